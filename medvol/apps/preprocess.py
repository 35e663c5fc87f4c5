"""``medvol preprocess``: a folder (or MSD json / CSV) of CT or MRI volumes -> preprocessed NIfTI + manifest.

Outputs mirror the input tree: ``INPUT/a/b/case.nrrd`` -> ``OUTPUT/a/b/case.nii.gz``, a DICOM series folder
``INPUT/s1`` -> ``OUTPUT/s1.nii.gz``; labels (paired by the datalist) go to their own mirrored path and the
manifest's ``label_output`` column. Paths are mirrored as given (symbolic links are not followed, so a link
loop fails its own input when it is read, not the run); an input whose output name cannot be formed (e.g. a
CSV row ``folder#../../x``) fails alone, and no output is ever placed outside ``OUTPUT``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medvol.engines.batch import Job, is_inside
from medvol.errors import DataError, one_line
from medvol.io.atomic import save_nifti
from medvol.io.datalist import case_name
from medvol.io.dicom import is_series_uid, split_series_ref
from medvol.io.readers import LoadVolume, volume_suffix

__all__ = ["output_relpath", "build_jobs", "PreprocessProcessor", "describe_nifti"]


def output_relpath(source: str, root: Path) -> Path:
    """Output path (relative) of ``source`` below ``root``, with a ``.nii.gz`` suffix.

    The path is taken as given (absolute, normalised, symbolic links not followed); a source outside ``root``
    (or ``root`` itself, a DICOM folder given as INPUT) keeps only its name.

    Raises:
        DataError: when the series UID of ``FOLDER#UID`` is not a UID (e.g. ``../../x``).
    """
    folder, uid = split_series_ref(source)
    if uid is not None and not is_series_uid(uid):
        raise DataError(source, f"'{uid}' after '#' is not a DICOM Series Instance UID (digits and dots)")
    path = Path(os.path.abspath(folder))
    try:
        rel = path.relative_to(os.path.abspath(root))
    except ValueError:
        rel = Path(path.name)
    if not rel.name:  # the source is root itself
        rel = Path(path.name)
    name = rel.name
    suffix = volume_suffix(name)
    stem = name[: -len(suffix)] if suffix else name
    if uid:
        stem = f"{stem}_{uid}"
    return rel.with_name(stem + ".nii.gz")


def build_jobs(datalist: list[dict], root: Path, output_dir: Path) -> list[Job]:
    """One job per datalist entry; entries whose output paths collide are failed up front (both named), and so
    are entries whose output path cannot be formed or would leave ``output_dir`` (the reason names the file)."""
    jobs, owners = [], {}
    for item in datalist:
        try:
            outputs = {"output": output_dir / output_relpath(item["image"], root)}
            if item.get("label"):
                outputs["label_output"] = output_dir / output_relpath(item["label"], root)
            for path in outputs.values():
                if not is_inside(path, output_dir):
                    raise DataError(item["image"], f"its output {path} would lie outside {output_dir}")
        except Exception as e:  # noqa: BLE001 - one odd entry fails alone; the run goes on
            error = str(e) if isinstance(e, DataError) else f"{item['image']}: {type(e).__name__}: {one_line(e)}"
            jobs.append(Job(source=item["image"], item=item, error=error))
            continue
        job = Job(source=item["image"], item=item, outputs=outputs)
        for path in outputs.values():
            if path in owners:
                job.error = f"{item['image']}: output {path} would overwrite the output of {owners[path]}; rename one"
            owners.setdefault(path, item["image"])
        jobs.append(job)
    return jobs


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def describe_nifti(path: str | os.PathLike) -> dict:
    """Shape and spacing of an existing NIfTI output (header only)."""
    img = nib.load(str(path))
    return {"shape": tuple(int(s) for s in img.shape[:3]), "spacing": _spacing(img.affine)}


class PreprocessProcessor:
    """Apply a CT/MRI preset to one datalist entry and write image (and label) NIfTI atomically.

    The MONAI ``Compose`` is built lazily in each worker process (it holds no state between volumes).

    Args:
        preset: ``"ct"`` or ``"mri"``.
        preset_kwargs: arguments of the preset function (spacing, size, n4, window, ...).
    """

    def __init__(self, preset: str, **preset_kwargs):
        self.preset = preset
        self.preset_kwargs = preset_kwargs
        self._transform = None

    def __getstate__(self):
        return {"preset": self.preset, "preset_kwargs": self.preset_kwargs, "_transform": None}

    @property
    def transform(self):
        if self._transform is None:
            from medvol.transforms.presets import get_preset

            self._transform = get_preset(self.preset, keys=("image", "label"), **self.preset_kwargs)
        return self._transform

    def __call__(self, job: Job) -> dict:
        data = {"image": job.item["image"]}
        if job.item.get("label"):
            data["label"] = job.item["label"]
        out = self.transform(data)
        image = out["image"]
        save_nifti(image, image.affine, job.outputs["output"], dtype=np.float32)
        if "label" in out:
            label = np.rint(out["label"].detach().cpu().numpy()[0])
            dtype = np.uint8 if label.min() >= 0 and label.max() < 256 else np.int16
            save_nifti(label, out["label"].affine, job.outputs["label_output"], dtype=dtype)
        row = {"shape": tuple(image.shape[1:]), "spacing": _spacing(image.affine.numpy()),
               "case": case_name(job.source)}
        note = image.meta.get("medvol_note") if hasattr(image, "meta") else None
        return {**row, "note": note} if note else row

    def describe(self, job: Job) -> dict:
        return {**describe_nifti(job.outputs["output"]), "case": case_name(job.source)}

    def verify(self, job: Job) -> None:
        """Read every existing output back completely (gzip CRC, data size); raises DataError if one is damaged."""
        reader = LoadVolume(dtype=None, ensure_channel_first=False)
        for path in job.outputs.values():
            reader(str(path))
