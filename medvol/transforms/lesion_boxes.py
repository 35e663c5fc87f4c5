"""Lesion boxes: per-slice boxes of lesions from a mask (connected components) or from a CSV (DeepLesion style).

Lesion boxes are float arrays ``(n, 6)``: ``[lesion_id, slice, x0, y0, x1, y1]``, in slice voxel coordinates
of the volume grid (``x`` along the first in-plane axis, see :mod:`medvol.transforms.slices`), half-open.
Rows sharing ``lesion_id`` are the cross-sections of one lesion. :class:`~medvol.transforms.RandLesionSliceViewsd`
draws its lesion views from them.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from medvol.errors import DataError
from medvol.transforms.slices import _check_int

__all__ = ["lesion_boxes_from_mask", "load_lesion_boxes", "as_lesion_boxes", "LesionBoxesd"]


def lesion_boxes_from_mask(mask, axis: int = 2, min_voxels: int = 1) -> np.ndarray:
    """Per-slice boxes of the 3D connected components (26-connectivity) of ``mask > 0``.

    Args:
        mask: ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` (any channel > 0 is lesion).
        axis: spatial axis sliced.
        min_voxels: components smaller than this are ignored (specks).

    Returns:
        ``(n, 6)`` float64 rows ``[lesion_id, slice, x0, y0, x1, y1]`` (ids 0.. in component order).
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    m = (m > 0).any(0) if m.ndim == 4 else m > 0
    if m.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z) or (C, X, Y, Z), got shape {tuple(np.shape(mask))}.")
    comps, _ = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())
    rows, lesion_id = [], 0
    for cid, region in enumerate(ndimage.find_objects(comps), start=1):
        if region is None or sizes[cid] < min_voxels:
            continue
        start = [s.start for s in region]
        sub = np.moveaxis(comps[region] == cid, axis, 0)  # (slices, h, w) of this component
        ox, oy = (start[i] for i in range(3) if i != axis)
        for k, plane in enumerate(sub):
            xs, ys = np.nonzero(plane.any(1))[0], np.nonzero(plane.any(0))[0]
            if xs.size:
                rows.append([lesion_id, start[axis] + k, ox + xs[0], oy + ys[0], ox + xs[-1] + 1, oy + ys[-1] + 1])
        lesion_id += 1
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


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


def as_lesion_boxes(boxes) -> np.ndarray:
    """``boxes`` as an ``(n, 6)`` float64 array; ``(n, 5)`` rows without ids get ids ``0..n-1`` (one lesion each).

    Raises:
        ValueError: for any other shape.
    """
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 6))
    if b.ndim != 2 or b.shape[1] not in (5, 6):
        raise ValueError(f"boxes must be (n, 6) [lesion_id, slice, x0, y0, x1, y1] or (n, 5), got {b.shape}.")
    return b if b.shape[1] == 6 else np.concatenate([np.arange(len(b))[:, None], b], 1)


class LesionBoxesd(MapTransform):
    """Compute the lesion boxes of a mask once (deterministic, so ``CacheDataset`` can keep them).

    Connected components cost ~0.05 s on a 120 x 126 x 164 mask and grow with the volume; run this before
    :class:`RandLesionSliceViewsd` (``label_key=None, boxes_key=boxes_key``) instead of labelling every draw.

    Args:
        keys: the lesion mask key (one key; any voxel > 0 is lesion).
        boxes_key: where the ``(n, 6)`` float64 boxes go.
        axis, min_voxels: as in :func:`lesion_boxes_from_mask`.
        remove_mask: delete the mask from the output (it is not needed once boxed).
        allow_missing_keys: skip samples without a mask (they get no boxes: lesion-free).
    """

    def __init__(self, keys: KeysCollection = "label", boxes_key: str = "boxes", axis: int = 2, min_voxels: int = 1,
                 remove_mask: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LesionBoxesd takes one mask key, got {self.keys!r}.")
        self.boxes_key, self.axis, self.remove_mask = boxes_key, axis, remove_mask
        self.min_voxels = _check_int("min_voxels", min_voxels, 1)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.boxes_key] = lesion_boxes_from_mask(d[key], self.axis, self.min_voxels)
            if self.remove_mask:
                del d[key]
        return d
