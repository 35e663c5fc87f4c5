"""Self-supervised views of a 3D volume that remember where they came from.

- :class:`RandCropPair` / :class:`RandCropPaird`: two random sub-volumes (random size per axis, optional
  minimum IoU between them), each resized to ``roi_size``, with their boxes in source voxel coordinates, so
  losses can align the overlap of the two views (:mod:`medvol.transforms.geometry`).
- :class:`RandPartitionCropd`: one crop per slice partition (equal parts along an axis) with its partition
  index and normalised position, so positives can be the same partition of different volumes (Chaitanya et
  al. 2020, G^D strategy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep

from medvol.transforms.geometry import box_iou

__all__ = ["RandCropPair", "RandCropPaird", "RandPartitionCropd"]


def _plain(img) -> torch.Tensor:
    """Views are training tensors: drop MetaTensor metadata (collating crops with different metadata fails)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def _crop_resize(img: torch.Tensor, box: np.ndarray, roi_size, mode: str) -> torch.Tensor:
    x = _plain(img)
    slices = tuple(slice(int(s), int(e)) for s, e in zip(box[0], box[1]))
    sub = x[(slice(None), *slices)].float()[None]  # (1, C, *crop)
    if tuple(sub.shape[2:]) != tuple(roi_size):
        sub = F.interpolate(sub, size=tuple(roi_size), mode=mode,
                            **({"align_corners": False} if mode != "nearest" else {}))
    out = sub[0]
    return out.to(x.dtype) if not x.is_floating_point() else out


