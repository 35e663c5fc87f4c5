"""What a training or evaluation run prints: one line per epoch, one progress bar, the evaluation summary.

ignite's and MONAI's INFO messages of the engines medvol builds go to DEBUG (``quiet_engine_logger``); the
per-iteration losses are logged at DEBUG too; ``level=DEBUG`` under ``[logger_medvol]`` in a bundle's
``logging.conf`` shows them all.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import (
    StatsHandler,
)

from medvol.engines.handlers import ModelSaver, scalar_outputs

__all__ = ["quiet_engine_logger", "SingleRenderProgressBar", "EpochSummary", "MetricsReport", "log_iteration_debug",
           "quiet_stats_handler"]

logger = logging.getLogger("medvol.engines")  # the logger bundles' logging.conf configures


class _InfoToDebug(logging.Filter):
    """Demote INFO records of its logger to DEBUG: dropped unless that logger is enabled for DEBUG."""

    def __init__(self, log: logging.Logger):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.log.isEnabledFor(logging.DEBUG)


def quiet_engine_logger(engine: Engine) -> Engine:
    """Give ``engine`` the logger ``medvol.engines.<EngineClass>``, on which ignite's and MONAI's INFO messages
    are DEBUG.

    ignite logs "Engine run resuming ...", "Epoch[k] Complete. Time taken ...", "Engine run finished ..." and
    MONAI's workflow "Got new best metric ..." on the engine's logger at INFO: with validation that is six
    lines per epoch (trainer and validator), all of which the trainer's :class:`EpochSummary` line already
    says. They are kept at DEBUG (``level=DEBUG`` under ``[logger_medvol]`` in the bundle's ``logging.conf``
    shows them). Warnings and errors are unchanged. Only the engines medvol builds get this logger; ignite's own
    class loggers stay as they are.
    """
    log = logging.getLogger(f"medvol.engines.{type(engine).__name__}")
    if not any(isinstance(f, _InfoToDebug) for f in log.filters):
        log.addFilter(_InfoToDebug(log))
    engine.logger = log
    return engine


class SingleRenderProgressBar(ProgressBar):
    """ignite's ``ProgressBar``, drawn once per update instead of twice.

    ignite's bar handler calls tqdm's ``set_description`` (which redraws at once, ignoring tqdm's
    ``mininterval``) and then ``update`` every iteration, and tqdm draws a bar without description when it is
    created, and again when the epoch closes it: in a log file or a notebook every step appeared twice, the
    first one without "Epoch [k/N]". Here the description is set without a redraw, the bar first appears with
    its first update, tqdm's ``mininterval`` (0.1 s) alone decides when it is redrawn, and the final state is
    drawn once, when the epoch closes the bar (``persist=True`` keeps it on its own line).
    """

    def _reset(self, pbar_total: int | None) -> None:
        kwargs = {"delay": 1e-6, **self.tqdm_kwargs}
        self.pbar = self.pbar_cls(total=pbar_total, leave=self.persist, bar_format=self.bar_format, initial=1,
                                  **kwargs)
        pbar, update = self.pbar, self.pbar.update
        pbar.set_description = functools.partial(pbar.set_description, refresh=False)
        pbar.set_postfix = functools.partial(pbar.set_postfix, refresh=False)

        def update_until_last(n: float = 1):
            if pbar.total is not None and pbar.n + n >= pbar.total:
                pbar.n += n  # the epoch's last step: closing the bar draws it
                return None
            return update(n)

        pbar.update = update_until_last


def _metric_text(metrics: dict) -> str:
    return ", ".join(f"{name} {float(value):.4f}" for name, value in metrics.items()
                     if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1))


class EpochSummary:
    """The one console line per training epoch: epoch, training loss, validation metric (best so far), time.

    ``epoch 3/30: train_loss 0.4521, val_loss 1.2060 (best 1.1873 at epoch 2), model saved, 12.3 s`` at INFO on
    the ``medvol.engines`` logger. Used as MONAI ``StatsHandler``'s ``epoch_print_logger`` on the trainer
    (``ValidationHandler`` has run by then); the time is the epoch's iterations plus the validation run.

    Args:
        validator: the evaluator run every epoch (its key metric and best value are shown), or None.
        saver: the :class:`~medvol.engines.ModelSaver` (the line says when it saved this epoch), or None.
    """

    def __init__(self, validator: Engine | None = None, saver: ModelSaver | None = None):
        self.validator, self.saver = validator, saver

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        parts = [_metric_text(state.metrics)]
        seconds = float(state.times.get("EPOCH_COMPLETED") or 0.0)
        validator = self.validator
        if validator is not None and getattr(validator.state, "metrics", None):
            vstate = validator.state
            text = _metric_text(vstate.metrics)
            if getattr(vstate, "key_metric_name", None) and getattr(vstate, "best_metric_epoch", -1) != -1:
                text += f" (best {float(vstate.best_metric):.4f} at epoch {vstate.best_metric_epoch})"
            parts.append(text)
            seconds += float(vstate.times.get("COMPLETED") or 0.0)
        if self.saver is not None and self.saver.saved_epoch == state.epoch:
            parts.append("model saved")
        parts.append(f"{seconds:.1f} s")
        logger.info(f"epoch {state.epoch}/{state.max_epochs}: " + ", ".join(p for p in parts if p))


def log_iteration_debug(engine: Engine) -> None:
    """Per-iteration losses at DEBUG (MONAI ``StatsHandler``'s ``iteration_print_logger``); free when not shown."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    state = engine.state
    output = state.output[0] if isinstance(state.output, list) and state.output else state.output
    losses = scalar_outputs(output) if isinstance(output, dict) else {}
    losses = {k: v for k, v in losses.items() if k.startswith("loss") or k.endswith("loss")} or losses
    step = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
    logger.debug(f"epoch {state.epoch}/{state.max_epochs} iteration {step}/{state.epoch_length}: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))


def quiet_stats_handler(tag_name: str = "Loss") -> StatsHandler:
    """MONAI's ``StatsHandler`` for an evaluator, with its epoch lines at DEBUG (the trainer's line or
    :class:`MetricsReport` prints the result)."""
    def epoch_debug(engine: Engine) -> None:
        logger.debug(f"{type(engine).__name__} epoch {engine.state.epoch}: {_metric_text(engine.state.metrics)}")

    return StatsHandler(iteration_log=False, epoch_print_logger=epoch_debug, tag_name=tag_name)




class MetricsReport:
    """Print an evaluation's metrics, per-class means and where ``MetricsSaver`` wrote its files, at the end.

    Args:
        save_dir: the ``MetricsSaver`` folder.
        class_names: names of the classes of the metric details (background excluded), for the printed means.
    """

    def __init__(self, save_dir: str | os.PathLike, class_names: Sequence[str] | None = None):
        self.save_dir, self.class_names = Path(save_dir), list(class_names or [])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        derived = getattr(engine.state, "derived_metrics", None) or set()
        for name, value in engine.state.metrics.items():
            if name in derived:  # e.g. val_dice_anterior: already in the val_mean_dice line
                continue
            line = f"{name} {float(value):.4f}"
            if name in details:
                scores = torch.as_tensor(details[name], dtype=torch.float64)
                per_class = scores.nanmean(dim=0).tolist() if scores.ndim == 2 else []
                names = self.class_names if len(self.class_names) == len(per_class) else \
                    [f"class{i}" for i in range(len(per_class))]
                line += f" over {scores.shape[0]} volumes (" + ", ".join(
                    f"{n} {v:.4f}" for n, v in zip(names, per_class)) + ")"
            print(line, flush=True)
        print(f"evaluation written to {self.save_dir} (metrics.csv, <metric>_raw.csv per volume, "
              "<metric>_summary.csv)", flush=True)


