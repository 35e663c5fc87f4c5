"""Views and labels of three pretext tasks that need more than a crop pair.

- :class:`RandRotate90Class` / :class:`RandRotate90Classd`: rotate a view by a random multiple of 90 degrees
  in one of a few planes and record the class of the rotation (Tang et al. 2022, SwinUNETR self-supervised
  pre-training: 4 classes, 0/90/180/270 degrees in one plane).
- :class:`RandLocalCropsd`: PCRLv2's small local views, drawn inside the union of the two global views' boxes
  and resized to a small size (Zhou et al. 2023: 6 local crops resized to 16^3 next to 64x64x32 global crops).
- :class:`VoCoCrops` / :class:`VoCoCropsd`: VoCo's base crops on a regular grid, random crops of the same
  size, and each random crop's overlap fraction with every base crop (Wu et al. 2024).

Every view comes out as a plain tensor (no metadata), so views of different positions collate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandCoarseDropoutd, Randomizable
from monai.utils import ensure_tuple_rep

__all__ = ["RandRotate90Class", "RandRotate90Classd", "swin_inpainting_cutout", "RandLocalCropsd", "VoCoCrops",
           "VoCoCropsd", "grid_overlap"]


def _plain(img) -> torch.Tensor:
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def _crop_resize(x: torch.Tensor, start: Sequence[int], size: Sequence[int], out_size: Sequence[int]) -> torch.Tensor:
    index = (slice(None), *(slice(int(s), int(s) + int(n)) for s, n in zip(start, size)))
    sub = x[index].float()
    if tuple(sub.shape[1:]) != tuple(out_size):
        sub = F.interpolate(sub[None], size=tuple(int(s) for s in out_size), mode="trilinear" if sub.ndim == 4
                            else "bilinear", align_corners=False)[0]
    return sub


# ---- rotation classes (SwinUNETR self-supervised) ------------------------------------------------------------


class RandRotate90Class(Randomizable):
    """Rotate a (C, *spatial) image by k x 90 degrees in one of ``planes``; the class says which.

    Class 0 is the identity; for plane index p (0-based) and k in {1, 2, 3} the class is ``1 + 3 p + (k - 1)``,
    so one plane gives Tang et al.'s 4 classes and three planes 10 (the identity is one class, not one per
    plane: the rotation label would be ambiguous otherwise).

    Args:
        planes: pairs of spatial axes (0-based) to rotate in; the research-contributions code rotates its
            (C, H, W, D) tensors in the plane of spatial axes (1, 2).

    Raises:
        ValueError: for an empty ``planes`` or a pair that is not two different axes; at call time for a plane
            whose two sides differ (a rotation would change the shape).

    Example:
        >>> rot = RandRotate90Class(planes=[(0, 1)])
        >>> img, label = rot(torch.rand(1, 8, 8, 4))
        >>> img.shape, 0 <= label < rot.num_classes == 4
        (torch.Size([1, 8, 8, 4]), True)
    """

    def __init__(self, planes: Sequence[Sequence[int]] = ((1, 2),)):
        planes = tuple(tuple(int(a) for a in p) for p in planes)
        if not planes or any(len(p) != 2 or p[0] == p[1] for p in planes):
            raise ValueError(f"planes must be a non-empty list of pairs of two different axes, got {planes}")
        self.planes = planes
        self.num_classes = 1 + 3 * len(planes)
        self.label = 0

    def randomize(self, data=None) -> None:
        self.label = int(self.R.randint(0, self.num_classes))

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        x = _plain(img)
        if self.label == 0:
            return x.clone(), 0
        plane, k = divmod(self.label - 1, 3)
        a, b = self.planes[plane]
        if x.shape[1 + a] != x.shape[1 + b]:
            raise ValueError(f"RandRotate90Class: plane {self.planes[plane]} of an image of shape {tuple(x.shape)} "
                             "is not square; crop the view to equal sides in the rotation planes")
        return torch.rot90(x, k + 1, dims=(1 + a, 1 + b)).contiguous(), self.label


class RandRotate90Classd(Randomizable, MapTransform):
    """Dictionary version of :class:`RandRotate90Class`: one draw per call for all ``keys``, class under
    ``label_key`` (an int64 scalar tensor).

    Args:
        keys: images to rotate identically.
        label_key: where to write the rotation class.
        planes: as in :class:`RandRotate90Class`.
    """

    def __init__(self, keys: KeysCollection, label_key: str, planes: Sequence[Sequence[int]] = ((1, 2),),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.rotate = RandRotate90Class(planes)
        self.label_key = label_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.rotate.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.rotate.randomize()

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key], label = self.rotate(d[key], randomize=False)
        d[self.label_key] = torch.tensor(self.rotate.label, dtype=torch.int64)
        return d


def swin_inpainting_cutout(key: str, roi_size: Sequence[int], max_holes: int = 60,
                           size_range: tuple[float, float] = (0.05, 0.25)) -> RandCoarseDropoutd:
    """The cut-outs SwinUNETR's in-painting restores: 1..``max_holes`` boxes filled with uniform noise in [0, 1].

    The original (``patch_rand_drop``) drops boxes with sides of 5-25 % of the crop until U(0, 0.3) of the
    voxels are covered, filled with min-max scaled Gaussian noise; with sides uniform in that range a box
    covers about 0.5 % of the crop on average, so 1-60 boxes cover up to about 30 %.

    Args:
        key: the view to cut.
        roi_size: the view's spatial size.
        max_holes: largest number of boxes.
        size_range: box side as a fraction of the view side (min, max).
    """
    lo = tuple(max(1, int(round(size_range[0] * s))) for s in roi_size)
    hi = tuple(max(1, int(round(size_range[1] * s))) for s in roi_size)
    return RandCoarseDropoutd(key, holes=1, max_holes=max_holes, spatial_size=lo, max_spatial_size=hi,
                              fill_value=(0.0, 1.0), prob=1.0)


# ---- PCRLv2 local views --------------------------------------------------------------------------------------


class RandLocalCropsd(Randomizable, MapTransform):
    """``num_crops`` small crops of ``key``, each resized to ``roi_size``, written as ``{key}{prefix}{i}``.

    Each crop's side along axis d is ``round(f * size_d)`` with ``f ~ U(scale_range)`` per axis; it lies inside
    the union box of ``box_keys`` (the global views of :class:`~medvol.transforms.RandCropPaird`), or the
    whole volume without them (PCRLv2 draws its local crops near the two global crops).

    Args:
        keys: the source volume(s), cropped identically.
        roi_size: output size of every local view.
        num_crops: local views per call (6 in PCRLv2).
        scale_range: (min, max) side of a crop as a fraction of the union box (PCRLv2's local sides are 8-32
            voxels next to global sides of 64-112).
        box_keys: boxes (2, D) limiting where local crops lie; ``()`` means the whole volume.
        prefix: suffix before the index of the output keys.

    Raises:
        ValueError: for ``num_crops < 1`` or a ``scale_range`` outside (0, 1].
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], num_crops: int = 6,
                 scale_range: tuple[float, float] = (0.1, 0.4), box_keys: Sequence[str] = ("box_v1", "box_v2"),
                 prefix: str = "_local", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        lo, hi = scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 1, got {scale_range}")
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.num_crops, self.scale_range = int(num_crops), (lo, hi)
        self.box_keys, self.prefix = tuple(box_keys), prefix
        self.crops: list[tuple[np.ndarray, np.ndarray]] = []

    def randomize(self, region: np.ndarray) -> None:
        lo, hi = region
        extent = hi - lo
        self.crops = []
        for _ in range(self.num_crops):
            sides = np.maximum(1, np.round(self.R.uniform(*self.scale_range, size=len(extent)) * extent)).astype(int)
            starts = np.array([self.R.randint(int(a), int(a) + int(e) - s + 1) for a, e, s in zip(lo, extent, sides)])
            self.crops.append((starts, sides))

    def __call__(self, data):
        d = dict(data)
        first = next(self.key_iterator(d))
        shape = np.asarray(d[first].shape[1:])
        if self.box_keys:
            boxes = [np.asarray(d[k], dtype=np.float64) for k in self.box_keys]
            lo = np.floor(np.min([b[0] for b in boxes], axis=0))
            hi = np.ceil(np.max([b[1] for b in boxes], axis=0))
            region = np.stack([np.clip(lo, 0, shape - 1), np.clip(hi, 1, shape)]).astype(int)
        else:
            region = np.stack([np.zeros_like(shape), shape])
        if len(self.roi_size) != len(shape):
            raise ValueError(f"roi_size {self.roi_size} does not match image of shape {tuple(d[first].shape)}")
        self.randomize(region)
        for key in self.key_iterator(d):
            x = _plain(d[key])
            for i, (start, sides) in enumerate(self.crops):
                d[f"{key}{self.prefix}{i}"] = _crop_resize(x, start, sides, self.roi_size)
        return d


