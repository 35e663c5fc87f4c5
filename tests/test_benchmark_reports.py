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
