"""`medvol demo`: the shipped pretrained weights, and the demo's fine-tuning, evaluation and pictures."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from medvol.apps.cli import main
from medvol.apps.demo import DEMO_WEIGHTS, TINY_UNET, run_demo
from medvol.networks import build_backbone, load_pretrained


def test_shipped_weights_fit_the_demo_network_and_match_their_readme():
    readme = (DEMO_WEIGHTS.parent / "README.md").read_text(encoding="utf-8")
    digest = hashlib.sha256(DEMO_WEIGHTS.read_bytes()).hexdigest()
    assert digest in readme, "the README's sha256 must be the shipped file's"
    assert DEMO_WEIGHTS.stat().st_size < 4_000_000  # a few MB at most inside the package
    assert (DEMO_WEIGHTS.parent / "LICENSE.hippocampus").is_file()  # CC-BY-SA data: the licence travels along
    split = json.loads(DEMO_WEIGHTS.with_suffix(".split.json").read_text(encoding="utf-8"))
    demo_cases = {p.name[: -len(".nii.gz")] for p in (DEMO_WEIGHTS.parents[2] / "demo_data" / "hippocampus"
                                                       / "imagesTr").glob("*.nii.gz")}
    assert len(split["pool"]) == 180 and not demo_cases & set(split["pool"])  # never saw the demo volumes
    net = build_backbone("unet", in_channels=1, out_channels=3, options=TINY_UNET)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_pretrained(net, DEMO_WEIGHTS)
    assert not report["missing"] and not report["skipped_shape"] and len(report["loaded"]) == 34
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith(("encoder.", "decoder.")) for k in changed)


@pytest.mark.slow
def test_demo_fine_tunes_from_scratch_and_from_the_shipped_weights(demo_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    worst = run_demo(out, demo_dir, train=True, command=main,
                     finetune={"seeds": (0,), "max_epochs": 1, "iterations_per_epoch": 2})
    assert worst == 0
    dice = json.loads((out / "dice.json").read_text(encoding="utf-8"))
    assert dice["seeds"] == [0] and len(dice["scratch"]) == 1 and len(dice["pretrained"]) == 1
    assert all(0.0 <= v <= 1.0 for v in dice["scratch"] + dice["pretrained"])
    for picture in ("dice.png", "segmentation.png"):
        assert (out / picture).stat().st_size > 10_000
    assert (out / "fewshot_pretrained_seed0" / "segmentations" / "hippocampus_034_seg.nii.gz").is_file()
    text = capsys.readouterr().out
    assert re.search(r"pretrained: \d\.\d{3}\s+\(seeds: \d\.\d{3}\)", text)
    assert "--pretrained_checkpoint" in text and str(DEMO_WEIGHTS) in text  # the equivalent command is shown


def test_demo_without_the_shipped_data_is_one_line(tmp_path, monkeypatch, capsys):
    """A package that lost its bundles or demo data (installed elsewhere, half deleted) says so on one line."""
    import medvol.bundles

    monkeypatch.setattr(medvol.bundles, "PACKAGE_DIR", tmp_path / "site-packages" / "medvol")
    for data in ([], ["--data", str(DEMO_WEIGHTS.parents[2] / "demo_data")]):
        assert main(["demo", "--output", str(tmp_path / "out"), *data]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        kind = "bundles" if data else "demo_data"
        assert len(err) == 1 and f"medvol's {kind} folder is missing" in err[0], err
