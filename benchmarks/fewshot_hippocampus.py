"""Few-shot hippocampus benchmark: what self-supervised pretraining is worth with 1, 2, 5, 10 and all labels.

On MSD Task04 Hippocampus with the fixed split in ``benchmarks/splits/hippocampus_fewshot.json`` (150 pool /
50 test): pretrain every SSL method on the 150 pool images (labels unused), then fine-tune the
``fewshot_segmentation`` bundle from scratch and from each pretrained checkpoint with n labeled pool volumes
(3 seeds = 3 different labeled subsets) and evaluate Dice (anterior, posterior) on the test volumes.

Everything runs through the bundles (``monai.bundle.ConfigWorkflow``) with command-line style overrides, so
the numbers are what a user gets from ``python -m monai.bundle run``. Stages are cached in ``--out``: re-running
skips finished pretraining and fine-tuning runs.

Usage:
    MEDVOL_DATA=../shared/data python benchmarks/fewshot_hippocampus.py --out benchmarks/results/fewshot
    python benchmarks/fewshot_hippocampus.py --out ... --report-only     # table + plot from cached runs
    python benchmarks/fewshot_hippocampus.py --out /tmp/recheck \
        --recheck docs/results/fewshot_hippocampus_issue15/run1/runs.csv --recheck-cell scratch 1 0  # one cell
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

UNETR_IMG_SIZE = [32, 48, 32]  # the fine-tuning crop (fewshot_segmentation's roi_size), fixed by the position grid
# pretraining method -> (bundle, extra overrides); every batch entry is one crop, seen in VIEWS_PER_CROP views
METHODS = {
    "caid": ("caid", {}),
    "global_local_contrastive": ("global_local_contrastive", {}),
    "patch_clustering": ("patch_clustering", {}),
    "pixel_clustering": ("pixel_clustering", {}),
    "simclr": ("simclr", {}),
    "byol": ("byol", {}),
    "models_genesis": ("models_genesis", {}),
    "pcrlv2": ("pcrlv2", {}),
    # VoCo's SwinUNETR default would not be comparable with the U-Net fine-tuning of this benchmark
    "voco": ("voco", {"backbone": "unet", "roi_size": [32, 32, 32]}),
    "spark": ("spark", {}),
    # the transformer encoders pretrain on their own backbones and fine-tune into a segmentation network of the
    # same architecture (FINETUNE_BACKBONE), compared with that architecture trained from scratch
    "swinunetr_ssl": ("swinunetr_ssl", {}),
    "mae": ("mae", {"roi_size": UNETR_IMG_SIZE}),  # = the UNETR's img_size: the position embeddings transfer
}
# what a run without --methods pretrains: SwinUNETR-SSL is GPU-sized (about 7 h of fine-tuning on 2 CPU cores)
DEFAULT_METHODS = [m for m in METHODS if m != "swinunetr_ssl"]
# fine-tuning backbone of the methods that do not pretrain the U-Net; each gets its own scratch row
FINETUNE_BACKBONE = {"swinunetr_ssl": "swinunetr", "mae": "unetr"}
# fine-tuning overrides per backbone: SwinUNETR needs every side divisible by 32 (five halvings), so it trains on
# 32 x 64 x 32 crops (the padded volume's full height) instead of the U-Net's 32 x 48 x 32
BACKBONE_FINETUNE = {"swinunetr": {"backbone": "swinunetr", "roi_size": [32, 64, 32]},
                     "unetr": {"backbone": "unetr"}}
# run ids of a method's bundle that must run before its training ("run"), in order, on the same overrides
PRE_STEPS = {"pixel_clustering": ("cluster",)}  # pseudo-labels: k-means fitted once, one map per volume
VIEWS_PER_CROP = 2
# views per batch entry where not 2: Models Genesis and SparK one view (the target is the crop itself),
# PCRLv2 2 global + 6 local crops, VoCo 4 base + 2 random crops
VIEWS_PER_SAMPLE = {"models_genesis": 1, "pcrlv2": 8, "voco": 6, "spark": 1, "mae": 1}
# pretraining epochs relative to --pretrain-epochs, so every method gets a similar compute budget:
# global+local contrastive feeds 4 partition crops per volume (4x CAiD's work per epoch)
# VoCo feeds 4 base crops + 2 random crops per volume (3x CAiD's 2 views)
EPOCH_SCALE = {"global_local_contrastive": 0.25, "voco": 0.33}
# fine-tuning overrides per initialisation (what is transferred); see docs/benchmarks.md for how they were chosen
FINETUNE = {
    # chosen on a validation split of the pool (130 pool / 20 validation volumes, 2 labels, 3 seeds), not on the
    # test set: encoder-only 0.794, encoder + decoder 0.779, scratch 0.775 mean Dice
    "caid": {"pretrained_prefixes": ["encoder."]},
    "patch_clustering": {"pretrained_prefixes": ["encoder."]},  # its pretext trains the encoder only
    "simclr": {"pretrained_prefixes": ["encoder."]},  # encoder only trained (not chosen on validation data)
    "byol": {"pretrained_prefixes": ["encoder."]},  # encoder only trained (not chosen on validation data)
    "pcrlv2": {"pretrained_prefixes": ["encoder."]},  # skip-free decoder: its shapes differ from the U-Net's
    "voco": {"pretrained_prefixes": ["encoder."]},  # its pretext trains the encoder only
    # SwinUNETR-SSL and MAE train only the transformer of the encoder (their heads and MAE's decoder are not the
    # segmentation decoder; the conv skip blocks stay at initialisation): that transformer only, fixed by what the
    # pretext trains before the test run (2026-12-04), not chosen on validation data
    "swinunetr_ssl": {"pretrained_prefixes": ["encoder.swinViT."]},
    "mae": {"pretrained_prefixes": ["encoder.vit."]},
    # Models Genesis: encoder only, chosen on the validation split (hippocampus_fewshot_validation.json, 2 labels,
    # 3 seeds; rule written in docs/methods/models_genesis.md before the run): encoder only 0.753, encoder +
    # decoder 0.705, scratch 0.775 mean Dice. Its test rows in docs/benchmarks.md are still encoder + decoder.
    "models_genesis": {"pretrained_prefixes": ["encoder."]},
    # SparK restores the volume with the whole U-Net, so encoder + decoder (the default) transfer; fixed before its
    # test run by what the pretext trains (2026-12-03), not chosen on validation data
}


def _bundle_files(bundle: str, config: str | list[str]) -> dict:
    """``config``: one file, or a list merged in order (``["train.json", "evaluate.json"]``: an overlay)."""
    root = BUNDLES / bundle
    files = [str(root / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    return {"config_file": files, "meta_file": str(root / "configs" / "metadata.json"),
            "logging_file": str(root / "configs" / "logging.conf"), "bundle_root": str(root)}


def _workflow(bundle: str, config: str | list[str], overrides: dict, run_id: str = "run"):
    from monai.bundle import ConfigWorkflow

    files = _bundle_files(bundle, config)
    wf = ConfigWorkflow(config_file=files["config_file"], meta_file=files["meta_file"],
                        logging_file=files["logging_file"], workflow_type=None,
                        bundle_root=files["bundle_root"], run_id=run_id, **overrides)
    wf.initialize()
    return wf


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _common(args) -> dict:
    channels = [int(c) for c in args.channels]
    return {"dataset_dir": str(args.data), "split_file": str(args.split),
            "backbone_options": {"unet": {"channels": channels, "norm": "instance"},
                                 "unetr": {"img_size": UNETR_IMG_SIZE}}}


# --variants METHOD@TRANSFER: extra rows that fine-tune a method's checkpoint with another transfer choice (for
# choosing it on a validation split, or for diagnosing a method)
TRANSFERS = {"encoder": ["encoder."], "all": ["encoder.", "decoder."]}


def base_method(init: str) -> str:
    """``models_genesis@encoder`` -> ``models_genesis`` (the checkpoint a variant row fine-tunes)."""
    return init.split("@")[0]


def parse_variant(text: str) -> str:
    """argparse type of ``--variants``: ``METHOD@TRANSFER`` with a known method and transfer."""
    method, _, transfer = text.partition("@")
    if method not in METHODS or transfer not in TRANSFERS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD@TRANSFER with METHOD one of "
                                         f"{', '.join(METHODS)} and TRANSFER one of {', '.join(TRANSFERS)}")
    return text


def scratch_init(method: str) -> str:
    """The from-scratch row a method is compared with: ``scratch`` (U-Net) or ``scratch_<backbone>``."""
    backbone = FINETUNE_BACKBONE.get(base_method(method), "unet")
    return "scratch" if backbone == "unet" else f"scratch_{backbone}"


def initialisations(methods: list[str], variants: list[str] = ()) -> list[str]:
    """Rows of the table in order: the U-Net scratch row first, each other scratch row before its methods, a
    method's variants after it."""
    inits = ["scratch"]
    rows = [*methods, *(v for v in variants if base_method(v) not in methods)]
    for method in rows:
        for init in (scratch_init(method), method, *(v for v in variants if base_method(v) == method)):
            if init not in inits:
                inits.append(init)
    return inits


