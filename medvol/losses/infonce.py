"""NT-Xent / InfoNCE with an arbitrary positive mask (SimCLR and Chaitanya et al.'s G^R, G^D-, G^D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_embeddings, check_reduction, check_temperature, no_autocast, reduce_loss

__all__ = ["InfoNCELoss"]


class InfoNCELoss(_Loss):
    """NT-Xent (normalised temperature-scaled cross entropy) with an arbitrary positive/negative mask.

    Every positive pair (i, j) is its own SimCLR problem (Chen et al., "A Simple Framework for Contrastive
    Learning of Visual Representations", ICML 2020)::

        l_ij = -log( exp(s_ij) / (exp(s_ij) + sum_{k in neg(i)} exp(s_ik)) ),   s = cos(z_i, z_k) / temperature

    With group labels this is the global loss of Chaitanya et al., "Contrastive learning of global and local
    features for medical image segmentation with limited annotations", NeurIPS 2020: G^R (labels = sample id),
    G^D (labels = partition id). G^D- needs a mask that ignores (-1) same-partition samples of other volumes.
    When each sample has exactly one positive it equals the standard SimCLR NT-Xent.

    Args:
        temperature: softmax temperature tau > 0 (0.1 in Chaitanya et al.).
        reduction: over all positive pairs: ``"mean"``, ``"sum"`` or ``"none"`` (a vector with one value per
            positive pair, in row-major order of (i, j), i.e. the order of ``(mask == 1).nonzero()``).

    Raises:
        TypeError: if ``temperature`` is not a number.
        ValueError: if ``temperature`` <= 0 or ``reduction`` is unknown.

    Example:
        >>> loss = InfoNCELoss(temperature=0.1)
        >>> z = torch.randn(8, 16)                      # 4 samples x 2 views
        >>> labels = torch.arange(4).repeat(2)          # view a of sample i <-> view b of sample i
        >>> loss(z, labels).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_temperature(temperature)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: (N, D) embeddings; L2-normalised here. Any float dtype (computed in float32).
            target: either (N,) integer group labels (positives = same label, self excluded, all others
                negative) or an (N, N) integer mask: 1 = positive, 0 = negative, -1 = ignored (neither).
                Row i describes anchor i; the diagonal is always ignored. A bool (N, N) mask means
                True = positive, False = negative.

        Returns:
            A float32 scalar, or a (P,) vector for ``reduction="none"`` (P = number of positive pairs).
            Anchors without a positive contribute nothing; a positive pair whose anchor has no negative
            has loss 0.

        Raises:
            TypeError: if ``input`` is not floating point or ``target`` is not integer/bool.
            ValueError: on shape mismatch, mask values outside {-1, 0, 1}, or no positive pair in the batch.
        """
        check_embeddings(input, "input")
        n = input.shape[0]
        mask = self._mask(target, n, input.device)  # (N, N) int: 1 pos, 0 neg, -1 ignore
        eye = torch.eye(n, dtype=torch.bool, device=input.device)
        pos = (mask == 1) & ~eye
        neg = (mask == 0) & ~eye
        pairs = pos.nonzero(as_tuple=True)  # (rows i, cols j), row-major
        if pairs[0].numel() == 0:
            raise ValueError("InfoNCELoss: the batch has no positive pair (every anchor needs >= 1 positive).")

        with no_autocast(input):
            z = F.normalize(input.float(), dim=1)
            sim = z @ z.t() / self.temperature  # (N, N) scaled cosine similarities
            # log sum_{k in neg(i)} exp(s_ik) per anchor; rows without negatives -> -inf, without NaN gradients
            has_neg = neg.any(dim=1)  # (N,)
            neg_logits = sim.masked_fill(~neg, float("-inf")).masked_fill(~has_neg[:, None], 0.0)  # finite rows
            neg_lse = torch.logsumexp(neg_logits, dim=1)
            neg_lse = torch.where(has_neg, neg_lse, torch.full_like(neg_lse, float("-inf")))  # (N,)
            s_pos = sim[pairs]  # (P,)
            # -log(e^s / (e^s + e^n)) = log(1 + e^(n - s)): softplus avoids the cancellation of lse - s
            losses = F.softplus(neg_lse[pairs[0]] - s_pos)  # (P,)
        return reduce_loss(losses, self.reduction)

    @staticmethod
    def _mask(target: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """Turn labels or a mask into an (N, N) int8 mask with values in {-1, 0, 1}."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be an integer (or bool) tensor, got dtype {target.dtype}.")
        target = target.to(device)
        if target.ndim == 1:
            if target.shape[0] != n:
                raise ValueError(f"target labels must have shape ({n},) to match input, got {tuple(target.shape)}.")
            return (target[:, None] == target[None, :]).to(torch.int8)  # (N, N): same label -> positive
        if target.ndim == 2:
            if tuple(target.shape) != (n, n):
                raise ValueError(f"target mask must have shape ({n}, {n}) to match input, got {tuple(target.shape)}.")
            if target.dtype == torch.bool:
                return target.to(torch.int8)
            if bool(((target < -1) | (target > 1)).any()):
                bad = sorted(set(target.unique().tolist()) - {-1, 0, 1})
                raise ValueError(f"target mask values must be in {{-1, 0, 1}}, got {bad}.")
            return target.to(torch.int8)
        raise ValueError(f"target must be (N,) labels or an (N, N) mask, got shape {tuple(target.shape)}.")
