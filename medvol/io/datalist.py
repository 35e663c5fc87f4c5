"""Datalists (``[{"image": path, "label": path, ...}, ...]``, MONAI's format) from folders, MSD json and CSV.

Sources:

- a folder of volumes: every NIfTI / MetaImage / NRRD file and every DICOM series folder below it is one
  image. When the folder has an images/labels pair of sub-folders (``imagesTr``/``labelsTr``,
  ``images``/``labels``; nnU-Net and MSD layouts), images and labels are paired by name.
- an MSD ``dataset.json`` (``training``: image/label dicts, ``test``: image paths), paths relative to it.
- a CSV file with an ``image`` column, optional ``label`` and any other columns (kept as strings); relative
  paths are resolved against the CSV's folder.

Pairing by name: a volume's *case name* is its file name without the volume suffix and without an nnU-Net
channel suffix (``case_0000.nii.gz`` -> ``case``). A label without an image, an image without a label
(when the dataset has labels), or duplicate case names are errors that name the files involved.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path

from medvol.errors import ConfigError, DataError, MedvolError
from medvol.io.atomic import atomic_write_text
from medvol.io.dicom import DICOM_SUFFIXES, is_dicom_dir, is_dicom_file, list_series
from medvol.io.readers import check_volume, volume_suffix

logger = logging.getLogger(__name__)

__all__ = [
    "case_name",
    "find_volumes",
    "datalist_from_folder",
    "is_label_path",
    "datalist_from_msd",
    "datalist_from_csv",
    "load_datalist",
    "open_datalist",
    "image_datalist",
    "labeled_datalist",
    "filter_cases",
    "with_case_index",
    "check_datalist",
    "BAD_INPUTS_FILE",
    "IMAGE_LABEL_DIRS",
]


# (images sub-folder, labels sub-folder) layouts recognised by datalist_from_folder, in priority order
IMAGE_LABEL_DIRS = (("imagesTr", "labelsTr"), ("images", "labels"), ("imagesTs", "labelsTs"))
# nnU-Net's first-channel suffix. Only ``_0000``: a general ``_NNNN`` would merge ordinary numbered files
# (``amos_0001``, ``amos_0002`` -> ``amos``) into one case.
_CHANNEL_SUFFIX = re.compile(r"_0000$")


def case_name(path: str | os.PathLike) -> str:
    """Case name of a volume: the file name without its suffix and nnU-Net's ``_0000``, or the folder name."""
    name = Path(str(path).split("#", 1)[0]).name
    suffix = volume_suffix(name)
    if suffix:
        name = name[: -len(suffix)]
    elif Path(name).suffix.lower() in DICOM_SUFFIXES:
        name = Path(name).stem
    return _CHANNEL_SUFFIX.sub("", name)


