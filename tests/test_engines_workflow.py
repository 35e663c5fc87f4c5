"""medvol.engines.workflow: the standard trainer/evaluator every bundle instantiates, device choice and DDP, and the
pieces the bundle configs no longer spell out (method handlers, batch keys, backbone defaults)."""

from __future__ import annotations

import socket

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, ValidationHandler
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import EnsureTyped, SelectItemsd

from medvol.engines import (
    EpochHookHandler,
    ModelSaver,
    MomentumUpdateHandler,
    QueueUpdateHandler,
    ResumableCheckpoint,
    SeededDataset,
    build_trainer,
    default_device,
    destroy_process_group,
    lower_is_better,
    prepare_network,
)
from medvol.errors import ConfigError
from medvol.methods import CAiD, GlobalLocalContrastive, LeCL, SSLMethod
from medvol.networks import UNet3D, build_backbone, build_slice_encoder


def _views(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image_v1": torch.rand(1, 16, 16, 16, generator=g), "image_v2": torch.rand(1, 16, 16, 16, generator=g),
             "target_v1": torch.rand(1, 16, 16, 16, generator=g), "extra": f"case{i}"} for i in range(n)]


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda:3")  # torchrun's local rank
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == torch.device("cuda:0")


def test_lower_is_better_starts_from_monais_sentinel():
    assert lower_is_better(5.0, -1) and lower_is_better(1.0, 2.0) and not lower_is_better(3.0, 2.0)


def test_backbone_defaults_are_the_bundles_networks():
    """backbone_options {} builds exactly what the bundles' spelled-out options built before."""
    before = build_backbone("unet", in_channels=1, out_channels=3, channels=[16, 32, 64, 128], norm="instance")
    after = build_backbone("unet", out_channels=3, options={})
    assert str(before) == str(after)
    swin = build_backbone("swinunetr", options={"unet": {"channels": [4, 8]}})  # other backbones' entries ignored
    assert str(swin) == str(build_backbone("SwinUNETR", feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)))
    small = build_backbone("unet", options={"unet": {"channels": [4, 8]}}, out_channels=2)
    assert small.encoder_channels == (4, 8) and small.out_channels == 2 and isinstance(small, UNet3D)


def test_methods_declare_their_handlers_and_batch_keys():
    net = build_backbone("unet", options={"unet": {"channels": [4, 8, 16]}})
    caid = CAiD(net, hidden_dim=8, queue_size=8, momentum=0.9)
    handlers = caid.train_handlers()
    assert [type(h) for h in handlers] == [MomentumUpdateHandler, QueueUpdateHandler] and handlers[0].momentum == 0.9
    assert caid.batch_keys == ("image_v1", "image_v2", "target_v1") and caid.find_unused_parameters
    glc = GlobalLocalContrastive(net, hidden_dim=8, local_levels=2, local_grid=(2, 2, 2))
    assert [type(h) for h in glc.train_handlers()] == [EpochHookHandler] and glc.selection_group() == "global"
    lecl = LeCL(build_slice_encoder("mambaout", in_channels=3, dims=(8, 16), depths=(1, 1)), 16, 32, 32)
    (momentum,) = lecl.train_handlers()
    assert (momentum.momentum, momentum.schedule) == (0.99, "cosine") and not lecl.find_unused_parameters
    assert SSLMethod(net).train_handlers() == [] and SSLMethod(net).selection_group() is None


def test_seeded_dataset_keys_and_like():
    data = _views(3)
    keyed = SeededDataset(data, deterministic=[], random=[], keys=["image_v1", "target_v1"])
    explicit = SeededDataset(data, deterministic=[], random=[SelectItemsd(["image_v1", "target_v1"]),
                                                             EnsureTyped(["image_v1", "target_v1"], track_meta=False)])
    a, b = keyed[(1, 7)], explicit[(1, 7)]
    assert set(a) == {"image_v1", "target_v1"} and torch.equal(a["image_v1"], b["image_v1"])
    other = keyed.like(data[:1])
    assert len(other) == 1 and set(other[0]) == {"image_v1", "target_v1"} and other.cache_rate == keyed.cache_rate


