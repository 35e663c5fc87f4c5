"""Lesion-aware 2.5D view pairs for LeCL (CLEAR) pretraining.

CLEAR (KatherLab/CLEAR, "lesion-enhanced contrastive learning") pairs, for a slice with a lesion, a crop around
the lesion with the whole slice; other slices give two random-resized crops. This module does the same on 3D
volumes: lesions come from a label mask or from precomputed lesion boxes (:mod:`medvol.transforms.lesion_boxes`,
from a mask or a CSV); the crop is centred on the lesion *box centre* plus a bounded jitter (CLEAR's code
centres it on the box corner ``(x1, y2)``, which we do not reproduce). The views' intensity augmentation is
:func:`medvol.transforms.lecl_view_augmentation`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import TransformBackends

from medvol.transforms.lesion_boxes import as_lesion_boxes, lesion_boxes_from_mask
from medvol.transforms.slices import (
    _as_volume,
    _check_int,
    _check_size,
    check_windows,
    crop_resize,
    fit_box,
    render_slices,
    slice_pad_value,
)

__all__ = ["RandLesionSliceViewsd"]


class RandLesionSliceViewsd(Randomizable, MapTransform):
    """Two 2D views of one slice: a lesion pair (crop centred on a lesion, whole slice) or two random crops.

    With probability ``lesion_prob``, and only if the volume has lesions, a lesion is drawn uniformly, then one
    of its slices; view 1 is a crop whose sides are drawn in ``crop_size_range`` x the slice side (enlarged so
    the lesion box fits despite the jitter: side >= box side / (1 - 2 jitter)), centred on the box centre +
    ``U(-jitter, jitter)`` x side; view 2 is the whole slice. Otherwise a slice is drawn uniformly and both
    views are RandomResizedCrop draws (area ``scale``, aspect ``ratio`` = w / h). Crops reaching outside the
    slice are padded with the volume minimum. Each view is resized to ``spatial_size`` (stretched; the whole
    slice keeps its aspect when ``keep_aspect``).

    Writes ``{key}{suffix}`` ``(C, H, W)`` per key and suffix, ``is_lesion`` (0-dim bool), ``box{suffix}``
    (long ``[x0, y0, x1, y1]`` actually cropped, slice voxel coords), ``lesion_box`` (float box, NaN without
    lesion) and ``slice_index``. With ``remove_source`` the volumes, label and boxes are removed so the
    samples collate into batches.

    Args:
        keys: image volumes ``(C_in, X, Y, Z)`` on one grid (the same draw for all).
        label_key: lesion mask (any voxel > 0), or ``None``.
        boxes_key: lesion boxes (see :mod:`medvol.transforms.lesion_boxes`; ``(n, 5)`` without ids also works),
            or ``None``; used instead of ``label_key`` when present in the data.
        lesion_prob: probability of a lesion pair when the volume has lesions.
        spatial_size: view size ``(H, W)``; ``None`` keeps each crop's own size (for inspection: views of
            different sizes do not batch).
        crop_size_range: lesion crop side as a fraction of the slice side (drawn per side).
        jitter: crop centre offset bound, as a fraction of the crop side, in ``[0, 0.5)``.
        context, windows, axis, keep_aspect: as in :class:`~medvol.transforms.VolumeToSlices`.
        scale, ratio: RandomResizedCrop area fraction and aspect ranges for non-lesion pairs.
        min_lesion_voxels: mask components smaller than this are ignored.
        suffixes: view name suffixes.
        remove_source: delete ``keys``, ``label_key`` and ``boxes_key`` from the output.
        allow_missing_keys: skip absent image keys; an absent label/boxes key then means "no lesion".

    Raises:
        ValueError: for bad arguments, or a label/boxes that do not fit the image.
        KeyError: when the label/boxes key is absent and ``allow_missing_keys`` is False.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = "label", boxes_key: str | None = None,
                 lesion_prob: float = 0.5, spatial_size: Sequence[int] | None = (224, 224),
                 crop_size_range: tuple[float, float] = (0.3, 0.9), jitter: float = 0.1, context: int = 1,
                 windows=None, axis: int = 2, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), keep_aspect: bool = True, min_lesion_voxels: int = 1,
                 suffixes: tuple[str, str] = ("_v1", "_v2"), remove_source: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if label_key is None and boxes_key is None:
            raise ValueError("give label_key (a lesion mask) or boxes_key (lesion boxes), or both.")
        if not 0.0 <= lesion_prob <= 1.0:
            raise ValueError(f"lesion_prob must be in [0, 1], got {lesion_prob!r}.")
        lo, hi = crop_size_range
        if not 0 < lo <= hi:
            raise ValueError(f"crop_size_range must satisfy 0 < low <= high, got {crop_size_range!r}.")
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"jitter must be in [0, 0.5), got {jitter!r}.")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale must be in (0, 1] and increasing, ratio positive and increasing; got {scale!r}, "
                             f"{ratio!r}.")
        if axis not in (0, 1, 2) or len(suffixes) != 2 or suffixes[0] == suffixes[1]:
            raise ValueError(f"axis must be 0, 1 or 2 and suffixes two distinct strings; got {axis!r}, {suffixes!r}.")
        self.label_key, self.boxes_key, self.lesion_prob = label_key, boxes_key, float(lesion_prob)
        self.spatial_size = _check_size(spatial_size)
        self.crop_size_range, self.jitter = (float(lo), float(hi)), float(jitter)
        self.context, self.windows = _check_int("context", context, 0), check_windows(windows)
        self.axis, self.scale, self.ratio, self.keep_aspect = axis, tuple(scale), tuple(ratio), keep_aspect
        self.min_lesion_voxels = _check_int("min_lesion_voxels", min_lesion_voxels, 1)
        self.suffixes, self.remove_source = tuple(suffixes), remove_source
        self._draw: tuple | None = None

    def lesion_boxes(self, d: Mapping, shape: Sequence[int]) -> np.ndarray:
        """The ``(n, 6)`` lesion boxes of sample ``d`` whose image has spatial ``shape`` (X, Y, Z)."""
        if self.boxes_key is not None and self.boxes_key in d:
            boxes = as_lesion_boxes(d[self.boxes_key])
        elif self.label_key is not None and self.label_key in d:
            label = _as_volume(d[self.label_key], str(self.label_key))
            if tuple(label.shape[1:]) != tuple(shape):
                raise ValueError(f"{self.label_key!r} has spatial shape {tuple(label.shape[1:])}, the image "
                                 f"{tuple(shape)}; they must share the voxel grid.")
            return lesion_boxes_from_mask(label, self.axis, self.min_lesion_voxels)
        elif self.allow_missing_keys:
            return np.zeros((0, 6))
        else:
            raise KeyError(f"neither {self.boxes_key!r} nor {self.label_key!r} is in the data; set "
                           "allow_missing_keys=True to treat such volumes as lesion-free.")
        n_slices = shape[self.axis]
        bad = (boxes[:, 1] < 0) | (boxes[:, 1] >= n_slices)
        if bad.any():
            raise ValueError(f"lesion box slice {int(boxes[bad][0, 1])} is outside the {n_slices} slices.")
        return boxes

    def randomize(self, data) -> None:
        """Draw the pair for a volume: ``data = (spatial shape (X, Y, Z), boxes (n, 6))``."""
        shape, boxes = data
        n_slices = shape[self.axis]
        h, w = (s for i, s in enumerate(shape) if i != self.axis)
        lesion = self.R.rand() < self.lesion_prob and len(boxes) > 0
        if lesion:
            ids = np.unique(boxes[:, 0])
            rows = boxes[boxes[:, 0] == ids[self.R.randint(len(ids))]]
            row = rows[self.R.randint(len(rows))]
            z, lesion_box = int(row[1]), tuple(float(v) for v in row[2:6])
            box1 = self._lesion_crop(h, w, lesion_box)
            box2 = fit_box(h, w, self.spatial_size, self.keep_aspect)
        else:
            z, lesion_box = int(self.R.randint(n_slices)), (math.nan,) * 4
            box1, box2 = self._random_resized_crop(h, w), self._random_resized_crop(h, w)
        self._draw = (bool(lesion), z, lesion_box, box1, box2)

    def _lesion_crop(self, h: int, w: int, box: tuple[float, ...]) -> tuple[int, ...]:
        out = []
        for side, lo_edge, hi_edge in ((h, box[0], box[2]), (w, box[1], box[3])):
            size = self.R.uniform(*self.crop_size_range) * side
            size = max(size, (hi_edge - lo_edge) / (1.0 - 2.0 * self.jitter), 1.0)  # the box fits after jitter
            centre = (lo_edge + hi_edge) / 2 + self.R.uniform(-self.jitter, self.jitter) * size
            out.append((math.floor(centre - size / 2), math.ceil(centre + size / 2)))
        (x0, x1), (y0, y1) = out
        return (x0, y0, x1, y1)

    def _random_resized_crop(self, h: int, w: int) -> tuple[int, ...]:
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = h * w * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_ratio))  # w / h
            ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if 0 < ch <= h and 0 < cw <= w:
                x0, y0 = self.R.randint(0, h - ch + 1), self.R.randint(0, w - cw + 1)
                return (x0, y0, x0 + ch, y0 + cw)
        aspect = min(max(w / h, self.ratio[0]), self.ratio[1])  # fallback: central crop of a valid aspect
        ch, cw = (h, min(w, round(h * aspect))) if w / h >= aspect else (min(h, round(w / aspect)), w)
        x0, y0 = (h - ch) // 2, (w - cw) // 2
        return (x0, y0, x0 + ch, y0 + cw)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        vols = {k: _as_volume(d[k], str(k)) for k in keys}
        shape = tuple(vols[keys[0]].shape[1:])
        for k, v in vols.items():
            if tuple(v.shape[1:]) != shape:
                raise ValueError(f"{k!r} has spatial shape {tuple(v.shape[1:])}, {keys[0]!r} {shape}.")
        self.randomize((shape, self.lesion_boxes(d, shape)))
        lesion, z, lesion_box, box1, box2 = self._draw
        for k, vol in vols.items():
            sample = render_slices(vol, [z], self.axis, self.context, self.windows)  # (1, C, h, w)
            pad = slice_pad_value(vol, self.context, self.windows)
            for suffix, box in zip(self.suffixes, (box1, box2)):
                d[f"{k}{suffix}"] = crop_resize(sample, box, self.spatial_size, "bilinear", pad)[0]
        for suffix, box in zip(self.suffixes, (box1, box2)):
            d[f"box{suffix}"] = torch.tensor(box, dtype=torch.long)
        d["is_lesion"] = torch.tensor(lesion)
        d["lesion_box"] = torch.tensor(lesion_box, dtype=torch.float32)
        d["slice_index"] = torch.tensor(z)
        if self.remove_source:
            for k in (*keys, self.label_key, self.boxes_key):
                d.pop(k, None)
        return d
