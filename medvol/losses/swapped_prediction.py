"""Swapped prediction between two overlapping crops (SwAV) and its voxel-level form.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020
(swapped prediction, Sinkhorn targets); radioSSL's patch- and pixel-level volumetric clustering applies it to
the tokens / voxels that the two crops of a volume have in common (``docs/methods/patch_clustering.md``). The
losses take inputs that are already aligned: the crop geometry that aligns them (``roi_align_pair``,
``warp_to_view``) is in :mod:`medvol.transforms.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_temperature, no_autocast, reduce_loss

__all__ = ["SwappedPredictionLoss", "PixelSwappedCELoss"]


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
        >>> s1, s2 = torch.randn(64, 50), torch.randn(64, 50)  # (N, K) scores of the two views
        >>> q1, q2 = s1.softmax(dim=1), s2.softmax(dim=1)  # in training: medvol.cluster.sinkhorn of the scores
        >>> (0.5 * (loss(s1, q2) + loss(s2, q1))).shape
        torch.Size([])
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
    crops, where the labels come from the other view, see :func:`medvol.transforms.warp_to_view`), log-softmax
    over the class axis (dimension 1). Computed with ``log_softmax`` in float32, so no epsilon is needed and
    ``log(0)`` cannot occur (radioSSL took the log of softmax outputs without an epsilon).

    Args:
        reduction: ``"mean"`` (over masked voxels of the whole batch), ``"sum"``, or ``"none"`` ((B, 1, *S),
            zero outside the mask).

    Example:
        >>> loss = PixelSwappedCELoss()
        >>> logits, labels = torch.randn(2, 10, 8, 8, 8), torch.randint(0, 10, (2, 1, 8, 8, 8))
        >>> inside = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
        >>> inside[..., :4] = True  # the voxels the two crops share
        >>> loss(logits, labels, inside).shape, float(loss(logits, labels, torch.zeros_like(inside)))
        (torch.Size([]), 0.0)
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
