"""Swapped prediction between two overlapping crops (SwAV) and its voxel-level form, with ROI alignment.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020
(swapped prediction, Sinkhorn targets); radioSSL's patch- and pixel-level volumetric clustering applies it to
the tokens / voxels that the two crops of a volume have in common (``docs/methods/patch_clustering.md``).

ROI alignment. A crop from :class:`~medvol.transforms.RandCropPaird` covers the source box ``[a, b)`` per axis
(voxel ``j`` spans ``[j, j + 1)``) and is resized to ``R`` voxels with ``align_corners=False``; so cell ``g`` of
any map of ``G`` cells computed from that view (the view itself, its logits, a /8 encoder grid) is centred at
``a + (g + 1/2) (b - a) / G``, and a source point ``p`` lies at ``grid_sample`` coordinate
``2 (p - a) / (b - a) - 1`` whatever ``G`` is. :func:`roi_align_pair` samples both views on one set of points
covering the overlap of the boxes; :func:`warp_to_view` resamples one view's map (e.g. pseudo-labels, nearest)
onto the other view's voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_temperature, no_autocast, reduce_loss

__all__ = ["SwappedPredictionLoss", "PixelSwappedCELoss", "overlap_points", "sample_at", "roi_align_pair",
           "warp_to_view"]


# ---------------------------------------------------------------------------------------------- alignment


def _check_boxes(box: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if box.ndim != 3 or box.shape[1] != 2 or box.shape[2] != ndim:
        raise ValueError(f"{name} must have shape (B, 2, {ndim}) [[start...], [end...]], got {tuple(box.shape)}")
    return box.double()


def overlap_points(box1: torch.Tensor, box2: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A regular grid of ``size`` points over the common region of two boxes, in source voxel coordinates.

    Point ``k`` along an axis is the centre of the k-th of ``size`` equal cells of the overlap ``[lo, hi)``:
    ``lo + (k + 1/2) (hi - lo) / size``.

    Args:
        box1, box2: (B, 2, D) boxes ``[[start...], [end...]]`` in source voxels (``box_v1``/``box_v2``).
        size: points per axis (D ints).

    Returns:
        ``points`` (B, *size, D) float64 and ``valid`` (B,) bool, False where the boxes do not overlap (those
        points are meaningless).
    """
    d = len(size)
    b1, b2 = _check_boxes(box1, d, "box1"), _check_boxes(box2, d, "box2")
    lo, hi = torch.maximum(b1[:, 0], b2[:, 0]), torch.minimum(b1[:, 1], b2[:, 1])  # (B, D)
    valid = (hi > lo).all(dim=1)
    hi = torch.maximum(hi, lo)
    axes = [(torch.arange(n, dtype=torch.float64, device=b1.device) + 0.5) / n for n in size]
    frac = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*size, D) in (0, 1)
    shape = (lo.shape[0],) + (1,) * d + (d,)
    points = lo.view(shape) + frac[None] * (hi - lo).view(shape)  # (B, *size, D)
    return points, valid


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
        >>> z1, z2, ok = roi_align_pair(tokens_v1, tokens_v2, batch["box_v1"], batch["box_v2"])  # doctest: +SKIP
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
    axes = [(torch.arange(n, dtype=torch.float64, device=b_dst.device) + 0.5) / n for n in size]
    frac = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*size, D)
    shape = (b_dst.shape[0],) + (1,) * d + (d,)
    points = b_dst[:, 0].view(shape) + frac[None] * (b_dst[:, 1] - b_dst[:, 0]).view(shape)  # voxel centres
    inside = ((points >= b_src[:, 0].view(shape)) & (points < b_src[:, 1].view(shape))).all(dim=-1)
    return sample_at(src, box_src, points, mode), inside[:, None]


# ---------------------------------------------------------------------------------------------- losses