def find_volumes(root: str | os.PathLike) -> list[str]:
    """All volumes below ``root`` in sorted order: volume files and DICOM series folders.

    Hidden files and folders are ignored; MetaImage ``.raw`` companions are not volumes of their own.

    Raises:
        DataError: when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "input folder does not exist" if not root.exists() else "not a folder")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        visible = sorted(f for f in filenames if not f.startswith("."))
        if any(is_dicom_file(here / f) for f in visible if volume_suffix(f) is None):
            series = list_series(here)
            # one volume per series; an unreadable folder stays listed so that loading reports why
            found.extend([f"{here}#{uid}" for uid in series] if len(series) > 1 else [str(here)])
        found.extend(str(here / f) for f in visible if volume_suffix(f) is not None)
    return sorted(found)


def _index_by_case(paths: list[str], role: str) -> dict[str, str]:
    index: dict[str, str] = {}
    for p in paths:
        name = case_name(p)
        if name in index:
            raise DataError(p, f"{role} case name '{name}' is also used by {index[name]}")
        index[name] = p
    return index


def _pair(images: list[str], labels: list[str], image_dir: Path, allow_unlabeled: bool) -> list[dict]:
    by_image = _index_by_case(images, "image")
    by_label = _index_by_case(labels, "label")
    for name, label in by_label.items():
        if name not in by_image:
            raise DataError(label, f"label has no matching image: expected an image named '{name}.*' in {image_dir}")
    datalist = []
    for name, image in by_image.items():
        item = {"image": image}
        if name in by_label:
            item["label"] = by_label[name]
        elif not allow_unlabeled:
            raise DataError(image, f"image has no matching label named '{name}.*' (pass allow_unlabeled=True "
                            "to keep unlabeled images)")
        datalist.append(item)
    return datalist


# Label maps found while walking a folder without an images/labels layout: a folder named like a label folder
# anywhere on the path (MSD / nnU-Net labelsTr, labels*, segmentations, masks, gt), or a file whose case name
# has a label token (TotalSegmentator's example_seg, aorta_label, *_mask, *_gt).
LABEL_DIR = re.compile(r"^(labels\w*|segmentations?|masks?|seg|gt|ground[_-]?truth)$", re.IGNORECASE)
LABEL_NAME = re.compile(r"(^|[_.-])(seg|segmentation|label|labels|mask|masks|gt)([_.-]|$)", re.IGNORECASE)
_IMAGE_TOKEN = re.compile(r"[_.-](image|img|ct|mr|mri|t1|t2)$", re.IGNORECASE)


def is_label_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """True for a volume that looks like a label map: in a label folder (below ``root``) or named like one."""
    path = Path(str(path).split("#", 1)[0])
    parts = path.relative_to(root).parts[:-1] if root is not None and path.is_relative_to(root) else path.parts[:-1]
    return any(LABEL_DIR.match(part) for part in parts) or bool(LABEL_NAME.search(case_name(path)))


def _label_base(name: str) -> str:
    """Case name of the image a label map belongs to: the label token removed (``breast1_label`` -> ``breast1``)."""
    return LABEL_NAME.sub(lambda m: m.group(1) if m.group(3) else "", name).strip("_.-")


def _layout_roots(root: Path) -> list[Path]:
    """Folders below ``root`` (not ``root`` itself) that hold an images/labels layout, outermost first."""
    found = []
    for image_sub, _ in IMAGE_LABEL_DIRS:
        for d in sorted(root.rglob(image_sub)):
            if d.is_dir() and not any(part.startswith(".") for part in d.relative_to(root).parts):
                found.append(d.parent)
    return sorted(set(found), key=lambda d: (len(d.parts), str(d)))


def datalist_from_folder(root: str | os.PathLike, allow_unlabeled: bool = False) -> list[dict]:
    """Datalist of every volume below ``root``; images and labels paired when an images/labels layout exists.

    Discovery: an images/labels layout at ``root`` (``imagesTr``/``labelsTr``, ...) pairs images with labels by
    case name. Without one, sub-folders that hold such a layout are paired the same way (unlabeled images
    kept), and every other volume is an image *unless it looks like a label map* (:func:`is_label_path`: a
    label folder on its path, or a label token in its name such as ``_seg``, ``_label``, ``_mask``): label maps
    are paired with the image of the same base name (``breast1_label`` -> ``breast1_image``) or left out. What
    was found is logged (images, labels, label maps left out), so a parent folder never trains on label maps.

    Args:
        root: folder of volumes (NIfTI, MetaImage, NRRD, DICOM series folders), searched recursively.
        allow_unlabeled: with an images/labels layout at ``root``, keep images that have no label instead of
            raising.

    Raises:
        DataError: missing folder, no volume found, unpaired label or image, duplicate case names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist" if not root.exists() else "not a folder")
    for image_sub, label_sub in IMAGE_LABEL_DIRS:
        image_dir, label_dir = root / image_sub, root / label_sub
        if image_dir.is_dir():
            images = find_volumes(image_dir)
            if not images:
                raise DataError(image_dir, "no volumes found (NIfTI, MetaImage, NRRD or DICOM series)")
            labels = find_volumes(label_dir) if label_dir.is_dir() else []
            datalist = _pair(images, labels, image_dir, allow_unlabeled=allow_unlabeled or not labels)
            _report(root, datalist, [])
            return datalist
    volumes = find_volumes(root)
    if not volumes:
        raise DataError(root, "no volumes found (NIfTI .nii/.nii.gz, MetaImage .mha/.mhd, NRRD, DICOM series)")
    datalist: list[dict] = []
    done: list[Path] = []
    for sub in _layout_roots(root):  # outermost first; a dataset inside a paired one is already paired
        if not any(sub.is_relative_to(d) for d in done):
            datalist += datalist_from_folder(sub, allow_unlabeled=True)
            done.append(sub)
    claimed = {d[k] for d in datalist for k in ("image", "label") if k in d}
    rest = [v for v in volumes if v not in claimed]
    is_label = {v: is_label_path(v, root) for v in rest}
    images = [v for v in rest if not is_label[v]]
    labels = [v for v in rest if is_label[v]]
    by_image: dict[str, list[str]] = {}
    for v in images:
        name = case_name(v)
        for key in {name, _IMAGE_TOKEN.sub("", name)}:
            by_image.setdefault(key, []).append(v)
    items = {v: {"image": v} for v in images}
    left_out = []
    for lab in labels:
        match = by_image.get(_label_base(case_name(lab)), [])
        if len(match) == 1 and "label" not in items[match[0]]:
            items[match[0]]["label"] = lab
        else:
            left_out.append(lab)
    datalist += [items[v] for v in images]
    if not datalist:
        raise DataError(root, f"no images found: all {len(labels)} volumes look like label maps "
                        f"(e.g. {labels[0]}); point at the images folder")
    _report(root, datalist, left_out)
    return datalist