# ---- VoCo base and random crops ------------------------------------------------------------------------------


def grid_overlap(start: Sequence[float], size: Sequence[float], grid: Sequence[int],
                 base_size: Sequence[float]) -> np.ndarray:
    """Fraction of a box (``start``, ``size``) inside each cell of a grid of ``base_size`` cells from 0.

    Returns a (prod(grid),) array in row-major cell order (the last axis fastest), summing to 1 when the box
    lies inside the grid. VoCo's labels: the overlap area of a random crop with each base crop over the
    crop's area.

    Example:
        >>> grid_overlap([2, 0], [4, 4], grid=[2, 1], base_size=[4, 4]).tolist()
        [0.5, 0.5]
    """
    start, size = np.asarray(start, float), np.asarray(size, float)
    per_axis = []
    for d, (n, b) in enumerate(zip(grid, base_size)):
        cells = np.arange(n) * float(b)
        inter = np.minimum(cells + b, start[d] + size[d]) - np.maximum(cells, start[d])
        per_axis.append(np.clip(inter, 0, None) / size[d])
    out = per_axis[0]
    for frac in per_axis[1:]:
        out = np.multiply.outer(out, frac)
    return out.reshape(-1)


class VoCoCrops(Randomizable):
    """VoCo's views of a (C, *spatial) volume: a grid of base crops and random crops with overlap labels.

    The region covered by the grid (``grid * base_size`` voxels) is taken at a random position of the volume
    (the volume is zero-padded, centred, where it is smaller). Base crop k is cell k of the grid (row-major);
    each of the ``num_crops`` random crops has the base crops' size and a uniform position inside the region,
    and its label is its overlap fraction with every base crop (:func:`grid_overlap`). Every crop is resized
    to ``out_size``. VoCo (Wu et al. 2024): a 4 x 4 x 1 grid of 96^3 base crops (384 x 384 x 96 voxels), 2
    random crops per volume, all resized to 64^3.

    Args:
        grid: base crops per spatial axis.
        base_size: size of a base crop (and of a random crop) before resizing.
        out_size: size of every view after resizing.
        num_crops: random crops per call.

    Returns:
        ``(bases (K, C, *out), crops (N, C, *out), labels (N, K) float32, starts (N, D))``.

    Example:
        >>> voco = VoCoCrops(grid=(2, 2, 1), base_size=(8, 8, 8), out_size=(4, 4, 4), num_crops=3)
        >>> bases, crops, labels, _ = voco(torch.rand(1, 20, 20, 10))
        >>> bases.shape, crops.shape, torch.allclose(labels.sum(1), torch.ones(3))
        (torch.Size([4, 1, 4, 4, 4]), torch.Size([3, 1, 4, 4, 4]), True)
    """

    def __init__(self, grid: Sequence[int] = (4, 4, 1), base_size: Sequence[int] = (96, 96, 96),
                 out_size: Sequence[int] = (64, 64, 64), num_crops: int = 2):
        self.grid = tuple(int(g) for g in grid)
        self.base_size = tuple(int(b) for b in ensure_tuple_rep(base_size, len(self.grid)))
        self.out_size = tuple(int(s) for s in ensure_tuple_rep(out_size, len(self.grid)))
        if min(self.grid) < 1 or min(self.base_size) < 1 or num_crops < 1:
            raise ValueError(f"grid, base_size and num_crops must be positive, got {grid}, {base_size}, {num_crops}")
        if np.prod(self.grid) < 2:
            raise ValueError(f"VoCo needs at least two base crops, got grid {self.grid}")
        self.region = tuple(g * b for g, b in zip(self.grid, self.base_size))
        self.num_crops = int(num_crops)
        self.offset = np.zeros(len(self.grid), int)
        self.starts = np.zeros((self.num_crops, len(self.grid)), int)

    def randomize(self, spatial_shape) -> None:
        shape = np.maximum(np.asarray(spatial_shape), self.region)
        self.offset = np.array([self.R.randint(0, s - r + 1) for s, r in zip(shape, self.region)])
        self.starts = np.array([[self.R.randint(0, r - b + 1) for r, b in zip(self.region, self.base_size)]
                                for _ in range(self.num_crops)])

    def __call__(self, img, randomize: bool = True):
        x = _plain(img).float()
        if len(self.grid) != x.ndim - 1:
            raise ValueError(f"grid {self.grid} does not match image of shape {tuple(x.shape)}")
        if randomize:
            self.randomize(x.shape[1:])
        pad = [max(0, r - s) for s, r in zip(x.shape[1:], self.region)]
        if any(pad):
            torch_pad = []
            for p in reversed(pad):
                torch_pad += [p // 2, p - p // 2]
            x = F.pad(x, torch_pad)
        region = x[(slice(None), *(slice(int(o), int(o) + r) for o, r in zip(self.offset, self.region)))]
        cells = np.stack(np.meshgrid(*(np.arange(g) for g in self.grid), indexing="ij"), -1).reshape(-1, len(self.grid))
        bases = torch.stack([_crop_resize(region, c * np.asarray(self.base_size), self.base_size, self.out_size)
                             for c in cells])
        crops = torch.stack([_crop_resize(region, s, self.base_size, self.out_size) for s in self.starts])
        labels = torch.as_tensor(np.stack([grid_overlap(s, self.base_size, self.grid, self.base_size)
                                           for s in self.starts]), dtype=torch.float32)
        return bases, crops, labels, self.starts.copy()


class VoCoCropsd(Randomizable, MapTransform):
    """Dictionary version of :class:`VoCoCrops` for one key: writes ``{key}_bases`` (K, C, *out),
    ``{key}_crops`` (N, C, *out) and ``overlap`` (N, K).

    Args:
        keys: the volume (one key).
        grid, base_size, out_size, num_crops: as in :class:`VoCoCrops`.
        label_key: where to write the overlap labels.
    """

    def __init__(self, keys: KeysCollection, grid: Sequence[int] = (4, 4, 1), base_size: Sequence[int] = (96, 96, 96),
                 out_size: Sequence[int] = (64, 64, 64), num_crops: int = 2, label_key: str = "overlap",
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"VoCoCropsd takes one key, got {self.keys}")
        self.voco = VoCoCrops(grid, base_size, out_size, num_crops)
        self.label_key = label_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.voco.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.voco.randomize(data)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_bases"], d[f"{key}_crops"], d[self.label_key], _ = self.voco(d[key])
        return d
