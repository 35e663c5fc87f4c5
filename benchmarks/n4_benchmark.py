"""Benchmark medvol's N4 (fit on a shrunken image) against SimpleITK's N4 run at full resolution.

Both sides get the same image (float32), the same Otsu mask (``sitk.OtsuThreshold(image, 0, 1, 200)``), the
same iterations per level, convergence threshold, spline order and control points, and the same thread count.
Timings exclude reading the file and include the Otsu mask. Reported: wall and CPU time per volume, the
speed-up, and the Pearson correlation of the two corrected images inside the mask and over the whole volume.

    python benchmarks/n4_benchmark.py --n 5 --threads 2 --out /tmp/n4_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from machine_info import machine_info
from monai.transforms import LoadImage

from medvol.transforms.n4 import N4BiasFieldCorrection

ITERATIONS = (50, 50, 50, 50)
CONVERGENCE = 0.001
SPLINE_ORDER = 3
CONTROL_POINTS = 4


def machine() -> dict:
    return machine_info(simpleitk=sitk.Version_VersionString())


def direct_n4(path: Path, threads: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """SimpleITK N4 on the full-resolution image; returns (corrected (X, Y, Z), mask, wall s, CPU s)."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    wall, cpu = time.perf_counter(), time.process_time()
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(ITERATIONS))
    n4.SetConvergenceThreshold(CONVERGENCE)
    n4.SetSplineOrder(SPLINE_ORDER)
    n4.SetNumberOfControlPoints([CONTROL_POINTS] * 3)
    n4.SetNumberOfThreads(threads)
    corrected = n4.Execute(image, mask)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # SimpleITK arrays are (Z, Y, X); transpose to MONAI's (X, Y, Z)
    return sitk.GetArrayFromImage(corrected).T, sitk.GetArrayFromImage(mask).T > 0, wall, cpu


def medvol_n4(path: Path, threads: int, shrink: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """medvol's transform on the MetaTensor MONAI loads; returns (corrected, Otsu mask, wall s, CPU s)."""
    img = LoadImage(ensure_channel_first=True)(str(path))  # (1, X, Y, Z) MetaTensor, 2 mm affine
    transform = N4BiasFieldCorrection(
        shrink_factor=shrink,
        num_iterations=ITERATIONS,
        convergence_threshold=CONVERGENCE,
        spline_order=SPLINE_ORDER,
        num_control_points=CONTROL_POINTS,
        num_threads=threads,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    corrected = transform(img)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.GetImageFromArray(img[0].numpy().T), 0, 1, 200)).T > 0
    return corrected[0].numpy(), mask, wall, cpu


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def markdown(rows: list[dict], summary: dict) -> str:
    lines = [
        "| volume | medvol N4 (shrink {s}) s | SimpleITK N4 full-res s | speed-up (wall) | speed-up (CPU) "
        "| r in mask | r whole volume |".format(s=summary["shrink_factor"]),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows + [summary]:
        lines.append(
            f"| {r['volume']} | {r['medvol_s']:.2f} | {r['simpleitk_s']:.2f} | {r['speedup']:.1f}x "
            f"| {r['speedup_cpu']:.1f}x | {r['r_mask']:.4f} | {r['r_volume']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ["MEDVOL_DATA"]) / "ixi_t1" / "t1" if os.environ.get("MEDVOL_DATA") else None
    parser.add_argument(
        "--data", type=Path, default=default, help="folder of *.nii.gz (default $MEDVOL_DATA/ixi_t1/t1)"
    )
    parser.add_argument("--n", type=int, default=5, help="number of volumes (first N by name)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both N4 runs")
    parser.add_argument("--shrink", type=int, default=4, help="medvol's shrink factor")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: print only)")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required when MEDVOL_DATA is not set")
    if args.n < 1 or args.threads < 1 or args.shrink < 1:
        parser.error(f"--n, --threads and --shrink must be >= 1, got {args.n}, {args.threads}, {args.shrink}")
    paths = sorted(args.data.glob("*.nii.gz"))[: args.n]
    if not paths:
        parser.error(f"--data {args.data}: no *.nii.gz files")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)  # Otsu, shrink, field evaluation
    torch.set_num_threads(args.threads)
    warm_up = np.random.default_rng(0).uniform(1, 2, (1, 16, 16, 16)).astype(np.float32)
    N4BiasFieldCorrection(shrink_factor=1, num_iterations=(2,), num_threads=args.threads)(warm_up)

    rows = []
    for path in paths:
        fast, fast_mask, fast_wall, fast_cpu = medvol_n4(path, args.threads, args.shrink)
        full, mask, full_wall, full_cpu = direct_n4(path, args.threads)
        row = {
            "volume": path.name.replace(".nii.gz", ""),
            "medvol_s": fast_wall,
            "simpleitk_s": full_wall,
            "medvol_cpu_s": fast_cpu,
            "simpleitk_cpu_s": full_cpu,
            "speedup": full_wall / fast_wall,
            "speedup_cpu": full_cpu / fast_cpu,
            "r_mask": pearson(fast[mask], full[mask]),
            "r_volume": pearson(fast, full),
            "same_mask": bool(np.array_equal(fast_mask, mask)),
        }
        rows.append(row)
        print(f"{row['volume']}: {fast_wall:.2f} s vs {full_wall:.2f} s, r_mask={row['r_mask']:.4f}", file=sys.stderr)

    keys = ["medvol_s", "simpleitk_s", "medvol_cpu_s", "simpleitk_cpu_s", "r_mask", "r_volume"]
    summary = {"volume": "**mean**", **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    summary["speedup"] = summary["simpleitk_s"] / summary["medvol_s"]  # ratio of mean times
    summary["speedup_cpu"] = summary["simpleitk_cpu_s"] / summary["medvol_cpu_s"]
    summary["shrink_factor"] = args.shrink
    summary["targets_met"] = summary["speedup"] >= 5 and min(r["r_mask"] for r in rows) >= 0.98
    table = markdown(rows, summary)
    print(table)
    print(f"targets (>= 5x faster, r >= 0.98 in the mask): {'met' if summary['targets_met'] else 'NOT met'}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "threads": args.threads,
            "shrink_factor": args.shrink,
            "num_iterations": ITERATIONS,
            "convergence_threshold": CONVERGENCE,
            "spline_order": SPLINE_ORDER,
            "num_control_points": CONTROL_POINTS,
            "mask": "sitk.OtsuThreshold(image, 0, 1, 200)",
        },
        "machine": machine(),
        "volumes": rows,
        "mean": summary,
        "markdown": table,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as f:
            json.dump(result, f, indent=2)
        os.replace(f.name, args.out)
    return result


if __name__ == "__main__":
    main()
