"""The ``medvol`` command line (also ``python -m medvol``).

Exit codes: 0 = everything succeeded, 1 = some inputs failed (see the manifest), 2 = usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvol import __version__
from medvol.errors import ConfigError, DataError

__all__ = ["main", "build_parser", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ConfigError):
    """A command-line problem: reported as ``medvol CMD: error: ...`` with exit code 2."""


def _triplet(kind):
    def parse(values):
        return tuple(kind(v) for v in values)

    return parse


def _add_preprocess(sub):
    p = sub.add_parser(
        "preprocess",
        help="preprocess a folder of CT/MRI volumes into NIfTI (+ manifest.csv)",
        description="Load every volume in INPUT (a folder of NIfTI/MetaImage/NRRD/DICOM series, an MSD "
        "dataset.json or a CSV datalist), apply the CT or MRI preset and write one NIfTI per volume under "
        "OUTPUT (mirroring INPUT's tree) plus OUTPUT/manifest.csv. Re-running skips finished volumes.",
        epilog="example: medvol preprocess scans/ out/ --preset mri --n4 --spacing 1 1 1 --workers 2",
    )
    p.add_argument("input", type=Path, help="folder, MSD dataset.json or CSV datalist")
    p.add_argument("output", type=Path, help="output folder (must not be inside INPUT)")
    p.add_argument("--preset", choices=("ct", "mri"), required=True, help="intensity preset")
    p.add_argument("--spacing", nargs=3, type=float, metavar=("SX", "SY", "SZ"), help="target voxel size (mm)")
    p.add_argument("--size", nargs=3, type=int, metavar=("X", "Y", "Z"), help="pad/crop to this size (voxels)")
    p.add_argument("--n4", action="store_true", help="N4 bias field correction (MRI preset only)")
    p.add_argument("--n4-shrink", type=int, default=4, metavar="S", help="N4 shrink factor (default 4)")
    p.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"), default=(-1000.0, 1000.0),
                   help="CT window in HU mapped to [0, 1] (default -1000 1000)")
    p.add_argument("--percentiles", nargs=2, type=float, metavar=("LO", "HI"), default=(0.5, 99.5),
                   help="MRI percentiles mapped to [0, 1] (default 0.5 99.5)")
    p.add_argument("--no-crop", action="store_true", help="skip the foreground crop")
    p.add_argument("--allow-unlabeled", action="store_true",
                   help="with imagesTr/labelsTr folders, keep images without a label")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="redo volumes whose outputs exist")
    p.add_argument("--qc", action="store_true", help="also write OUTPUT/qc.png (mid-slices of a few outputs)")
    p.set_defaults(func=cmd_preprocess)


def _check_io_folders(input_path: Path, output: Path) -> None:
    if not input_path.exists():
        raise UsageError(f"input {input_path} does not exist")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a folder")
    root = input_path.resolve() if input_path.is_dir() else None
    out = output.resolve()
    if root is not None and (out == root or root in out.parents):
        raise UsageError(f"output {output} is inside input {input_path}: choose a folder outside the input")


def cmd_preprocess(args) -> int:
    from medvol.apps.batch import run_batch
    from medvol.apps.preprocess import PreprocessProcessor, build_jobs
    from medvol.io.datalist import load_datalist

    _check_io_folders(args.input, args.output)
    if args.n4 and args.preset != "mri":
        raise UsageError("--n4 applies to the MRI preset only")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    kwargs = {"spacing": args.spacing, "size": args.size, "crop_foreground": not args.no_crop}
    if args.preset == "mri":
        kwargs.update(n4=args.n4, n4_kwargs={"shrink_factor": args.n4_shrink}, percentiles=tuple(args.percentiles))
    else:
        kwargs.update(window=tuple(args.window))
    try:
        from medvol.transforms.presets import get_preset

        get_preset(args.preset, **kwargs)  # validate arguments before touching any file
    except ValueError as e:
        raise UsageError(str(e)) from None
    extra = {"allow_unlabeled": True} if args.allow_unlabeled and args.input.is_dir() else {}
    try:
        datalist = load_datalist(args.input, **extra)
    except DataError as e:
        raise UsageError(str(e)) from None
    root = args.input if args.input.is_dir() else args.input.parent
    args.output.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(datalist, root, args.output)
    result = run_batch(jobs, PreprocessProcessor(args.preset, **kwargs), args.output / "manifest.csv",
                       workers=args.workers, overwrite=args.overwrite, desc=f"preprocess ({args.preset})")
    counts = result.counts
    from medvol.apps.batch import dist_context

    if dist_context()[0] == 0:
        print(f"{sum(counts.values())} volumes: {counts['ok']} ok, {counts['skipped']} skipped, "
              f"{counts['failed']} failed; manifest: {result.manifest}")
        if args.qc:
            print(f"QC picture: {write_qc(result.manifest, args.output / 'qc.png')}")
    return result.exit_code


def write_qc(manifest_path: Path, png: Path, max_cases: int = 6) -> Path | None:
    """QC montage of the first ``max_cases`` finished outputs listed in a preprocess manifest."""
    import nibabel as nib
    import numpy as np

    from medvol.apps.qc import qc_montage
    from medvol.io.manifest import read_manifest

    cases, spacing = [], []
    for row in read_manifest(manifest_path).values():
        if row["status"] not in ("ok", "skipped") or len(cases) >= max_cases:
            continue
        img = nib.load(row["output"])
        label = np.asarray(nib.load(row["label_output"]).dataobj) if row.get("label_output") else None
        cases.append((Path(row["output"]).name, np.asarray(img.dataobj, dtype=np.float32), label))
        spacing.append(img.header.get_zooms()[:3])
    if not cases:
        return None
    return qc_montage(cases, png, title=f"medvol QC: {manifest_path.parent}", spacing=spacing)


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the end-to-end demo on the data shipped with medvol",
                       description="Preprocess the demo scans (MRI with labels, CT, DICOM, NRRD) and write QC "
                       "pictures.")
    p.add_argument("--output", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--data", type=Path, default=None, help="demo data folder (default: the repository's demo_data)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from medvol.apps.demo import run_demo

    return run_demo(args.output, args.data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvol", description="MONAI-native self-supervised learning for 3D CT and MRI.")
    parser.add_argument("--version", action="version", version=f"medvol {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_preprocess(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as e:
        print(f"medvol {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medvol {args.command}: interrupted; finished outputs are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