def test_model_saver_compares_like_the_engine(tmp_path):
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    engine.metric_cmp_fn = lambda current, prev: current > prev  # MONAI's default: higher is better
    saver = ModelSaver(tmp_path / "m.pt", net, metric_name="dice", mode=None)
    for value, saved in [(0.5, True), (0.4, False), (0.7, True)]:
        engine.state.metrics = {"dice": value}
        (tmp_path / "m.pt").unlink(missing_ok=True)
        saver(engine)
        assert (tmp_path / "m.pt").is_file() == saved
    assert saver.best == 0.7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prepare_network_wraps_in_ddp_with_the_methods_setting(monkeypatch):
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1",
                       "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    net = build_backbone("unet", options={"unet": {"channels": [4, 8]}})
    assert prepare_network(net, "cpu") is net
    method = LeCL(build_slice_encoder("mambaout", in_channels=3, dims=(8, 16), depths=(1, 1)), 16, 32, 32)
    try:
        ddp = prepare_network(method, "cpu", multi_gpu=True)  # gloo on CPU
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is method
        assert ddp.find_unused_parameters is False
    finally:
        destroy_process_group()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("val_items", [0, 2])
def test_build_trainer_wires_the_standard_handlers(val_items, tmp_path):
    torch.manual_seed(0)
    method = CAiD(build_backbone("unet", options={"unet": {"channels": [4, 8]}}), hidden_dim=8, queue_size=4)
    data = _views(4 + val_items)
    dataset = SeededDataset(data[:4], deterministic=[], random=[], keys=method.batch_keys)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    trainer = build_trainer(method, optimizer, dataset, max_epochs=2, output_dir=tmp_path, batch_size=2,
                            val_data=data[4:], warmup_epochs=1)
    trainer.run()
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert list((tmp_path / "tensorboard").iterdir())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"method", "optimizer", "lr_scheduler", "best_model", "trainer"} <= set(state)
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(saved) == set(method.backbone.state_dict())  # the backbone, not the whole method
    assert trainer.state.epoch == 2 and trainer.lr_scheduler.last_epoch == 4  # stepped every iteration
    final = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)  # the last epoch's backbone
    for key, value in method.backbone.state_dict().items():
        torch.testing.assert_close(final[key], value, msg=key)
    validated = trainer.validator is not None and len(trainer.validator.data_loader) > 0
    assert validated == bool(val_items)
    if validated:
        assert trainer.validator.state.metrics["val_loss"] > 0 and trainer.model_saver.best is not None
    handler_types = {type(h) for h in _attached(trainer)}
    expected = {LrScheduleHandler, MomentumUpdateHandler, QueueUpdateHandler, ResumableCheckpoint, StatsHandler,
                TensorBoardStatsHandler}
    assert expected <= handler_types and (ValidationHandler in handler_types) == validated


def test_build_trainer_keeps_a_batch_per_process_under_ddp(monkeypatch, tmp_path):
    """3 items over 2 processes at batch 2: each shard (padded to 2) is one batch. Dropping the tail by the global
    count (3 > 2) left every process an empty loader, and training ended at once with nothing saved."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    net = torch.nn.Conv3d(1, 1, 1)
    dataset = SeededDataset([{"image_v1": torch.zeros(1, 2, 2, 2)}] * 3, deterministic=[], random=[],
                            keys=["image_v1"])
    trainer = build_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), dataset, max_epochs=1,
                            output_dir=tmp_path, batch_size=2)
    assert len(trainer.data_loader) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    empty = SeededDataset([], deterministic=[], random=[], keys=["image_v1"])
    with pytest.raises(ConfigError, match="no batch: 0 training items over 1 process"):
        build_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), empty, max_epochs=1,
                      output_dir=tmp_path / "empty", batch_size=2)


def test_build_trainer_lr_schedule_is_monais_warmup_cosine(tmp_path):
    net = torch.nn.Conv3d(1, 1, 1)
    dataset = SeededDataset([{"image_v1": torch.zeros(1, 2, 2, 2)}] * 4, deterministic=[], random=[],
                            keys=["image_v1"])
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    trainer = build_trainer(net, optimizer, dataset, max_epochs=5, output_dir=tmp_path, iterations_per_epoch=2,
                            warmup_epochs=1)
    sched = trainer.lr_scheduler
    assert isinstance(sched, WarmupCosineSchedule) and (sched.warmup_steps, sched.t_total) == (2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # linear warm-up from 0, then cosine decay
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05
    one = build_trainer(net, torch.optim.SGD(net.parameters(), lr=1.0), dataset, max_epochs=1,
                        output_dir=tmp_path / "one", iterations_per_epoch=1, warmup_epochs=1)
    assert one.lr_scheduler.warmup_steps == 0  # never only warm-up (MONAI's would train at lr 0)
    assert one.optimizer.param_groups[0]["lr"] == 1.0


def _attached(engine: Engine) -> list:
    """The handler objects registered on ``engine`` (ignite keeps the bound methods / callables per event)."""
    found = []
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            owner = getattr(handler, "__self__", handler)
            found.append(owner)
    return found
