"""VoCo's position-prediction and base-crop regularisation losses (Wu et al., CVPR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_embeddings, check_same_shape, no_autocast

__all__ = ["VoCoLoss", "VoCoRegularizationLoss", "voco_logits"]

_EPS = 1e-6


def voco_logits(crops: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """VoCo's prediction: ``relu(cos(crop_n, base_k))``, (N, K) for crops (N, D) and bases (K, D)."""
    check_embeddings(crops, "crops")
    check_embeddings(bases, "bases")
    with no_autocast(crops):
        return F.relu(F.normalize(crops.float(), dim=1) @ F.normalize(bases.float(), dim=1).t())


class VoCoLoss(_Loss):
    """Distance between predicted and true overlap proportions, VoCo's L_pred as in its released code.

    With logits l = relu(cos(crop, base)) and overlap labels y in [0, 1] (each random crop's share in every base
    crop, summing to 1 over the base crops)::

        pos = - sum_{y > 0} y * log(1 - |y - l| + eps) / sum y         (the paper's -log(1 - |y - l|), weighted)
        neg = sum_{y = 0} l^2 / #{y = 0}                              (similarity to non-overlapping bases -> 0)
        loss = pos + neg

    Args:
        eps: the 1e-6 of the released code inside the log and the divisions.

    Example:
        >>> loss = VoCoLoss()
        >>> loss(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]])).item() < 1e-5
        True
    """

    def __init__(self, eps: float = _EPS) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: predicted overlaps (..., K) in [0, 1], e.g. :func:`voco_logits`.
            target: the overlap labels, same shape.

        Returns:
            A float32 scalar (``pos + neg`` over every crop of the batch).

        Raises:
            TypeError, ValueError: for non-float inputs or different shapes.
        """
        check_same_shape(input, target)
        with no_autocast(input):
            logits, labels = input.float(), target.to(input.device).float()
            pos = -(labels * torch.log(1 - (labels - logits).abs() + self.eps)).sum() / (labels.sum() + self.eps)
            neg_mask = (labels == 0).float()
            neg = (neg_mask * logits.square()).sum() / (neg_mask.sum() + self.eps)
        return pos + neg


class VoCoRegularizationLoss(_Loss):
    """VoCo's L_reg: base crops of one volume are pushed apart, ``mean_{i<j} relu(cos(b_i, sg(b_j)))^2``.

    ``sg`` is a stop-gradient on the second base of each pair, as in the released code (each pair moves only
    the first of its two bases). For a batch, ``input`` is (B, K, D) and the loss is the mean over volumes.

    Example:
        >>> VoCoRegularizationLoss()(torch.eye(4)[None]).item()   # orthogonal bases: nothing to push apart
        0.0
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: base-crop embeddings (K, D) or (B, K, D), K >= 2.
            target: unused (``forward(input, target)`` signature of medvol losses).

        Raises:
            ValueError: for fewer than two base crops or a wrong number of dimensions.
        """
        bases = input[None] if input.ndim == 2 else input
        if bases.ndim != 3 or bases.shape[1] < 2 or not bases.is_floating_point():
            raise ValueError(f"input must be float (K, D) or (B, K, D) with K >= 2, got {tuple(input.shape)}.")
        with no_autocast(bases):
            z = F.normalize(bases.float(), dim=2)
            sim = F.relu(z @ z.detach().transpose(1, 2))  # (B, K, K): row i moves, column j is detached
            k = z.shape[1]
            upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=z.device), diagonal=1)
            return sim[:, upper].square().mean()
