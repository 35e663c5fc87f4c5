"""Benchmark medvol's default KMeans against scikit-learn and faiss.Kmeans defaults, and out-of-core on a memmap.

Stages (each cached as JSON in ``--cache``, so an interrupted run resumes where it stopped):

``gmm``: 300,000 x 64 float32 rows of a 32-component Gaussian mixture,
    ``sklearn.datasets.make_blobs(300_000, 64, centers=32, random_state=0)`` (centres uniform in [-10, 10]^64,
    unit variance), k = 32.
``hippo``: 1,000,000 x 64 voxel features of the 200 hippocampus MRI volumes, k = 10. Each volume is
    normalised on its own (clipped to its 1st-99th intensity percentiles, then zero mean and unit variance),
    convolved with a fixed bank of 64 random 5x5x5 filters (seeded, each zero-mean with unit L2 norm, replicate
    padding), passed through tanh; :class:`medvol.cluster.FeatureSampler` keeps a uniform sample of 1M voxels.
``outofcore``: ``--ooc-rows`` x 64 float32 rows (a 32-component mixture written chunk by chunk) in a
    ``numpy.memmap`` under ``--tmp``, fitted by the default ``KMeans(32)`` in a fresh process that reports its
    peak memory; the file is deleted afterwards.

Rows of the comparisons, all with ``--threads`` threads, every timing including the assignment of all rows
(labels and inertia), inertia always over all rows:

- scikit-learn ``KMeans(k, n_init=1, max_iter=20, random_state=0)`` (its defaults otherwise: greedy k-means++,
  tol 1e-4, lloyd): the reference.
- medvol ``KMeans(k)``: the defaults (seed 0).
- ``faiss.Kmeans(d, k)``: its defaults (random init, 25 iterations, 256 points per centroid), then an
  ``IndexFlatL2`` search of all rows.
- medvol ``KMeans(k, init="random", n_init=1, max_points_per_centroid=None)``: the defaults before issue #13
  (random init, every row), for the record.
- medvol ``device="cuda"`` when faiss sees a GPU.

Methods are interleaved over ``--repeats`` rounds and the median time is reported, so load from other users of
a shared CPU spreads over all of them.

    MEDVOL_DATA=/work/shared/data OMP_WAIT_POLICY=PASSIVE python benchmarks/kmeans_benchmark.py \
        --cache /tmp/kmeans_bench --out kmeans.json

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` (read when the OpenMP runtimes load, so
in the environment): with spinning threads faiss' many short parallel regions slow down up to 10x when the
cores are oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine_info  # noqa: E402


def normalise(volume: np.ndarray) -> np.ndarray:
    """Clip to the volume's own 1st-99th percentiles, then zero mean, unit variance."""
    lo, hi = np.percentile(volume, [1, 99])
    v = np.clip(volume, lo, hi)
    return ((v - v.mean()) / max(float(v.std()), 1e-6)).astype(np.float32)


def filter_bank(dim: int, seed: int, size: int = 5):
    """``dim`` random zero-mean, unit-norm 3D filters (dim, 1, size, size, size)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 1, size, size, size, generator=g)
    w = w - w.mean(dim=(2, 3, 4), keepdim=True)
    return w / w.flatten(1).norm(dim=1)[:, None, None, None, None]


def build_features(files: list[Path], n_samples: int, dim: int, seed: int) -> tuple[np.ndarray, int]:
    """Uniform sample of ``n_samples`` voxel features (n, dim) over ``files``; also returns the voxels seen."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from medvol.cluster import FeatureSampler

    weights = filter_bank(dim, seed)
    pad = weights.shape[-1] // 2
    sampler = FeatureSampler(n_samples, seed=seed)
    with torch.no_grad():
        for f in files:
            v = torch.from_numpy(normalise(np.asarray(nib.load(f).dataobj, dtype=np.float32)))[None, None]
            v = F.pad(v, (pad,) * 6, mode="replicate")
            feats = torch.tanh(F.conv3d(v, weights))  # (1, dim, X, Y, Z)
            sampler.add(feats[0].flatten(1).T.contiguous())  # (X*Y*Z, dim)
    return sampler.sample(), sampler.n_seen


