"""Crop-box geometry: where two crops of a volume overlap, and how maps of the crops align there.

A crop from :class:`~medvol.transforms.RandCropPaird` covers the source box ``[a, b)`` per axis (voxel ``j``
spans ``[j, j + 1)``), stored as ``[[start...], [end...]]`` (shape ``(2, D)``, or ``(B, 2, D)`` once
collated), and is resized to ``R`` voxels with ``align_corners=False``. So cell ``g`` of any map of ``G``
cells computed from that view (the view itself, its logits, a /8 encoder grid) is centred at
``a + (g + 1/2) (b - a) / G``, and a source point ``p`` lies at ``grid_sample`` coordinate
``2 (p - a) / (b - a) - 1`` whatever ``G`` is.

- :func:`box_intersection`: the common region of two boxes; the one overlap computation the others use
  (:func:`box_iou` for drawing crop pairs, :func:`overlap_points` for aligning them).
- :func:`cell_centres`: a regular grid of points over a region (the voxel or token centres of a view).
- :func:`sample_at`, :func:`roi_align_pair`: read maps of both views at the same source points of their
  overlap (swapped prediction on tokens, ``medvol.methods.PatchClustering``).
- :func:`warp_to_view`: resample one view's map (e.g. pseudo-labels, nearest) onto the other view's voxels
  (``medvol.methods.PixelClustering``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["box_intersection", "box_iou", "cell_centres", "overlap_points", "sample_at",
           "roi_align_pair", "warp_to_view"]


def _check_boxes(box: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if box.ndim != 3 or box.shape[1] != 2 or box.shape[2] != ndim:
        raise ValueError(f"{name} must have shape (B, 2, {ndim}) [[start...], [end...]], got {tuple(box.shape)}")
    return box.double()


def box_intersection(box1: torch.Tensor, box2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The common region ``[lo, hi)`` of two boxes ``(..., 2, D)`` (``[[start...], [end...]]``, end exclusive).

    Returns:
        ``(lo, hi)``, each ``(..., D)``; where the boxes do not overlap along an axis, ``hi`` is clamped to
        ``lo`` (an empty extent), so ``(hi > lo).all(-1)`` says whether they overlap.
    """
    lo = torch.maximum(box1[..., 0, :], box2[..., 0, :])
    hi = torch.minimum(box1[..., 1, :], box2[..., 1, :])
    return lo, torch.maximum(hi, lo)


def box_iou(a, b) -> float:
    """IoU of two boxes given as (2, D) arrays [[start...], [end...]] (end exclusive)."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    lo, hi = box_intersection(a, b)
    inter = (hi - lo).prod()
    union = (a[1] - a[0]).prod() + (b[1] - b[0]).prod() - inter
    return float(inter / union) if union > 0 else 0.0


def cell_centres(lo: torch.Tensor, hi: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centres of ``size`` equal cells per axis of the regions ``[lo, hi)`` (``(B, D)`` each).

    Point ``k`` along an axis is ``lo + (k + 1/2) (hi - lo) / size``: the voxel centres of a view resized to
    ``size`` when ``[lo, hi)`` is its box.

    Returns:
        ``(B, *size, D)`` float64 points.
    """
    d = len(size)
    axes = [(torch.arange(n, dtype=torch.float64, device=lo.device) + 0.5) / n for n in size]
    frac = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*size, D) in (0, 1)
    shape = (lo.shape[0],) + (1,) * d + (d,)
    return lo.view(shape) + frac[None] * (hi - lo).view(shape)  # (B, *size, D)


