"""Preprocessing throughput: ``medvol preprocess --preset mri --n4`` with 1 and 2 workers vs a plain loop.

The baseline is what one would write without medvol: a loop over an equivalent MONAI ``Compose`` (LoadImaged,
orientation, the same intensity scaling and crop, SaveImaged) with SimpleITK's N4 at full resolution. Full
resolution N4 takes minutes per IXI volume, so the baseline runs on the first ``--baseline-n`` volumes and is
reported in volumes/s (say so when quoting it).

Peak memory is the largest total resident memory of the whole process tree (the command and its workers),
sampled from /proc every 0.2 s.

Usage:
    MEDVOL_DATA=../shared/data python benchmarks/preprocess_benchmark.py --out /tmp/prep_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MB (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024.0


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return wall time, exit code and the peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    return {"seconds": time.perf_counter() - t0, "returncode": code, "peak_rss_mb": peak[0]}


def baseline(files: list[Path], out: Path) -> None:
    """Plain loop over a MONAI Compose with SimpleITK N4 at full resolution (run in a subprocess)."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRangePercentilesd,
    )

    torch.set_num_threads(os.cpu_count() or 1)

    def n4_full_resolution(d):
        img = d["image"]
        arr = img[0].numpy().astype(np.float32)
        image = sitk.GetImageFromArray(np.transpose(arr))
        image.SetSpacing([float(s) for s in img.pixdim])
        mask = sitk.OtsuThreshold(image, 0, 1, 200)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations([50] * 4)
        n4.SetConvergenceThreshold(0.001)
        corrected = n4.Execute(image, mask)
        d["image"] = img.clone()
        d["image"][0] = torch.from_numpy(np.transpose(sitk.GetArrayFromImage(corrected)).copy())
        return d

    pipeline = Compose([
        LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), n4_full_resolution,
        Orientationd("image", axcodes="RAS", labels=None),
        ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        CropForegroundd("image", source_key="image", select_fn=lambda x: x > 0.05, allow_smaller=True),
        SaveImaged("image", output_dir=str(out), output_postfix="", separate_folder=False, print_log=False),
    ])
    for f in files:
        pipeline({"image": str(f)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MEDVOL_DATA", REPO.parent / "shared" /
                                                                          "data")) / "ixi_t1" / "t1")
    parser.add_argument("--n", type=int, default=0, help="number of volumes for medvol runs (0 = all)")
    parser.add_argument("--baseline-n", type=int, default=5, help="volumes for the full-resolution N4 baseline")
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/medvol_preprocess_benchmark"))
    parser.add_argument("--_baseline", dest="baseline_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = sorted(args.data.glob("*.nii.gz"))
    if args.baseline_dir:
        baseline(files[: args.baseline_n], Path(args.baseline_dir))
        return
    if args.n:
        files = files[: args.n]
    subset = args.out / "input"
    shutil.rmtree(args.out, ignore_errors=True)
    subset.mkdir(parents=True)
    for f in files:  # a folder with exactly the benchmarked volumes (symlinks, inputs untouched)
        (subset / f.name).symlink_to(f.resolve())
    rows = []
    for w in args.workers:
        out = args.out / f"medvol_w{w}"
        cmd = [sys.executable, "-m", "medvol", "preprocess", str(subset), str(out), "--preset", "mri", "--n4",
               "--workers", str(w)]
        r = run_measured(cmd)
        r.update(name=f"medvol preprocess --n4 --workers {w}", volumes=len(files))
        rows.append(r)
        print(json.dumps(r), flush=True)
    r = run_measured([sys.executable, __file__, "--data", str(args.data), "--baseline-n", str(args.baseline_n),
                      "--_baseline", str(args.out / "baseline")])
    r.update(name="plain loop, MONAI Compose + SimpleITK N4 at full resolution", volumes=min(args.baseline_n,
                                                                                               len(files)))
    rows.append(r)
    print(json.dumps(r), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU")
    print("| pipeline | volumes | wall (s) | volumes/s | peak RSS, all processes (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['volumes']} | {r['seconds']:.1f} | {r['volumes'] / r['seconds']:.3f} | "
              f"{r['peak_rss_mb']:.0f} |")
    w1 = next((r for r in rows if r["name"].endswith("--workers 1")), None)
    w2 = next((r for r in rows if r["name"].endswith("--workers 2")), None)
    if w1 and w2:
        print(f"\n2 workers / 1 worker throughput: {w1['seconds'] / w2['seconds']:.2f}x")
    base = rows[-1]
    if w1:
        speed = (w1["volumes"] / w1["seconds"]) / (base["volumes"] / base["seconds"])
        print(f"medvol (1 worker) / baseline throughput: {speed:.1f}x")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
