"""scripts/gpu_check.py (`make gpu-check`): skips cleanly without a GPU; its logic runs on the CPU (--device cpu)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _report(path):
    return json.loads((path / "gpu_check.json").read_text(encoding="utf-8"))


def test_without_a_gpu_nothing_runs_and_the_exit_code_says_so(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_devices", lambda: 0)
    assert gpu_check.main(["--output", str(tmp_path)]) == gpu_check.EXIT_NO_GPU == 3
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "no CUDA device" in printed[0] and "--device cpu" in printed[0]
    report = _report(tmp_path)
    skipped = len(gpu_check.BUNDLES) + 2
    assert report["exit_code"] == 3 and report["summary"] == {"passed": 0, "failed": 0, "skipped": skipped}
    names = [r["name"] for r in report["results"]]
    n = len(gpu_check.BUNDLES)
    assert names[:n] == [f"bundle:{b}" for b in gpu_check.BUNDLES] and names[n:] == ["kmeans:faiss-gpu", "ddp:nccl"]
    assert set(gpu_check.BUNDLES) == {p.name for p in (REPO_ROOT / "bundles").iterdir() if p.is_dir()}
    assert not (tmp_path / "runs").exists()


def test_cpu_dry_run_reports_each_path_and_a_failure_fails(gpu_check, tmp_path, monkeypatch, capsys):
    assert gpu_check.main(["--device", "cpu", "--output", str(tmp_path / "ok"), "--only", "kmeans:*"]) == 0
    report = _report(tmp_path / "ok")
    status = {r["name"]: r["status"] for r in report["results"]}
    n = len(gpu_check.BUNDLES)  # every bundle and the DDP check are not selected
    assert status["kmeans:faiss-gpu"] == "passed" and report["summary"]["skipped"] == n + 1
    assert "on cpu" in report["results"][n]["detail"]
    text = capsys.readouterr().out
    assert re.search(r"^kmeans:faiss-gpu +passed +\d+\.\d +20000 x 16 points", text, re.M)
    assert re.search(r"^ddp:nccl +skipped +0\.0 +not selected", text, re.M)
    assert f"1 passed, 0 failed, {n + 1} skipped" in text

    def broken(device):
        raise RuntimeError("faiss exploded")

    monkeypatch.setattr(gpu_check, "check_kmeans", broken)
    assert gpu_check.main(["--device", "cpu", "--output", str(tmp_path / "bad"), "--only", "kmeans:*"]) == 1
    (result,) = [r for r in _report(tmp_path / "bad")["results"] if r["name"] == "kmeans:faiss-gpu"]
    assert result["status"] == "failed" and "RuntimeError: faiss exploded" in result["detail"]
    assert "faiss exploded" in (tmp_path / "bad" / "logs" / "kmeans_faiss-gpu.log").read_text(encoding="utf-8")


@pytest.mark.slow
def test_cpu_dry_run_trains_a_bundle(gpu_check, tmp_path):
    code = gpu_check.main(["--device", "cpu", "--output", str(tmp_path), "--only", "bundle:fewshot_segmentation"])
    report = _report(tmp_path)
    (result,) = [r for r in report["results"] if r["name"] == "bundle:fewshot_segmentation"]
    assert code == 0, result
    assert result["status"] == "passed" and result["extra"] == {"amp": False, "device": "cpu"}
    assert (tmp_path / "runs" / "fewshot_segmentation" / "models" / "model.pt").is_file()
