"""Handlers of the self-supervised engine (configure in ``__init__``, register in ``attach(engine)``).

- :class:`MomentumUpdateHandler`: EMA update of the method's momentum encoders after every optimizer step.
- :class:`QueueUpdateHandler`: pushes the iteration's keys into the method's MoCo queue.
- :class:`EpochHookHandler`: tells the method which epoch starts (e.g. global -> local stage switch).
- :class:`ResumableCheckpoint`: everything needed to resume, written atomically every epoch; loaded on start.
- :class:`ModelSaver`: the network's ``state_dict`` (zoo ``models/model.pt``), on improvement, every epoch or at
  the end of training (``models/model_final.pt``).
- :class:`PerClassMetrics`: per-class means of a metric's details as metrics of their own (TensorBoard, log).

The learning-rate schedule is MONAI's ``WarmupCosineSchedule`` (see :func:`medvol.engines.build_trainer`).

The queue and momentum handlers are attached to the trainer only: validation never changes method state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
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
    "ResumableCheckpoint",
    "ModelSaver",
    "PerClassMetrics",
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


class ModelSaver:
    """Save ``network.state_dict()`` atomically: when ``metric_name`` improves (attach to the evaluator),
    after every epoch when ``metric_name`` is None (attach to the trainer), or once when the engine completes
    (``at_end=True``, e.g. ``models/model_final.pt``).

    Not MONAI's ``CheckpointSaver``: its files are written in place (``DiskSaver(atomic=False)``), a "final" one
    is also written when training fails, and the best one cannot forget its best value when the method's
    training stage changes (``group_fn``).

    Args:
        path: destination (e.g. ``{output_dir}/models/model.pt``, the MONAI zoo convention).
        network: the module to save (the backbone, not the whole method).
        metric_name: engine metric to track (e.g. ``"val_loss"``); None saves every epoch.
        mode: ``"min"``, ``"max"``, or None to compare with the attached engine's ``metric_cmp_fn`` (the same
            "better" test MONAI's workflow uses for its best metric).
        group_fn: optional callable returning the current "group" (e.g. the training stage); when it changes,
            the best value is forgotten, because losses of different stages are not comparable.
        at_end: save once, when the engine completes (``metric_name`` must be None).
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, metric_name: str | None = None,
                 mode: str | None = "min", group_fn=None, at_end: bool = False):
        if mode not in ("min", "max", None):
            raise ValueError(f"mode must be 'min', 'max' or None, got {mode!r}")
        if at_end and metric_name is not None:
            raise ValueError("at_end=True saves the last state; it takes no metric_name")
        self.path, self.network, self.metric_name, self.mode = Path(path), network, metric_name, mode
        self.group_fn, self.at_end = group_fn, at_end
        self.best: float | None = None
        self.group = None
        self.saved_epoch: int | None = None  # epoch of the last save (the trainer's epoch line says "model saved")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED if self.at_end else Events.EPOCH_COMPLETED, self)

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

    Not MONAI's ``CheckpointSaver`` + ``CheckpointLoader``: the saver writes in place (a kill mid-write leaves a
    truncated file) under epoch-numbered names the loader cannot find by itself, and neither keeps the RNG state.

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


class PerClassMetrics:
    """Put the per-class means of ``metric_name``'s details (``engine.state.metric_details``, e.g. MONAI
    ``MeanDice`` with ``save_details=True``: one row per volume, one column per class) into ``engine.state.metrics``
    as ``{prefix}{class_name}``, so ``StatsHandler``/``TensorBoardStatsHandler``/``MetricsSaver`` report them.

    Attach it after the metric (its ``EPOCH_COMPLETED`` handler must have run) and before the handlers that
    read the metrics. NaN (a class absent from every volume) is left out of the mean, as in ``MeanDice``.

    Args:
        metric_name: the metric whose details are averaged (e.g. ``"val_mean_dice"``).
        class_names: a name per column (background excluded); default ``class0``, ``class1``, ...
        prefix: of the new metric names (e.g. ``"val_dice_"`` gives ``val_dice_anterior``).
    """

    def __init__(self, metric_name: str, class_names: Sequence[str] | None = None, prefix: str = "val_dice_"):
        self.metric_name, self.class_names, self.prefix = metric_name, list(class_names or []), prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        details = (getattr(engine.state, "metric_details", None) or {}).get(self.metric_name)
        if details is None:
            return
        scores = torch.as_tensor(details, dtype=torch.float64)
        if scores.ndim != 2:
            return
        names = self.class_names if len(self.class_names) == scores.shape[1] else \
            [f"class{i}" for i in range(scores.shape[1])]
        derived = getattr(engine.state, "derived_metrics", None) or set()
        for name, value in zip(names, scores.nanmean(dim=0).tolist()):
            engine.state.metrics[f"{self.prefix}{name}"] = value
            derived.add(f"{self.prefix}{name}")
        engine.state.derived_metrics = derived  # MetricsReport prints them within the line of their source