def pretrained_methods(args) -> list[str]:
    """The methods whose checkpoints the rows need: ``--methods`` and the methods of ``--variants``."""
    variants = getattr(args, "variants", None) or []
    return list(dict.fromkeys([*args.methods, *(base_method(v) for v in variants)]))


def finetune_overrides(init: str, args) -> dict:
    """The fine-tuning bundle's overrides for one row: shared settings, its backbone's, then its transfer."""
    method = base_method(init)
    backbone = init[len("scratch_"):] if init.startswith("scratch_") else FINETUNE_BACKBONE.get(method, "unet")
    transfer = {"pretrained_prefixes": TRANSFERS[init.split("@")[1]]} if "@" in init else FINETUNE.get(init, {})
    return {**_common(args), **BACKBONE_FINETUNE.get(backbone, {}), **transfer}


# ---- stage 1: pretraining (one subprocess per method, for a clean peak-memory number) ----------------------


def pretrain(method: str, args) -> dict:
    out = Path(args.out) / "pretrain" / method
    stats_file = out / "stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        split = str(Path(args.split).resolve())
        if stats.get("split", split) != split:  # a cache keyed by path must not mix splits
            raise SystemExit(f"{stats_file}: pretrained on split {stats['split']}, not {args.split}; "
                             "use another --out for another split")
        return stats
    cmd = [sys.executable, __file__, "--_pretrain-one", method, *sys.argv[1:]]
    print(f"[pretrain] {method} -> {out}", flush=True)
    log = out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining {method} failed, see {log}")
    return json.loads(stats_file.read_text(encoding="utf-8"))


