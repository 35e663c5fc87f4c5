"""Context distortions of restoration pretext tasks (Models Genesis, CAiD), as array + dictionary transforms.

Zhou et al., "Models Genesis", MedIA 2021 (https://arxiv.org/abs/2004.07882) restore a sub-volume from a
distorted copy; CAiD (Taher et al., MIDL 2022) reuses their distortions. The building blocks, shared by both:

- :class:`RandBezierIntensity`: the non-linear intensity transform, ``v -> B_y(B_x^-1(v))`` along a random
  cubic Bezier curve from (0, 0) to (1, 1), or its decreasing mirror.
- :class:`RandLocalPixelShuffle`: voxels permuted inside many small random blocks (local texture destroyed,
  global shape kept).
- :class:`RandPainting`: in-painting (random boxes replaced by noise or a constant) or out-painting
  (everything outside a few random boxes replaced).

and the two recipes built from them, :func:`models_genesis_distortion` and :func:`caid_distortion`. Box and
block sides are fractions of the image's side, each side drawn independently for every box.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, Identityd, MapTransform, OneOf, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "RandBezierIntensity",
    "RandBezierIntensityd",
    "RandLocalPixelShuffle",
    "RandLocalPixelShuffled",
    "RandPainting",
    "RandPaintingd",
    "models_genesis_distortion",
    "caid_distortion",
]


def _check_fractions(value, name: str, low: float = 0.0) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must be (min, max) fractions with {low} <= min <= max <= 1, got {value!r}.")
    return lo, hi


def _check_count(value, name: str) -> tuple[int, int]:
    lo, hi = (int(value), int(value)) if np.isscalar(value) else (int(v) for v in value)
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must be a count or (min, max) with 0 <= min <= max, got {value!r}.")
    return lo, hi


def _side_range(fractions: tuple[float, float], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, the smallest and largest side in voxels: ``round(f * size)``, at least 1, at most the size."""
    shape = np.asarray(shape)
    lo = np.clip(np.round(fractions[0] * shape), 1, shape).astype(int)
    hi = np.clip(np.round(fractions[1] * shape), lo, shape).astype(int)
    return lo, hi


