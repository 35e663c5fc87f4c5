"""Benchmark medvol's FAISS k-means against scikit-learn's Lloyd k-means on features of real MRI volumes.

Features (documented in docs/benchmarks.md): every hippocampus volume is normalised on its own (clipped to its
1st-99th intensity percentiles, then zero mean and unit variance), convolved with a fixed bank of ``--dim``
random 5x5x5 filters (seeded, each zero-mean with unit L2 norm, replicate padding), and passed through tanh.
:class:`medvol.cluster.FeatureSampler` keeps a uniform sample of ``--n-samples`` voxels over all volumes.

Both k-means start from the same ``--k`` centroids (distinct voxels drawn with ``--seed``, i.e. random init
from the data) and run Lloyd iterations on all samples (sklearn: ``max_iter=--n-iter, n_init=1, tol=0,
algorithm="lloyd"``; medvol: ``n_iter=--n-iter`` without subsampling). Inertia is the sum of squared distances
of all samples to their nearest final centroid for both. An extra row shows medvol with faiss' subsampling
(``--subsampled-mppc``, inertia still measured on all samples). device="cuda" is timed when faiss sees a GPU.

    MEDVOL_DATA=../shared/data OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kmeans_benchmark.py \
        --n-samples 100000 --out r.json

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` (read when the OpenMP runtimes load, so
in the environment, not in Python): with the default spinning threads, faiss' many short parallel regions run
up to 10x slower when the cores are oversubscribed; scikit-learn is much less affected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from functools import partial
from pathlib import Path

import faiss
import nibabel as nib
import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans as SkKMeans
from threadpoolctl import threadpool_limits

from medvol import __version__
from medvol.cluster import FeatureSampler, KMeans, faiss_has_gpu


def normalise(volume: np.ndarray) -> np.ndarray:
    """Clip to the volume's own 1st-99th percentiles, then zero mean, unit variance."""
    lo, hi = np.percentile(volume, [1, 99])
    v = np.clip(volume, lo, hi)
    return ((v - v.mean()) / max(float(v.std()), 1e-6)).astype(np.float32)


def filter_bank(dim: int, seed: int, size: int = 5) -> torch.Tensor:
    """``dim`` random zero-mean, unit-norm 3D filters (dim, 1, size, size, size)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 1, size, size, size, generator=g)
    w = w - w.mean(dim=(2, 3, 4), keepdim=True)
    return w / w.flatten(1).norm(dim=1)[:, None, None, None, None]


def build_features(files: list[Path], n_samples: int, dim: int, seed: int) -> tuple[np.ndarray, int]:
    """Uniform sample of ``n_samples`` voxel features (n, dim) over ``files``; also returns the voxels seen."""
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


def fit_sklearn(x: np.ndarray, init: np.ndarray, args) -> tuple[float, int]:
    with threadpool_limits(args.threads):
        sk = SkKMeans(args.k, init=init, n_init=1, max_iter=args.n_iter, tol=0.0, algorithm="lloyd").fit(x)
    return float(sk.inertia_), int(sk.n_iter_)


def fit_medvol(x: np.ndarray, init: np.ndarray, args, device: str, mppc: int | None) -> tuple[float, int]:
    km = KMeans(args.k, device=device, n_iter=args.n_iter, seed=args.seed, init=init, max_points_per_centroid=mppc)
    km.fit(x)
    return km.inertia_, km.n_iter_


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "gpu": gpu or "no GPU",
        "faiss_gpu": faiss_has_gpu(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "sklearn": sklearn.__version__,
        "medvol": __version__,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "loadavg_1min_at_end": os.getloadavg()[0],  # other developers share the CPU
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.environ.get("MEDVOL_DATA", "."), "hippocampus", "imagesTr"))
    p.add_argument("--n-samples", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10, help="10 = radioSSL's pixel-level K (docs/methods/pixel_clustering.md)")
    p.add_argument("--n-iter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--subsampled-mppc",
        type=int,
        nargs="*",
        default=[256, 2048],
        help="extra medvol rows with faiss subsampling (k * value training points each); none: no extra row",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed fits per method (interleaved); the median is reported")
    p.add_argument("--out", default="results.json")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    files = sorted(Path(args.data).glob("*.nii.gz"))
    if not files:
        raise SystemExit(f"{args.data}: no .nii.gz volumes (set --data or MEDVOL_DATA)")
    t0 = time.perf_counter()
    x, n_voxels = build_features(files, args.n_samples, args.dim, args.seed)
    t_feat = time.perf_counter() - t0
    print(f"features {x.shape} from {len(files)} volumes ({n_voxels} voxels) in {t_feat:.1f} s")
    init = x[np.sort(np.random.default_rng(args.seed).choice(len(x), args.k, replace=False))]  # random init
    configs = {  # name -> fit function returning (inertia over all samples, iterations run)
        "scikit-learn KMeans (lloyd)": lambda: fit_sklearn(x, init, args),
        "medvol KMeans cpu (all samples)": lambda: fit_medvol(x, init, args, "cpu", None),
    }
    for mppc in args.subsampled_mppc:
        configs[f"medvol KMeans cpu (max_points_per_centroid={mppc})"] = partial(fit_medvol, x, init, args, "cpu", mppc)
    gpu_note = "skipped: the installed faiss has no GPU support or sees no CUDA device"
    if faiss_has_gpu():
        KMeans(args.k, device="cuda", n_iter=2, init=init).fit(x[: 10 * args.k])  # warm-up (CUDA context)
        configs["medvol KMeans cuda (all samples)"] = lambda: fit_medvol(x, init, args, "cuda", None)
        gpu_note = "timed"
    else:
        print(f"device='cuda': {gpu_note}")
    times: dict[str, list[float]] = {name: [] for name in configs}
    results = {}
    for _ in range(args.repeats):  # interleaved, so load from other users spreads over all methods
        for name, fit in configs.items():
            t0 = time.perf_counter()
            results[name] = fit()  # medvol's fit includes its exact inertia over all samples
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in configs:
        inertia, n_iter = results[name]
        rows.append({"method": name, "seconds": float(np.median(times[name])), "seconds_all": times[name],
                     "inertia": inertia, "n_iter": n_iter})  # fmt: skip
        print(f"{name:55s} median {rows[-1]['seconds']:8.2f} s  inertia {inertia:.6e}  iterations {n_iter}")

    base = rows[0]
    for r in rows:
        r["speedup_vs_sklearn"] = base["seconds"] / r["seconds"]
        r["inertia_ratio_vs_sklearn"] = r["inertia"] / base["inertia"]
    result = {
        "args": vars(args),
        "n_volumes": len(files),
        "n_voxels_seen": n_voxels,
        "features_seconds": t_feat,
        "gpu": gpu_note,
        "machine": machine(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| method | median time (s) | speed-up vs sklearn | inertia | inertia / sklearn | iterations |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['speedup_vs_sklearn']:.2f}x | {r['inertia']:.6e} | "
            f"{r['inertia_ratio_vs_sklearn']:.5f} | {r['n_iter']} |"
        )


if __name__ == "__main__":
    main()
