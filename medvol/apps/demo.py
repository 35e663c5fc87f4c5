"""``medvol demo``: the end-to-end tour on the scans shipped in ``demo_data/`` (no download, a few minutes on CPU).

1. Preprocess every demo dataset with its preset (MRI with labels, CT, a DICOM series with N4, NRRD from a CSV)
   and write a QC picture per dataset.
2. Fine-tune the few-shot segmentation bundle with 2 labeled hippocampus volumes, from scratch and from the
   pixel-clustering weights shipped in the package (``medvol/data``: pretrained on 180 *other* unlabeled
   hippocampus MRIs with the project's own recipe, the command is in ``medvol/data/README.md``), for 3 seeds
   (3 different pairs of labeled volumes), and evaluate both on the 6 held-out demo volumes.
3. Pictures: ``dice.png`` (mean Dice per seed and init) and ``segmentation.png`` (a held-out volume with its
   reference and both predictions overlaid).

Every step runs the same bundles as ``python -m monai.bundle run``; the equivalent commands are printed. The
fine-tuning budget is tiny (80 iterations) so the demo finishes in minutes: the numbers show the effect at that
budget, not the method's ceiling (docs/benchmarks.md has the real benchmark).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medvol.errors import ConfigError

__all__ = ["default_demo_data", "run_demo"]

TINY_UNET = {"unet": {"channels": [8, 16, 32, 64], "norm": "instance"}}
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "pixel_clustering_hippocampus_unet8.pt"
SEEDS = (0, 1, 2)


def default_demo_data() -> Path:
    """The demo scans shipped with medvol (``medvol/_demo_data`` in a wheel, ``demo_data/`` in a checkout)."""
    from medvol.bundles import demo_data_dir

    return demo_data_dir()


def _bundle(name: str, overlay: str | None = None, **overrides):
    """Run bundle ``name``'s train.json (with the ``overlay``, e.g. ``evaluate.json``) in this process; print the
    equivalent command line."""
    from monai.bundle import ConfigWorkflow

    from medvol.bundles import bundle_path

    root = bundle_path(name)
    configs = ["train.json"] + ([overlay] if overlay else [])
    args = " ".join(f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in overrides.items())
    files = ",".join(f"'{root / 'configs' / c}'" for c in configs)
    config_arg = f'"[{files}]"' if overlay else shlex.quote(str(root / "configs" / "train.json"))
    print(f"  $ python -m monai.bundle run --config_file {config_arg} --bundle_root {shlex.quote(str(root))} {args}",
          flush=True)
    wf = ConfigWorkflow(config_file=[str(root / "configs" / c) for c in configs],
                        meta_file=str(root / "configs" / "metadata.json"),
                        logging_file=str(root / "configs" / "logging.conf"), workflow_type=None,
                        bundle_root=str(root), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _preprocess_all(data: Path, output: Path, main) -> int:
    steps = [
        ("hippocampus MRI (labels follow images)", [str(data / "hippocampus"), "--preset", "mri"]),
        ("abdominal CT, resampled to 3 mm", [str(data / "ct"), "--preset", "ct", "--spacing", "3", "3", "3"]),
        ("DICOM series with N4 bias field correction", [str(data / "dicom"), "--preset", "mri", "--n4"]),
        ("NRRD image + lesion mask from a CSV datalist (flipped direction cosines)",
         [str(data / "nrrd" / "datalist.csv"), "--preset", "mri", "--no-crop"]),
    ]
    worst = 0
    for i, (title, args) in enumerate(steps, start=1):
        name = Path(args[0]).name if Path(args[0]).is_dir() else Path(args[0]).parent.name
        out = output / "preprocessed" / name
        print(f"[1.{i}] {title}\n  $ medvol preprocess {args[0]} {out} {' '.join(args[1:])} --qc", flush=True)
        worst = max(worst, main(["preprocess", args[0], str(out), *args[1:], "--qc"]))
    return worst


def _finetune_and_evaluate(data: Path, output: Path, seeds=SEEDS, max_epochs: int = 8,
                           iterations_per_epoch: int = 10) -> dict:
    """Fine-tune from scratch and from the shipped weights for each seed; returns {init: [Dice per seed]}."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in (data / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    split = output / "split.json"
    split.write_text(json.dumps({"pool": cases[:14], "test": cases[14:]}, indent=1))
    common = {"dataset_dir": str(data / "hippocampus"), "split_file": str(split), "backbone_options": TINY_UNET}
    results: dict[str, list[float]] = {"scratch": [], "pretrained": []}
    step = 1
    for seed in seeds:
        for init, ckpt in (("scratch", None), ("pretrained", str(DEMO_WEIGHTS))):
            out = output / f"fewshot_{init}_seed{seed}"
            print(f"[2.{step}] fine-tune with 2 labeled volumes (seed {seed}), init = {init}", flush=True)
            _bundle("fewshot_segmentation", **common, output_dir=str(out), num_labeled=2, seed=seed,
                    pretrained_checkpoint=ckpt, max_epochs=max_epochs, iterations_per_epoch=iterations_per_epoch)
            print(f"[2.{step + 1}] evaluate on the {len(cases) - 14} held-out volumes", flush=True)
            wf = _bundle("fewshot_segmentation", "evaluate.json", **common, output_dir=str(out))
            results[init].append(float(wf.parser.get_parsed_content("evaluator").state.metrics["val_mean_dice"]))
            step += 2
    (output / "dice.json").write_text(json.dumps({"seeds": list(seeds), **results}, indent=1))
    return {"results": results, "seeds": list(seeds), "iterations": max_epochs * iterations_per_epoch,
            "test_case": cases[14], "common": common}