class SwappedPredictionLoss(_Loss):
    """SwAV's swapped-prediction cross entropy between student scores and (Sinkhorn) targets.

    For each sample (token) n with prototype scores ``s_n`` (K,) and a target distribution ``q_n`` (K,) computed
    from the *other* view (e.g. ``medvol.cluster.sinkhorn`` of its detached scores)::

        l_n = - sum_k q_nk log softmax_k(s_n / temperature)

    The softmax runs over the class (prototype) axis, dimension 1, never over a spatial axis. The method applies
    it symmetrically: ``1/2 [l(s_1, q_2) + l(s_2, q_1)]``. The target is detached.

    Args:
        temperature: student temperature (SwAV and radioSSL: 0.1).
        reduction: over samples: ``"mean"``, ``"sum"`` or ``"none"`` (the per-sample losses).

    Raises:
        TypeError/ValueError: for a bad temperature or reduction.

    Example:
        >>> loss = SwappedPredictionLoss(0.1)
        >>> s1, s2 = torch.randn(64, 50), torch.randn(64, 50)
        >>> l = 0.5 * (loss(s1, sinkhorn(s2)) + loss(s2, sinkhorn(s1)))  # doctest: +SKIP
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean"):
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_temperature(temperature)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: (N, K) scores (or (N, K, *points): class axis 1).
            target: the same shape, non-negative, summing to 1 over axis 1.

        Raises:
            ValueError: shapes differ or the input has no class axis.
        """
        if input.ndim < 2 or input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape (N, K, ...), got {tuple(input.shape)} "
                             f"and {tuple(target.shape)}")
        with no_autocast(input):
            log_p = F.log_softmax(input.float() / self.temperature, dim=1)  # class axis
            per_sample = -(target.detach().float() * log_p).sum(dim=1)  # (N, ...)
        return reduce_loss(per_sample, self.reduction)


class PixelSwappedCELoss(_Loss):
    """Cross entropy of K-channel voxel logits against integer pseudo-labels on a voxel mask.

    ``l_v = -log softmax_k(logits_v)[label_v]`` for voxels with ``mask_v`` (the ROI-aligned overlap of two
    crops, where the labels come from the other view, see :func:`warp_to_view`), log-softmax over the class axis
    (dimension 1). Computed with ``log_softmax`` in float32, so no epsilon is needed and ``log(0)`` cannot
    occur (radioSSL took the log of softmax outputs without an epsilon).

    Args:
        reduction: ``"mean"`` (over masked voxels of the whole batch), ``"sum"``, or ``"none"`` ((B, 1, *S),
            zero outside the mask).

    Example:
        >>> loss = PixelSwappedCELoss()
        >>> loss(torch.randn(2, 10, 8, 8, 8), torch.randint(0, 10, (2, 1, 8, 8, 8)))  # doctest: +SKIP
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__(reduction=check_reduction(reduction))

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: (B, K, *S) logits.
            target: (B, 1, *S) or (B, *S) labels in [0, K) (float labels are rounded).
            mask: optional (B, 1, *S) or (B, *S) bool; ``None`` uses every voxel. An empty mask gives 0 (with a
                graph, so ``backward`` works).

        Raises:
            ValueError: shapes do not match or a label is outside [0, K).
        """
        b, k, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
        if target.ndim == input.ndim - 1:
            target = target[:, None]
        if tuple(target.shape) != (b, 1, *spatial):
            raise ValueError(f"target must have shape {(b, 1, *spatial)} or {(b, *spatial)}, got {tuple(target.shape)}")
        labels = target.round().long() if target.is_floating_point() else target.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"target labels must be in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]")
        if mask is None:
            mask = torch.ones_like(labels, dtype=torch.bool)
        elif mask.ndim == input.ndim - 1:
            mask = mask[:, None]
        if tuple(mask.shape) != (b, 1, *spatial):
            raise ValueError(f"mask must have shape {(b, 1, *spatial)} or {(b, *spatial)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        with no_autocast(input):
            log_p = F.log_softmax(input.float(), dim=1)  # (B, K, *S), class axis
            ce = -log_p.gather(1, labels) * mask  # (B, 1, *S)
        if self.reduction == "none":
            return ce
        total = ce.sum()
        if self.reduction == "sum":
            return total
        return total / mask.sum().clamp(min=1)
