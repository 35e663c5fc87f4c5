"""Masked MSE / L1 restoration loss (context restoration in CAiD, Models Genesis-style pretext tasks)."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_same_shape, no_autocast

__all__ = ["RestorationLoss"]

_LOSSES = ("mse", "l1")


class RestorationLoss(_Loss):
    """Voxel-wise MSE or L1 between a restored image and its target, optionally inside a mask only.

    The context-restoration term of CAiD (Taher et al., "CAiD: Context-Aware Instance Discrimination for
    Self-supervised Learning in Medical Imaging", MIDL 2022; MSE, weight 10) and of Models Genesis (Zhou et al.,
    MedIA 2021). With a mask m (bool, or non-negative float weights) broadcast to the input's shape::

        mean:  sum(m * e) / sum(m)      sum:  sum(m * e)      none:  m * e      (e = (x - y)^2 or |x - y|)

    A mask with no voxel gives 0 for ``"mean"`` (still part of the graph, gradient 0).

    Args:
        loss: ``"mse"`` (squared error) or ``"l1"`` (absolute error).
        reduction: ``"mean"`` (over the masked voxels), ``"sum"`` or ``"none"`` (the masked error map).

    Raises:
        ValueError: if ``loss`` or ``reduction`` is unknown.

    Example:
        >>> loss = RestorationLoss("mse")
        >>> x, y = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
        >>> loss(x, y, mask=y > 0.5).shape
        torch.Size([])
    """

    def __init__(self, loss: str = "mse", reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not isinstance(loss, str) or loss.lower() not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
        self.loss = loss.lower()

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: restored image, e.g. (B, C, D, H, W); any float dtype (computed in float32).
            target: the image to restore, same shape as ``input`` (not detached).
            mask: ``None`` = every voxel; else a bool or float tensor broadcastable to ``input``'s shape
                (e.g. (B, 1, D, H, W)); a broadcast mask counts once per broadcast element in the mean.

        Returns:
            A float32 scalar, or the masked error map (``input``'s shape) for ``reduction="none"``.

        Raises:
            TypeError: if ``input``/``target`` are not floating-point tensors or ``mask`` is not a tensor.
            ValueError: if ``target`` does not match ``input``'s shape or ``mask`` does not broadcast to it.
        """
        check_same_shape(input, target)
        with no_autocast(input):
            diff = input.float() - target.to(input.device).float()
            err = diff.square() if self.loss == "mse" else diff.abs()  # input's shape
            if mask is None:
                if self.reduction == "mean":
                    return err.mean()
                return err.sum() if self.reduction == "sum" else err
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}.")
            try:
                m = torch.broadcast_to(mask.to(err.device, torch.float32), err.shape)
            except RuntimeError as e:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the input's shape "
                                 f"{tuple(err.shape)}.") from e
            masked = err * m
            if self.reduction == "none":
                return masked
            total = masked.sum()
            if self.reduction == "sum":
                return total
            weight = m.sum()
            return torch.where(weight > 0, total / weight.clamp_min(torch.finfo(torch.float32).tiny), total * 0.0)
