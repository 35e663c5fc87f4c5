"""Handlers of the self-supervised engine (configure in ``__init__``, register in ``attach(engine)``).

- :class:`MomentumUpdateHandler`: EMA update of the method's momentum encoders after every optimizer step.
- :class:`QueueUpdateHandler`: pushes the iteration's keys into the method's MoCo queue.
- :class:`EpochHookHandler`: tells the method which epoch starts (e.g. global -> local stage switch).
- :func:`warmup_cosine_schedule`: per-iteration linear warm-up then cosine decay (``LambdaLR``).
- :class:`ResumableCheckpoint`: everything needed to resume, written atomically every epoch; loaded on start.
- :class:`ModelSaver`: the network's ``state_dict`` (zoo ``models/model.pt``), on improvement or every epoch.

The queue and momentum handlers are attached to the trainer only: validation never changes method state.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from medvol.errors import DataError
from medvol.io.atomic import atomic_path
from medvol.io.checkpoint import read_checkpoint
from medvol.networks.momentum import cosine_momentum, unwrap_module

__all__ = [
    "MomentumUpdateHandler",
    "QueueUpdateHandler",
    "EpochHookHandler",
    "warmup_cosine_schedule",
    "ResumableCheckpoint",
    "ModelSaver",
    "scalar_outputs",
]

logger = logging.getLogger("medvol.engines")


def scalar_outputs(output: dict) -> dict[str, float]:
    """The scalar entries of an iteration output (for StatsHandler / TensorBoardStatsHandler)."""
    out = {}
    for key, value in (output or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class MomentumUpdateHandler:
    """Call ``method.update_momentum(m)`` after each iteration.

    Args:
        momentum: EMA momentum m (ema = m * ema + (1 - m) * online).
        schedule: ``"constant"`` or ``"cosine"`` (m rises from ``momentum`` to 1 over training, BYOL style).
    """

    def __init__(self, momentum: float = 0.999, schedule: str = "constant"):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        self.momentum, self.schedule = momentum, schedule

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        method = unwrap_module(engine.network)
        if self.schedule == "cosine":
            total = engine.state.max_epochs * engine.state.epoch_length
            m = cosine_momentum(self.momentum, engine.state.iteration, total)
        else:
            m = self.momentum
        method.update_momentum(m)


class QueueUpdateHandler:
    """Call ``method.update_queue(engine.state.output)`` after each iteration (MoCo negatives)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        unwrap_module(engine.network).update_queue(engine.state.output)


class EpochHookHandler:
    """Call ``method.on_epoch_start(epoch)`` when an epoch starts (stage switches, schedules)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        unwrap_module(engine.network).on_epoch_start(engine.state.epoch)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                           min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps`` iterations, then cosine decay to ``min_lr_ratio`` x base LR.

    Step it every iteration (``monai.handlers.LrScheduleHandler(..., epoch_level=False)``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ModelSaver:
    """Save ``network.state_dict()`` atomically: when ``metric_name`` improves (attach to the evaluator) or
    after every epoch when ``metric_name`` is None (attach to the trainer).

    Args:
        path: destination (e.g. ``{output_dir}/models/model.pt``, the MONAI zoo convention).
        network: the module to save (the backbone, not the whole method).
        metric_name: engine metric to track (e.g. ``"val_loss"``); None saves every epoch.
        mode: ``"min"``, ``"max"``, or None to compare with the attached engine's ``metric_cmp_fn`` (the same
            "better" test MONAI's workflow uses for its best metric).
        group_fn: optional callable returning the current "group" (e.g. the training stage); when it changes,
            the best value is forgotten, because losses of different stages are not comparable.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, metric_name: str | None = None,
                 mode: str | None = "min", group_fn=None):
        if mode not in ("min", "max", None):
            raise ValueError(f"mode must be 'min', 'max' or None, got {mode!r}")
        self.path, self.network, self.metric_name, self.mode = Path(path), network, metric_name, mode
        self.group_fn = group_fn
        self.best: float | None = None
        self.group = None
        self.saved_epoch: int | None = None  # epoch of the last save (the trainer's epoch line says "model saved")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _better(self, value: float, engine: Engine) -> bool:
        if self.best is None:
            return True
        if self.mode is None:
            return bool(engine.metric_cmp_fn(value, self.best))
        return value < self.best if self.mode == "min" else value > self.best

    def __call__(self, engine: Engine) -> None:
        if self.group_fn is not None:
            group = self.group_fn()
            if group != self.group:
                self.group, self.best = group, None
        if self.metric_name is not None:
            value = float(engine.state.metrics[self.metric_name])
            if not self._better(value, engine):
                return
            self.best = value
        if _is_rank0():
            with atomic_path(self.path) as tmp:
                torch.save(unwrap_module(self.network).state_dict(), tmp)
            self.saved_epoch = getattr(engine.state, "epoch", None)
            logger.debug(f"saved {self.path}" + (f" ({self.metric_name}={self.best:.5f})" if self.metric_name else ""))

    def state_dict(self) -> dict:
        return {"best": self.best, "group": self.group}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.group = state.get("best"), state.get("group")


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class ResumableCheckpoint:
    """Write ``{name: obj.state_dict()}`` plus the trainer state and torch RNG to ``last.pt`` every epoch
    (atomically, rank 0); with ``resume=True`` load it when training starts, so a killed run continues from
    its last finished epoch and ends where an uninterrupted run with the same seed ends.

    Attach it after the validation handler so the saved best-model state includes this epoch's validation.

    Args:
        save_dir: folder of ``last.pt``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (method, optimizer, scheduler, savers, ...).
        resume: load ``save_dir/last.pt`` when the trainer starts (a missing file starts from scratch).
        filename: checkpoint file name.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: dict, resume: bool = False,
                 filename: str = "last.pt"):
        self.path = Path(save_dir) / filename
        self.save_dict, self.resume = save_dict, resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)

    def save(self, engine: Engine) -> None:
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        state["torch_rng"] = torch.get_rng_state()
        if getattr(engine, "scaler", None) is not None:  # monai's SupervisedTrainer has scaler=None without AMP
            state["scaler"] = engine.scaler.state_dict()
        if _is_rank0():
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.info(f"resume: no checkpoint at {self.path}, starting from scratch")
            return
        state = read_checkpoint(self.path)  # DataError "PATH: problem" for a truncated/refused/foreign file
        for name, obj in self.save_dict.items():
            if name not in state:
                raise DataError(self.path, f"has no '{name}' entry (saved keys: {sorted(state)}): not this "
                                "bundle's checkpoint")
            obj.load_state_dict(state[name])
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)  # the config may extend training
        torch.set_rng_state(state["torch_rng"])
        if "scaler" in state and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(state["scaler"])
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")
