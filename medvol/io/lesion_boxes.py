"""Lesion boxes for LeCL: a CSV of boxes (DeepLesion style) per case, and datalists that carry them.

Lesion boxes are float arrays ``(n, 6)``: ``[lesion_id, slice, x0, y0, x1, y1]``, in slice voxel coordinates
of the volume grid (``x`` along the first in-plane axis, see :mod:`medvol.transforms.slices`), half-open.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError, DataError, MedvolError
from medvol.io.datalist import case_name, filter_cases, open_datalist, with_case_index

__all__ = ["load_lesion_boxes", "lesion_datalist"]


def load_lesion_boxes(csv_path: str | os.PathLike, case_column: str = "case", slice_column: str = "slice",
                      box_columns: str | Sequence[str] = ("x1", "y1", "x2", "y2"), slice_base: int = 0,
                      transpose_xy: bool = False, case_fn: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """Read lesion boxes from a CSV into one ``(n, 6)`` array per case (each row = one lesion).

    Args:
        csv_path: CSV file with a header row.
        case_column: column naming the volume (e.g. its file name).
        slice_column: column with the slice index along the sliced axis.
        box_columns: four columns ``x1, y1, x2, y2``, or one column holding the four numbers
            (DeepLesion's ``Bounding_boxes``: ``"x1, y1, x2, y2"``).
        slice_base: index of the first slice in the CSV (1 for 1-based indices).
        transpose_xy: swap x and y (the CSV's x is the column of a row-major image, our x the first array axis).
        case_fn: maps the case cell to the dictionary key (e.g. strip a folder); ``None`` keeps it.

    Returns:
        ``{case: array (n, 6)}`` with rows ``[lesion_id, slice, x0, y0, x1, y1]``.

    Raises:
        DataError: unreadable file, missing columns, a non-numeric value or an empty box (names file and row).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:  # a DeepLesion-style CSV with 1-based slice indices
        ...     csv_path = os.path.join(folder, "DL_info.csv")
        ...     with open(csv_path, "w") as f:
        ...         _ = f.write('File_name,Key_slice_index,Bounding_boxes\\ncase_1.nii.gz,12,"30.5, 40, 52, 61"\\n')
        ...     boxes = load_lesion_boxes(csv_path, case_column="File_name", slice_column="Key_slice_index",
        ...                               box_columns="Bounding_boxes", slice_base=1)
        >>> boxes["case_1.nii.gz"].tolist()
        [[0.0, 11.0, 30.5, 40.0, 52.0, 61.0]]
    """
    path = os.fspath(csv_path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot read the lesion box CSV ({e})") from e
    cols = [box_columns] if isinstance(box_columns, str) else list(box_columns)
    if len(cols) not in (1, 4):
        raise ValueError(f"box_columns must be one column name or four, got {box_columns!r}.")
    missing = [c for c in (case_column, slice_column, *cols) if c not in header]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'no rows'}")
    out: dict[str, list] = {}
    for line, row in enumerate(rows, start=2):
        try:
            cells = re.split(r"[,;\s]+", row[cols[0]].strip()) if len(cols) == 1 else [row[c] for c in cols]
            x0, y0, x1, y1 = (float(v) for v in cells)
            z = int(float(row[slice_column])) - slice_base
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(path, f"row {line}: expected a slice index and four box numbers ({e})") from e
        if transpose_xy:
            x0, y0, x1, y1 = y0, x0, y1, x1
        if not (x1 > x0 and y1 > y0) or z < 0:
            raise DataError(path, f"row {line}: empty box {[x0, y0, x1, y1]} or negative slice {z}")
        case = row[case_column] if case_fn is None else case_fn(row[case_column])
        lesions = out.setdefault(case, [])
        lesions.append([len(lesions), z, x0, y0, x1, y1])  # each row is its own lesion
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _match_boxes(image: str, boxes: dict[str, np.ndarray]):
    for key in (case_name(image), Path(image.split("#", 1)[0]).name):
        if key in boxes:
            return key
    return None


def lesion_datalist(source, lesion_boxes_csv: str | os.PathLike | None = None, lesion_boxes_options: dict | None = None,
                  cases: Sequence[str] | None = None, name: str = "dataset_dir") -> list[dict]:
    """Training datalist: images, their lesion masks (``label``) where the dataset pairs them, or CSV boxes.

    Args:
        source: folder (``imagesTr``/``labelsTr`` layouts pair masks by name; unlabeled images are kept), MSD
            ``dataset.json`` or CSV datalist (its ``label`` column is the lesion mask, empty = no lesion).
        lesion_boxes_csv: CSV of lesion boxes (:func:`load_lesion_boxes`), matched to images by
            case name or file name; when given, masks are ignored and images without rows are lesion-free. Boxes
            are in voxel coordinates of the preprocessed grid (RAS orientation, ``spacing``).
        lesion_boxes_options: arguments of ``load_lesion_boxes`` (``case_column``, ``slice_column``, ...).
        cases: keep only these case names (e.g. the pretraining part of a split file).
        name: config key named in errors.

    Returns:
        ``[{"image", ["label"] | ["boxes"], "case_index"}, ...]``.

    Raises:
        ConfigError: missing/empty dataset, unreadable box CSV, no box row matching any image, unknown cases.
    """
    items = open_datalist(source, name, allow_unlabeled=True)
    datalist = filter_cases([{k: d[k] for k in ("image", "label") if d.get(k)} for d in items], cases, name)
    if lesion_boxes_csv not in (None, "", "None"):
        try:
            boxes = load_lesion_boxes(lesion_boxes_csv, **(lesion_boxes_options or {}))
        except MedvolError as e:
            raise ConfigError(f"lesion_boxes_csv: {e}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lesion_boxes_options: {e}") from e
        matched = 0
        for d in datalist:
            d.pop("label", None)
            key = _match_boxes(d["image"], boxes)
            if key is not None:
                d["boxes"] = boxes[key]
                matched += 1
        if boxes and not matched:
            raise ConfigError(f"lesion_boxes_csv '{lesion_boxes_csv}': none of its cases ({', '.join(list(boxes)[:3])}"
                              f", ...) names an image of {name} (match by case name or file name)")
    return with_case_index(datalist)
