"""The SSL engine: deterministic data, trainer/evaluator, handlers, resume after an interruption."""

from __future__ import annotations

import copy

import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import CopyItemsd, EnsureTyped, SelectItemsd

from medvol.engines import (
    ModelSaver,
    MomentumUpdateHandler,
    QueueUpdateHandler,
    ResumableCheckpoint,
    SeededDataset,
    SeededSampler,
    SSLEvaluator,
    SSLTrainer,
    make_loader,
)
from medvol.io import load_datalist
from medvol.methods import CAiD
from medvol.networks import UNet3D
from medvol.transforms import RandCropPaird, caid_distortion, intensity_augmentation, mri_preset

ROI = (16, 16, 16)


def _dataset(demo_dir, n=4):
    data = [{"image": d["image"]} for d in load_datalist(demo_dir / "hippocampus")][:n]
    det = [mri_preset(keys=("image",), size=(32, 48, 32), crop_foreground=False)]
    rand = [RandCropPaird("image", ROI), CopyItemsd("image_v1", names="target_v1"),
            intensity_augmentation("image_v1"), intensity_augmentation("image_v2"),
            caid_distortion("image_v1"), caid_distortion("image_v2"),
            SelectItemsd(["image_v1", "image_v2", "target_v1"]),
            EnsureTyped(["image_v1", "image_v2", "target_v1"], track_meta=False)]
    return SeededDataset(data, det, rand)


def _setup(dataset, tmp_path, max_epochs=2, resume=False):
    torch.manual_seed(0)
    method = CAiD(UNet3D(channels=(4, 8, 16)), hidden_dim=16, proj_dim=8, queue_size=16)
    loader = make_loader(dataset, batch_size=2, seed=3)
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    sched = WarmupCosineSchedule(opt, warmup_steps=1, t_total=max_epochs * len(loader))
    ckpt = ResumableCheckpoint(tmp_path / "ckpt", {"method": method, "optimizer": opt, "lr_scheduler": sched},
                               resume=resume)
    handlers = [LrScheduleHandler(sched, epoch_level=False, print_lr=False), MomentumUpdateHandler(0.9),
                QueueUpdateHandler(), ckpt]
    trainer = SSLTrainer("cpu", max_epochs, loader, method, opt, train_handlers=handlers)
    return method, trainer


def test_sampler_is_deterministic_and_shards(demo_dir):
    data = list(range(10))
    a, b = SeededSampler(data, seed=5), SeededSampler(data, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    shards = [SeededSampler(data, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(1)
    indices = [i for s in shards for i, _ in s]
    assert len(indices) == 12 and set(indices) == set(data)  # padded to equal shards, every item covered
    assert list(SeededSampler([], seed=1)) == []  # an empty validation split iterates to nothing
    many = SeededSampler([0, 1], seed=1, num_samples=9)
    many.set_epoch(1)
    draws = list(many)
    assert len(draws) == 9 and len({seed for _, seed in draws}) == 9  # a fresh seed for every draw


def test_seeded_dataset_reproduces_views(demo_dir):
    ds = _dataset(demo_dir, n=2)
    a, b, c = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    torch.testing.assert_close(a["image_v1"], b["image_v1"])
    assert not torch.equal(a["image_v1"], c["image_v1"])
    assert a["target_v1"].shape == (1, *ROI)


def test_resume_matches_uninterrupted_run(demo_dir, tmp_path):
    ds = _dataset(demo_dir)
    full, trainer = _setup(ds, tmp_path / "full")
    trainer.run()

    part, trainer = _setup(ds, tmp_path / "part")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # "killed" after epoch 1
    trainer.run()
    assert trainer.state.epoch == 1
    resumed, trainer = _setup(ds, tmp_path / "part", resume=True)
    trainer.run()
    assert trainer.state.epoch == 2
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert int(b["queue.ptr"]) != 0  # the queue was restored and kept filling
    fresh, _ = _setup(ds, tmp_path / "other")
    assert not torch.equal(fresh.state_dict()["head.mlp.layers.0.weight"], b["head.mlp.layers.0.weight"])


def test_validation_does_not_touch_method_state(demo_dir, tmp_path):
    ds = _dataset(demo_dir)
    method, trainer = _setup(ds, tmp_path, max_epochs=1)
    trainer.run()  # queue and momentum branch now hold trained state
    before = copy.deepcopy(method.state_dict())
    evaluator = SSLEvaluator("cpu", make_loader(ds, batch_size=2, shuffle=False), method)
    evaluator.run()
    after = method.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), f"validation changed {key}"
    assert evaluator.state.output["loss"].isfinite()


def test_training_updates_queue_and_momentum(demo_dir, tmp_path):
    ds = _dataset(demo_dir)
    method, trainer = _setup(ds, tmp_path, max_epochs=1)
    key_before = copy.deepcopy(method.key_backbone.state_dict())
    queue_before = method.queue.queue.clone()
    trainer.run()
    assert not torch.equal(queue_before, method.queue.queue)
    assert int(method.queue.ptr) == (len(trainer.data_loader) * 2) % 16
    changed = [k for k, v in method.key_backbone.state_dict().items() if not torch.equal(v, key_before[k])]
    assert changed  # the EMA moved the momentum encoder
    assert all(not p.requires_grad for p in method.key_backbone.parameters())


def test_model_saver_tracks_best_and_groups(tmp_path):
    net = torch.nn.Linear(2, 2)
    saver = ModelSaver(tmp_path / "m.pt", net, metric_name="val_loss", group_fn=lambda: stage[0])
    stage = ["global"]

    class E:
        class state:
            metrics = {}

    for value, expect_save in [(3.0, True), (2.0, True), (2.5, False)]:
        E.state.metrics = {"val_loss": value}
        (tmp_path / "m.pt").unlink(missing_ok=True)
        saver(E)
        assert (tmp_path / "m.pt").exists() == expect_save
    stage[0] = "local"  # a new stage: its loss is not comparable, the first value is saved
    E.state.metrics = {"val_loss": 9.0}
    saver(E)
    assert (tmp_path / "m.pt").exists() and saver.best == 9.0
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert loaded.keys() == net.state_dict().keys()