def dataset(name: str, args) -> tuple[np.ndarray, int, dict]:
    """The rows of a comparison stage, cached as .npy; returns (x, k, description)."""
    path = Path(args.cache) / f"{name}.npy"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return np.load(path), *json.loads(info_path.read_text(encoding="utf-8")).values()
    t0 = time.perf_counter()
    if name == "gmm":
        from sklearn.datasets import make_blobs

        x = make_blobs(n_samples=300_000, n_features=64, centers=32, random_state=0)[0].astype(np.float32)
        k, desc = 32, {"source": "make_blobs(300000, 64, centers=32, random_state=0)"}
    else:
        files = sorted(Path(args.data).glob("*.nii.gz"))
        if not files:
            raise SystemExit(f"{args.data}: no .nii.gz volumes (set --data or MEDVOL_DATA)")
        x, seen = build_features(files, 1_000_000, 64, 0)
        k, desc = 10, {"source": f"{len(files)} hippocampus volumes, {seen} voxels, 64 random 5^3 filters + tanh"}
    desc["build_seconds"] = time.perf_counter() - t0
    np.save(path, x)
    info_path.write_text(json.dumps({"k": k, "desc": desc}))
    return x, k, desc


def compare(name: str, args) -> dict:
    import faiss
    import sklearn
    from sklearn.cluster import KMeans as SkKMeans
    from threadpoolctl import threadpool_limits

    from medvol.cluster import KMeans, faiss_has_gpu

    x, k, desc = dataset(name, args)
    d = x.shape[1]

    def sk():
        with threadpool_limits(args.threads):
            m = SkKMeans(k, n_init=1, max_iter=20, random_state=0).fit(x)
        return float(m.inertia_), int(m.n_iter_)

    def medvol(**kw):
        def fit():
            m = KMeans(k, seed=0, **kw).fit(x)
            return m.inertia_, m.n_iter_
        return fit

    def faiss_defaults():
        m = faiss.Kmeans(d, k)
        m.train(x)
        dist, _ = m.assign(x)  # every row assigned, as the other rows do
        return float(np.maximum(dist, 0).sum(dtype=np.float64)), int(len(m.obj))

    configs = {
        "scikit-learn KMeans(k, n_init=1, max_iter=20)": sk,
        "medvol KMeans(k) (defaults)": medvol(device="cpu"),
        "faiss.Kmeans(d, k) (defaults) + assignment": faiss_defaults,
        "medvol, pre-#13 defaults (random init, every row)": medvol(device="cpu", init="random", n_init=1,
                                                                     max_points_per_centroid=None),
    }
    if faiss_has_gpu():
        KMeans(k, device="cuda", n_iter=2).fit(x[: 100 * k])  # warm-up (CUDA context)
        configs["medvol KMeans(k, device='cuda')"] = medvol(device="cuda")
    times: dict[str, list[float]] = {c: [] for c in configs}
    results = {}
    for _ in range(args.repeats):
        for c, fit in configs.items():
            t0 = time.perf_counter()
            results[c] = fit()
            times[c].append(time.perf_counter() - t0)
    with threadpool_limits(args.threads):  # how much scikit-learn itself varies with its seed (not timed)
        sk_seeds = [float(SkKMeans(k, n_init=1, max_iter=20, random_state=s).fit(x).inertia_) for s in (1, 2)]
    medvol_seeds = [float(KMeans(k, seed=s, device="cpu").fit(x).inertia_) for s in (1, 2, 3, 4)]
    base_t = float(np.median(times[next(iter(configs))]))
    base_i = results[next(iter(configs))][0]
    rows = []
    for c in configs:
        t = float(np.median(times[c]))
        rows.append({"method": c, "seconds": t, "seconds_all": times[c], "inertia": results[c][0],
                     "n_iter": results[c][1], "speedup_vs_sklearn": base_t / t,
                     "inertia_ratio_vs_sklearn": results[c][0] / base_i})
    return {"dataset": name, "shape": list(x.shape), "k": k, **desc, "rows": rows,
            "sklearn_inertia_ratio_seeds_1_2": [v / base_i for v in sk_seeds],
            "medvol_inertia_ratio_seeds_1_4": [v / base_i for v in medvol_seeds],
            "versions": {"faiss": faiss.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__},
            "loadavg_end": os.getloadavg()}


