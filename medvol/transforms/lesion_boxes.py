"""Lesion boxes: per-slice boxes of lesions from a mask (connected components); CSV boxes: medvol.io.lesion_boxes.

Lesion boxes are float arrays ``(n, 6)``: ``[lesion_id, slice, x0, y0, x1, y1]``, in slice voxel coordinates
of the volume grid (``x`` along the first in-plane axis, see :mod:`medvol.transforms.slices`), half-open.
Rows sharing ``lesion_id`` are the cross-sections of one lesion. :class:`~medvol.transforms.RandLesionSliceViewsd`
draws its lesion views from them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from medvol.transforms.slices import _check_int

__all__ = ["lesion_boxes_from_mask", "as_lesion_boxes", "LesionBoxesd"]


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
