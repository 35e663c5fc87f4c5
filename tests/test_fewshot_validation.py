"""Validation while fine-tuning fewshot_segmentation: Dice in TensorBoard and the log, best and last checkpoints,
the automatic validation split and its few-label rule."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import bundle_workflow, copy_labeled_hippo
from ignite.engine import Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medvol.io import AUTO_MIN_ITEMS, split_datalist

TINY = {"backbone_options": {"unet": {"channels": [4, 8, 16], "norm": "instance"}}, "roi_size": [16, 32, 16],
        "pad_size": [32, 48, 32], "batch_size": 1}


def test_split_datalist_is_monais_partition_with_at_least_one_item_each_side():
    data = [{"i": i} for i in range(10)]
    train, val = split_datalist(data, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and sorted(d["i"] for d in train + val) == list(range(10))
    assert [d["i"] for d in train] == sorted(d["i"] for d in train)  # the datalist's order is kept
    assert split_datalist(data, 0.2, seed=3) == (train, val)  # deterministic by seed
    assert split_datalist(data, 0.2, seed=4) != (train, val)
    assert [len(p) for p in split_datalist(data[:4], 0.1)] == [3, 1]  # MONAI alone would round 0.4 to none
    assert [len(p) for p in split_datalist(data[:2], 0.9)] == [1, 1]  # never an empty training part
    assert [len(p) for p in split_datalist(data[:1], 0.5)] == [1, 0]
    assert split_datalist(data, 0.0)[1] == []


def test_auto_validation_split_rule(caplog):
    data = [{"i": i} for i in range(20)]
    with caplog.at_level(logging.INFO, logger="medvol.io"):
        for n in (1, AUTO_MIN_ITEMS - 1):
            train, val = split_datalist(data[:n], "auto")
            assert len(train) == n and val == []  # too few labels to hold one out: fixed budget, last epoch
        assert "none held out" in caplog.text
        assert [len(p) for p in split_datalist(data[:AUTO_MIN_ITEMS], "auto")] == [AUTO_MIN_ITEMS - 1, 1]
        assert [len(p) for p in split_datalist(data[:10], "auto")] == [8, 2]
        assert [len(p) for p in split_datalist(data, " AUTO ")] == [16, 4]
    from medvol.errors import ConfigError

    for bad in ("half", 1.0, -0.1):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_datalist(data, bad)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_validation_dice_in_tensorboard_and_log_best_and_final_checkpoints(demo_dir, tmp_path, capsys):
    data = copy_labeled_hippo(demo_dir, tmp_path / "data", 4)
    out = tmp_path / "run"
    wf = bundle_workflow("fewshot_segmentation", dataset_dir=str(data), output_dir=str(out), num_labeled=4,
                         max_epochs=3, iterations_per_epoch=2, **TINY)
    train, val = wf.parser.get_parsed_content("labeled_split")
    assert (len(train), len(val)) == (3, 1)  # the default ("auto") holds one of 4 labeled volumes out
    trainer = wf.parser.get_parsed_content("train#trainer")
    validator = trainer.validator
    assert validator.state.key_metric_name == "val_mean_dice"
    states = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: states.__setitem__(
        e.state.epoch, {k: v.clone() for k, v in trainer.network.state_dict().items()}))
    dice = {}
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: dice.__setitem__(
        trainer.state.epoch, float(e.state.metrics["val_mean_dice"])))
    capsys.readouterr()
    wf.run()  # the bundle's logging.conf prints to stdout
    wf.finalize()

    scalars = _scalars(out / "tensorboard")
    steps = [s for s, _ in scalars["val_mean_dice"]]
    assert steps == [1, 2, 3]  # one point per training epoch, at the trainer's epoch
    assert [v for _, v in scalars["val_mean_dice"]] == pytest.approx([dice[e] for e in steps], abs=1e-6)
    assert {"val_dice_anterior", "val_dice_posterior", "train_loss"} <= set(scalars)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " - medvol.engines - INFO - epoch " in ln]
    assert len(lines) == 3 and all("val_mean_dice" in ln and "val_dice_anterior" in ln for ln in lines)

    best = validator.state.best_metric_epoch
    assert dice[best] == max(dice.values())
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    final = torch.load(out / "models" / "model_final.pt", weights_only=True)
    for key, value in states[best].items():
        torch.testing.assert_close(saved[key], value, msg=key)
        torch.testing.assert_close(final[key], states[3][key], msg=key)
    if best != 3:
        assert any(not torch.equal(saved[k], final[k]) for k in saved)


@pytest.mark.slow
def test_two_labels_train_on_both_and_keep_the_last_epoch(demo_dir, tmp_path):
    data = copy_labeled_hippo(demo_dir, tmp_path / "data", 3)
    out = tmp_path / "run"
    wf = bundle_workflow("fewshot_segmentation", dataset_dir=str(data), output_dir=str(out), num_labeled=2,
                         max_epochs=2, iterations_per_epoch=1, **TINY)
    train, val = wf.parser.get_parsed_content("labeled_split")
    assert len(train) == 2 and val == []
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert len(trainer.validator.data_loader) == 0  # no validation: the saver writes every epoch
    wf.run()
    wf.finalize()
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    final = torch.load(out / "models" / "model_final.pt", weights_only=True)
    last = trainer.network.state_dict()
    for key in saved:
        torch.testing.assert_close(saved[key], last[key], msg=key)
        torch.testing.assert_close(final[key], last[key], msg=key)
    assert "val_mean_dice" not in _scalars(out / "tensorboard")
