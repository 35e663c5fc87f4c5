"""What a user sees while a bundle trains: one line per epoch, one progress bar per epoch, the per-iteration detail
at DEBUG; and evaluate.json's warning when it scores the training volumes too."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLES_DIR, REPO_ROOT, bundle_cli, copy_labeled_hippo, overlay

TINY = "{'unet': {'channels': [4, 8, 16], 'norm': 'instance'}}"
EPOCHS, ITERATIONS = 2, 3
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ")


@pytest.fixture(scope="module")
def hippo4(demo_dir, tmp_path_factory) -> Path:
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("hippo4"), 4)


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config_file", "bundles/fewshot_segmentation/configs/train.json",
            "--bundle_root", "bundles/fewshot_segmentation", "--dataset_dir", str(data), "--output_dir", str(out),
            "--max_epochs", str(EPOCHS), "--iterations_per_epoch", str(ITERATIONS), "--val_fraction", "0.5",
            "--backbone_options", TINY, "--pad_size", "[32, 48, 32]", "--roi_size", "[16, 32, 16]", *extra]


def _after_summary(stdout: str) -> list[str]:
    """The log lines after `monai.bundle run`'s input summary (which ends with a '---' line)."""
    lines = stdout.splitlines()
    end = max(i for i, line in enumerate(lines) if line.endswith(" - ---"))
    return [line for line in lines[end + 1:] if line.strip()]