def _report(root: Path, datalist: list[dict], left_out: list[str]) -> None:
    n_labels = sum("label" in d for d in datalist)
    message = f"{root}: {len(datalist)} images, {n_labels} with a label"
    if left_out:
        message += (f"; {len(left_out)} label maps left out as images (label folder or _seg/_label/_mask name, "
                    f"no image of the same name), e.g. {left_out[0]}")
        logger.warning(message)
    else:
        logger.info(message)


def _resolve(base: Path, value: str, source: Path, column: str, missing_ok: bool = False) -> str:
    value = value.strip()
    path = Path(value.split("#", 1)[0])
    full = path if path.is_absolute() else (base / path)
    if not missing_ok and not full.exists():
        raise DataError(source, f"{column} '{value}' does not exist (resolved to {full})")
    return os.path.normpath(str(full)) + (("#" + value.split("#", 1)[1]) if "#" in value else "")


def datalist_from_msd(dataset_json: str | os.PathLike, section: str = "training",
                      missing_ok: bool = False) -> list[dict]:
    """Datalist from a Medical Segmentation Decathlon ``dataset.json``.

    Args:
        dataset_json: path of the json file; its paths are relative to its folder.
        section: ``"training"`` (image/label pairs), ``"test"`` (images) or another list in the file.
        missing_ok: keep entries whose files do not exist (a batch command fails them one by one) instead of
            raising.

    Raises:
        DataError: unreadable json, missing section, or a listed file that does not exist (named).
    """
    path = Path(dataset_json)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read MSD dataset.json ({e})") from e
    if section not in meta or not isinstance(meta[section], list):
        raise DataError(path, f"no list '{section}' in dataset.json (keys: {', '.join(meta)})")
    datalist = []
    for entry in meta[section]:
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)
        for key in ("image", "label"):
            if key in entry:
                entry[key] = _resolve(path.parent, entry[key], path, key, missing_ok)
        datalist.append(entry)
    if not datalist:
        raise DataError(path, f"section '{section}' is empty")
    return datalist