def _pretrain_one(method: str, args) -> None:
    import torch
    from ignite.engine import Events

    torch.set_num_threads(args.pretrain_threads)
    bundle, extra = METHODS[method]
    out = Path(args.out) / "pretrain" / method
    epochs = max(1, round(args.pretrain_epochs * EPOCH_SCALE.get(method, 1.0)))
    overrides = {**_common(args), "output_dir": str(out), "max_epochs": epochs, "seed": 0,
                 "val_fraction": 0.1, "num_workers": 0, **extra}
    step_seconds = {}
    for step in PRE_STEPS.get(method, ()):
        t_step = time.perf_counter()
        step_wf = _workflow(bundle, "train.json", overrides, run_id=step)
        step_wf.run()
        step_wf.finalize()
        step_seconds[f"{step}_seconds"] = time.perf_counter() - t_step
    wf = _workflow(bundle, "train.json", overrides)
    trainer = wf.parser.get_parsed_content("train#trainer")
    timing = {"train_seconds": 0.0, "samples": 0}

    def start(engine):
        timing["t0"] = time.perf_counter()

    def done(engine):
        timing["train_seconds"] += time.perf_counter() - timing["t0"]
        timing["samples"] += len(next(iter(engine.state.batch.values())))

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
    t0 = time.perf_counter()
    wf.run()
    wall = time.perf_counter() - t0
    wf.finalize()
    samples = timing["samples"]
    stats = {"method": method, "epochs": epochs, "iterations": trainer.state.iteration,
             "samples": samples, "crops": samples * VIEWS_PER_SAMPLE.get(method, VIEWS_PER_CROP),
             "train_seconds": timing["train_seconds"], "wall_seconds": wall, "peak_rss_mb": _peak_rss_mb(),
             "checkpoint": str(out / "models" / "model.pt"), "split": str(Path(args.split).resolve()),
             **step_seconds}
    stats["crops_per_second"] = stats["crops"] / max(stats["train_seconds"], 1e-9)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))


# ---- stage 2: fine-tuning + evaluation -----------------------------------------------------------------------