@pytest.fixture(scope="module")
def trained(hippo4, tmp_path_factory):
    """A 2-epoch run; output read as bytes, since text mode would turn tqdm's carriage returns into newlines."""
    out = tmp_path_factory.mktemp("seg")
    raw = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *_train_args(hippo4, out)],
                         capture_output=True, timeout=300, cwd=REPO_ROOT)
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_an_epoch_is_one_line(trained):
    out, proc = trained
    body = _after_summary(proc.stdout)
    # the datalist line, then one line per epoch; nothing from ignite's engine loggers at INFO
    assert len(body) <= 2 + EPOCHS, "\n".join(body)
    assert not [line for line in body if "ignite" in line or "Key metric" in line or "Metrics --" in line]
    epochs = [line for line in body if " - medvol.engines - INFO - epoch " in line]
    assert len(epochs) == EPOCHS, "\n".join(body)
    for k, line in enumerate(epochs, start=1):
        assert re.search(rf"epoch {k}/{EPOCHS}: train_loss \d+\.\d{{4}}, val_mean_dice \d\.\d{{4}}, "
                         rf"val_dice_anterior \d\.\d{{4}}, val_dice_posterior \d\.\d{{4}} "
                         rf"\(best \d\.\d{{4}} at epoch \d\)(, model saved)?, \d+\.\d s$", line), line
    assert "model saved" in epochs[0] and (out / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_one_progress_bar_per_epoch_each_state_drawn_once(trained):
    _, proc = trained
    bars = [line for line in proc.stderr.split("\n") if "Epoch [" in line]
    # tqdm rate-limits its redraws (and the bar waits for its first update): on a quiet machine a whole
    # 3-iteration epoch of this tiny run can end before anything is drawn (known: epochs shorter than tqdm's
    # 0.1 s interval show no bar). What must hold whatever the timing: at most one line per epoch, never two
    # bars on a line, never a state drawn twice, never a bar without its "Epoch [k/N]" description
    assert len(bars) <= EPOCHS, bars
    for line in bars:
        draws = [d.strip() for d in line.split("\r") if d.strip()]
        epochs = {re.match(r"Epoch \[(\d+)/", d).group(1) for d in draws if d.startswith("Epoch [")}
        assert len(epochs) == 1 and all(d.startswith("Epoch [") for d in draws), draws  # one bar, described
        steps = [re.search(r"\[(\d+)/\d+\]", d.split(":", 1)[1]).group(1) for d in draws]
        assert len(steps) == len(set(steps)), draws  # no state drawn twice
    for k in range(1, EPOCHS + 1):
        assert sum(f"Epoch [{k}/{EPOCHS}]" in line for line in bars) <= 1, bars


@pytest.mark.slow
def test_iterations_and_engine_messages_at_debug(hippo4, tmp_path):
    conf = tmp_path / "logging_debug.conf"
    text = (BUNDLES_DIR / "fewshot_segmentation" / "configs" / "logging.conf").read_text(encoding="utf-8")
    conf.write_text(text.replace("[logger_medvol]\nlevel=INFO", "[logger_medvol]\nlevel=DEBUG"))
    assert conf.read_text(encoding="utf-8") != text
    proc = bundle_cli([*_train_args(hippo4, tmp_path / "out"), "--max_epochs", "1", "--logging_file", str(conf)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    debug = [line for line in proc.stdout.splitlines() if " - DEBUG - " in line]
    iterations = [line for line in debug if re.search(rf"epoch 1/1 iteration \d/{ITERATIONS}: loss \d", line)]
    assert len(iterations) == ITERATIONS, "\n".join(debug)
    assert any("medvol.engines.SupervisedTrainer - DEBUG - Epoch[1] Complete" in line for line in debug)
    assert any("medvol.engines - DEBUG - saved " in line for line in debug)


def test_ssl_trainer_epoch_line_has_the_validation_loss(tmp_path, caplog):
    """The same one line for a self-supervised method (SSLTrainer + SSLEvaluator), in-process."""
    import torch

    from medvol.engines import SeededDataset, build_trainer
    from medvol.methods import CAiD
    from medvol.networks import build_backbone

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [{k: torch.rand(1, 16, 16, 16, generator=g) for k in ("image_v1", "image_v2", "target_v1")}
            for _ in range(6)]
    method = CAiD(build_backbone("unet", options={"unet": {"channels": [4, 8]}}), hidden_dim=8, queue_size=4)
    dataset = SeededDataset(data[:4], deterministic=[], random=[], keys=method.batch_keys)
    trainer = build_trainer(method, torch.optim.SGD(method.parameters(), lr=0.01), dataset, max_epochs=2,
                            output_dir=tmp_path, batch_size=2, val_data=data[4:])
    with caplog.at_level(logging.INFO):
        trainer.run()
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 2, info
    assert re.fullmatch(r"epoch 1/2: train_loss \d+\.\d{4}, val_loss \d+\.\d{4} \(best \d+\.\d{4} at epoch 1\), "
                        r"model saved, \d+\.\d s", info[0]), info


@pytest.mark.slow
def test_evaluate_without_split_file_warns_that_it_scores_the_training_volumes(trained, hippo4, tmp_path):
    out, _ = trained
    args = ["--config_file", overlay("fewshot_segmentation", "evaluate.json"),
            "--bundle_root", "bundles/fewshot_segmentation", "--dataset_dir", str(hippo4), "--output_dir", str(out),
            "--backbone_options", TINY, "--roi_size", "[16, 32, 16]"]
    proc = bundle_cli(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warning = [line for line in proc.stdout.splitlines() if " - WARNING - no split_file" in line]
    assert len(warning) == 1, proc.stdout
    assert f"all 4 labeled volumes of {hippo4}, including the ones the model was trained on" in warning[0]
    assert "val_mean_dice " in proc.stdout and "over 4 volumes" in proc.stdout

    cases = sorted(p.name[: -len(".nii.gz")] for p in (hippo4 / "imagesTr").iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"pool": cases[:2], "test": cases[2:]}))
    proc = bundle_cli([*args, "--split_file", str(split)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout and "over 2 volumes" in proc.stdout


def test_evaluation_datalist_warns_only_without_a_split(hippo4, tmp_path, caplog):
    from medvol.engines import evaluation_datalist

    with caplog.at_level(logging.WARNING, logger="medvol.engines"):
        assert len(evaluation_datalist(hippo4)) == 4
    assert "including the ones the model was trained on" in caplog.text and "--split_file" in caplog.text
    caplog.clear()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"test": [sorted(p.name for p in (hippo4 / "imagesTr").iterdir())[0][:-7]]}))
    with caplog.at_level(logging.WARNING, logger="medvol.engines"):
        assert len(evaluation_datalist(hippo4, split)) == 1
    assert not caplog.records