_OOC_FIT = """
import json, sys, threading, time, tracemalloc
import numpy as np
from medvol.cluster import KMeans

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

threads = int(sys.argv[2])
import faiss
faiss.omp_set_num_threads(threads)
x = np.load(sys.argv[1], mmap_mode="r")
peak_anon, stop = [0], threading.Event()
def watch():
    while not stop.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.01)
base_anon, base_hwm = status("RssAnon"), status("VmHWM")
thread = threading.Thread(target=watch, daemon=True)
thread.start()
tracemalloc.start()
t0 = time.perf_counter()
km = KMeans(32, seed=0, device="cpu").fit(x)
seconds = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1]
stop.set(); thread.join()
print(json.dumps({"seconds": seconds, "rows_per_second": x.shape[0] / seconds, "inertia": km.inertia_,
                  "n_train": km.n_train_, "labels_bytes": km.labels_.nbytes, "traced_peak": traced,
                  "rss_anon_before": base_anon, "rss_anon_peak": max(peak_anon[0], status("RssAnon")),
                  "vm_hwm_before": base_hwm, "vm_hwm": status("VmHWM"), "rss_file_end": status("RssFile")}))
"""


def outofcore(args) -> dict:
    """Write the memmap, fit it in a fresh process, delete it."""
    n, d = args.ooc_rows, 64
    path = Path(args.tmp) / "kmeans_outofcore_features.npy"
    try:
        t0 = time.perf_counter()
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.default_rng(0)
        centers = rng.uniform(-10, 10, (32, d)).astype(np.float32)
        step = 1 << 20
        for start in range(0, n, step):
            m = min(step, n - start)
            mm[start:start + m] = centers[rng.integers(0, 32, m)] + rng.standard_normal((m, d), dtype=np.float32)
        mm.flush()
        del mm
        write_seconds = time.perf_counter() - t0
        size = path.stat().st_size
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_OOC_FIT), str(path), str(args.threads)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        fit = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        path.unlink(missing_ok=True)
    return {"rows": n, "dim": d, "file_bytes": size, "write_seconds": write_seconds, "fit": fit,
            "loadavg_end": os.getloadavg()}


def _table(stage: dict) -> str:
    lines = [f"{stage['dataset']}: {stage['shape'][0]:,} x {stage['shape'][1]}, k = {stage['k']}", "",
             "| method | median time (s) | speed-up vs sklearn | inertia | inertia / sklearn | iterations |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in stage["rows"]:
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['speedup_vs_sklearn']:.1f}x | {r['inertia']:.6e} | "
                     f"{r['inertia_ratio_vs_sklearn']:.4f} | {r['n_iter']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.environ.get("MEDVOL_DATA", "."), "hippocampus", "imagesTr"))
    p.add_argument("--stages", nargs="+", default=["gmm", "hippo", "outofcore"],
                   choices=["gmm", "hippo", "outofcore"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; the median is reported")
    p.add_argument("--ooc-rows", type=int, default=20_000_000)
    p.add_argument("--tmp", default="/tmp", help="folder of the out-of-core memmap (deleted afterwards)")
    p.add_argument("--cache", default="/tmp/kmeans_bench", help="finished stages and built features")
    p.add_argument("--out", default="kmeans.json")
    args = p.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "machine": machine_info(faiss=faiss.__version__,
                                                          OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))}
    for stage in args.stages:
        done = Path(args.cache) / f"result_{stage}.json"
        if done.is_file():
            print(f"{stage}: cached in {done}")
            result[stage] = json.loads(done.read_text(encoding="utf-8"))
            continue
        print(f"{stage}: running", flush=True)
        result[stage] = outofcore(args) if stage == "outofcore" else compare(stage, args)
        done.write_text(json.dumps(result[stage], indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["machine"]))
    for stage in args.stages:
        if stage == "outofcore":
            o = result[stage]
            f = o["fit"]
            print(f"\nout-of-core: {o['rows']:,} x {o['dim']} memmap ({o['file_bytes'] / 2**30:.2f} GiB): "
                  f"{f['seconds']:.1f} s ({f['rows_per_second']:,.0f} rows/s); RssAnon peak "
                  f"{f['rss_anon_peak'] / 2**20:.0f} MiB (before {f['rss_anon_before'] / 2**20:.0f}), "
                  f"tracemalloc peak {f['traced_peak'] / 2**20:.0f} MiB, VmHWM {f['vm_hwm'] / 2**20:.0f} MiB "
                  f"(file pages included), labels_ {f['labels_bytes'] / 2**20:.0f} MiB")
        else:
            print("\n" + _table(result[stage]))
            st = result[stage]
            print("sklearn seeds 1, 2 / seed 0:", [round(v, 4) for v in st["sklearn_inertia_ratio_seeds_1_2"]],
                  "| medvol seeds 1-4 / sklearn seed 0:", [round(v, 4) for v in st["medvol_inertia_ratio_seeds_1_4"]])


if __name__ == "__main__":
    main()
