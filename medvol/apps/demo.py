"""``medvol demo``: the end-to-end tour on the scans shipped in ``demo_data/`` (no download, a few minutes)."""

from __future__ import annotations

from pathlib import Path

from medvol.errors import ConfigError

__all__ = ["default_demo_data", "run_demo"]


def default_demo_data() -> Path:
    """The repository's ``demo_data`` folder (medvol is installed from a checkout: ``pip install -e .``)."""
    return Path(__file__).resolve().parents[2] / "demo_data"


def run_demo(output: Path, data: Path | None = None) -> int:
    """Preprocess every demo dataset with its preset and write a QC picture per dataset.

    Returns:
        the worst exit code of the steps (0 when everything succeeded).
    """
    from medvol.apps.cli import main

    data = Path(data) if data is not None else default_demo_data()
    if not (data / "hippocampus").is_dir():
        raise ConfigError(f"demo data not found in {data}: pass --data DEMO_DATA_DIR (the repository's demo_data)")
    output = Path(output)
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
        print(f"[{i}/{len(steps)}] {title}")
        code = main(["preprocess", args[0], str(output / "preprocessed" / name), *args[1:], "--qc"])
        worst = max(worst, code)
    print(f"demo finished: outputs and QC pictures under {output / 'preprocessed'}")
    return worst
