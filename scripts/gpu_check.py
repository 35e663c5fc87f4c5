#!/usr/bin/env python
"""`make gpu-check`: the GPU paths CI cannot run, in a few minutes on one machine with CUDA.

Checks, each reported as passed / failed / skipped in a table and in ``OUTPUT/gpu_check.json``:

- ``bundle:<name>``: every bundle trains for a few iterations with ``--device cuda:0 --amp true``
  (``python -m monai.bundle run`` in a subprocess, on a few demo volumes, tiny networks); ``pixel_clustering`` runs
  its ``cluster`` step first, with k-means on the GPU; ``slice_mil`` trains on random bags of slice features.
- ``kmeans:faiss-gpu``: ``medvol.cluster.KMeans(device="cuda")`` fits and predicts with faiss on the GPU.
- ``ddp:nccl``: the ``caid`` bundle with its ``multi_gpu_train.json`` overlay under ``torchrun``, one process per
  GPU present, NCCL.

Without a CUDA device nothing runs: a one-line message says so and the exit code is 3. ``--device cpu`` is the dry
mode: the same checks on the CPU (AMP off, faiss on the CPU, gloo with one process), which is how the script's own
logic is tested where there is no GPU.

Exit codes: 0 every check passed (or was skipped with a reason), 1 some check failed, 3 no CUDA device (nothing run).

Usage::

    make gpu-check                                   # = python scripts/gpu_check.py --output gpu_check_output
    python scripts/gpu_check.py --device cpu --only bundle:fewshot_segmentation kmeans:*
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_data" / "hippocampus"
EXIT_FAILED, EXIT_NO_GPU = 1, 3
TINY_UNET = {"backbone_options": {"unet": {"channels": [8, 16, 32], "norm": "instance"}}, "pad_size": [32, 48, 32]}
TINY_SWIN = {"backbone_options": {"swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "norm": "group"}},
             "pad_size": [32, 48, 32], "roi_size": [32, 32, 32]}
# a few iterations per bundle: one epoch over 4 volumes (batch 2), tiny networks
BUNDLES: dict[str, dict] = {
    "caid": {**TINY_UNET, "roi_size": [16, 16, 16], "method#queue_size": 16, "method#hidden_dim": 16},
    "global_local_contrastive": {**TINY_UNET, "roi_size": [16, 16, 8], "method#hidden_dim": 16,
                                 "method#local_levels": 2, "method#local_grid": [2, 2, 2]},
    "patch_clustering": {**TINY_UNET, "roi_size": [16, 16, 16], "proj_dim": 8, "num_prototypes": 8},
    "pixel_clustering": {**TINY_UNET, "roi_size": [16, 16, 16], "num_clusters": 4, "cluster_samples": 4000,
                         "cluster_quota": 1000, "montage_volumes": 0},
    "fewshot_segmentation": {**TINY_UNET, "roi_size": [16, 32, 16], "iterations_per_epoch": 3, "num_labeled": 4},
    "lecl_slice_embedding": {"encoder_options": {"mambaout": {"dims": [8, 16], "depths": [1, 1]}}, "spatial_size": 32,
                             "samples_per_volume": 2, "method#proj_dim": 16, "method#hidden_dim": 32,
                             "method#pred_hidden_dim": 32},
    "slice_mil": {"num_folds": 2, "network_def#hidden_dim": 16, "network_def#attention_dim": 8, "plot_cases": 0,
                  "target_columns": ["large"], "task": "binary"},
    "simclr": {**TINY_UNET, "roi_size": [16, 16, 16], "method#hidden_dim": 16},
    "byol": {**TINY_UNET, "roi_size": [16, 16, 16], "method#hidden_dim": 16},
    "models_genesis": {**TINY_UNET, "roi_size": [16, 16, 16], "shuffle_blocks": 100},
    "pcrlv2": {**TINY_UNET, "roi_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local": 2},
    "swinunetr_ssl": {**TINY_SWIN, "max_holes": 5},
    "voco": {**TINY_SWIN, "voco_grid": [2, 2, 1], "base_size": [16, 24, 32], "method#hidden_dim": 16,
             "method#proj_dim": 16},
    "spark": {**TINY_UNET, "roi_size": [16, 16, 16]},
    "mae": {"backbone_options": {"unetr": {"img_size": "@roi_size", "hidden_size": 24, "mlp_dim": 48, "num_heads": 2,
                                           "feature_size": 4}}, "pad_size": [32, 48, 32], "roi_size": [32, 32, 32],
            "method#decoder_dim": 12, "method#decoder_heads": 2},
    # 3D image-report alignment on the demo volumes with header sentences (configs/volume.json), scratch text
    "lovt": {"volume_size": [32, 32, 32], "proj_dim": 16, "text_encoder": "scratch",
             "text_options": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
             "backbone_options": {"unet": {"channels": [8, 16, 32], "num_convs": 1}}},
}
PRE_STEPS = {"pixel_clustering": ["cluster"]}
# overlays merged after train.json, and the prepared data the bundle reads (default "labeled")
OVERLAYS = {"lovt": ["volume.json"]}
DATA_KEY = {"lovt": "reports"}


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


# ---- environment --------------------------------------------------------------------------------------------


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace",
                              timeout=timeout, env=_env())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else ""
        log.write_text(out, encoding="utf-8")
        return 124, f"timed out after {timeout:.0f} s (log {log})"
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    tail = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()][-1:] or [""]
    return proc.returncode, tail[0][-300:]


# ---- data ---------------------------------------------------------------------------------------------------


def prepare_data(root: Path, n: int = 4) -> dict[str, Path]:
    """A few labeled demo volumes (MSD layout); for slice_mil, random slice-feature bags with a targets.csv; for
    lovt, a table pairing the volumes with sentences built from their headers (plumbing, not reports)."""
    import nibabel as nib
    import numpy as np

    from medvol.mil import write_bag

    labeled = root / "hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (labeled / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((DEMO / sub).glob("*.nii.gz"))[:n]:
            if not (labeled / sub / f.name).exists():
                shutil.copy(f, labeled / sub / f.name)
    bags = root / "bags"
    rng = np.random.default_rng(0)
    rows = ["id,large"]
    for i in range(8):
        case = f"case{i:02d}"
        if not (bags / f"{case}.h5").exists():
            write_bag(bags / f"{case}.h5", rng.normal(size=(12, 18)).astype(np.float32) + (i % 2), np.arange(12),
                      f"{case}.nii.gz", (1.0, 1.0, 1.0), "0" * 64, 2)
        rows.append(f"{case},{'yes' if i % 2 else 'no'}")
    (root / "targets.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    reports = [{"image": str(f), "subject": f.name,
                "report": f"MRI {f.name}. Its grid is {' by '.join(map(str, nib.load(f).shape))} voxels."}
               for f in sorted((labeled / "imagesTr").glob("*.nii.gz"))]
    (root / "reports.json").write_text(json.dumps(reports), encoding="utf-8")
    return {"labeled": labeled, "bags": bags, "targets": root / "targets.csv", "reports": root / "reports.json"}


# ---- checks -------------------------------------------------------------------------------------------------


def check_bundle(bundle: str, device: str, data: dict[str, Path], out: Path, timeout: float) -> Result:
    run_dir = out / "runs" / bundle
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"output_dir": str(run_dir), "max_epochs": 1, "device": device, **BUNDLES[bundle]}
    if bundle == "slice_mil":
        overrides.update({"dataset_dir": str(data["bags"]), "targets_csv": str(data["targets"])})
    else:
        overrides.update({"dataset_dir": str(data[DATA_KEY.get(bundle, "labeled")]), "batch_size": 2,
                          "amp": device != "cpu",
                          "num_workers": 0})
        if bundle != "fewshot_segmentation":
            overrides["val_fraction"] = 0.25
    if bundle == "pixel_clustering":
        overrides["kmeans_device"] = "cuda" if device != "cpu" else "cpu"
    configs = json.dumps([f"bundles/{bundle}/configs/{c}" for c in ["train.json", *OVERLAYS.get(bundle, [])]])
    base = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", f"bundles/{bundle}"]
    t0 = time.perf_counter()
    for run_id in [*PRE_STEPS.get(bundle, []), "run"]:
        rc, tail = _run([*base, "--run_id", run_id, *_cli_args(overrides)], out / "logs" / f"{bundle}.{run_id}.log",
                        timeout)
        if rc != 0:
            return Result(f"bundle:{bundle}", "failed", time.perf_counter() - t0, f"{run_id}: exit {rc}: {tail}")
    model = run_dir / "models" / "model.pt"
    if bundle == "slice_mil":
        model = run_dir / "folds" / "fold_1" / "model.pt"
    if not model.is_file():
        return Result(f"bundle:{bundle}", "failed", time.perf_counter() - t0, f"no {model} after training")
    return Result(f"bundle:{bundle}", "passed", time.perf_counter() - t0, f"trained, wrote {model.relative_to(out)}",
                  {"amp": overrides.get("amp", False), "device": device})


def check_kmeans(device: str) -> Result:
    import numpy as np

    from medvol.cluster import KMeans

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(8, 16))
    x = (centres[rng.integers(0, 8, 20000)] + rng.normal(size=(20000, 16))).astype(np.float32)
    km = KMeans(8, device="cuda" if device != "cpu" else "cpu", n_iter=10, seed=0).fit(x)
    labels = km.predict(x)
    if km.device_ != ("cuda" if device != "cpu" else "cpu"):
        return Result("kmeans:faiss-gpu", "failed", time.perf_counter() - t0, f"fitted on {km.device_}")
    found = len(np.unique(labels))
    if found != 8:
        return Result("kmeans:faiss-gpu", "failed", time.perf_counter() - t0, f"{found} clusters used, expected 8")
    return Result("kmeans:faiss-gpu", "passed", time.perf_counter() - t0,
                  f"20000 x 16 points, 8 clusters on {km.device_}, inertia {float(km.inertia_):.4g}")


def check_ddp(device: str, data: dict[str, Path], out: Path, timeout: float) -> Result:
    nproc = cuda_devices() if device != "cpu" else 1
    run_dir = out / "runs" / "ddp_caid"
    shutil.rmtree(run_dir, ignore_errors=True)
    overlay = "['bundles/caid/configs/train.json','bundles/caid/configs/multi_gpu_train.json']"
    overrides = {"dataset_dir": str(data["labeled"]), "output_dir": str(run_dir), "max_epochs": 1, "batch_size": 2,
                 "val_fraction": 0.25, "amp": device != "cpu", **BUNDLES["caid"]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "monai.bundle", "run", "--config_file", overlay, "--bundle_root", "bundles/caid", *_cli_args(overrides)]
    t0 = time.perf_counter()
    rc, tail = _run(cmd, out / "logs" / "ddp_caid.log", timeout)
    backend = "nccl" if device != "cpu" else "gloo"
    if rc != 0:
        return Result("ddp:nccl", "failed", time.perf_counter() - t0,
                      f"{nproc} process(es), {backend}: exit {rc}: {tail}")
    if not (run_dir / "models" / "model.pt").is_file():
        return Result("ddp:nccl", "failed", time.perf_counter() - t0, "no models/model.pt after training")
    return Result("ddp:nccl", "passed", time.perf_counter() - t0, f"{nproc} process(es), {backend}",
                  {"nproc": nproc, "backend": backend})


def planned_checks(device: str, data_fn: Callable[[], dict], out: Path, timeout: float) -> dict[str, Callable]:
    checks: dict[str, Callable[[], Result]] = {}
    for bundle in BUNDLES:
        checks[f"bundle:{bundle}"] = lambda b=bundle: check_bundle(b, device, data_fn(), out, timeout)
    checks["kmeans:faiss-gpu"] = lambda: check_kmeans(device)
    checks["ddp:nccl"] = lambda: check_ddp(device, data_fn(), out, timeout)
    return checks


# ---- report -------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':<{width}}  status   seconds  detail", f"{'-' * width}  -------  -------  ------"]
    lines += [f"{r.name:<{width}}  {r.status:<7}  {r.seconds:7.1f}  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def write_report(path: Path, results: list[Result], device: str, exit_code: int, message: str = "") -> None:
    import torch

    report = {"device": device, "exit_code": exit_code, "message": message, "python": platform.python_version(),
              "torch": torch.__version__, "cuda_devices": cuda_devices(),
              "gpu": torch.cuda.get_device_name(0) if cuda_devices() else None,
              "results": [asdict(r) for r in results],
              "summary": {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; exit 3 when there is none) or cpu: the dry mode, same checks on the CPU")
    parser.add_argument("--output", type=Path, default=REPO / "gpu_check_output",
                        help="runs, logs and gpu_check.json (default: gpu_check_output/)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="run the checks matching these names or patterns (e.g. 'bundle:*' 'ddp:*'); "
                             "the others are reported as skipped")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per bundle / torchrun check")
    args = parser.parse_args(argv)
    out = args.output.resolve()
    json_path = out / "gpu_check.json"
    device = "cuda:0" if args.device == "cuda" else "cpu"
    names = [f"bundle:{b}" for b in BUNDLES] + ["kmeans:faiss-gpu", "ddp:nccl"]

    if args.device == "cuda" and cuda_devices() == 0:
        message = ("gpu-check skipped: no CUDA device is visible (torch.cuda.is_available() is False); nothing was "
                   "run. Run it on a machine with a GPU, or `--device cpu` for the dry run of the same checks.")
        results = [Result(n, "skipped", detail="no CUDA device") for n in names]
        print(message, flush=True)
        write_report(json_path, results, device, EXIT_NO_GPU, message)
        return EXIT_NO_GPU

    cache: dict = {}

    def data_fn() -> dict:
        if "data" not in cache:
            cache["data"] = prepare_data(out / "data")
        return cache["data"]

    checks = planned_checks(device, data_fn, out, args.timeout)
    results = []
    for name, check in checks.items():
        if args.only and not any(fnmatch.fnmatch(name, p) for p in args.only):
            results.append(Result(name, "skipped", detail="not selected (--only)"))
            continue
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # one broken path must not hide the others
            (out / "logs").mkdir(parents=True, exist_ok=True)
            (out / "logs" / f"{name.replace(':', '_')}.log").write_text(traceback.format_exc(), encoding="utf-8")
            result = Result(name, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:300])
        results.append(result)
        print(f"[gpu-check] {name}: {result.status} ({result.seconds:.1f} s) {result.detail}", flush=True)
    code = EXIT_FAILED if any(r.status == "failed" for r in results) else 0
    print("\n" + table(results), flush=True)
    write_report(json_path, results, device, code)
    print(f"report: {json_path} (logs in {out / 'logs'})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
