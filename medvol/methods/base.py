"""The contract between a pretext task and the engine.

A method is an ``nn.Module`` that owns the backbone (``self.backbone``, the network users keep) and whatever
the task adds (heads, momentum copies, queues). ``forward(batch)`` takes the collated batch dict of views and
returns ``{"loss": scalar, ...}`` (extra scalars are logged; tensors such as MoCo keys may ride along for the
handlers). State changes outside the optimizer step happen only in the hooks below, which the engine calls
from handlers attached to the trainer, never from validation.
"""

from __future__ import annotations

import torch
from torch import nn

from medvol.networks.momentum import update_momentum

__all__ = ["SSLMethod"]


class SSLMethod(nn.Module):
    """Base class of medvol's self-supervised methods.

    Args:
        backbone: a :class:`medvol.networks.Backbone` (its ``state_dict`` becomes ``models/model.pt``).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum copy) module pairs updated by :meth:`update_momentum`."""
        return []

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """EMA update of every momentum copy (called after each optimizer step)."""
        for online, ema in self.momentum_pairs():
            update_momentum(online, ema, m)

    def update_queue(self, output: dict) -> None:
        """Push this iteration's keys into the method's queue, if it has one."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called when a training epoch starts (1-based), e.g. to switch stages."""

    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError
