"""The benchmark scripts' report text states what the run used (counts from the split file, not prose)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fewshot_report_counts_the_split(tmp_path):
    bench = _load("fewshot_hippocampus")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"pool": [f"p{i}" for i in range(7)], "test": ["t0", "t1", "t2"]}), encoding="utf-8")
    results = [{"init": "scratch", "n": n, "seed": s, "mean_dice": 0.5 + 0.1 * s, "dice_anterior": 0.5,
                "dice_posterior": 0.6} for n in (1, "all") for s in (0, 1)]
    args = SimpleNamespace(methods=[], labels=[1, "all"], split=split, plot=str(tmp_path / "plot.png"))
    text = bench.report(args, results, {})
    assert "over the 3 test volumes" in text
    assert "50 test" not in text
    assert "0.550 ± 0.050" in text  # mean ± std over the two seeds
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_fewshot_export_writes_runs_volumes_and_provenance(tmp_path):
    """The files committed beside the table: one row per run, one per test volume of each run, commit + versions."""
    import csv

    bench = _load("fewshot_hippocampus")
    out = tmp_path / "out"
    results = []
    for seed in (0, 1):
        run = out / "finetune" / "scratch" / f"n2_s{seed}" / "eval"
        run.mkdir(parents=True)
        (run / "val_mean_dice_raw.csv").write_text(
            "filename,class0,class1,mean\n/d/imagesTr/hippocampus_004.nii.gz,0.8,0.6,0.7\n"
            "/d/imagesTr/hippocampus_014.nii.gz,0.9,0.7,0.8\n", encoding="utf-8")
        results.append({"init": "scratch", "n": "2", "seed": seed, "mean_dice": 0.75, "dice_anterior": 0.85,
                        "dice_posterior": 0.65, "train_seconds": 12.0})
    args = SimpleNamespace(out=out, threads=1, workers=2, labels=["2"], seeds=[0, 1], methods=[], pretrain_epochs=30,
                           finetune_epochs=25, iterations=20, channels=[8, 16], split=REPO / "benchmarks" / "splits"
                           / "hippocampus_fewshot.json")
    bench.export_results(args, results, {}, tmp_path / "export")
    with open(tmp_path / "export" / "per_volume.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["case"] == "hippocampus_004" and rows[1]["mean_dice"] == "0.8"
    assert len((tmp_path / "export" / "runs.csv").read_text(encoding="utf-8").splitlines()) == 3
    prov = json.loads((tmp_path / "export" / "provenance.json").read_text(encoding="utf-8"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine_info import cpu_model

    assert len(prov["commit"]) == 40 and prov["torch"] and prov["monai"] and prov["cpu"] == cpu_model()
    assert prov["split"] == "benchmarks/splits/hippocampus_fewshot.json"


def test_fewshot_transformer_rows_have_their_own_scratch_baseline(tmp_path):
    """SwinUNETR-SSL and MAE fine-tune into their own architectures and are compared with that architecture from
    scratch; the U-Net methods keep the U-Net scratch row."""
    bench = _load("fewshot_hippocampus")
    assert bench.initialisations(["simclr", "swinunetr_ssl", "mae"]) == [
        "scratch", "simclr", "scratch_swinunetr", "swinunetr_ssl", "scratch_unetr", "mae"]
    assert bench.initialisations([]) == ["scratch"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"pool": ["p0"], "test": ["t0"]}), encoding="utf-8")
    dice = {"scratch": 0.7, "simclr": 0.75, "scratch_swinunetr": 0.6, "swinunetr_ssl": 0.65}
    results = [{"init": i, "n": "1", "seed": 0, "mean_dice": d, "dice_anterior": d, "dice_posterior": d}
               for i, d in dice.items()]
    args = SimpleNamespace(methods=["simclr", "swinunetr_ssl"], labels=["1"], split=split, plot=str(tmp_path / "p.png"),
                           data=tmp_path, channels=[8, 16, 32, 64])
    text = bench.report(args, results, {})
    assert "swinunetr_ssl minus scratch_swinunetr (mean Dice): 1: +0.050" in text
    assert "simclr minus scratch (mean Dice): 1: +0.050" in text
    swin, unetr, unet = (bench.finetune_overrides(i, args) for i in ("swinunetr_ssl", "scratch_unetr", "simclr"))
    assert swin["backbone"] == "swinunetr" and swin["pretrained_prefixes"] == ["encoder.swinViT."]
    assert unetr["backbone"] == "unetr" and "pretrained_prefixes" not in unetr
    assert "backbone" not in unet  # the bundle's default, the U-Net


def test_fewshot_transformer_overrides_build_networks_the_crops_fit(tmp_path):
    """The benchmark's SwinUNETR and UNETR overrides give fewshot_segmentation networks that take its crops."""
    import torch
    from monai.bundle import ConfigParser

    bench = _load("fewshot_hippocampus")
    args = SimpleNamespace(data=tmp_path, split=tmp_path / "split.json", channels=[8, 16, 32, 64])
    for init in ("scratch_swinunetr", "scratch_unetr"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "fewshot_segmentation" / "configs" / "train.json"))
        for key, value in bench.finetune_overrides(init, args).items():
            parser[key] = value
        roi = parser.get_parsed_content("roi_size")
        net = parser.get_parsed_content("network_def").eval()
        with torch.no_grad():
            out = net(torch.zeros(1, 1, *roi))
        assert out.shape == (1, 3, *roi), init


