"""The contract between a pretext task and the engine.

A method is an ``nn.Module`` that owns the backbone (``self.backbone``, the network users keep) and whatever
the task adds (heads, momentum copies, queues). ``forward(batch)`` takes the collated batch dict of views and
returns ``{"loss": scalar, ...}`` (extra scalars are logged; tensors such as MoCo keys may ride along for the
handlers). State changes outside the optimizer step happen only in the hooks below, which the engine calls
from handlers attached to the trainer, never from validation. A method declares those handlers itself
(:meth:`SSLMethod.train_handlers`, solo-learn style) and the batch keys it reads (``batch_keys``), so a bundle
config lists neither; :func:`medvol.engines.build_trainer` attaches them.
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

    #: items of a batch the method reads (what the dataset keeps of the views: ``SeededDataset(keys=...)``)
    batch_keys: tuple[str, ...] = ()
    #: ``DistributedDataParallel(find_unused_parameters=...)``: True unless every trainable parameter gets a
    #: gradient at every step (methods with frozen parts, unused decoders or stage switches need True)
    find_unused_parameters: bool = True

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def train_handlers(self) -> list:
        """Handlers the trainer attaches for this method (momentum update, queue update, epoch hook, ...)."""
        return []

    def selection_group(self):
        """Best-model selection restarts when this value changes (losses of different stages are not
        comparable); None: one group for the whole run."""
        return None

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