def _log_to(stream) -> None:
    """Point every logging stream handler at ``stream``: the bundles' loggers are created once per worker
    process and would otherwise keep writing to the previous run's (closed) log file."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = stream  # not setStream(): it flushes the old stream, which may be closed


def _finetune_one(job: dict) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    common = job["common"]
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        _log_to(log)
        # val_fraction 0: the published table's protocol (docs/benchmarks.md) trains on all n labeled volumes for a
        # fixed budget and scores the last epoch; the bundle's default ("auto") would hold 20 % of n >= 3 out
        # and keep the best validation epoch, which changes the 5/10/all columns (1 and 2 labels are the same)
        train = {**common, "output_dir": str(out), "num_labeled": job["n"], "seed": job["seed"],
                 "max_epochs": job["epochs"], "iterations_per_epoch": job["iterations"],
                 "pretrained_checkpoint": job["checkpoint"], "num_workers": 0, "val_fraction": 0}
        wf = _workflow("fewshot_segmentation", "train.json", train)
        wf.run()
        wf.finalize()
        train_seconds = time.perf_counter() - t0
        wf = _workflow("fewshot_segmentation", ["train.json", "evaluate.json"], {**common, "output_dir": str(out)})
        wf.run()
        wf.finalize()
    # MONAI's MetricsSaver: per-class means in val_mean_dice_summary.csv (class0 = anterior, class1 = posterior)
    with open(out / "eval" / "val_mean_dice_summary.csv", newline="") as f:
        summary = {row["class"]: float(row["mean"]) for row in csv.DictReader(f)}
    result = {"init": job["init"], "n": job["n"], "seed": job["seed"], "train_seconds": train_seconds,
              "mean_dice": summary["mean"], "dice_anterior": summary["class0"], "dice_posterior": summary["class1"]}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def _job(args, init: str, n, seed: int, checkpoint: str | None, out: Path) -> dict:
    return {"init": init, "n": n, "seed": seed, "threads": args.threads, "checkpoint": checkpoint,
            "epochs": args.finetune_epochs, "iterations": args.iterations, "common": finetune_overrides(init, args),
            "out": str(out)}


def finetune_all(args, checkpoints: dict) -> list[dict]:
    inits = initialisations(args.methods, getattr(args, "variants", None) or [])
    jobs = [_job(args, init, n, seed, checkpoints.get(base_method(init)),
                 Path(args.out) / "finetune" / init / f"n{n}_s{seed}")
            for n in args.labels for seed in args.seeds for init in inits]
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(_finetune_one, jobs):
            print(f"[finetune] {r['init']:>26} n={r['n']:>3} seed={r['seed']} dice={r['mean_dice']:.3f} "
                  f"({r['train_seconds']:.0f}s)", flush=True)
            results.append(r)
    return results


def recheck(args) -> int:
    """Re-run one cell of a committed ``runs.csv`` from nothing (its pretraining cached in ``--out``, the
    fine-tuning always fresh) and compare its mean Dice; 1 when it differs by more than ``--tolerance``."""
    import shutil

    init, n, seed = args.recheck_cell
    with open(args.recheck, newline="", encoding="utf-8") as f:
        want = [r for r in csv.DictReader(f) if (r["init"], r["n_labeled"], r["seed"]) == (init, n, seed)]
    if not want:
        raise SystemExit(f"{args.recheck}: no run with init {init}, {n} labels, seed {seed}")
    checkpoint = None if init.startswith("scratch") else pretrain(base_method(init), args)["checkpoint"]
    out = Path(args.out) / "recheck" / init / f"n{n}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    got = _finetune_one(_job(args, init, n, int(seed), checkpoint, out))
    diff = got["mean_dice"] - float(want[0]["mean_dice"])
    recorded = Path(args.recheck).with_name("provenance.json")
    if recorded.is_file():  # float results depend on the CPU's kernels: say which CPUs are compared
        prov = json.loads(recorded.read_text(encoding="utf-8"))
        print(f"recorded at {prov.get('commit', '?')[:10]} on {prov.get('cpu', prov.get('machine', '?'))}; "
              f"now on {cpu_model()}", flush=True)
    ok = abs(diff) <= args.tolerance
    print(f"recheck {init} n={n} seed={seed}: {got['mean_dice']:.4f} now, {float(want[0]['mean_dice']):.4f} in "
          f"{args.recheck} ({diff:+.4f}; tolerance {args.tolerance}): {'same' if ok else 'DIFFERENT'}", flush=True)
    return 0 if ok else 1


# ---- stage 3: report ------------------------------------------------------------------------------------------


def split_sizes(split: Path) -> tuple[int, int]:
    """(pool, test) volume counts of the split file: the report prints these, not numbers written in the text."""
    d = json.loads(Path(split).read_text(encoding="utf-8"))
    return len(d["pool"]), len(d["test"])


def report(args, results: list[dict], pretrain_stats: dict) -> str:
    import numpy as np

    variants = getattr(args, "variants", None) or []
    inits = initialisations(args.methods, variants)
    labels = [str(n) for n in args.labels]
    lines = ["| init | " + " | ".join(f"{n} labels" for n in labels) + " |",
             "|---|" + "---|" * len(labels)]
    table = {}
    for init in inits:
        cells = []
        for n in labels:
            rs = [r for r in results if r["init"] == init and str(r["n"]) == n]
            m = [r["mean_dice"] for r in rs]
            a = [r["dice_anterior"] for r in rs]
            p = [r["dice_posterior"] for r in rs]
            table[(init, n)] = (float(np.mean(m)), float(np.std(m)), float(np.mean(a)), float(np.mean(p)), len(rs))
            cells.append(f"{np.mean(m):.3f} ± {np.std(m):.3f} ({np.mean(a):.2f} / {np.mean(p):.2f})" if rs else "-")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    n_pool, n_test = split_sizes(args.split)
    lines += ["", f"Cells: mean Dice over the {n_test} test volumes, mean ± std over seeds (anterior / posterior).", "",
              "| pretraining | epochs | iterations | crops/s | train time (s) | peak RSS (MB) |",
              "|---|---|---|---|---|---|"]
    for method, s in pretrain_stats.items():
        lines.append(f"| {method} | {s['epochs']} | {s['iterations']} | {s['crops_per_second']:.1f} | "
                     f"{s['train_seconds']:.0f} | {s['peak_rss_mb']:.0f} |")
    for method in [i for i in inits if not i.startswith("scratch")]:
        base = scratch_init(method)
        gains = [table[(method, n)][0] - table[(base, n)][0] for n in labels if (method, n) in table]
        lines.append(f"\n{method} minus {base} (mean Dice): " + ", ".join(
            f"{n}: {g:+.3f}" for n, g in zip(labels, gains)))
    text = "\n".join(lines)
    _plot(args, table, inits, labels, n_pool, n_test)
    return text


def export_results(args, results: list[dict], pretrain_stats: dict, dest: Path) -> None:
    """Small files to commit beside the tables: every run (runs.csv), every test volume of every run
    (per_volume.csv, from MONAI's MetricsSaver), pretraining statistics and the exact code and versions."""
    import monai
    import torch

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    runs = sorted(results, key=lambda r: (r["init"], str(r["n"]), r["seed"]))
    with open(dest / "runs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["init", "n_labeled", "seed", "mean_dice", "dice_anterior", "dice_posterior", "train_seconds"])
        for r in runs:
            w.writerow([r["init"], r["n"], r["seed"], f"{r['mean_dice']:.6f}", f"{r['dice_anterior']:.6f}",
                        f"{r['dice_posterior']:.6f}", f"{r['train_seconds']:.1f}"])
    with open(dest / "per_volume.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["init", "n_labeled", "seed", "case", "dice_anterior", "dice_posterior", "mean_dice"])
        for r in runs:
            raw = Path(args.out) / "finetune" / r["init"] / f"n{r['n']}_s{r['seed']}" / "eval" / "val_mean_dice_raw.csv"
            with open(raw, newline="", encoding="utf-8") as g:
                for row in csv.DictReader(g):
                    w.writerow([r["init"], r["n"], r["seed"], Path(row["filename"]).name.split(".")[0],
                                row["class0"], row["class1"], row["mean"]])
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", getattr(args, "code_commit", None) or "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    import faiss

    provenance = {"commit": commit, "tree_modified": bool(dirty), "python": platform.python_version(),
                  "torch": torch.__version__, "monai": monai.__version__, "faiss": faiss.__version__,
                  "machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "threads_per_finetune": args.threads, "workers": args.workers, "labels": args.labels,
                  "seeds": args.seeds, "methods": args.methods,
                  "variants": getattr(args, "variants", None) or [], "pretrain_epochs": args.pretrain_epochs,
                  "finetune_epochs": args.finetune_epochs, "iterations_per_epoch": args.iterations,
                  "channels": [int(c) for c in args.channels], "pretraining": pretrain_stats,
                  "split": str(Path(args.split).relative_to(REPO)) if Path(args.split).is_relative_to(REPO)
                  else str(args.split)}
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def _plot(args, table, inits, labels, n_pool: int, n_test: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [n_pool if n == "all" else int(n) for n in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    for init in inits:
        mean = [table[(init, n)][0] for n in labels]
        std = [table[(init, n)][1] for n in labels]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=init,
                    linestyle="--" if init.startswith("scratch") else "-")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no "3 x 10^0" labels between the label counts
    ax.set_xticks(xs)
    ax.set_xticklabels(labels)
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel(f"mean Dice on {n_test} test volumes")
    ax.set_title("Few-shot hippocampus (MSD Task04), 3 seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("MEDVOL_DATA", REPO.parent / "shared" / "data")) / "hippocampus"
    parser.add_argument("--data", type=Path, default=data)
    parser.add_argument("--split", type=Path, default=REPO / "benchmarks" / "splits" / "hippocampus_fewshot.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fewshot_hippocampus")
    parser.add_argument("--plot", type=Path, default=None, help="default: OUT/fewshot_hippocampus.png")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="default: every method but swinunetr_ssl (GPU-sized)")
    parser.add_argument("--variants", nargs="*", default=[], type=parse_variant, metavar="METHOD@TRANSFER",
                        help=f"extra rows: a method's checkpoint with another transfer ({', '.join(TRANSFERS)})")
    parser.add_argument("--labels", nargs="*", default=["1", "2", "5", "10", "all"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--channels", nargs="*", default=[8, 16, 32, 64],
                        help="UNet3D channels per level (small enough for the 1-hour CPU budget)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=25)
    parser.add_argument("--iterations", type=int, default=20, help="fine-tuning iterations per epoch")
    parser.add_argument("--workers", type=int, default=2, help="fine-tuning runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fine-tuning process")
    parser.add_argument("--pretrain-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the pretraining process")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--export", type=Path, default=None,
                        help="also write runs.csv, per_volume.csv and provenance.json (commit, versions) here")
    parser.add_argument("--code-commit", default=None,
                        help="with --report-only --export: the commit the cached runs were made with (default HEAD)")
    parser.add_argument("--recheck", type=Path, default=None, metavar="RUNS_CSV",
                        help="re-run one cell of a committed runs.csv (--recheck-cell) and compare; 1 if it differs")
    parser.add_argument("--recheck-cell", nargs=3, default=["scratch", "1", "0"], metavar=("INIT", "N", "SEED"))
    parser.add_argument("--tolerance", type=float, default=0.005, help="--recheck: largest mean Dice difference")
    parser.add_argument("--_pretrain-one", dest="pretrain_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pretrain_one:
        _pretrain_one(args.pretrain_one, args)
        return
    if args.recheck:
        sys.exit(recheck(args))
    if args.plot is None:
        args.plot = args.out / "fewshot_hippocampus.png"
    t0 = time.perf_counter()
    methods = pretrained_methods(args)
    if args.report_only:
        missing = [m for m in methods if not (args.out / "pretrain" / m / "stats.json").is_file()]
        if missing:
            raise SystemExit(f"--report-only: {args.out} has no pretraining of {', '.join(missing)}; "
                             "pass the --methods that run used")
        stats = {m: json.loads((args.out / "pretrain" / m / "stats.json").read_text(encoding="utf-8"))
                 for m in methods}
    else:
        stats = {m: pretrain(m, args) for m in methods}
    checkpoints = {m: s["checkpoint"] for m, s in stats.items()}
    results = finetune_all(args, checkpoints)
    text = report(args, results, stats)
    import torch

    machine = f"{cpu_model()} ({platform.machine()})"
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    header = (f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
              f"machine: {machine}, {os.cpu_count()} CPU cores, {gpu}; total {time.perf_counter() - t0:.0f} s\n")
    (args.out / "report.md").write_text(header + "\n" + text + "\n", encoding="utf-8")
    if args.export:
        export_results(args, results, stats, args.export)
    print(header + "\n" + text)


if __name__ == "__main__":
    main()
