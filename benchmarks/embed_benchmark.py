"""Throughput and memory of ``medvol embed`` with 1 and 2 workers on real volumes (default: 20 IXI T1 MRIs).

Each run is the command a user types (``python -m medvol embed DATALIST OUT --bundle ... --workers N``), timed
from process start to exit (interpreter start-up, model loading and writing included). Peak memory is the resident
set size (RSS, from /proc) of the whole process tree (main process + workers), sampled every 0.1 s, and of the
largest single process. The encoder is the bundle's default (MambaOut-Femto-sized gated CNN, 224 x 224, 3 context
channels), freshly initialised with seed 0 unless ``--checkpoint`` is given: the cost of a forward pass does not
depend on the weights.

    MEDVOL_DATA=../shared/data python benchmarks/embed_benchmark.py --n 20 --workers 1 2 --out /tmp/embed.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine_info import machine_info

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lecl_slice_embedding"


def machine() -> dict:
    return machine_info()


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(encoding="utf-8")
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


class RssSampler(threading.Thread):
    """Peak RSS (KiB) of a process tree, summed and per process, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_total = self.peak_single = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sizes = [_rss_kib(p) for p in _tree(self.pid)]
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max([self.peak_single, *sizes])
            time.sleep(self.interval)


def fresh_checkpoint(bundle: Path, folder: Path, overrides: dict) -> Path:
    """The bundle's default encoder, freshly initialised (seed 0), saved as a state dict."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in ("train.json", "inference.json")])  # an overlay
    parser.update({"bundle_root": str(bundle), **overrides})
    torch.manual_seed(0)
    path = folder / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def run_once(datalist: Path, out: Path, bundle: Path, checkpoint: Path, workers: int, batch_size: int,
             sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "medvol", "embed", str(datalist), str(out), "--bundle", str(bundle),
           "--checkpoint", str(checkpoint), "--workers", str(workers), "--batch-size", str(batch_size)]
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    slices = sum(int(r["n_slices"]) for r in ok)
    return {"workers": workers, "returncode": proc.returncode, "volumes": len(ok), "failed": len(rows) - len(ok),
            "slices": slices, "wall_s": wall, "volumes_per_s": len(ok) / wall, "slices_per_s": slices / wall,
            "mean_volume_s": sum(float(r["seconds"]) for r in ok) / max(1, len(ok)),
            "peak_rss_total_mib": sampler.peak_total / 1024, "peak_rss_largest_mib": sampler.peak_single / 1024,
            "summary": stdout.strip().splitlines()[-1:] if stdout else []}


def table(results: list[dict]) -> str:
    lines = ["| workers | volumes | slices | wall (s) | volumes/s | slices/s | mean s/volume (in worker) | "
             "peak RSS, all processes (MiB) | peak RSS, largest process (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['workers']} | {r['volumes']} | {r['slices']} | {r['wall_s']:.1f} | "
                     f"{r['volumes_per_s']:.3f} | {r['slices_per_s']:.1f} | {r['mean_volume_s']:.2f} | "
                     f"{r['peak_rss_total_mib']:.0f} | {r['peak_rss_largest_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    default_data = Path(os.environ.get("MEDVOL_DATA", REPO.parent / "shared" / "data")) / "ixi_t1" / "t1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data, help="folder of volumes (default: IXI T1)")
    p.add_argument("--n", type=int, default=20, help="volumes (the first N by name; default 20)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    p.add_argument("--bundle", type=Path, default=BUNDLE)
    p.add_argument("--checkpoint", type=Path, default=None, help="trained encoder (default: fresh, seed 0)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per network call (default 64)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="inference.json override passed to medvol embed (e.g. spatial_size=64 for a quick try)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    volumes = sorted(str(v) for v in args.data.iterdir() if v.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    volumes = volumes[: args.n]
    if len(volumes) < args.n:
        print(f"only {len(volumes)} volumes in {args.data}", file=sys.stderr)
    info = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        tmp = Path(tmp)
        datalist = tmp / "datalist.csv"
        datalist.write_text("image\n" + "\n".join(volumes) + "\n")
        overrides = {k: json.loads(v) if v[:1] in "[{0123456789-\"" or v in ("true", "false", "null") else v
                     for k, _, v in (s.partition("=") for s in args.sets)}
        checkpoint = args.checkpoint or fresh_checkpoint(args.bundle, tmp, overrides)
        for workers in args.workers:
            result = run_once(datalist, tmp / f"out_w{workers}", args.bundle, checkpoint, workers, args.batch_size,
                              args.sets)
            results.append(result)
            print(json.dumps(result), flush=True)
    info["loadavg_after"] = os.getloadavg()
    print()
    print(table(results))
    print(f"\nmachine: {json.dumps(info)}; checkpoint: {args.checkpoint or 'fresh (seed 0)'}; "
          f"data: {args.data} (first {len(volumes)})")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "results": results, "volumes": volumes,
                                        "checkpoint": str(args.checkpoint or "fresh seed 0"),
                                        "overrides": args.sets}, indent=1))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