class RandCropPair(Randomizable):
    """Draw two random crops of a (C, *spatial) volume and resize both to ``roi_size``.

    Each crop's side along axis d is ``round(f * size_d)`` with ``f ~ U(scale_range)`` drawn per axis, and its
    position is uniform. With ``min_iou`` the pair is redrawn (up to ``max_tries``) until the boxes overlap at
    least that much; otherwise the most overlapping draw is kept.

    Args:
        roi_size: output size of both views.
        scale_range: (min, max) fraction of the volume size per axis.
        min_iou: minimum IoU between the two boxes (None = no constraint).
        max_tries: draws before giving up on ``min_iou``.
        mode: interpolation for resizing (``"trilinear"`` for images, ``"nearest"`` for labels).

    Returns:
        ``(view1, view2, box1, box2)``; boxes are (2, D) float arrays ``[[start...], [end...]]``.

    Example:
        >>> crop = RandCropPair(roi_size=(16, 16, 16), scale_range=(0.5, 1.0), min_iou=0.3)
        >>> v1, v2, b1, b2 = crop(torch.rand(1, 40, 48, 40))
        >>> v1.shape, box_iou(b1, b2) >= 0.3
        (torch.Size([1, 16, 16, 16]), True)
    """

    def __init__(self, roi_size: Sequence[int], scale_range: tuple[float, float] = (0.5, 1.0),
                 min_iou: float | None = None, max_tries: int = 50, mode: str = "trilinear"):
        lo, hi = scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 1, got {scale_range}")
        if min_iou is not None and not 0 <= min_iou < 1:
            raise ValueError(f"min_iou must be in [0, 1), got {min_iou}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.scale_range, self.min_iou, self.max_tries, self.mode = (lo, hi), min_iou, max_tries, mode
        self.boxes: tuple[np.ndarray, np.ndarray] | None = None

    def _draw_box(self, shape) -> np.ndarray:
        shape = np.asarray(shape)
        sides = np.maximum(1, np.round(self.R.uniform(*self.scale_range, size=len(shape)) * shape)).astype(int)
        starts = np.array([self.R.randint(0, s - c + 1) for s, c in zip(shape, sides)])
        return np.stack([starts, starts + sides]).astype(np.float64)

    def randomize(self, spatial_shape) -> None:
        best, best_iou = None, -1.0
        for _ in range(self.max_tries if self.min_iou is not None else 1):
            pair = (self._draw_box(spatial_shape), self._draw_box(spatial_shape))
            iou = box_iou(*pair)
            if iou > best_iou:
                best, best_iou = pair, iou
            if self.min_iou is None or iou >= self.min_iou:
                break
        self.boxes = best

    def __call__(self, img, randomize: bool = True):
        if len(self.roi_size) != img.ndim - 1:
            raise ValueError(f"roi_size {self.roi_size} does not match image of shape {tuple(img.shape)}")
        if randomize:
            self.randomize(img.shape[1:])
        b1, b2 = self.boxes
        return (_crop_resize(img, b1, self.roi_size, self.mode), _crop_resize(img, b2, self.roi_size, self.mode),
                b1.copy(), b2.copy())


class RandCropPaird(Randomizable, MapTransform):
    """Dictionary version of :class:`RandCropPair`: the same two boxes for every key (image and label align).

    Writes ``{key}{suffixes[0]}``, ``{key}{suffixes[1]}`` for each key and the boxes under
    ``box{suffixes[0]}``/``box{suffixes[1]}`` (float tensors (2, D)); the source volume is kept.

    Args:
        keys: volumes to crop (the first one defines the shape).
        roi_size, scale_range, min_iou, max_tries: as in :class:`RandCropPair`.
        mode: interpolation per key (``"trilinear"`` images, ``"nearest"`` labels); one value or one per key.
        suffixes: names of the two views.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], scale_range=(0.5, 1.0),
                 min_iou: float | None = None, max_tries: int = 50, mode="trilinear",
                 suffixes: tuple[str, str] = ("_v1", "_v2"), allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.cropper = RandCropPair(roi_size, scale_range, min_iou, max_tries)
        self.modes = ensure_tuple_rep(mode, len(self.keys))
        self.suffixes = suffixes

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.cropper.randomize(data)

    def __call__(self, data):
        d = dict(data)
        first = next(self.key_iterator(d))
        self.randomize(d[first].shape[1:])
        for key, mode in self.key_iterator(d, self.modes):
            self.cropper.mode = mode
            v1, v2, b1, b2 = self.cropper(d[key], randomize=False)
            d[key + self.suffixes[0]], d[key + self.suffixes[1]] = v1, v2
        d["box" + self.suffixes[0]] = torch.as_tensor(b1, dtype=torch.float32)
        d["box" + self.suffixes[1]] = torch.as_tensor(b2, dtype=torch.float32)
        return d


class RandPartitionCropd(Randomizable, MapTransform):
    """One ``roi_size`` crop per partition of the volume along ``axis`` (returns a list of dicts).

    The volume is split into ``num_partitions`` equal parts along ``axis``; crop ``p`` is centred at a random
    position inside part ``p`` (clamped to the volume) and at a random position along the other axes. Each
    output dict gets ``partition`` (p), ``position`` (the crop centre normalised to [0, 1] along ``axis``) and
    the other entries of the input. Volumes smaller than ``roi_size`` must be padded first.

    Args:
        keys: volumes to crop identically.
        roi_size: crop size.
        num_partitions: S, the number of partitions (4 in Chaitanya et al.).
        axis: spatial axis of the partitions (2 = z for RAS volumes).
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], num_partitions: int = 4, axis: int = 2,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.num_partitions, self.axis = num_partitions, axis
        self.starts: list[np.ndarray] = []

    def randomize(self, spatial_shape) -> None:
        shape = np.asarray(spatial_shape)
        if np.any(shape < self.roi_size):
            raise ValueError(f"volume of shape {tuple(shape)} is smaller than roi_size {self.roi_size}: pad it first")
        self.starts = []
        part = shape[self.axis] / self.num_partitions
        for p in range(self.num_partitions):
            start = np.array([self.R.randint(0, s - r + 1) for s, r in zip(shape, self.roi_size)])
            centre = self.R.uniform(p * part, (p + 1) * part)
            r = self.roi_size[self.axis]
            start[self.axis] = int(np.clip(round(centre - r / 2), 0, shape[self.axis] - r))
            self.starts.append(start)

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        first = next(self.key_iterator(d))
        shape = d[first].shape[1:]
        self.randomize(shape)
        out = []
        for p, start in enumerate(self.starts):
            item = dict(d)
            index = (slice(None), *(slice(int(s), int(s) + r) for s, r in zip(start, self.roi_size)))
            for key in self.key_iterator(d):
                item[key] = _plain(d[key])[index].clone()
            item["partition"] = p
            item["position"] = float((start[self.axis] + self.roi_size[self.axis] / 2) / shape[self.axis])
            out.append(item)
        return out
