"""The benchmark scripts' report text states what the run used (counts from the split file, not prose)."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

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
    assert len(prov["commit"]) == 40 and prov["torch"] and prov["monai"]
    assert prov["split"] == "benchmarks/splits/hippocampus_fewshot.json"
