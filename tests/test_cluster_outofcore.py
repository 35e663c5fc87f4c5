"""KMeans on inputs that are not (or need not be) in memory: numpy.memmap, h5py datasets, streams of batches."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from medvol.cluster import KMeans
from medvol.cluster.rows import count_bad_rows, is_batch_stream, row_chunks, take_rows

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _mixture(n: int, k: int = 5, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return (rng.normal(0, 10, (k, d))[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _memmap(path, x, dtype=np.float32):
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=x.shape)
    mm[:] = x
    mm.flush()
    return np.load(path, mmap_mode="r")


def _same_fit(a: KMeans, b: KMeans) -> None:
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-9) and a.n_train_ == b.n_train_


@pytest.mark.parametrize("spherical", [False, True])
def test_memmap_and_hdf5_fit_like_the_array_in_memory(tmp_path, spherical):
    x, _ = _mixture(30_000)  # 5 x 1024 training rows of 30,000; two assignment chunks with chunk_rows below
    ref = KMeans(5, seed=2, spherical=spherical).fit(x)
    mm = _memmap(tmp_path / "x.npy", x)
    assert isinstance(mm, np.memmap)
    _same_fit(KMeans(5, seed=2, spherical=spherical).fit(mm), ref)
    _same_fit(KMeans(5, seed=2, spherical=spherical).fit(_memmap(tmp_path / "x64.npy", x, np.float64)), ref)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("features", data=x, chunks=(1000, 8))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        km = KMeans(5, seed=2, spherical=spherical).fit(f["features"])
        _same_fit(km, ref)
        np.testing.assert_array_equal(km.predict(f["features"]), ref.labels_)
    np.testing.assert_array_equal(ref.predict(mm), ref.labels_)
    assert -ref.score(mm) == pytest.approx(ref.inertia_, rel=1e-6)


def test_row_helpers_read_by_chunks(tmp_path):
    x = np.arange(5000 * 3, dtype=np.float64).reshape(5000, 3)
    chunks = list(row_chunks(x, chunk_rows=1024))
    assert [s for s, _ in chunks] == [0, 1024, 2048, 3072, 4096] and chunks[-1][1].shape == (904, 3)
    assert all(c.dtype == np.float32 and c.flags.c_contiguous for _, c in chunks)
    x32 = x.astype(np.float32)
    assert next(row_chunks(x32, 100))[1].base is x32  # in-memory float32: views, no copy
    rows = np.array([0, 3, 4095, 4096, 4999])
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f["x"] = x
        np.testing.assert_array_equal(take_rows(f["x"], rows), x32[rows])
        assert not is_batch_stream(f["x"])
    np.testing.assert_array_equal(take_rows(x, rows), x32[rows])
    assert is_batch_stream(iter([x])) and not is_batch_stream([[1.0, 2.0]]) and not is_batch_stream(x)
    bad = x32.copy()
    bad[7, 1], bad[9] = np.nan, np.inf
    assert count_bad_rows(bad) == 2 and count_bad_rows(x32) == 0
    assert count_bad_rows(np.full((3, 2), 3e38, np.float32)) == 0  # the sum overflows, the rows are finite


def test_nan_outside_the_training_sample_is_still_reported(tmp_path):
    x, _ = _mixture(40_000)
    x[[5, 39_999], 3] = np.nan
    mm = _memmap(tmp_path / "x.npy", x)
    km = KMeans(5, max_points_per_centroid=2)  # 10 training rows: the NaN rows are almost surely not among them
    with pytest.raises(ValueError, match="x has 2 of 40000 rows with NaN or inf features"):
        km.fit(mm)
    assert km.cluster_centers_ is None  # nothing half-fitted


def _batches(x, size):
    for start in range(0, len(x), size):
        yield x[start:start + size]


def test_stream_that_fits_in_the_sample_is_exact():
    x, y = _mixture(6000, seed=1)
    km = KMeans(5, seed=0).fit(_batches(x, 700))
    assert km.labels_ is None and km.n_samples_seen_ == 6000 and km.n_train_ == 5 * 1024
    assert km.inertia_ == pytest.approx(-km.score(x), rel=1e-6)  # every row was kept: exact
    assert adjusted_rand_score(y, km.predict(x)) == pytest.approx(1.0)
    again = KMeans(5, seed=0).fit(_batches(x, 700))
    np.testing.assert_array_equal(again.cluster_centers_, km.cluster_centers_)  # seeded


def test_stream_larger_than_the_sample_estimates_inertia_from_held_out_rows():
    x, y = _mixture(60_000, k=6, seed=2)
    km = KMeans(6, seed=0, max_points_per_centroid=100).fit(_batches(x, 5000), stream_sample=3000)
    assert km.n_samples_seen_ == 60_000 and km.n_train_ == 600  # 3000 kept, 600 trained on, 2400 held out
    assert km.inertia_ == pytest.approx(-km.score(x), rel=0.05)
    assert adjusted_rand_score(y, km.predict(x)) == pytest.approx(1.0)
    half = KMeans(6, seed=0, max_points_per_centroid=10_000).fit(_batches(x, 5000), stream_sample=3000)
    assert half.n_train_ == 1500  # at most half of the kept rows train, the rest estimate the inertia


def test_stream_errors():
    x, _ = _mixture(100, d=4)
    with pytest.raises(ValueError, match="features have 5 columns but earlier volumes had 4"):
        KMeans(3).fit(iter([x, np.zeros((10, 5), np.float32)]))
    with pytest.raises(ValueError, match="needs at least 3 samples, got 2"):
        KMeans(3).fit(iter([x[:1], x[1:2]]))
    with pytest.raises(ValueError, match="needs at least 3 samples, got 0"):
        KMeans(3).fit(iter([]))
    with pytest.raises(ValueError, match="features has 1 of 100 rows with NaN"):
        KMeans(3).fit(iter([np.where(np.arange(100)[:, None] == 7, np.nan, x)]))
    with pytest.raises(ValueError, match="stream_sample must be at least 2 \\* n_clusters = 6"):
        KMeans(3).fit(iter([x]), stream_sample=5)
    with pytest.raises(ValueError, match="needs max_points_per_centroid or stream_sample"):
        KMeans(3, max_points_per_centroid=None).fit(iter([x]))
    assert KMeans(3, max_points_per_centroid=None).fit(iter([x]), stream_sample=50).n_train_ == 25


_MEMORY_CHECK = """
import json, sys, threading, time, tracemalloc
import numpy as np
from medvol.cluster import KMeans

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0

