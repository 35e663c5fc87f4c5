"""Self-supervised trainer and evaluator on ``monai.engines``.

MONAI's ``SupervisedTrainer`` assumes ``(image, label)`` and one network call; a pretext task needs several
views and returns several losses. :class:`SSLTrainer` keeps the MONAI workflow (handlers, events, metrics,
DDP samplers) and replaces only the iteration: the *method* module (see :mod:`medvol.methods`) takes the whole
batch dict and returns ``{"loss": scalar, <other scalars>...}``. The iteration still fires MONAI's
FORWARD_COMPLETED, LOSS_COMPLETED, BACKWARD_COMPLETED and MODEL_COMPLETED events, and CUDA AMP is one flag.

:class:`SSLEvaluator` computes the same losses in eval mode under ``no_grad``. It never calls the method's
state-changing hooks (queue update, momentum update), which live in handlers attached to the trainer only, and
eval mode freezes normalisation statistics, so validation leaves the method's state untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils import ForwardMode

__all__ = ["SSLTrainer", "SSLEvaluator", "prepare_ssl_batch", "prepare_supervised_batch"]


def _move(value, device, non_blocking: bool, channels_last: bool):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device, non_blocking=non_blocking)
    if channels_last and value.ndim == 5 and value.is_floating_point():
        value = value.contiguous(memory_format=torch.channels_last_3d)
    return value


def prepare_ssl_batch(batch: dict, device: torch.device, non_blocking: bool = False,
                      channels_last: bool = False, **kwargs) -> dict:
    """Move every tensor of a collated batch dict to ``device``; other entries pass through.

    With ``channels_last`` 5D float tensors use ``torch.channels_last_3d`` (about 3x faster 3D convolutions on
    CPU with oneDNN, and the layout tensor cores prefer).
    """
    if not isinstance(batch, dict):
        raise TypeError(f"SSL batches must be dicts of views, got {type(batch).__name__}")
    return {k: _move(v, device, non_blocking, channels_last) for k, v in batch.items()}


def prepare_supervised_batch(batchdata, device: torch.device, non_blocking: bool = False, channels_last: bool = True,
                             **kwargs):
    """``monai.engines.default_prepare_batch`` for (image, label) batches, in ``channels_last_3d`` when asked.

    Use it as ``prepare_batch`` of MONAI's SupervisedTrainer/SupervisedEvaluator together with
    ``network.to(memory_format=torch.channels_last_3d)`` (about 3x faster 3D convolutions on CPU).
    """
    from monai.engines.utils import default_prepare_batch

    image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    return _move(image, device, non_blocking, channels_last), label


def _scalars(out: dict) -> dict:
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _autocast(device: torch.device, enabled: bool, amp_kwargs: dict):
    # AMP is a CUDA feature here; on CPU the flag is ignored so the same config runs in CI
    return torch.autocast("cuda", enabled=enabled and device.type == "cuda", **(amp_kwargs or {}))


class SSLTrainer(Trainer):
    """Trainer for a self-supervised method module.

    Args:
        device: torch device.
        max_epochs: epochs to run.
        train_data_loader: loader of batch dicts (views, coordinates, ...).
        network: the method module (``nn.Module``; may be DDP-wrapped); ``network(batch)`` returns a dict with
            a scalar ``"loss"``.
        optimizer: optimizer over the method's trainable parameters.
        epoch_length: iterations per epoch (default: the loader's length).
        train_handlers: MONAI/ignite handlers with ``attach(engine)``.
        amp: CUDA automatic mixed precision with a GradScaler (ignored on CPU).
        grad_clip: clip the gradient norm to this value (None = off).
        channels_last: run 3D convolutions in ``channels_last_3d`` memory format (network and batches).
        key_train_metric, additional_metrics, metric_cmp_fn: as in ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        grad_clip: float | None = None,
        channels_last: bool = True,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        kwargs = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_ssl_batch,
            key_metric=key_train_metric,
            to_kwargs={"channels_last": channels_last},
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp,
            event_names=[IterationEvents],
            decollate=False,
            amp_kwargs=amp_kwargs,
            **kwargs,
        )
        self.network = network.to(memory_format=torch.channels_last_3d) if channels_last else network
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and torch.device(device).type == "cuda")

    def run(self) -> None:
        # monai's Trainer.run replaces the GradScaler with a fresh one; keep ours (it is checkpointed)
        Workflow.run(self)

    def _iteration(self, engine: SSLTrainer, batchdata: dict) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with _autocast(engine.state.device, engine.amp, engine.amp_kwargs):
            out = engine.network(batch)
        if "loss" not in out:
            raise KeyError(f"{type(engine.network).__name__} must return a dict with a 'loss' entry")
        engine.state.output = out
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.scaler.scale(out["loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.grad_clip is not None:
            engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.grad_clip)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.output = _scalars(out)
        return engine.state.output


class SSLEvaluator(Evaluator):
    """Validation loss of a self-supervised method (eval mode, no gradients, no state updates).

    Args:
        device: torch device.
        val_data_loader: loader of batch dicts.
        network: the same method module as the trainer's.
        key_val_metric: e.g. ``{"val_loss": ignite.metrics.Average(output_transform=...)}``.
        val_handlers: handlers attached to the evaluator (best-model saver, stats).
        amp: CUDA autocast (ignored on CPU).
        channels_last: feed 5D batches in ``channels_last_3d`` memory format (as the trainer).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: torch.nn.Module,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        channels_last: bool = True,
    ) -> None:
        kwargs = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            to_kwargs={"channels_last": channels_last},
            prepare_batch=prepare_ssl_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=amp,
            mode=ForwardMode.EVAL,
            decollate=False,
            amp_kwargs=amp_kwargs,
            **kwargs,
        )
        self.network = network

    def _iteration(self, engine: SSLEvaluator, batchdata: dict) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.eval()
        with torch.no_grad(), _autocast(engine.state.device, engine.amp, engine.amp_kwargs):
            out = engine.network(batch)
        engine.state.output = _scalars(out)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        return engine.state.output