def _segment(data: Path, output: Path, case: str, common: dict, seed: int) -> dict[str, Path]:
    """Segment one held-out volume with the ``seed`` model of each init (the bundle's inference.json)."""
    folder = output / "heldout_example"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{case}.nii.gz"
    if not image.exists():
        image.write_bytes((data / "hippocampus" / "imagesTr" / f"{case}.nii.gz").read_bytes())
    preds = {}
    for init in ("scratch", "pretrained"):
        out = output / f"fewshot_{init}_seed{seed}"
        _bundle("fewshot_segmentation", "inference.json", dataset_dir=str(folder), output_dir=str(out),
                backbone_options=common["backbone_options"])
        preds[init] = out / "segmentations" / f"{case}_seg.nii.gz"
    return preds


def _pictures(data: Path, output: Path, finetuned: dict, preds: dict[str, Path]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    from medvol.apps.qc import qc_montage

    results, case, seeds = finetuned["results"], finetuned["test_case"], finetuned["seeds"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    x = np.arange(len(seeds) + 1)
    for i, (init, colour) in enumerate((("scratch", "tab:gray"), ("pretrained", "tab:blue"))):
        values = results[init] + [float(np.mean(results[init]))]
        bars = ax.bar(x + (i - 0.5) * width, values, width, color=colour,
                      label="from scratch" if init == "scratch" else "from the shipped pixel-clustering weights")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [f"seed {s}" for s in seeds] + ["mean"])
    ax.set_ylabel("mean Dice, 6 held-out volumes")
    ax.set_ylim(0, 1)
    ax.set_title(f"2 labeled volumes, {finetuned['iterations']} fine-tuning iterations", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    dice_png = output / "dice.png"
    fig.savefig(dice_png, dpi=110)
    plt.close(fig)

    def ras(path):
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asarray(img.dataobj, dtype=np.float32), img.header.get_zooms()[:3]

    image, spacing = ras(data / "hippocampus" / "imagesTr" / f"{case}.nii.gz")
    reference, _ = ras(data / "hippocampus" / "labelsTr" / f"{case}.nii.gz")
    rows = [(f"{case}: reference", image, reference)]
    rows += [(f"{init} (seed {seeds[0]})", image, ras(p)[0]) for init, p in preds.items()]
    seg_png = qc_montage(rows, output / "segmentation.png", title="held-out demo volume: anterior / posterior",
                         spacing=[spacing] * len(rows))
    return [dice_png, seg_png]


def run_demo(output: Path, data: Path | None = None, train: bool = True, command=None,
             finetune: dict | None = None) -> int:
    """Run the demo; returns the worst exit code of the preprocessing steps (0 when everything succeeded).

    ``finetune`` overrides the fine-tuning budget (``seeds``, ``max_epochs``, ``iterations_per_epoch``; tests use
    a smaller one).

    ``command`` runs a ``medvol`` command line (``medvol.apps.cli.main``, passed in by the CLI so that this
    module does not import the module that imports it).
    """
    if command is None:
        raise ConfigError("run_demo needs command=medvol.apps.cli.main (run it as `medvol demo`)")
    data = Path(data) if data is not None else default_demo_data()
    if train:
        from medvol.bundles import bundle_path

        bundle_path("fewshot_segmentation")  # a clear error if the package lost its bundles
        if not DEMO_WEIGHTS.is_file():
            raise ConfigError(f"the demo's pretrained weights {DEMO_WEIGHTS} are missing: reinstall medvol")
    if not (data / "hippocampus").is_dir():
        raise ConfigError(f"demo data not found in {data}: pass --data DEMO_DATA_DIR (a copy of the shipped "
                          "demo_data folder, see `medvol demo --where`)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    worst = _preprocess_all(data, output, command)
    if train:
        finetuned = _finetune_and_evaluate(data, output, **(finetune or {}))
        print("[3] pictures: a held-out volume segmented by both models, and the Dice of every run", flush=True)
        preds = _segment(data, output, finetuned["test_case"], finetuned["common"], finetuned["seeds"][0])
        pictures = _pictures(data, output, finetuned, preds)
        results = finetuned["results"]
        print("\nmean Dice (anterior + posterior) on the 6 held-out demo volumes, 2 labeled training volumes:")
        for init, values in results.items():
            per_seed = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {init:>10}: {sum(values) / len(values):.3f}  (seeds: {per_seed})")
        print(f"pictures: {', '.join(str(p) for p in pictures)}")
        print(f"({finetuned['iterations']} fine-tuning iterations on 2 volumes; {len(finetuned['seeds'])} seeds "
              "because single runs vary a lot at this budget; the full benchmark: docs/benchmarks.md)")
    print(f"\ndemo finished: preprocessed volumes and QC pictures under {output / 'preprocessed'}, "
          f"models and evaluations under {output}")
    return worst