x = np.load(sys.argv[1], mmap_mode="r")
KMeans(4, n_init=1).fit(np.asarray(x[:5000]))  # warm up faiss and numpy outside the measurement
peak, stop = [0], threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
base = rss_anon()
thread = threading.Thread(target=watch)
thread.start()
tracemalloc.start()
t0 = time.perf_counter()
km = KMeans(4, seed=0).fit(x)
seconds = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1]
stop.set(); thread.join()
print(json.dumps({"traced_peak": traced, "anon_growth": max(peak[0], rss_anon()) - base, "n": km.labels_.size,
                  "inertia": km.inertia_, "seconds": seconds}))
"""


def test_memory_stays_bounded_on_a_memmap_larger_than_the_bound(tmp_path):
    """A 195 MiB memory-mapped matrix is fitted within 48 MiB of new memory (one bool mask of it would be 49)."""
    n, d, bound = 1_600_000, 32, 48 << 20
    path = tmp_path / "features.npy"
    try:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.default_rng(0)
        centers = rng.normal(0, 5, (4, d)).astype(np.float32)
        for start in range(0, n, 250_000):
            block = rng.random((min(250_000, n - start), d), dtype=np.float32)
            mm[start:start + len(block)] = block + centers[np.arange(len(block)) % 4]
        mm.flush()
        del mm
        assert path.stat().st_size > 4 * bound
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEMORY_CHECK), str(path)], capture_output=True,
                              encoding="utf-8", errors="replace", timeout=600)
    finally:
        path.unlink(missing_ok=True)  # do not leave 195 MiB behind in pytest's kept temp folders
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == n and out["inertia"] > 0
    # labels_ (8 bytes a row, 12.2 MiB) + the training sample, the distances of one chunk and FAISS's buffers
    assert out["traced_peak"] < bound, out
    assert out["anon_growth"] < bound, out