def test_fewshot_transformer_checkpoints_load_under_the_benchmark_prefixes(tmp_path):
    """The pretraining bundles' backbones (with the benchmark's overrides) load into the fine-tuning networks
    under FINETUNE's prefixes, every selected tensor (strict), so the transformer rows start from the pretext."""
    import torch
    from monai.bundle import ConfigParser

    from medvol.networks import load_pretrained

    bench = _load("fewshot_hippocampus")
    args = SimpleNamespace(data=tmp_path, split=tmp_path / "split.json", channels=[8, 16, 32, 64])
    for method, bundle in (("mae", "mae"), ("swinunetr_ssl", "swinunetr_ssl")):
        nets = []
        for name, overrides in ((bundle, {**bench._common(args), **bench.METHODS[method][1]}),
                                ("fewshot_segmentation", bench.finetune_overrides(method, args))):
            parser = ConfigParser()
            parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
            for key, value in overrides.items():
                parser[key] = value
            nets.append(parser.get_parsed_content("network_def"))
        pretrained, finetune = nets
        prefixes = bench.FINETUNE[method]["pretrained_prefixes"]
        torch.save(pretrained.state_dict(), tmp_path / f"{method}.pt")
        load_pretrained(finetune, tmp_path / f"{method}.pt", prefixes=prefixes, strict=True)
        selected = [k for k in finetune.state_dict() if k.startswith(tuple(prefixes))]
        assert len(selected) > 50, (method, len(selected))  # the whole transformer, not a stray key
        for key in selected:
            assert torch.equal(finetune.state_dict()[key], pretrained.state_dict()[key]), key


def test_fewshot_pretraining_cache_refuses_another_split(tmp_path):
    bench = _load("fewshot_hippocampus")
    stats = tmp_path / "pretrain" / "byol" / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"split": str(tmp_path / "test_split.json"), "checkpoint": "x"}), encoding="utf-8")
    args = SimpleNamespace(out=tmp_path, split=tmp_path / "test_split.json")
    assert bench.pretrain("byol", args)["checkpoint"] == "x"
    args.split = tmp_path / "validation_split.json"
    with pytest.raises(SystemExit, match="use another --out for another split"):
        bench.pretrain("byol", args)


def test_fewshot_recheck_reruns_the_cell_fresh_and_compares(tmp_path, monkeypatch, capsys):
    """--recheck re-runs one committed cell (never its cached result) and fails when the Dice moved."""
    bench = _load("fewshot_hippocampus")
    runs = tmp_path / "runs.csv"
    runs.write_text("init,n_labeled,seed,mean_dice,dice_anterior,dice_posterior,train_seconds\n"
                    "scratch,1,0,0.704400,0.789,0.620,120.0\n", encoding="utf-8")
    stale = tmp_path / "out" / "recheck" / "scratch" / "n1_s0"
    stale.mkdir(parents=True)
    (stale / "result.json").write_text("{}", encoding="utf-8")
    seen = []

    def fake(job):
        seen.append(job)
        assert not Path(job["out"]).exists()  # the old result was removed, so the cell really re-runs
        return {"mean_dice": dice}

    monkeypatch.setattr(bench, "_finetune_one", fake)
    args = SimpleNamespace(recheck=runs, recheck_cell=["scratch", "1", "0"], tolerance=0.005, out=tmp_path / "out",
                           threads=1, finetune_epochs=25, iterations=20, data=tmp_path, split=tmp_path / "s.json",
                           channels=[8, 16, 32, 64])
    (tmp_path / "provenance.json").write_text(json.dumps({"commit": "b241706a8b", "cpu": "Intel(R) Xeon(R)"}),
                                              encoding="utf-8")
    dice = 0.7046
    assert bench.recheck(args) == 0
    assert "recorded at b241706a8b on Intel(R) Xeon(R); now on" in capsys.readouterr().out
    dice = 0.7831
    assert bench.recheck(args) == 1
    assert seen[0]["checkpoint"] is None and seen[0]["n"] == "1" and seen[0]["seed"] == 0
    args.recheck_cell = ["scratch", "2", "0"]
    with pytest.raises(SystemExit, match="no run with init scratch, 2 labels, seed 0"):
        bench.recheck(args)


def test_fewshot_variants_fine_tune_a_checkpoint_with_another_transfer(tmp_path):
    """--variants models_genesis@encoder: the same checkpoint, encoder only, as a row after the method's."""
    import argparse

    bench = _load("fewshot_hippocampus")
    assert bench.initialisations(["models_genesis"], ["models_genesis@encoder"]) == [
        "scratch", "models_genesis", "models_genesis@encoder"]
    assert bench.initialisations([], ["models_genesis@encoder", "mae@all"]) == [
        "scratch", "models_genesis@encoder", "scratch_unetr", "mae@all"]
    args = SimpleNamespace(methods=[], variants=["models_genesis@encoder"], data=tmp_path, split=tmp_path / "s.json",
                           channels=[8, 16, 32, 64])
    assert bench.pretrained_methods(args) == ["models_genesis"]
    assert bench.finetune_overrides("models_genesis@encoder", args)["pretrained_prefixes"] == ["encoder."]
    assert bench.finetune_overrides("models_genesis", args)["pretrained_prefixes"] == ["encoder."]  # FINETUNE
    assert bench.finetune_overrides("models_genesis@all", args)["pretrained_prefixes"] == ["encoder.", "decoder."]
    assert "pretrained_prefixes" not in bench.finetune_overrides("spark", args)  # the bundle's default
    assert bench.finetune_overrides("mae@all", args)["backbone"] == "unetr"
    with pytest.raises(argparse.ArgumentTypeError, match="METHOD@TRANSFER"):
        bench.parse_variant("models_genesis@decoder")