def datalist_from_csv(csv_path: str | os.PathLike, image_column: str = "image",
                      label_column: str = "label", missing_ok: bool = False) -> list[dict]:
    """Datalist from a CSV with an image column, optional label column and any other columns.

    Other columns are kept as strings (e.g. ``age``, ``sex``); an empty label cell means "unlabeled".
    ``missing_ok`` keeps rows whose files do not exist (a batch command fails them one by one).

    Raises:
        DataError: unreadable CSV, no image column, empty file, or a path that does not exist (row named).
    """
    path = Path(csv_path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot read CSV ({e})") from e
    if not rows:
        raise DataError(path, "CSV has no rows")
    if image_column not in rows[0]:
        raise DataError(path, f"CSV has no '{image_column}' column (columns: {', '.join(rows[0])})")
    datalist = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        item = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
        if not item[image_column].strip():
            raise DataError(path, f"line {i}: empty '{image_column}'")
        item["image"] = _resolve(path.parent, item.pop(image_column), path, f"line {i} image", missing_ok)
        label = item.pop(label_column, "")
        if label and label.strip():
            item["label"] = _resolve(path.parent, label, path, f"line {i} label", missing_ok)
        datalist.append(item)
    return datalist


def load_datalist(source: str | os.PathLike, **kwargs) -> list[dict]:
    """Datalist from a folder, an MSD ``dataset.json`` (any ``.json``) or a ``.csv`` file.

    ``kwargs`` go to the matching function (e.g. ``allow_unlabeled``, ``section``, ``image_column``).
    """
    path = Path(source)
    if path.is_dir() or (not path.exists() and not path.suffix):
        if is_dicom_dir(path):
            return [{"image": str(path)}]
        return datalist_from_folder(path, **kwargs)
    if path.suffix.lower() == ".json":
        return datalist_from_msd(path, **kwargs)
    if path.suffix.lower() == ".csv":
        return datalist_from_csv(path, **kwargs)
    raise DataError(path, "expected a folder, an MSD dataset.json or a .csv datalist")


# ------------------------------------------------------------------ datalists named by a config key (bundles)


def open_datalist(source, name: str = "dataset_dir", allow_unlabeled: bool = False) -> list[dict]:
    """:func:`load_datalist` for a config key: errors become one-line ConfigErrors that name the key.

    Args:
        source: the dataset folder or datalist file (``None`` / ``""`` is "not set").
        name: config key reported in errors.
        allow_unlabeled: for a folder, keep images without a label (ignored for json/csv sources).

    Raises:
        ConfigError: the key is not set, the path does not exist, or the datalist is invalid.
    """
    if source is None or str(source).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} FOLDER")
    path = Path(str(source))
    if not path.exists():
        raise ConfigError(f"{name} '{source}' does not exist")
    kwargs = {"allow_unlabeled": True} if allow_unlabeled and path.is_dir() else {}
    try:
        return load_datalist(path, **kwargs)
    except MedvolError as e:
        raise ConfigError(f"{name}: {e}") from e


def filter_cases(datalist: list[dict], cases, name: str = "dataset_dir") -> list[dict]:
    """The items of ``datalist`` whose case names are ``cases``, in that order (``None`` keeps all).

    Raises:
        ConfigError: when a case of ``cases`` is not in the datalist (the count and an example are named).
    """
    if cases is None:
        return list(datalist)
    by_case = {case_name(d["image"]): d for d in datalist}
    missing = [c for c in cases if c not in by_case]
    if missing:
        raise ConfigError(f"{name}: {len(missing)} cases of the split are not in the dataset, e.g. {missing[0]}")
    return [by_case[c] for c in cases]


def with_case_index(datalist: list[dict]) -> list[dict]:
    """Add ``case_index`` (position in the datalist) so crops of one volume can be told apart in a batch."""
    return [{**d, "case_index": i} for i, d in enumerate(datalist)]


def image_datalist(source, name: str = "dataset_dir", cases=None) -> list[dict]:
    """Images of a folder / MSD json / CSV for self-supervised training (labels dropped), with ``case_index``.

    Args:
        source: the dataset folder or datalist file.
        name: config key reported in errors.
        cases: optional list of case names to keep (e.g. the pretraining part of a fixed split).
    """
    datalist = [{"image": d["image"]} for d in open_datalist(source, name, allow_unlabeled=True)]
    return with_case_index(filter_cases(datalist, cases, name))


