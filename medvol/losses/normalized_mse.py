"""BYOL's regression loss: the mean squared error of L2-normalised vectors, ``2 - 2 cos``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_embeddings, check_reduction, no_autocast, reduce_loss

__all__ = ["NormalizedMSELoss"]


class NormalizedMSELoss(_Loss):
    """Squared distance between L2-normalised predictions and targets (BYOL).

    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, Eq. 2: for the online prediction q_i and the target
    projection z_i::

        l_i = || q_i / ||q_i|| - z_i / ||z_i|| ||^2 = 2 - 2 cos(q_i, z_i)

    The target is detached (the stop-gradient of BYOL and SimSiam; SimSiam's negative cosine is ``l / 2 - 1``).
    BYOL symmetrises it over the two views: ``loss(q1, z2) + loss(q2, z1)`` (the method adds the two).

    Args:
        reduction: over the N pairs: ``"mean"``, ``"sum"`` or ``"none"`` (an (N,) vector).

    Raises:
        ValueError: if ``reduction`` is unknown.

    Example:
        >>> loss = NormalizedMSELoss()
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss(q, torch.tensor([[3.0, 0.0], [1.0, 0.0]]))    # pairs at 0 and 90 degrees: (0 + 2) / 2
        tensor(1.)
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: (N, D) predictions (gradients flow here).
            target: (N, D) targets, detached here.

        Returns:
            A float32 scalar, or an (N,) vector for ``reduction="none"``.

        Raises:
            TypeError: if a tensor is not floating point.
            ValueError: if the shapes are not both (N, D).
        """
        check_embeddings(input, "input")
        check_embeddings(target, "target")
        if input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}.")
        with no_autocast(input):
            q = F.normalize(input.float(), dim=1)
            z = F.normalize(target.detach().to(q.device).float(), dim=1)
            losses = 2.0 - 2.0 * (q * z).sum(dim=1)  # (N,)
        return reduce_loss(losses, self.reduction)
