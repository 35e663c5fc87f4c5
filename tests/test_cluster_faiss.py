"""faiss integration: SimpleITK import order (SWIG proxy repair), device selection, shadowed GPU installs."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys

import faiss
import numpy as np
import pytest

from medvol.cluster import KMeans, faiss_gpu_count, faiss_has_gpu, repair_faiss_vectors

_IMPORT_ORDER_CHECK = """
import json, sys
if sys.argv[1] == "faiss-first":
    import faiss, SimpleITK as sitk
else:
    import SimpleITK as sitk, faiss
import numpy as np
proxy = type(faiss.Clustering(1, 1).centroids)
before = f"{proxy.__module__}.{proxy.__name__}"
from medvol.cluster import KMeans, repair_faiss_vectors
x = np.random.default_rng(0).standard_normal((3000, 8)).astype("float32")
km = KMeans(4, seed=0, max_points_per_centroid=100).fit(x)  # medvol's training (repairs by itself)
again = repair_faiss_vectors()                               # already repaired: nothing to do
raw = faiss.Kmeans(8, 4, niter=5, seed=1)                    # faiss's own wrapper works too now
raw.train(x)
image = sitk.GetImageFromArray(np.random.rand(8, 9, 10).astype("float32"))  # and SimpleITK still works
image.SetSpacing((1.0, 2.0, 3.0))
smooth = sitk.SmoothingRecursiveGaussian(image, 1.5)
print(json.dumps({"before": before, "again": again, "inertia": km.inertia_, "raw_shape": list(raw.centroids.shape),
                  "spacing": list(smooth.GetSpacing()), "size": list(smooth.GetSize()),
                  "vector": type(sitk.VectorFloat([1.0, 2.0])).__name__}))
"""


@pytest.mark.parametrize("order", ["faiss-first", "simpleitk-first"])
def test_training_works_in_both_import_orders(order):
    """faiss.Kmeans.train raised AssertionError when SimpleITK (another SWIG module) was imported after faiss."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_CHECK, order], capture_output=True,
                          encoding="utf-8", errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the root cause: the shared SWIG type of std::vector<float> carries the proxy class of the last import
    expected = "SimpleITK.SimpleITK.VectorFloat" if order == "faiss-first" else "faiss.swigfaiss"
    assert out["before"].startswith(expected)
    assert out["again"] is False and out["inertia"] > 0 and out["raw_shape"] == [4, 8]
    assert out["spacing"] == [1.0, 2.0, 3.0] and out["size"] == [10, 9, 8] and out["vector"] == "VectorFloat"


def test_repair_is_a_no_op_when_faiss_owns_its_vectors():
    assert type(faiss.Clustering(1, 1).centroids) is faiss.Float32Vector or repair_faiss_vectors()
    assert repair_faiss_vectors() is False


# ---------------------------------------------------------------------------------------------- devices
class _FakeGpuResources:
    """Stands in for faiss.StandardGpuResources on a CPU machine (counts how often it is created)."""

    created = 0

    def __init__(self):
        type(self).created += 1


def _fake_gpu(monkeypatch, n_gpus: int, calls: list | None = None) -> None:
    """Make the installed faiss look like a GPU build that sees ``n_gpus`` devices (indexes stay on the CPU)."""
    _FakeGpuResources.created = 0
    monkeypatch.setattr(faiss, "StandardGpuResources", _FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: n_gpus)

    def gpu_index(res, d):
        assert isinstance(res, _FakeGpuResources)
        if calls is not None:
            calls.append(d)
        return faiss.IndexFlatL2(d)

    monkeypatch.setattr(faiss, "GpuIndexFlatL2", gpu_index, raising=False)


def _x(n=600, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 10, (3, d))[rng.integers(0, 3, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_auto_picks_the_gpu_when_faiss_sees_one(monkeypatch):
    calls: list[int] = []
    _fake_gpu(monkeypatch, 1, calls)
    assert faiss_gpu_count() == 1 and faiss_has_gpu()
    km = KMeans(3, device="auto", n_init=2)
    assert km.device_ == "cuda"
    x = _x()
    km.fit(x)
    assert calls and set(calls) == {4} and _FakeGpuResources.created == 1  # one set of GPU resources per model
    np.testing.assert_array_equal(km.predict(x), KMeans(3, device="cpu", n_init=2).fit(x).predict(x))
    assert KMeans(3, device="cpu").device_ == "cpu"  # an explicit CPU request wins


def test_gpu_build_without_a_device_falls_back_to_cpu(monkeypatch):
    _fake_gpu(monkeypatch, 0)
    assert faiss_gpu_count() == 0 and not faiss_has_gpu()
    assert KMeans(3, device="auto").device_ == "cpu"
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        KMeans(3, device="cuda")


def test_cpu_only_faiss(monkeypatch):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", _versions({}))
    assert faiss_gpu_count() == 0
    assert KMeans(3, device="auto").fit(_x()).device_ == "cpu"
    with pytest.raises(RuntimeError, match=r"CPU-only: pip install 'medvol-ssl\[gpu\]' \(adds faiss-gpu"):
        KMeans(3, device="cuda")


def _versions(known: dict):
    real = importlib.metadata.version

    def version(name):
        if name in known:
            return known[name]
        if name.startswith("faiss"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    return version


def test_gpu_wheel_shadowed_by_cpu_files_says_how_to_repair(monkeypatch, caplog):
    """faiss-gpu installed, but faiss-cpu's files were written after it: ``import faiss`` is the CPU build."""
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", _versions({"faiss-gpu": "1.15.1", "faiss-cpu": "1.15.1"}))
    fix = r"pip install --force-reinstall --no-deps faiss-gpu==1\.15\.1"
    with pytest.raises(RuntimeError, match=fix):
        KMeans(3, device="cuda")
    with caplog.at_level(logging.WARNING, logger="medvol.cluster"):
        assert KMeans(3, device="auto").device_ == "cpu"
    assert "--force-reinstall --no-deps faiss-gpu==1.15.1" in caplog.text


@pytest.mark.skipif(not faiss_has_gpu(), reason="needs faiss with GPU support and a CUDA device")
def test_real_gpu_matches_cpu():
    x = _x(20_000, 16)
    gpu, cpu = KMeans(3, device="cuda").fit(x), KMeans(3, device="cpu").fit(x)
    np.testing.assert_array_equal(gpu.predict(x), cpu.predict(x))
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-4)