def labeled_datalist(source, name: str = "dataset_dir", cases=None) -> list[dict]:
    """Image/label pairs (every image must have a label) for supervised training or evaluation.

    Raises:
        ConfigError: when an image has no label, or as :func:`open_datalist` / :func:`filter_cases`.
    """
    datalist = open_datalist(source, name)
    unlabeled = [d["image"] for d in datalist if "label" not in d]
    if unlabeled:
        raise ConfigError(f"{name}: {len(unlabeled)} images have no label, e.g. {unlabeled[0]}")
    return filter_cases(datalist, cases, name)


# ------------------------------------------------------------------ up-front checks of a training datalist

BAD_INPUTS_FILE = "bad_inputs.csv"


def check_datalist(datalist: list[dict], skip_bad: bool = False, report_dir=None, keys=("image", "label"),
                   full: bool = False, name: str = "dataset_dir", max_listed: int = 20) -> list[dict]:
    """Check every file of a datalist before training and report *all* bad ones at once.

    A training run otherwise stops at the first unreadable file it meets (often after minutes of caching),
    naming only that one. Each entry's ``keys`` (``image``, ``label``; missing keys are skipped) is checked with
    :func:`medvol.io.check_volume`: headers only by default (fast: exists, not empty, a readable 3D header, no
    zero-size axis, complete DICOM series), the voxels too with ``full=True`` (truncated ``.nii.gz``, NaN).

    Args:
        datalist: MONAI datalist (``[{"image": ..., "label": ...}, ...]``).
        skip_bad: drop the entries with a bad file and go on (a warning per file) instead of stopping.
        report_dir: when given, the bad files are written to ``report_dir/bad_inputs.csv`` (``key,path,problem``)
            in either case; a clean check removes a stale list.
        keys: the entry keys holding paths.
        full: read the voxels, not only the headers.
        name: config key reported in errors.
        max_listed: bad files spelled out in the error (the report file has all of them).

    Returns:
        The datalist (without the bad entries when ``skip_bad``; ``case_index`` renumbered if present).

    Raises:
        ConfigError: some files are bad and ``skip_bad`` is False (one line per bad file), or every entry is bad.

    Example (a bundle's ``datalist``, with a ``"skip_bad_inputs": false`` key beside it)::

        "datalist": "$medvol.io.check_datalist(medvol.io.image_datalist(@dataset_dir),
                     skip_bad=@skip_bad_inputs, report_dir=@output_dir)"
    """
    bad: list[tuple[str, str, str]] = []
    kept = []
    for item in datalist:
        problems = []
        for key in keys:
            if not item.get(key):
                continue
            try:
                check_volume(item[key], full=full)
            except DataError as e:
                problems.append((key, str(item[key]), e.problem))
            except MedvolError as e:
                problems.append((key, str(item[key]), " ".join(str(e).split())))
        bad.extend(problems)
        if not problems:
            kept.append(item)
    report = None
    if report_dir is not None:
        report = Path(report_dir) / BAD_INPUTS_FILE
        if bad:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["key", "path", "problem"])
            writer.writerows(bad)
            atomic_write_text(report, buf.getvalue())
        elif report.is_file():
            report.unlink()
    if not bad:
        return list(datalist)
    where = f"; all listed in {report}" if report is not None else ""
    lines = [f"  {path}: {problem}" for _, path, problem in bad[:max_listed]]
    if len(bad) > max_listed:
        lines.append(f"  ... and {len(bad) - max_listed} more")
    if not kept:
        raise ConfigError(f"{name}: none of the {len(datalist)} entries is usable{where}:\n" + "\n".join(lines))
    if not skip_bad:
        raise ConfigError(f"{name}: {len(bad)} of the datalist's files cannot be used (checked before training; "
                          f"skip_bad=True trains without them){where}:\n" + "\n".join(lines))
    for _, path, problem in bad:
        logger.warning(f"skipping {path}: {problem}")
    logger.warning(f"{name}: skipped {len(datalist) - len(kept)} of {len(datalist)} entries with bad files{where}")
    return with_case_index(kept) if any("case_index" in d for d in kept) else kept