def overlap_points(box1: torch.Tensor, box2: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A regular grid of ``size`` points over the common region of two boxes, in source voxel coordinates.

    Point ``k`` along an axis is the centre of the k-th of ``size`` equal cells of the overlap ``[lo, hi)``
    (:func:`cell_centres`): ``lo + (k + 1/2) (hi - lo) / size``.

    Args:
        box1, box2: (B, 2, D) boxes ``[[start...], [end...]]`` in source voxels (``box_v1``/``box_v2``).
        size: points per axis (D ints).

    Returns:
        ``points`` (B, *size, D) float64 and ``valid`` (B,) bool, False where the boxes do not overlap (those
        points are meaningless).
    """
    d = len(size)
    lo, hi = box_intersection(_check_boxes(box1, d, "box1"), _check_boxes(box2, d, "box2"))  # (B, D)
    return cell_centres(lo, hi, size), (hi > lo).all(dim=1)


def sample_at(feat: torch.Tensor, box: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample a map computed from one crop at source points (``grid_sample``, ``align_corners=False``).

    Args:
        feat: (B, C, *grid) map of the view whose crop is ``box`` (any grid size: voxels, /8 tokens, ...).
        box: (B, 2, D) the view's source box.
        points: (B, *size, D) source coordinates; points outside the box take the border value.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (labels).

    Returns:
        (B, C, *size) in ``feat``'s dtype (nearest sampling of integer maps returns the integer dtype).
    """
    d = feat.ndim - 2
    b = _check_boxes(box, d, "box")
    shape = (b.shape[0],) + (1,) * d + (d,)
    norm = 2.0 * (points - b[:, 0].view(shape)) / (b[:, 1] - b[:, 0]).view(shape) - 1.0
    grid = norm.flip(-1)  # grid_sample wants (x, y, z) = (last, ..., first) spatial axis
    src = feat if feat.is_floating_point() else feat.double()
    out = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="border", align_corners=False)
    return out if feat.is_floating_point() else out.round().to(feat.dtype)


def roi_align_pair(feat1: torch.Tensor, feat2: torch.Tensor, box1: torch.Tensor, box2: torch.Tensor,
                   size: Sequence[int] | None = None, mode: str = "bilinear"):
    """Features of two views at the same source points, covering the overlap of their crops.

    Args:
        feat1, feat2: (B, C, *grid) maps of view 1 and view 2 (their grids may differ).
        box1, box2: (B, 2, D) source boxes of the two views.
        size: points per axis; default ``feat1``'s grid size (one point per token of the overlap's extent).
        mode: interpolation of ``grid_sample``.

    Returns:
        ``(f1, f2, valid)``: (B, C, P) each with P = prod(size) points in the same order, and ``valid`` (B,) bool
        (False for pairs whose crops do not overlap; exclude them from the loss).

    Example:
        >>> box1 = torch.tensor([[[0.0, 0, 0], [32, 32, 32]], [[0.0, 0, 0], [32, 32, 32]]])
        >>> box2 = torch.tensor([[[16.0, 0, 0], [48, 32, 32]], [[40.0, 0, 0], [72, 32, 32]]])  # 2nd: no overlap
        >>> tokens1, tokens2 = torch.rand(2, 8, 4, 4, 4), torch.rand(2, 8, 4, 4, 4)  # (B, C, /8 grid) per view
        >>> f1, f2, valid = roi_align_pair(tokens1, tokens2, box1, box2)
        >>> f1.shape, f2.shape, valid.tolist()
        (torch.Size([2, 8, 64]), torch.Size([2, 8, 64]), [True, False])
    """
    size = tuple(feat1.shape[2:]) if size is None else tuple(int(s) for s in size)
    points, valid = overlap_points(box1, box2, size)
    f1 = sample_at(feat1, box1, points, mode).flatten(2)  # (B, C, P)
    f2 = sample_at(feat2, box2, points, mode).flatten(2)
    return f1, f2, valid


def warp_to_view(src: torch.Tensor, box_src: torch.Tensor, box_dst: torch.Tensor, size: Sequence[int] | None = None,
                 mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a map of one view onto the voxel grid of another view of the same volume.

    Args:
        src: (B, C, *grid) map of the source view (e.g. pseudo-labels of view 2).
        box_src: (B, 2, D) the source view's box.
        box_dst: (B, 2, D) the destination view's box.
        size: the destination grid (default ``src``'s grid size, i.e. both views have the same ``roi_size``).
        mode: ``"nearest"`` for labels, ``"bilinear"`` for features.

    Returns:
        ``(warped (B, C, *size), inside (B, 1, *size) bool)``: ``inside`` marks destination voxels whose centre
        lies in the source box (the overlap); outside it ``warped`` holds border values, not data.
    """
    size = tuple(src.shape[2:]) if size is None else tuple(int(s) for s in size)
    d = len(size)
    b_dst = _check_boxes(box_dst, d, "box_dst")
    b_src = _check_boxes(box_src, d, "box_src")
    points = cell_centres(b_dst[:, 0], b_dst[:, 1], size)  # (B, *size, D) destination voxel centres
    shape = (b_src.shape[0],) + (1,) * d + (d,)
    inside = ((points >= b_src[:, 0].view(shape)) & (points < b_src[:, 1].view(shape))).all(dim=-1)
    return sample_at(src, box_src, points, mode), inside[:, None]
