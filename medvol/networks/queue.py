"""The MoCo queue of negative keys (He et al. 2020, https://arxiv.org/abs/1911.05722), kept in buffers.

The queue and its write pointer are registered buffers, so they are part of ``state_dict()``: a resumed run
restores exactly the negatives it had, and the momentum/checkpoint handlers need nothing special. Reading the
queue (``negatives`` / ``forward()``) never changes it, so validation can use it freely; only ``enqueue`` writes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["MoCoQueue"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(keys: torch.Tensor) -> torch.Tensor:
    """Concatenate ``keys`` from every rank in rank order; batch sizes may differ between ranks."""
    world = dist.get_world_size()
    n = torch.tensor([keys.shape[0]], device=keys.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    padded = keys.new_zeros((max(sizes_), *keys.shape[1:]))
    padded[: keys.shape[0]] = keys
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes_)])


class MoCoQueue(nn.Module):
    """First-in first-out queue of ``size`` L2-normalised keys of dimension ``dim``.

    Under ``torch.distributed`` every rank enqueues the keys of all ranks (all-gather, rank order), so all ranks
    hold the same queue; the first distributed ``enqueue`` also broadcasts rank 0's queue so that differently
    seeded initialisations agree.

    Args:
        dim: key dimension.
        size: number of keys (MoCo v2/CAiD: 65536).
        generator: random generator for the initial queue (standard normal rows, L2-normalised); ``None`` uses
            the global torch seed.

    Raises:
        ValueError: when ``dim`` or ``size`` is not positive.

    Example:
        >>> q = MoCoQueue(dim=8, size=16, generator=torch.Generator().manual_seed(0))
        >>> q.enqueue(torch.nn.functional.normalize(torch.randn(4, 8), dim=1))
        >>> q.negatives.shape, int(q.ptr)
        (torch.Size([16, 8]), 4)
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim={dim} and size={size} must both be >= 1.")
        self.dim, self.size = int(dim), int(size)
        self.register_buffer("queue", F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._synced = False

    @property
    def negatives(self) -> torch.Tensor:
        """A detached copy of the queue, ``(size, dim)``; changing it does not change the queue."""
        return self.queue.detach().clone()

    def forward(self) -> torch.Tensor:
        """Same as :attr:`negatives`."""
        return self.negatives

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (``(B, dim)``, expected L2-normalised) at the pointer, wrapping around the end.

        Only the last ``size`` keys are kept when more than ``size`` arrive at once (after the all-gather).

        Raises:
            ValueError: when ``keys`` is not ``(B, dim)``.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}.")
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        if _distributed():
            if not self._synced:
                dist.broadcast(self.queue, src=0)
                dist.broadcast(self.ptr, src=0)
                self._synced = True
            keys = _all_gather(keys.contiguous())
        n = keys.shape[0]
        if n == 0:
            return
        kept = min(n, self.size)
        # key j of the kept tail is the (n - kept + j)-th key written after ptr
        idx = (self.ptr + (n - kept) + torch.arange(kept, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, idx, keys[n - kept :])
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"
