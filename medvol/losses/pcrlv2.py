"""PCRLv2's siamese feature comparison: predictor output vs the other view's stop-gradient projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_same_shape, no_autocast, reduce_loss

__all__ = ["SiameseCosineLoss"]


class SiameseCosineLoss(_Loss):
    """Negative cosine similarity between a prediction and a stop-gradient target, SimSiam style.

    PCRLv2 (Zhou et al., "A Unified Visual Information Preservation Framework for Self-supervised Pre-training in
    Medical Image Analysis", TPAMI 2023) compares pooled decoder features of two views at one scale::

        loss = - cos(p_1, sg(z_2)) / 2 - cos(p_2, sg(z_1)) / 2

    which is ``(loss(p_1, z_2) + loss(p_2, z_1)) / 2`` with this loss. ``target`` is detached here.

    Args:
        reduction: over the batch, ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> p, z = torch.randn(4, 8), torch.randn(4, 8)
        >>> round(SiameseCosineLoss()(p, p).item(), 4)  # identical features: the minimum, -1
        -1.0
        >>> bool(SiameseCosineLoss()(p, z) > -1.0)
        True
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-cos(input, target.detach())`` per row, reduced.

        Args:
            input: predictor outputs (N, D).
            target: projections of the other view (N, D); no gradient flows into them.

        Raises:
            TypeError, ValueError: for non-float inputs or different shapes.
        """
        check_same_shape(input, target)
        with no_autocast(input):
            cos = F.cosine_similarity(input.float(), target.detach().to(input.device).float(), dim=1)
        return reduce_loss(-cos, self.reduction)
