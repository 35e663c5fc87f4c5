"""The standard bundle workflow, built from a few arguments: trainer, evaluators, inference, device and DDP.

Every medvol bundle trains the same way: a seeded loader over its dataset, a per-iteration linear warm-up + cosine
learning-rate schedule (MONAI's ``WarmupCosineSchedule``), the method's own handlers (momentum, queue, epoch hook:
``method.train_handlers()``), validation every epoch with the best backbone kept as ``output_dir/models/model.pt``
(every epoch when there is no validation) and the last one as ``output_dir/models/model_final.pt``, a resumable
``output_dir/checkpoints/last.pt``, console and TensorBoard statistics (training and validation, both by the
trainer's epoch) and a progress bar. :func:`build_trainer` assembles that from MONAI's handlers
(``LrScheduleHandler``, ``ValidationHandler``, ``StatsHandler``, ``TensorBoardStatsHandler``) and medvol's
(:class:`ModelSaver`, :class:`ResumableCheckpoint`),
so a bundle's ``train.json`` states only what is particular to it: hyper-parameters, network, method, optimizer,
views. :func:`build_evaluator` (validation losses of a self-supervised method), :func:`build_segmentation_evaluator`
(Dice, with MONAI's ``MeanDice`` and ``MetricsSaver``) and :func:`build_inference` (an ``inference.json``'s
evaluator) do the same for the other workflows. Device choice and DistributedDataParallel are
:mod:`medvol.engines.distributed` (so ``multi_gpu_train.json`` only sets ``train#trainer#multi_gpu``), what a run
prints is :mod:`medvol.engines.console`.

Example (what a self-supervised bundle's ``train#trainer`` instantiates)::

    trainer = build_trainer(method, optimizer, SeededDataset(train_items, preprocessing, views, method.batch_keys),
                            max_epochs=100, output_dir="runs/caid", val_data=val_items, batch_size=8)
    trainer.run()
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    LrScheduleHandler,
    MeanDice,
    MetricsSaver,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import Inferer, SimpleInferer
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, SaveImaged
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from medvol.engines.config import require_file
from medvol.engines.console import (
    EpochSummary,
    MetricsReport,
    SingleRenderProgressBar,
    log_iteration_debug,
    quiet_engine_logger,
    quiet_stats_handler,
)
from medvol.engines.data import make_loader
from medvol.engines.distributed import prepare_network
from medvol.engines.handlers import ModelSaver, PerClassMetrics, ResumableCheckpoint, scalar_outputs
from medvol.engines.trainer import SSLEvaluator, SSLTrainer, prepare_supervised_batch
from medvol.errors import ConfigError
from medvol.io import labeled_datalist, load_split
from medvol.io.datalist import image_datalist
from medvol.networks.momentum import unwrap_module

__all__ = [
    "lower_is_better",
    "build_trainer",
    "build_evaluator",
    "build_segmentation_evaluator",
    "evaluation_datalist",
    "inference_dataset",
    "segmentation_writer",
    "build_inference",
    "default_checkpoint",
]

logger = logging.getLogger("medvol.engines")


def lower_is_better(current: float, prev: float) -> bool:
    """``metric_cmp_fn`` for losses: MONAI starts ``best_metric`` at -1, so a negative ``prev`` means "none yet"."""
    return prev < 0 or current < prev


def _loss(output: dict) -> torch.Tensor:
    return output["loss"]


# ---- training ------------------------------------------------------------------------------------------------


def build_trainer(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset,
    max_epochs: int,
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    samples_per_volume: int | None = None,
    iterations_per_epoch: int | None = None,
    warmup_epochs: float = 0,
    val_data: Sequence | None = None,
    validator: Engine | None = None,
    train_handlers: Sequence | None = None,
    resume: bool = False,
    amp: bool = False,
    multi_gpu: bool = False,
    loss_function: Callable | None = None,
    inferer: Inferer | None = None,
    channels_last: bool = True,
):
    """The standard medvol trainer with its handlers (and, for a self-supervised method, its validation).

    Without ``loss_function`` it is an :class:`SSLTrainer` of a self-supervised method (``network(batch)``
    returns the losses); with one, MONAI's ``SupervisedTrainer`` (``loss_function(inferer(image, network),
    label)``). Handlers, in this order: ``train_handlers`` (e.g. the ``CheckpointLoader`` MONAI Label inserts);
    ``LrScheduleHandler`` stepping MONAI's ``WarmupCosineSchedule`` every iteration (linear warm-up from 0 for
    ``warmup_epochs``, at most all iterations but one, then cosine decay to 0); the method's ``train_handlers()``
    (momentum / queue / epoch hooks); a ``ValidationHandler`` running the validator every epoch with a
    :class:`ModelSaver` on it that keeps the best backbone as ``output_dir/models/model.pt`` (it compares the
    validator's key metric with the validator's own ``metric_cmp_fn``; without validation, or with an empty
    validation set, the backbone is saved every epoch); a :class:`ModelSaver` writing the backbone of the last
    epoch to ``output_dir/models/model_final.pt`` when training completes; :class:`ResumableCheckpoint`
    (``output_dir/checkpoints/last.pt``, loaded when ``resume``); ``StatsHandler`` (one :class:`EpochSummary`
    line per epoch with the validation metrics, iterations at DEBUG); ``TensorBoardStatsHandler`` on the trainer
    and on the validator (``output_dir/tensorboard``, one event file; validation metrics such as
    ``val_mean_dice`` are written at the trainer's epoch); a :class:`SingleRenderProgressBar`.

    The saved backbone is ``network.backbone`` when the network has one (an ``SSLMethod``), else the network.
    The checkpoint stores the unwrapped network as ``"method"`` (self-supervised) or ``"network"``
    (supervised), next to ``"optimizer"``, ``"lr_scheduler"`` and ``"best_model"``. The trainer exposes
    ``validator``, ``lr_scheduler`` and ``model_saver``.

    Args:
        network: the method or network (moved to ``device``).
        optimizer: its optimizer.
        dataset: a :class:`~medvol.engines.SeededDataset` (loaded with a :class:`SeededSampler`).
        max_epochs: epochs to train (the schedule spans them).
        output_dir: run folder (``models/``, ``checkpoints/``, ``tensorboard/``).
        device, amp: as in MONAI's trainers (AMP is used on CUDA only).
        batch_size, seed, num_workers: loader settings; the last incomplete batch is dropped when there are
            more draws than ``batch_size`` (unless ``iterations_per_epoch`` is set).
        samples_per_volume: draws per volume and epoch (default 1: one pass over the dataset).
        iterations_per_epoch: fixed epoch length; draws per epoch are ``iterations_per_epoch * batch_size``.
        warmup_epochs: epochs of linear learning-rate warm-up.
        val_data: validation items of a self-supervised method: its losses on ``dataset.like(val_data)``
            (same views, drawn with ``seed + 1``) every epoch, by :func:`build_evaluator`.
        validator: an evaluator to run every epoch instead (e.g. :func:`build_segmentation_evaluator`).
        train_handlers: extra handlers, attached first.
        resume: continue from ``checkpoints/last.pt`` when it exists.
        multi_gpu: wrap the network in ``DistributedDataParallel`` (:func:`prepare_network`); the
            ``multi_gpu_train.json`` overlay sets it.
        loss_function, inferer: supervised training (inferer default: ``SimpleInferer``).
        channels_last: ``channels_last_3d`` batches (and, for a method, network).
    """
    output_dir, device = Path(output_dir), torch.device(device)
    module = unwrap_module(network)
    network = prepare_network(module, device, multi_gpu=multi_gpu)
    per_volume = 1 if samples_per_volume is None else int(samples_per_volume)
    num_samples = int(iterations_per_epoch) * int(batch_size) if iterations_per_epoch is not None else \
        (None if per_volume == 1 else len(dataset) * per_volume)
    draws = len(dataset) if num_samples is None else num_samples
    # the tail batch is dropped only when this process's shard holds more than one batch: under DDP each process
    # draws ceil(draws / world) items, and dropping at the global count left small shards with no batch at all
    world = int(os.environ.get("WORLD_SIZE", 1))
    loader = make_loader(dataset, batch_size=batch_size, seed=seed, num_workers=num_workers,
                         drop_last=iterations_per_epoch is None and math.ceil(draws / world) > batch_size,
                         num_samples=num_samples)
    if len(loader) == 0:
        raise ConfigError(f"the training data give no batch: {len(dataset)} training items over {world} "
                          f"process(es) with batch_size {batch_size}; add data or lower val_fraction")
    steps = int(iterations_per_epoch) if iterations_per_epoch is not None else len(loader)
    total_steps = max(1, max_epochs * steps)
    # at most total - 1 warm-up steps: MONAI's warm-up starts at lr 0, so the cosine part gets at least one step
    lr_scheduler = WarmupCosineSchedule(optimizer, warmup_steps=min(math.floor(warmup_epochs * steps), total_steps - 1),
                                        t_total=total_steps)
    if validator is None and val_data is not None:
        val_dataset = dataset.like(val_data)
        validator = build_evaluator(network, val_dataset, device=device, batch_size=batch_size, seed=seed,
                                    num_samples=len(val_dataset) * per_volume if per_volume != 1 else None,
                                    amp=amp, channels_last=channels_last)
    model_path = output_dir / "models" / "model.pt"
    model = getattr(module, "backbone", module)
    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))  # one event file for training and validation

    handlers = list(train_handlers or [])
    handlers.append(LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False))
    handlers += list(module.train_handlers()) if hasattr(module, "train_handlers") else []
    if validator is not None and len(validator.data_loader) > 0:
        saver = ModelSaver(model_path, model, metric_name=validator.state.key_metric_name, mode=None,
                           group_fn=getattr(module, "selection_group", None))
        saver.attach(validator)
        TensorBoardStatsHandler(summary_writer=writer, iteration_log=False,
                                global_epoch_transform=lambda _: trainer.state.epoch).attach(validator)
        handlers.append(ValidationHandler(validator=validator, interval=1, epoch_level=True))
    else:
        saver = ModelSaver(model_path, model)
        handlers.append(saver)
    handlers.append(ModelSaver(output_dir / "models" / "model_final.pt", model, at_end=True))
    supervised = loss_function is not None
    handlers.append(ResumableCheckpoint(output_dir / "checkpoints", {
        "network" if supervised else "method": module, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
        "best_model": saver}, resume=resume))
    if supervised:
        loss_of = from_engine(["loss"], first=True)
        tensorboard = TensorBoardStatsHandler(summary_writer=writer, tag_name="train_loss", output_transform=loss_of)
    else:
        loss_of = _loss
        tensorboard = TensorBoardStatsHandler(summary_writer=writer, tag_name="train", output_transform=scalar_outputs)
    stats = StatsHandler(tag_name="train_loss", epoch_print_logger=EpochSummary(validator, saver),
                         iteration_print_logger=log_iteration_debug)
    handlers += [stats, tensorboard, SingleRenderProgressBar(persist=True)]
    common = dict(device=device, max_epochs=max_epochs, train_data_loader=loader, network=network,
                  optimizer=optimizer, epoch_length=iterations_per_epoch, train_handlers=handlers, amp=amp,
                  key_train_metric={"train_loss": Average(output_transform=loss_of)}, metric_cmp_fn=lower_is_better)
    if supervised:
        trainer = SupervisedTrainer(loss_function=loss_function, inferer=inferer or SimpleInferer(),
                                    prepare_batch=prepare_supervised_batch,
                                    to_kwargs={"channels_last": channels_last}, **common)
    else:
        trainer = SSLTrainer(channels_last=channels_last, **common)
    trainer.validator, trainer.lr_scheduler, trainer.model_saver = validator, lr_scheduler, saver
    trainer.add_event_handler(Events.COMPLETED, lambda _: writer.flush())
    return quiet_engine_logger(trainer)


# ---- evaluation ----------------------------------------------------------------------------------------------


def build_evaluator(network: nn.Module, dataset, device: torch.device | str = "cpu", batch_size: int = 1,
                    seed: int = 0, num_samples: int | None = None, amp: bool = False, channels_last: bool = True,
                    val_handlers: Sequence | None = None) -> SSLEvaluator:
    """Validation losses of a self-supervised method: :class:`SSLEvaluator` with key metric ``val_loss``.

    The views are drawn with ``seed + 1`` (not the training draws), in a fixed order; ``num_samples`` as in
    :func:`build_trainer`. Lower is better (:func:`lower_is_better`); a ``StatsHandler`` logs the epoch's losses.
    """
    num_samples = num_samples if len(dataset) else None  # an empty validation set gives an empty loader
    loader = make_loader(dataset, batch_size=batch_size, seed=seed + 1, shuffle=False, num_samples=num_samples)
    handlers = [*(val_handlers or []), quiet_stats_handler("val")]
    return quiet_engine_logger(SSLEvaluator(
        device=torch.device(device), val_data_loader=loader, network=network, amp=amp,
        key_val_metric={"val_loss": Average(output_transform=_loss)}, metric_cmp_fn=lower_is_better,
        val_handlers=handlers, channels_last=channels_last))


def evaluation_datalist(dataset_dir, split_file=None) -> list[dict]:
    """The labeled volumes ``evaluate.json`` scores: the ``test`` list of ``split_file``, or all of ``dataset_dir``.

    Without a split file every labeled volume of ``dataset_dir`` is scored, including those the model was
    trained on, which inflates the Dice: a warning line says so (and how to hold volumes out).
    """
    cases = load_split(split_file, "test")
    items = labeled_datalist(dataset_dir, cases=cases)
    if cases is None:
        logger.warning(f"no split_file: evaluating all {len(items)} labeled volumes of {dataset_dir}, including the "
                       "ones the model was trained on (the Dice is optimistic); pass --split_file SPLIT.json with a "
                       "'test' list of held-out cases (and train with its 'pool' list) to score unseen volumes only")
    return items


def _image_meta(batch) -> list[dict]:
    return [item["image"].meta for item in batch]


def build_segmentation_evaluator(network: nn.Module, dataset, inferer: Inferer, num_classes: int,
                                 device: torch.device | str = "cpu", amp: bool = False, num_workers: int = 0,
                                 val_handlers: Sequence | None = None, checkpoint: str | os.PathLike | None = None,
                                 metrics_dir: str | os.PathLike | None = None,
                                 class_names: Sequence[str] | None = None) -> SupervisedEvaluator:
    """Mean Dice of a segmentation network (MONAI ``SupervisedEvaluator`` with ``MeanDice``, key ``val_mean_dice``).

    Prediction (argmax) and label are one-hot encoded with ``num_classes`` and Dice is computed per class without
    the background (``include_background=False``; a class absent from the label gives NaN, left out of means).
    The per-class means are metrics too (:class:`PerClassMetrics`): ``val_dice_<class name>`` (``class_names``;
    default ``val_dice_class0`` = label 1, ...), so they reach the trainer's log line and TensorBoard.

    Args:
        network: the network, on its device.
        dataset: (image, label) items, one volume per batch.
        inferer: e.g. a ``SlidingWindowInferer``.
        num_classes: classes including background.
        device, amp: as in MONAI's evaluators.
        num_workers: loader workers.
        val_handlers: extra handlers (after the checkpoint loader).
        checkpoint: load this state dict into ``network`` first (evaluation of a trained model).
        metrics_dir: write MONAI ``MetricsSaver`` reports there (``metrics.csv``, ``val_mean_dice_raw.csv``:
            Dice per volume and class, ``val_mean_dice_summary.csv``) and print the result
            (:class:`MetricsReport`).
        class_names: class names (labels 1, 2, ...) of the per-class metrics and the printed per-class means.

    Raises:
        ConfigError: when ``checkpoint`` does not exist.
    """
    device = torch.device(device)
    handlers = []
    if checkpoint is not None:
        handlers.append(CheckpointLoader(load_path=str(require_file(checkpoint, "ckpt_path")),
                                         load_dict={"model": unwrap_module(network)}, map_location=device))
    handlers += [PerClassMetrics("val_mean_dice", class_names), *(val_handlers or []), quiet_stats_handler()]
    if metrics_dir is not None:
        handlers += [MetricsSaver(save_dir=str(metrics_dir), metrics="*", metric_details="*", summary_ops="*",
                                  batch_transform=_image_meta), MetricsReport(metrics_dir, class_names)]
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)
    postprocessing = Compose([AsDiscreted("pred", argmax=True, to_onehot=num_classes),
                              AsDiscreted("label", to_onehot=num_classes)])
    metric = MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
    return quiet_engine_logger(SupervisedEvaluator(
        device=device, val_data_loader=loader, network=network, inferer=inferer, postprocessing=postprocessing,
        prepare_batch=prepare_supervised_batch, key_val_metric={"val_mean_dice": metric}, val_handlers=handlers,
        amp=amp))


# ---- inference -----------------------------------------------------------------------------------------------


def inference_dataset(dataset_dir, *transforms) -> Dataset:
    """Every image of ``dataset_dir`` (:func:`medvol.io.image_datalist`), transformed by ``transforms`` in order."""
    return Dataset(image_datalist(dataset_dir), Compose(list(transforms)))


def segmentation_writer(preprocessing, output_dir: str | os.PathLike, postfix: str = "seg") -> Compose:
    """Postprocessing that writes label maps on each input's own grid: ``{case}_{postfix}.nii.gz``, uint8.

    Softmax, ``Invertd`` of ``preprocessing`` (back to the input grid, before the argmax so probabilities are
    interpolated), argmax, ``SaveImaged`` (flat in ``output_dir``). MONAI Label filters the ``SaveImaged`` out
    and restores the result itself.
    """
    return Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir=str(output_dir), output_postfix=postfix, output_dtype=torch.uint8,
                   resample=False, separate_folder=False, print_log=False),
    ])


def default_checkpoint(bundle_root: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """The weights an ``inference.json`` loads when no ``--ckpt_path`` is given.

    A bundle in model-zoo's layout carries its released weights as ``<bundle_root>/models/model.pt``
    (``medvol bundle export --checkpoint``); that file wins when it exists. Otherwise it is what this bundle's own
    ``train.json`` wrote, ``<output_dir>/models/model.pt`` (its best epoch; see :class:`ModelSaver`).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> default_checkpoint(root, root / "runs") == str(root / "runs" / "models" / "model.pt")
    True
    >>> (root / "models").mkdir(); (root / "models" / "model.pt").touch()
    >>> default_checkpoint(root, root / "runs") == str(root / "models" / "model.pt")
    True
    """
    released = Path(bundle_root) / "models" / "model.pt"
    return str(released if released.is_file() else Path(output_dir) / "models" / "model.pt")


def build_inference(network: nn.Module, dataset, postprocessing, checkpoint: str | os.PathLike,
                    device: torch.device | str = "cpu", amp: bool = False, inferer: Inferer | None = None,
                    weights: nn.Module | None = None, num_workers: int = 0) -> SupervisedEvaluator:
    """The evaluator of an ``inference.json``: one volume per batch, ``checkpoint`` loaded first.

    Args:
        network: what maps an image to ``pred`` (moved to ``device``).
        dataset: image items (:func:`inference_dataset`).
        postprocessing: the writer (``SaveEmbeddingd``, :func:`segmentation_writer`, ...).
        checkpoint: state dict (``models/model.pt``), loaded with MONAI's ``CheckpointLoader``.
        device, amp: as in MONAI's evaluators.
        inferer: default ``SimpleInferer``.
        weights: the module the checkpoint belongs to, when ``network`` wraps it (e.g. the backbone inside
            an ``EmbeddingNet``); default ``network``.
        num_workers: loader workers.

    Raises:
        ConfigError: when ``checkpoint`` does not exist.
    """
    device = torch.device(device)
    network = network.to(device)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)
    handlers = [CheckpointLoader(load_path=str(require_file(checkpoint, "ckpt_path")),
                                 load_dict={"model": weights if weights is not None else network}, map_location=device),
                quiet_stats_handler()]
    return quiet_engine_logger(SupervisedEvaluator(
        device=device, val_data_loader=loader, network=network, inferer=inferer or SimpleInferer(),
        postprocessing=postprocessing, val_handlers=handlers, amp=amp))
