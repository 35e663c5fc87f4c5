"""LeCL: MoCo v3 contrastive loss with CLEAR's lesion-weighted denominator, built on :class:`MoCoLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvol.losses.moco import MoCoLoss
from medvol.losses.utils import check_temperature, no_autocast

__all__ = ["LeCLLoss"]


class LeCLLoss(MoCoLoss):
    """MoCo v3 loss with extra lesion-key terms in each anchor's softmax denominator (lesion-enhanced CL).

    Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers" (MoCo v3), ICCV
    2021, with the lesion variant of CLEAR (KatherLab/CLEAR, ``moco/builder.py: contrastive_loss_lesion``).
    With q, k L2-normalised, s = q k^T / T (N, N) and L the lesion keys of the batch, the loss of anchor i is::

        l_i = -log( exp(s_ii) / ( sum_j exp(s_ij) + sum_{l in L, l != i} exp(w * s_il) ) ) * 2T

    i.e. the row ``[s_i1 .. s_iN, w*s_il for l in L]`` (with w*s_ii set to -inf when i is a lesion) goes through
    a cross entropy with target i. The weight w multiplies the already temperature-scaled logits, as in the
    original code, so it acts as an inverse temperature of the extra terms; lesion keys therefore appear twice
    in the denominator (once as ordinary negatives). Without lesions it is exactly MoCo v3's
    ``CE(s, arange(N)) * 2T`` (same code path): ``s`` is :meth:`MoCoLoss.logits` with in-batch negatives (no
    queue; the third argument of ``forward`` is the lesion flags). Differences from the original: logsumexp in
    float32 (the original uses float64), and no all-gather (pass globally gathered keys yourself).

    The symmetric loss is ``loss(q1, k2, m) + loss(q2, k1, m)``; :meth:`symmetric` computes it.

    Args:
        temperature: T > 0 (1.0 in CLEAR's code; MoCo v3 uses 0.2 for ViTs).
        lesion_weight: w > 0 (CLEAR's ``--sample-weight``; its argparse default is 1, its ``forward`` default
            10). To switch the lesion term off, pass ``is_lesion=None``.
        reduction: over the N anchors: ``"mean"``, ``"sum"`` or ``"none"`` (an (N,) vector); the 2T factor
            is applied in every case.

    Raises:
        TypeError: if ``temperature`` or ``lesion_weight`` is not a number.
        ValueError: if either is <= 0 (or not finite), or ``reduction`` is unknown.

    Example:
        >>> loss = LeCLLoss(temperature=1.0, lesion_weight=10.0)
        >>> q1, q2, k1, k2 = torch.randn(4, 4, 256).unbind(0)
        >>> is_lesion = torch.tensor([True, False, False, True])
        >>> loss.symmetric(q1, k1, q2, k2, is_lesion).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 1.0, lesion_weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature, reduction)
        self.lesion_weight = check_temperature(lesion_weight, "lesion_weight")  # finite number > 0

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, is_lesion: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the one-directional loss l(q, k).

        Args:
            input: (N, D) predictor outputs q of one view.
            target: (N, D) momentum-encoder keys k of the other view (detached here); k_i is q_i's positive.
            is_lesion: (N,) bool (or 0/1 integer) flags of the keys (= of the samples), ``None`` = no lesion.

        Returns:
            A float32 scalar, or an (N,) vector for ``reduction="none"``.

        Raises:
            TypeError: if ``input``/``target`` are not floating point, or ``is_lesion`` is floating point.
            ValueError: if shapes do not match.
        """
        logits, labels = self.logits(input, target)  # (N, N): s_ij = q_i . k_j / T, labels arange(N)
        n = input.shape[0]
        lesion_idx = self._lesion_index(is_lesion, n, input.device)  # (L,)
        with no_autocast(input):
            if lesion_idx.numel() > 0:
                eye = torch.eye(n, dtype=torch.bool, device=logits.device)
                extra = (self.lesion_weight * logits).masked_fill(eye, float("-inf"))  # w*s_il, l == i removed
                logits = torch.cat([logits, extra[:, lesion_idx]], dim=1)  # (N, N + L)
            # reduce inside the CE as MoCo v3 does, so that without lesions the value is bit-identical
            return F.cross_entropy(logits, labels, reduction=self.reduction) * (2 * self.temperature)

    def symmetric(
        self,
        q1: torch.Tensor,
        k1: torch.Tensor,
        q2: torch.Tensor,
        k2: torch.Tensor,
        is_lesion: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetrised loss ``self(q1, k2, is_lesion) + self(q2, k1, is_lesion)`` (q_v, k_v from view v)."""
        return self(q1, k2, is_lesion) + self(q2, k1, is_lesion)

    @staticmethod
    def _lesion_index(is_lesion: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if is_lesion is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        if not isinstance(is_lesion, torch.Tensor):
            raise TypeError(f"is_lesion must be a torch.Tensor or None, got {type(is_lesion).__name__}.")
        if is_lesion.is_floating_point() or is_lesion.is_complex():
            raise TypeError(f"is_lesion must be a bool or integer tensor, got dtype {is_lesion.dtype}.")
        if tuple(is_lesion.shape) != (n,):
            raise ValueError(f"is_lesion must have shape ({n},) to match input, got {tuple(is_lesion.shape)}.")
        return is_lesion.to(device).nonzero(as_tuple=True)[0]