class _BoxesDictMixin:
    """Dictionary wrapper plumbing: one draw of the array transform, applied to every key."""

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        self.transform.randomize(d[first].shape[1:])
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandBezierIntensity(RandomizableTransform):
    """Models Genesis' non-linear transformation of intensities in [0, 1] along a random Bezier curve.

    With probability ``prob``: control points ``P0 = (0, 0)``, ``P1, P2 ~ U([0, 1]^2)``, ``P3 = (1, 1)``;
    ``B(t) = (1-t)^3 P0 + 3(1-t)^2 t P1 + 3(1-t) t^2 P2 + t^3 P3``. ``B_x`` is non-decreasing for control points
    in the unit square, so every voxel value ``v`` maps to ``B_y(t)`` with ``B_x(t) = v`` (increasing), or, with
    probability ``decreasing_prob``, to ``B_y(1 - t)`` (the flipped curve, which inverts intensities). The curve
    is evaluated at ``num_points`` values of t and interpolated linearly; values outside [0, 1] are clamped.

    Args:
        prob: probability of transforming (Models Genesis: 0.9).
        decreasing_prob: probability of the decreasing curve (0.5).
        num_points: samples of the curve (Models Genesis: 100000; 1000 is exact to ~1e-6 for a cubic).

    Example:
        >>> t = RandBezierIntensity(prob=1.0)
        >>> y = t(torch.linspace(0, 1, 11).reshape(1, 11, 1, 1))
        >>> y.shape, bool(y.min() >= 0) and bool(y.max() <= 1)
        (torch.Size([1, 11, 1, 1]), True)
    """

    def __init__(self, prob: float = 0.9, decreasing_prob: float = 0.5, num_points: int = 1000) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= decreasing_prob <= 1.0:
            raise ValueError(f"decreasing_prob must be in [0, 1], got {decreasing_prob!r}.")
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points!r}.")
        self.decreasing_prob, self.num_points = float(decreasing_prob), int(num_points)
        self.points = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.5], [1.0, 1.0]])
        self.decreasing = False

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.points[1], self.points[2] = self.R.random_sample(2), self.R.random_sample(2)
        self.decreasing = bool(self.R.random_sample() < self.decreasing_prob)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(B_x(t), B_y(t))`` at ``num_points`` values of t (``B_y(1 - t)`` for the decreasing curve)."""
        t = np.linspace(0.0, 1.0, self.num_points)[:, None]
        basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)  # (n, 4)
        xy = basis @ self.points  # (n, 2)
        xs, ys = np.maximum.accumulate(xy[:, 0]), xy[:, 1]
        return xs, ys[::-1].copy() if self.decreasing else ys

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = convert_to_tensor(img, track_meta=False)
        xs, ys = self.curve()
        out = np.interp(x.detach().cpu().numpy(), xs, ys).astype(np.float32)
        return convert_to_dst_type(out, img, dtype=x.dtype if x.is_floating_point() else torch.float32)[0]


class RandBezierIntensityd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandBezierIntensity`: one curve for every key."""

    def __init__(self, keys: KeysCollection, prob: float = 0.9, decreasing_prob: float = 0.5,
                 num_points: int = 1000, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = RandBezierIntensity(1.0, decreasing_prob, num_points)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            self.transform.randomize()
            for key in self.key_iterator(d):
                d[key] = self.transform(d[key], randomize=False)
        return d


class RandLocalPixelShuffle(RandomizableTransform):
    """Models Genesis' local pixel shuffling: voxels permuted inside ``num_blocks`` random blocks.

    With probability ``prob``, each block gets sides drawn independently per axis in ``block_size`` (fractions
    of the image side, at least 1 voxel) and a uniform position; its voxels (all channels together) are put in
    a random order, one block after the other, so the result is a permutation of the input's voxels (the
    paper's code reads every block from the undistorted input, so overlapping blocks duplicate some voxels and
    drop others). Models Genesis: 10000 blocks of 1 to side/10 voxels per axis.

    Args:
        prob: probability of shuffling (Models Genesis: 0.5).
        num_blocks: number of blocks, or (min, max) drawn uniformly.
        block_size: (min, max) block side as a fraction of the image side.
    """

    def __init__(self, prob: float = 0.5, num_blocks: int | Sequence[int] = 10000,
                 block_size: Sequence[float] = (0.0, 0.1)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.num_blocks = _check_count(num_blocks, "num_blocks")
        self.block_size = _check_fractions(block_size, "block_size")
        self.blocks = np.zeros((0, 2, 0), dtype=int)
        self.orders: list[np.ndarray] = []

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        n = int(self.R.randint(self.num_blocks[0], self.num_blocks[1] + 1))
        lo, hi = _side_range(self.block_size, spatial_shape)
        sides = self.R.randint(lo, hi + 1, size=(n, len(lo)))  # (n, D)
        starts = (self.R.random_sample((n, len(lo))) * (np.asarray(spatial_shape) - sides + 1)).astype(int)
        self.blocks = np.stack([starts, starts + sides], axis=1)  # (n, 2, D)
        self.orders = [self.R.permutation(int(v)) for v in sides.prod(axis=1)]  # one voxel order per block

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform:
            return img
        out = convert_to_tensor(img, track_meta=False).detach().cpu().numpy().copy()
        channels = out.shape[0]
        for (start, end), order in zip(self.blocks, self.orders):
            index = (slice(None), *(slice(s, e) for s, e in zip(start, end)))
            window = out[index].reshape(channels, -1)  # (C, voxels of the block)
            out[index] = window[:, order].reshape(out[index].shape)
        return convert_to_dst_type(out, img)[0]


class RandLocalPixelShuffled(_BoxesDictMixin, RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandLocalPixelShuffle`: the same blocks and voxel orders for every key."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, num_blocks: int | Sequence[int] = 10000,
                 block_size: Sequence[float] = (0.0, 0.1), allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.transform = RandLocalPixelShuffle(prob, num_blocks, block_size)


class RandPainting(RandomizableTransform):
    """In-painting or out-painting with random boxes (Models Genesis; CAiD's cut-out and out-painting).

    With probability ``prob``, ``num_boxes`` boxes are drawn, each with sides in ``box_size`` (fractions of the
    image side, drawn per axis) and a uniform position at least ``margin`` voxels from the border (when it
    fits). ``mode="in"`` replaces the boxes with ``fill``; ``mode="out"`` replaces everything outside the union
    of the boxes. The number of boxes is uniform in ``num_boxes = (min, max)``, or, with ``extra_box_prob``, is
    ``min`` plus one more box with that probability until a draw fails or ``max`` is reached (Models Genesis:
    in-painting ``(0, 5)``, out-painting ``(1, 5)``, 0.95).

    Args:
        mode: ``"in"`` or ``"out"``.
        prob: probability of painting.
        num_boxes: number of boxes, or (min, max).
        box_size: (min, max) box side as a fraction of the image side (in: 1/6-1/3, out: 3/7-4/7).
        fill: a constant, or (low, high) for uniform noise per voxel (Models Genesis: (0, 1)).
        extra_box_prob: see above; None draws the count uniformly.
        margin: distance of the boxes from the border in voxels (Models Genesis: 3).

    Example:
        >>> t = RandPainting("in", num_boxes=2, box_size=(0.25, 0.5), fill=0.0)
        >>> bool((t(torch.ones(1, 16, 16, 16)) == 0).any())
        True
    """

    def __init__(self, mode: str = "in", prob: float = 1.0, num_boxes: int | Sequence[int] = (1, 5),
                 box_size: Sequence[float] = (1 / 6, 1 / 3), fill: float | Sequence[float] = (0.0, 1.0),
                 extra_box_prob: float | None = None, margin: int = 0) -> None:
        RandomizableTransform.__init__(self, prob)
        if mode not in ("in", "out"):
            raise ValueError(f"mode must be 'in' or 'out', got {mode!r}.")
        if extra_box_prob is not None and not 0.0 <= extra_box_prob <= 1.0:
            raise ValueError(f"extra_box_prob must be in [0, 1] or None, got {extra_box_prob!r}.")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}.")
        self.mode, self.extra_box_prob, self.margin = mode, extra_box_prob, int(margin)
        self.num_boxes = _check_count(num_boxes, "num_boxes")
        self.box_size = _check_fractions(box_size, "box_size")
        self.fill = (float(fill), float(fill)) if np.isscalar(fill) else tuple(float(v) for v in fill)
        self.boxes: list[tuple[slice, ...]] = []

    def _count(self) -> int:
        lo, hi = self.num_boxes
        if self.extra_box_prob is None:
            return int(self.R.randint(lo, hi + 1))
        n = lo
        while n < hi and self.R.random_sample() < self.extra_box_prob:
            n += 1
        return n

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        shape = np.asarray(spatial_shape)
        lo, hi = _side_range(self.box_size, shape)
        self.boxes = []
        for _ in range(self._count()):
            sides = self.R.randint(lo, hi + 1)
            last = shape - sides - self.margin
            fits = last >= self.margin  # no room for the margin along an axis: anywhere inside
            first, last = np.where(fits, self.margin, 0), np.where(fits, last, shape - sides)
            starts = self.R.randint(first, last + 1)
            self.boxes.append(tuple(slice(int(s), int(s + n)) for s, n in zip(starts, sides)))

    def _filled(self, like: torch.Tensor) -> torch.Tensor:
        low, high = self.fill
        if low == high:
            return torch.full_like(like, low)
        noise = self.R.uniform(low, high, size=tuple(like.shape)).astype(np.float32)
        return torch.as_tensor(noise, dtype=like.dtype, device=like.device)

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform:
            return img
        x = convert_to_tensor(img, track_meta=False)
        if not x.is_floating_point():
            x = x.float()
        if self.mode == "in":
            out = x.clone()
            for box in self.boxes:
                out[(slice(None), *box)] = self._filled(out[(slice(None), *box)])
        else:
            out = self._filled(x)
            for box in self.boxes:
                out[(slice(None), *box)] = x[(slice(None), *box)]
        return convert_to_dst_type(out, img, dtype=out.dtype)[0]


class RandPaintingd(_BoxesDictMixin, RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandPainting`: the same boxes for every key (the noise is drawn per key)."""

    def __init__(self, keys: KeysCollection, mode: str = "in", prob: float = 1.0,
                 num_boxes: int | Sequence[int] = (1, 5), box_size: Sequence[float] = (1 / 6, 1 / 3),
                 fill: float | Sequence[float] = (0.0, 1.0), extra_box_prob: float | None = None, margin: int = 0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.transform = RandPainting(mode, prob, num_boxes, box_size, fill, extra_box_prob, margin)


def models_genesis_distortion(key: str, shuffle_prob: float = 0.5, nonlinear_prob: float = 0.9,
                              paint_prob: float = 0.9, outpaint_prob: float = 0.8,
                              num_blocks: int | Sequence[int] = 10000) -> Compose:
    """Models Genesis' distortion of one view, in the paper's order and with its probabilities.

    Local pixel shuffling (p 0.5; 10000 blocks of 1 to side/10 voxels), then the Bezier intensity transform
    (p 0.9), then with probability ``paint_prob`` (0.9) out-painting (``outpaint_prob`` 0.8 of those: noise
    everywhere but 1-5 boxes of 3/7-4/7 of each side) or in-painting (0.2: 0-5 boxes of 1/6-1/3 of each side
    filled with U(0, 1) noise); box counts grow by one with probability 0.95, boxes keep 3 voxels from the
    border. The restoration target is the view before this distortion (copy it first).

    Args:
        key: the view to distort.
        shuffle_prob, nonlinear_prob, paint_prob, outpaint_prob: the probabilities above.
        num_blocks: blocks of the local shuffle (fewer for small test crops).
    """
    paint = [RandPaintingd(key, "in", num_boxes=(0, 5), box_size=(1 / 6, 1 / 3), extra_box_prob=0.95, margin=3),
             RandPaintingd(key, "out", num_boxes=(1, 5), box_size=(3 / 7, 4 / 7), extra_box_prob=0.95, margin=3),
             Identityd(key)]
    weights = [paint_prob * (1 - outpaint_prob), paint_prob * outpaint_prob, 1 - paint_prob]
    return Compose([RandLocalPixelShuffled(key, prob=shuffle_prob, num_blocks=num_blocks, block_size=(0.0, 0.1)),
                    RandBezierIntensityd(key, prob=nonlinear_prob),
                    OneOf(paint, weights=weights)])


def caid_distortion(key: str, weights: Sequence[float] = (0.3, 0.05, 0.3, 0.35), max_holes: int = 10) -> OneOf:
    """One CAiD distortion per call for ``key``: cut-out, out-painting, local shuffle or none.

    Sizes follow CAiD's 2D settings scaled to the 3D crop: cut-out boxes 5-30 % of the crop side, set to 0
    (CAiD: 10-70 px of 224), out-painting keeps 1-3 boxes of 40-80 % and sets the rest to 0, local shuffle
    permutes voxels inside up to ``max_holes`` blocks of 5-15 %.

    Args:
        key: the view to distort.
        weights: probabilities of (cut-out, out-painting, local shuffle, none); CAiD uses 0.3, 0.05, 0.3.
        max_holes: largest number of cut-out boxes / shuffled blocks.
    """
    if len(weights) != 4 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be 4 non-negative numbers (cutout, outpaint, shuffle, none), got {weights}")
    cutout = RandPaintingd(key, "in", num_boxes=(1, max_holes), box_size=(0.05, 0.3), fill=0.0)
    outpaint = RandPaintingd(key, "out", num_boxes=(1, 3), box_size=(0.4, 0.8), fill=0.0)
    shuffle = RandLocalPixelShuffled(key, prob=1.0, num_blocks=(1, max_holes), block_size=(0.05, 0.15))
    return OneOf([cutout, outpaint, shuffle, Identityd(key)], weights=list(weights))
