"""``medvol demo``: the end-to-end tour on the scans shipped in ``demo_data/`` (no download, a few minutes on CPU).

1. Preprocess every demo dataset with its preset (MRI with labels, CT, a DICOM series with N4, NRRD from a CSV)
   and write a QC picture per dataset.
2. Pretrain CAiD on the hippocampus images (labels unused), then fine-tune the few-shot segmentation bundle
   with 2 labeled volumes from scratch and from the CAiD weights, and evaluate both on held-out volumes.

Every step runs the same bundles as ``python -m monai.bundle run``; the equivalent commands are printed. The
sizes are tiny so the demo finishes in minutes: the numbers show the workflow, not the method's ceiling (see
docs/benchmarks.md for the real benchmark).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medvol.errors import ConfigError

__all__ = ["default_demo_data", "run_demo"]

TINY_UNET = {"unet": {"channels": [8, 16, 32, 64], "norm": "instance"}}


def default_demo_data() -> Path:
    """The repository's ``demo_data`` folder (medvol is installed from a checkout: ``pip install -e .``)."""
    return Path(__file__).resolve().parents[2] / "demo_data"


def _bundles_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bundles"


def _bundle(name: str, overlay: str | None = None, **overrides):
    """Run bundle ``name``'s train.json (with the ``overlay``, e.g. ``evaluate.json``) in this process; print the
    equivalent command line."""
    from monai.bundle import ConfigWorkflow

    root = _bundles_dir() / name
    configs = ["train.json"] + ([overlay] if overlay else [])
    args = " ".join(f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in overrides.items())
    files = ",".join(f"'bundles/{name}/configs/{c}'" for c in configs)
    config_arg = f'"[{files}]"' if overlay else f"bundles/{name}/configs/train.json"
    print(f"  $ python -m monai.bundle run --config_file {config_arg} --bundle_root bundles/{name} {args}", flush=True)
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


def _pretrain_and_finetune(data: Path, output: Path) -> dict:
    cases = sorted(p.name[: -len(".nii.gz")] for p in (data / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    split = output / "split.json"
    split.write_text(json.dumps({"pool": cases[:14], "test": cases[14:]}, indent=1))
    common = {"dataset_dir": str(data / "hippocampus"), "split_file": str(split), "backbone_options": TINY_UNET}
    print("[2.1] CAiD pretraining on the 14 pool images (labels unused)", flush=True)
    _bundle("caid", **common, output_dir=str(output / "caid"), max_epochs=5, batch_size=4,
            val_fraction=0.15)
    results = {}
    for i, (init, ckpt) in enumerate([("scratch", None), ("caid", str(output / "caid" / "models" / "model.pt"))]):
        out = output / f"fewshot_{init}"
        print(f"[2.{2 + 2 * i}] fine-tune with 2 labeled volumes, init = {init}", flush=True)
        _bundle("fewshot_segmentation", **common, output_dir=str(out), num_labeled=2, seed=0,
                pretrained_checkpoint=ckpt, max_epochs=8, iterations_per_epoch=10)
        print(f"[2.{3 + 2 * i}] evaluate on the {len(cases) - 14} held-out volumes", flush=True)
        wf = _bundle("fewshot_segmentation", "evaluate.json", **common, output_dir=str(out))
        results[init] = float(wf.parser.get_parsed_content("evaluator").state.metrics["val_mean_dice"])
    return results


def run_demo(output: Path, data: Path | None = None, train: bool = True, command=None) -> int:
    """Run the demo; returns the worst exit code of the preprocessing steps (0 when everything succeeded).

    ``command`` runs a ``medvol`` command line (``medvol.apps.cli.main``, passed in by the CLI so that this
    module does not import the module that imports it).
    """
    if command is None:
        raise ConfigError("run_demo needs command=medvol.apps.cli.main (run it as `medvol demo`)")
    data = Path(data) if data is not None else default_demo_data()
    if not (data / "hippocampus").is_dir():
        raise ConfigError(f"demo data not found in {data}: pass --data DEMO_DATA_DIR (the repository's demo_data)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    worst = _preprocess_all(data, output, command)
    if train:
        dice = _pretrain_and_finetune(data, output)
        print("\nmean Dice (anterior + posterior) on the held-out demo volumes, 2 labeled training volumes:")
        for init, value in dice.items():
            print(f"  {init:>8}: {value:.3f}")
        print("(tiny demo run; real numbers: docs/benchmarks.md)")
    print(f"\ndemo finished: preprocessed volumes and QC pictures under {output / 'preprocessed'}, "
          f"models and evaluations under {output}")
    return worst
