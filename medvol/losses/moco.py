"""MoCo instance-discrimination loss: v2 with a queue of negatives (CAiD), or in-batch negatives (v3, LeCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_embeddings, check_reduction, check_temperature, no_autocast, reduce_loss

__all__ = ["MoCoLoss"]


class MoCoLoss(_Loss):
    """InfoNCE between queries and momentum keys, negatives from a queue (MoCo v2).

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020, and Chen et al.,
    "Improved Baselines with Momentum Contrastive Learning" (MoCo v2), 2020; the instance-discrimination term
    of CAiD (Taher et al., "CAiD: Context-Aware Instance Discrimination", MIDL 2022). For query q_i::

        logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / temperature,   l_i = CE(logits_i, 0)

    With ``queue=None`` the negatives are the other keys of the batch: ``logits_i = q_i . k^T / temperature``
    with target i (the in-batch / MoCo v3 form, without the 2T factor; :class:`~medvol.losses.LeCLLoss` is MoCo
    v3 built on :meth:`logits`).

    Queries, keys and queue entries are L2-normalised here; keys and queue are detached (no gradient reaches
    the momentum encoder). The caller enqueues the keys after the loss (``medvol.networks``' queue).

    Args:
        temperature: softmax temperature > 0 (0.2 in MoCo v2 / CAiD).
        reduction: over the N queries: ``"mean"``, ``"sum"`` or ``"none"`` (an (N,) vector).

    Raises:
        TypeError: if ``temperature`` is not a number.
        ValueError: if ``temperature`` <= 0 or ``reduction`` is unknown.

    Example:
        >>> loss = MoCoLoss(temperature=0.2)
        >>> q, k, queue = torch.randn(4, 128), torch.randn(4, 128), torch.randn(1024, 128)
        >>> loss(q, k, queue).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.2, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_temperature(temperature)

    def forward(self, input: torch.Tensor, target: torch.Tensor, queue: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: (N, D) queries q from the online encoder.
            target: (N, D) keys k from the momentum encoder (detached here); k_i is q_i's positive.
            queue: (K, D) negative keys, or ``None`` to use the other keys of the batch as negatives.

        Returns:
            A float32 scalar, or an (N,) vector for ``reduction="none"``.

        Raises:
            TypeError: if a tensor is not floating point.
            ValueError: if shapes do not match ((N, D) and (N, D); queue (K, D) with K >= 1).
        """
        logits, labels = self.logits(input, target, queue)
        with no_autocast(input):
            losses = F.cross_entropy(logits, labels, reduction="none")  # (N,)
        return reduce_loss(losses, self.reduction)

    def logits(self, input: torch.Tensor, target: torch.Tensor, queue: torch.Tensor | None = None):
        """The float32 temperature-scaled logits of every query and the column of its positive.

        Checks the arguments as :meth:`forward` does. Losses that extend MoCo's softmax (e.g.
        :class:`~medvol.losses.LeCLLoss`) add columns to these logits.

        Returns:
            ``(logits, labels)``: ``logits`` (N, N) ``q k^T / T`` with labels ``arange(N)`` (``queue=None``), or
            (N, 1 + K) ``[q_i . k_i, q_i . queue^T] / T`` with labels 0.
        """
        check_embeddings(input, "input")
        check_embeddings(target, "target")
        if input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}.")
        if queue is not None:
            check_embeddings(queue, "queue")
            if queue.shape[1] != input.shape[1]:
                raise ValueError(f"queue must have shape (K, {input.shape[1]}) to match input, "
                                 f"got {tuple(queue.shape)}.")
        n = input.shape[0]
        with no_autocast(input):
            q = F.normalize(input.float(), dim=1)
            k = F.normalize(target.detach().float(), dim=1)
            if queue is None:
                logits = q @ k.t()  # (N, N): column i is the positive of row i
                labels = torch.arange(n, device=q.device)
            else:
                neg = F.normalize(queue.detach().to(q.device, torch.float32), dim=1)
                l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
                l_neg = q @ neg.t()  # (N, K)
                logits = torch.cat([l_pos, l_neg], dim=1)  # (N, 1 + K): column 0 is the positive
                labels = torch.zeros(n, dtype=torch.long, device=q.device)
            return logits / self.temperature, labels
