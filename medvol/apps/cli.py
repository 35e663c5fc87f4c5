"""The ``medvol`` command line (also ``python -m medvol``).

Exit codes: 0 = everything succeeded, 1 = some inputs failed (see the manifest), 2 = usage error (including an
output folder that cannot be created or written), 3 = medvol itself failed (a bug: ``--debug`` shows the
traceback). Every error is one line on stderr; ``--debug`` adds the traceback (also of each failed input).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from medvol import __version__
from medvol.errors import ConfigError, DataError

__all__ = ["main", "build_parser", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(ConfigError):
    """A command-line problem: reported as ``medvol CMD: error: ...`` with exit code 2."""


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
    _add_gantry_tilt(p)
    _add_debug(p)
    p.set_defaults(func=cmd_preprocess)


def _add_gantry_tilt(p) -> None:
    p.add_argument("--gantry-tilt", choices=("resample", "fail"), default=None,
                   help="gantry-tilted DICOM CT: resample onto an orthogonal grid (default, as dcm2niix) or fail "
                   "that input (see docs/reliability.md)")


def _add_debug(p) -> None:
    # SUPPRESS: without the flag the sub-command leaves the value of `medvol --debug CMD` alone
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print tracebacks (of the run and of every failed input) besides the one-line errors")


def _check_io_folders(input_path: Path, output: Path) -> None:
    if not input_path.exists():
        raise UsageError(f"input {input_path} does not exist")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a folder")
    root = input_path.resolve() if input_path.is_dir() else None
    out = output.resolve()
    if root is not None and (out == root or root in out.parents):
        raise UsageError(f"output {output} is inside input {input_path}: choose a folder outside the input")


def _datalist_options(source: Path, allow_unlabeled: bool) -> dict:
    """``load_datalist`` options of a batch command: a listed file that is missing fails alone (in the manifest)."""
    if source.is_dir():
        return {"allow_unlabeled": True} if allow_unlabeled else {}
    return {"missing_ok": True} if source.suffix.lower() in (".csv", ".json") else {}


def _prepare_output(output: Path) -> None:
    """Create ``output`` and check that files can be written in it (before any input is processed)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output, prefix=".medvol-write-check."):
            pass
    except OSError as e:
        raise UsageError(f"output folder {output} is not writable ({e.strerror or e})") from None


def cmd_preprocess(args) -> int:
    # cheap argument checks first: a wrong path is reported before seconds of torch/MONAI imports
    _check_io_folders(args.input, args.output)
    if args.n4 and args.preset != "mri":
        raise UsageError("--n4 applies to the MRI preset only")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    from medvol.apps.preprocess import PreprocessProcessor, build_jobs
    from medvol.engines.batch import run_batch
    from medvol.io.datalist import load_datalist

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
    try:
        datalist = load_datalist(args.input, **_datalist_options(args.input, args.allow_unlabeled))
    except DataError as e:
        raise UsageError(str(e)) from None
    root = args.input if args.input.is_dir() else args.input.parent
    _prepare_output(args.output)
    _set_gantry_tilt(args)
    jobs = build_jobs(datalist, root, args.output)
    result = run_batch(jobs, PreprocessProcessor(args.preset, **kwargs), args.output / "manifest.csv",
                       workers=args.workers, overwrite=args.overwrite, desc=f"preprocess ({args.preset})")
    counts = result.counts
    from medvol.engines.batch import dist_context

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


def _add_embed(sub):
    p = sub.add_parser(
        "embed",
        help="embed every slice of a folder of CT/MRI volumes with a LeCL slice encoder (one .h5 bag per volume)",
        description="Load every volume in INPUT (a folder of NIfTI/MetaImage/NRRD/DICOM series, an MSD "
        "dataset.json or a CSV datalist), preprocess and slice it as the bundle's configs/inference.json says, "
        "embed the 2.5D slices with the bundle's encoder and write OUTPUT/<case>.h5 (datasets feats "
        "(n_slices, D) and slice_index; attributes source, spacing, checkpoint_sha256, axis) plus "
        "OUTPUT/manifest.csv. Re-running skips finished volumes. OUTPUT is ready for the slice_mil bundle.",
        epilog="example: medvol embed scans/ bags/ --bundle bundles/lecl_slice_embedding "
        "--checkpoint runs/lecl/models/model.pt --workers 2",
    )
    p.add_argument("input", type=Path, help="folder, MSD dataset.json or CSV datalist")
    p.add_argument("output", type=Path, help="output folder (must not be inside INPUT)")
    p.add_argument("--bundle", type=Path, required=True,
                   help="bundle folder, e.g. bundles/lecl_slice_embedding, or a shipped bundle's name")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="encoder state dict (default: BUNDLE/models/model.pt, else inference.json's ckpt_path)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="redo volumes whose outputs exist")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="slices per network call (default 64)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (default) or cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference.json id (value parsed as JSON when it can be), e.g. "
                   "--set spatial_size=128 --set encoder=resnet18; repeatable; use the values used in training")
    _add_gantry_tilt(p)
    _add_debug(p)
    p.set_defaults(func=cmd_embed)


def _set_gantry_tilt(args) -> None:
    from medvol.io.dicom import GANTRY_TILT_ENV

    if getattr(args, "gantry_tilt", None):
        os.environ[GANTRY_TILT_ENV] = args.gantry_tilt  # read by the DICOM reader, also in worker processes


def _parse_overrides(pairs: list[str]) -> dict:
    import json

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def _resolve_bundle(bundle: Path) -> Path:
    """``--bundle`` is a folder, or the name of a shipped bundle (``medvol bundle list``) when no such folder exists."""
    if bundle.exists() or len(bundle.parts) != 1:
        return bundle
    from medvol.bundles import bundle_path

    try:
        return bundle_path(bundle.name)
    except ConfigError as e:
        raise UsageError(f"--bundle {bundle}: no such folder, and {e}") from None


def cmd_embed(args) -> int:
    # cheap argument checks first: a wrong path is reported before seconds of torch/MONAI imports
    _check_io_folders(args.input, args.output)
    args.bundle = _resolve_bundle(args.bundle)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.bundle / "configs" / "inference.json").is_file():
        raise UsageError(f"bundle {args.bundle} does not exist or has no configs/inference.json")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    from medvol.engines.batch import dist_context, run_batch
    from medvol.engines.embedding import EmbedProcessor, build_embed_jobs, default_checkpoint
    from medvol.io.datalist import load_datalist
    from medvol.io.manifest import read_manifest

    overrides = _parse_overrides(args.overrides)
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    checkpoint = args.checkpoint or default_checkpoint(args.bundle, overrides)
    if not Path(checkpoint).is_file():
        raise UsageError(f"the bundle has no trained checkpoint ({checkpoint} does not exist): train the bundle "
                         "first, or pass --checkpoint FILE")
    processor = EmbedProcessor(args.bundle, checkpoint, overrides, device, args.batch_size,
                               previous=read_manifest(args.output / "manifest.csv"))
    try:
        processor.load()  # bundle, overrides and checkpoint are checked before any volume is touched
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.workers > 1:
        processor.release()
    try:
        datalist = load_datalist(args.input, **_datalist_options(args.input, allow_unlabeled=True))
    except DataError as e:
        raise UsageError(str(e)) from None
    _prepare_output(args.output)
    _set_gantry_tilt(args)
    jobs = build_embed_jobs(datalist, args.output)
    result = run_batch(jobs, processor, args.output / "manifest.csv", workers=args.workers,
                       overwrite=args.overwrite, desc="embed")
    counts = result.counts
    if dist_context()[0] == 0:
        print(f"{sum(counts.values())} volumes: {counts['ok']} ok, {counts['skipped']} skipped, "
              f"{counts['failed']} failed; manifest: {result.manifest}")
    return result.exit_code


def _add_index(sub):
    p = sub.add_parser(
        "index",
        help="build (or extend) a similar-case search index over a folder of embeddings",
        description="Pool every embedding file in EMBEDDINGS (medvol embed bags <case>.h5, or volume embeddings "
        "<case>.npy of a bundle's inference) to one vector per volume and index them with FAISS in INDEX: exact "
        "up to --exact-max vectors, IVF, IVF-SQ8 or IVF-PQ above (quantizer trained with medvol's k-means). "
        "Writes "
        "INDEX/index.json, the faiss index, the id map INDEX/ids.csv and INDEX/manifest.csv (bad or mismatched "
        "files failed with the reason). Re-running resumes a killed run and appends new files.",
        epilog="example: medvol index bags/ index/ --bundle bundles/lecl_slice_embedding "
        "--checkpoint runs/lecl/models/model.pt",
    )
    p.add_argument("embeddings", type=Path, help="folder of .h5 bags and/or .npy volume embeddings")
    p.add_argument("index", type=Path, help="index folder (created; an existing index is resumed / appended to)")
    p.add_argument("--metric", choices=("cosine", "l2"), default=None,
                   help="cosine (default for a new index) or l2; an existing index keeps its own")
    p.add_argument("--pooling", choices=("mean", "max"), default=None,
                   help="slice embeddings -> volume vector (default mean; an existing index keeps its own)")
    p.add_argument("--kind", choices=("auto", "flat", "ivf", "ivfsq", "ivfpq"), default="auto",
                   help="index kind (default auto: flat up to --exact-max vectors, then by the size of the raw "
                   "vectors ivf up to 512 MiB, ivfsq (8-bit) up to 16 GiB, ivfpq above)")
    p.add_argument("--exact-max", type=int, default=50_000, metavar="N",
                   help="auto: exact search up to N vectors (default 50000)")
    p.add_argument("--nlist", type=int, default=None, metavar="L", help="IVF lists (default about sqrt(n))")
    p.add_argument("--pq-m", type=int, default=None, metavar="M", help="IVF-PQ sub-quantizers (must divide D)")
    p.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                   help="recall at 10 the calibrated nprobe must reach (default 0.95)")
    p.add_argument("--rebuild", action="store_true", help="train the faiss index again on every stored vector")
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle the embeddings were made with (recorded, so scans can be queried)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="its checkpoint (default: BUNDLE/models/model.pt, else inference.json's ckpt_path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference.json overrides used for the embeddings (recorded with the bundle); repeatable")
    p.add_argument("--id-regex", default=None, metavar="RE", help="case id from the file name (first group of RE)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="faiss threads (default: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="k-means of the IVF quantizer on the GPU when faiss has GPU support (auto, default)")
    _add_debug(p)
    p.set_defaults(func=cmd_index)


def _embedder(args) -> dict | None:
    """The bundle/checkpoint/overrides of ``--bundle``, with the checkpoint's sha256 (None without --bundle)."""
    if args.bundle is None:
        if args.checkpoint is not None or args.overrides:
            raise UsageError("--checkpoint and --set need --bundle")
        return None
    if not (args.bundle / "configs" / "inference.json").is_file():
        raise UsageError(f"bundle {args.bundle} does not exist or has no configs/inference.json")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    from medvol.engines.embedding import default_checkpoint
    from medvol.io.bags import file_sha256

    overrides = _parse_overrides(args.overrides)
    checkpoint = args.checkpoint or default_checkpoint(args.bundle, overrides)
    if not Path(checkpoint).is_file():
        raise UsageError(f"the bundle has no trained checkpoint ({checkpoint} does not exist): pass --checkpoint FILE")
    return {"bundle": str(args.bundle.resolve()), "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": file_sha256(checkpoint), "overrides": overrides}


def cmd_index(args) -> int:
    # cheap argument checks first: a wrong path is reported before the faiss / numpy imports
    if not args.embeddings.is_dir():
        raise UsageError(f"embeddings folder {args.embeddings} does not exist")
    if args.index.exists() and not args.index.is_dir():
        raise UsageError(f"index {args.index} exists and is not a folder")
    if args.index.resolve() == args.embeddings.resolve():
        raise UsageError("INDEX must be another folder than EMBEDDINGS")
    for name in ("exact_max", "nlist", "pq_m", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.target_recall <= 1:
        raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    embedder = _embedder(args)
    _prepare_output(args.index)
    import json

    from medvol.search import IndexOptions, build_index

    existing = args.index / "index.json"
    meta = {}
    if existing.is_file():
        try:
            meta = json.loads(existing.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
    options = IndexOptions(metric=args.metric or meta.get("metric", "cosine"),
                           pooling=args.pooling or meta.get("pooling", "mean"), kind=args.kind,
                           exact_max=args.exact_max, nlist=args.nlist, pq_m=args.pq_m,
                           target_recall=args.target_recall, n_threads=args.threads, device=args.device)
    try:
        result = build_index(args.embeddings, args.index, options, embedder=embedder, rebuild=args.rebuild,
                             id_regex=args.id_regex)
    except (DataError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "faiss" not in str(e) and "cuda" not in str(e):
            raise
        raise UsageError(str(e)) from None
    counts, meta = result.counts, result.meta
    print(f"{sum(counts.values())} embedding files: {counts['ok']} added, {counts['skipped']} already indexed, "
          f"{counts['failed']} failed; {meta['n']} vectors ({meta['kind']}, {meta['metric']}, dim {meta['dim']}) "
          f"in {args.index}; manifest: {result.manifest}")
    return result.exit_code


def _add_search(sub):
    p = sub.add_parser(
        "search",
        help="the indexed cases most similar to a scan, an embedding file or (LoVT index) a text",
        description="Find the K indexed volumes nearest to QUERY: a scan (embedded on the fly with the bundle and "
        "checkpoint the index records, or --bundle/--checkpoint), an embedding file (.h5 bag or .npy), or, for an "
        "index with a text encoder, a text string. Prints rank, distance, id, case and source; --html writes a "
        "self-contained page with the mid slices and metadata of the query and of each neighbour.",
        epilog="example: medvol search index/ scans/case7.nii.gz -k 5 --html case7_similar.html",
    )
    p.add_argument("index", type=Path, help="index folder written by medvol index")
    p.add_argument("query", help="scan (file or DICOM folder), embedding file (.h5/.npy) or text")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default 10)")
    p.add_argument("--nprobe", type=int, default=None, metavar="P",
                   help="IVF lists searched (default: the one calibrated at build time)")
    p.add_argument("--html", type=Path, default=None, metavar="OUT", help="write the results page here")
    p.add_argument("--keep-self", action="store_true",
                   help="keep the query's own entry when it is in the index (default: left out)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to embed a scan query with (default: the index's)")
    p.add_argument("--checkpoint", type=Path, default=None, help="its checkpoint (default: the index's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference.json overrides for the scan query (default: the index's); repeatable")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="faiss GPU search when available (auto, default); the scan is embedded on the CPU")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="faiss threads")
    _add_debug(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    if not (args.index / "index.json").is_file():
        raise UsageError(f"{args.index} is not a search index (no index.json): build one with `medvol index`")
    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    if args.nprobe is not None and args.nprobe < 1:
        raise UsageError(f"--nprobe must be >= 1, got {args.nprobe}")
    if args.html is not None and args.html.is_dir():
        raise UsageError(f"--html {args.html} is a folder; give a file name")
    if args.bundle is not None and not (args.bundle / "configs" / "inference.json").is_file():
        raise UsageError(f"bundle {args.bundle} does not exist or has no configs/inference.json")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    import os as _os

    from medvol.apps.search import resolve_query, write_results_page
    from medvol.search import SimilarityIndex

    try:
        index = SimilarityIndex.open(args.index, device=args.device, n_threads=args.threads)
        query = resolve_query(args.query, index.meta, args.bundle, args.checkpoint,
                              _parse_overrides(args.overrides) if args.overrides else None)
        dist, ids = index.search(query.vector, args.k + (0 if args.keep_self else 1), nprobe=args.nprobe)
    except (DataError, ValueError) as e:
        raise UsageError(str(e)) from None
    results, left_out = [], None
    own = {_os.path.abspath(p) for p in (query.file, query.source) if p}
    for d, i in zip(dist[0], ids[0]):
        if i < 0:
            continue
        item = index.items[int(i)]
        if not args.keep_self and own & {_os.path.abspath(p) for p in (item.get("file"), item.get("source")) if p}:
            left_out = int(i)
            continue
        results.append({"rank": len(results) + 1, "distance": float(d), "id": int(i), "item": item})
    results = results[:args.k]
    what = "1 - cosine" if index.meta["metric"] == "cosine" else "squared L2"
    print(f"query: {query.label} -> {len(results)} nearest of {len(index)} ({index.meta['kind']} index, "
          f"distance {what})" + (f"; the query itself (id {left_out}) left out" if left_out is not None else ""))
    print(f"{'rank':>4}  {'distance':>9}  {'id':>6}  {'case':<24} source")
    for r in results:
        item = r["item"]
        print(f"{r['rank']:>4}  {r['distance']:>9.4f}  {r['id']:>6}  {item.get('case_id', ''):<24} "
              f"{item.get('source') or item.get('file', '')}")
    if args.html is not None:
        print(f"results page: {write_results_page(args.html, query, results, index.meta)}")
    return EXIT_OK


def _add_probe(sub):
    p = sub.add_parser(
        "probe",
        help="k-NN and linear probes of frozen volume embeddings (or downsampled voxels) against a targets CSV",
        description="Read one embedding per volume from INPUT (.h5 bags of 'medvol embed', pooled; .npy files of "
        "the 3D bundles' inference.json) or, with --voxels, downsample every volume of INPUT to SIZE^3 voxels; "
        "match them to the rows of --targets by case id; cross-validate a k-NN (cosine) and a linear probe "
        "(logistic / ridge regression) with outer folds for testing and inner folds choosing k, C or alpha (and "
        "the PCA size with --voxels), grouped by --group-column so that no subject is in train and test. Writes "
        "OUTPUT/probe.json (every fold) and OUTPUT/probe.md (the printed table).",
        epilog="example: medvol probe runs/caid/embeddings out/probe_sex --targets ixi.csv --target sex "
        "--group-column subject   |   baseline: medvol probe ixi_t1/ out/pca_sex --voxels --targets ixi.csv "
        "--target sex",
    )
    p.add_argument("input", type=Path, help="folder of embedding files (or of volumes with --voxels)")
    p.add_argument("output", type=Path, help="output folder (probe.json, probe.md)")
    p.add_argument("--targets", type=Path, required=True, help="CSV with one row per case")
    p.add_argument("--target", required=True, help="the column to predict")
    p.add_argument("--task", choices=("auto", "binary", "multiclass", "regression"), default="auto",
                   help="auto (default): binary for 2 values, regression for >10 distinct numbers, else multiclass")
    p.add_argument("--id-column", default="id", help="case id column, matched to the file names (default id)")
    p.add_argument("--group-column", default=None, help="subject column: its groups never straddle folds")
    p.add_argument("--id-regex", default=None, help="extract the case id from file names (first group)")
    p.add_argument("--voxels", action="store_true", help="INPUT holds volumes: probe downsampled voxels + PCA")
    p.add_argument("--size", type=int, default=16, help="--voxels grid size per axis (default 16)")
    p.add_argument("--pooling", choices=("mean", "max"), default="mean", help="pooling of a bag's slice rows")
    p.add_argument("--probes", nargs="+", default=["knn", "linear"], help="knn and/or linear (default both)")
    p.add_argument("--folds", type=int, default=5, help="outer folds (default 5)")
    p.add_argument("--inner-folds", type=int, default=3, help="inner folds choosing hyperparameters (default 3)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the fold splits (default 1337)")
    p.add_argument("--pca", type=int, nargs="+", default=None, metavar="N",
                   help="PCA sizes to choose from inside the folds (default: none; 8 16 32 64 with --voxels)")
    _add_debug(p)
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    from medvol.apps.probe import check_args, markdown_table, run_probe

    check_args(args.probes, args.folds, args.inner_folds)
    if not args.input.is_dir():
        raise UsageError(f"{args.input}: no such folder")
    try:
        result = run_probe(args.input, args.targets, args.target, args.output, task=args.task,
                           id_column=args.id_column, group_column=args.group_column, voxels=args.voxels,
                           size=args.size, pooling=args.pooling, id_regex=args.id_regex, probes=args.probes,
                           num_folds=args.folds, inner_folds=args.inner_folds, seed=args.seed,
                           pca_components=args.pca)
    except DataError as e:
        raise UsageError(str(e)) from None
    print(markdown_table(result))
    failed = result["info"]["failed"]
    for reason in failed.values():
        print(f"medvol probe: failed: {reason}", file=sys.stderr)
    print(f"wrote {args.output / 'probe.json'} and {args.output / 'probe.md'}")
    return EXIT_FAILED if failed else EXIT_OK


def _add_monailabel_app(sub):
    p = sub.add_parser(
        "monailabel-app",
        help="prepare a MONAI Label app folder serving a bundle (local, no model-zoo download)",
        description="Copy MONAI Label's bundle app (monaibundle, from the monailabel package installed in this "
        "environment) into APP unless APP/main.py exists, put BUNDLE with its checkpoint in APP/model/NAME/, "
        "write --set overrides into the copied configs, check that the checkpoint fits the network and print the "
        "'monailabel start_server' line. Run it in MONAI Label's environment (medvol must be installed there).",
        epilog="example: medvol monailabel-app apps/medvol --bundle bundles/fewshot_segmentation "
        "--checkpoint runs/seg/models/model.pt --studies /data/studies",
    )
    p.add_argument("app", type=Path, help="app folder to create or update")
    p.add_argument("--bundle", type=Path, required=True,
                   help="bundle folder, e.g. bundles/fewshot_segmentation, or a shipped bundle's name")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained state dict, e.g. runs/seg/models/model.pt (default: BUNDLE/models/model.pt)")
    p.add_argument("--name", default=None, help="model name in MONAI Label (default: the bundle folder's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="write a config value into the copied inference/train/evaluate.json (value parsed as JSON "
                   "when it can be), e.g. --set preset=ct --set spacing=[1.5,1.5,1.5]; use the values used in "
                   "training (MONAI Label runs the configs without command-line overrides); repeatable")
    p.add_argument("--studies", default="STUDIES", help="studies folder to put in the printed command line")
    p.add_argument("--host", default="127.0.0.1", help="host in the printed command line (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port in the printed command line (default 8000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing APP/model/NAME/")
    _add_debug(p)
    p.set_defaults(func=cmd_monailabel_app)


def cmd_monailabel_app(args) -> int:
    args.bundle = _resolve_bundle(args.bundle)
    from medvol.apps.monailabel_app import prepare_app

    overrides = _parse_overrides(args.overrides)
    try:
        app = prepare_app(args.app, args.bundle, checkpoint=args.checkpoint, name=args.name, overrides=overrides,
                          overwrite=args.overwrite)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    print(f"MONAI Label app ready: {app.app_dir} (model '{app.name}' in {app.bundle_dir})")
    print("start it with:")
    print(app.command(studies=args.studies, host=args.host, port=args.port))
    return EXIT_OK


def _add_bundle(sub):
    p = sub.add_parser("bundle", help="list, locate or export the MONAI bundles shipped with medvol",
                       description="The bundles shipped with medvol, by name: list them, print one's folder, or "
                       "export one as a self-contained MONAI bundle folder (configs/, docs/, LICENSE, the zoo "
                       "files, models/model.pt with --checkpoint) that `python -m monai.bundle run --bundle_root "
                       "DIR` runs. See docs/bundles.md.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="the shipped bundles: name, version, task")
    _add_debug(ls)
    path = actions.add_parser("path", help="print the folder of bundle NAME")
    path.add_argument("name", metavar="NAME", help="a bundle name (see `medvol bundle list`)")
    _add_debug(path)
    ex = actions.add_parser("export", help="copy bundle NAME into DIR as a self-contained bundle folder",
                            epilog="example: medvol bundle export fewshot_segmentation my_bundle "
                            "--checkpoint runs/seg/models/model.pt")
    ex.add_argument("name", metavar="NAME", help="a bundle name (see `medvol bundle list`)")
    ex.add_argument("dir", type=Path, metavar="DIR", help="folder to create (may exist if empty)")
    ex.add_argument("--checkpoint", type=Path, default=None, metavar="CKPT",
                    help="trained state dict to ship as DIR/models/model.pt")
    ex.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    _add_debug(ex)
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args) -> int:
    import json

    from medvol.bundles import bundle_path, bundles_root, export_bundle, list_bundles

    try:
        if args.action == "list":
            for name in list_bundles():
                meta = json.loads((bundle_path(name) / "configs" / "metadata.json").read_text(encoding="utf-8"))
                print(f"{name:<26} {meta.get('version', '?'):<8} {meta.get('task', '')}")
            print(f"({bundles_root()})")
        elif args.action == "path":
            print(bundle_path(args.name))
        else:
            if args.checkpoint is not None and not args.checkpoint.is_file():
                raise UsageError(f"--checkpoint {args.checkpoint} does not exist or is not a file")
            dest = export_bundle(args.name, args.dir, checkpoint=args.checkpoint, force=args.force)
            weights = " with models/model.pt" if args.checkpoint is not None else ""
            print(f"bundle {args.name} exported to {dest}{weights}; train it with:")
            print(f"  python -m monai.bundle run --config_file {dest}/configs/train.json --bundle_root {dest} "
                  "--dataset_dir DATA")
            print(f"its other commands: {dest}/docs/README.md (with --bundle_root {dest}"
                  + (f" --ckpt_path {dest}/models/model.pt)" if args.checkpoint is not None else ")"))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the end-to-end demo on the data shipped with medvol",
                       description="Preprocess the demo scans (MRI with labels, CT, DICOM, NRRD) with QC pictures, "
                       "then fine-tune a 2-label hippocampus segmentation from scratch and from the pretrained "
                       "weights shipped with medvol, 3 seeds each, with Dice and segmentation pictures (a few "
                       "minutes on CPU).")
    p.add_argument("--output", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--data", type=Path, default=None,
                   help="demo data folder (default: the one shipped with medvol, see --where)")
    p.add_argument("--no-train", action="store_true", help="only preprocess (skip fine-tuning)")
    p.add_argument("--where", action="store_true",
                   help="print the folder of the demo data shipped with medvol (with its licences) and exit")
    _add_debug(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    if args.where:
        from medvol.bundles import demo_data_dir

        print(demo_data_dir())
        return EXIT_OK
    from medvol.apps.demo import run_demo

    return run_demo(args.output, args.data, train=not args.no_train, command=main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvol", description="MONAI-native self-supervised learning for 3D CT and MRI.")
    parser.add_argument("--version", action="version", version=f"medvol {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks besides the one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_preprocess(sub)
    _add_embed(sub)
    _add_index(sub)
    _add_search(sub)
    _add_probe(sub)
    _add_monailabel_app(sub)
    _add_bundle(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from medvol.errors import DEBUG_ENV, one_line

    GANTRY_TILT_ENV = "MEDVOL_GANTRY_TILT"  # medvol.io.dicom's; not imported here, so --help and usage errors stay fast

    debug = bool(getattr(args, "debug", False))
    saved_env = {key: os.environ.get(key) for key in (DEBUG_ENV, GANTRY_TILT_ENV)}  # main() may run in-process
    if debug:
        os.environ[DEBUG_ENV] = "1"  # worker processes print the tracebacks of failed inputs too
    try:
        return args.func(args)
    except ConfigError as e:  # UsageError, and configuration errors raised below the command line
        _report(args, f"error: {e}", debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medvol {args.command}: interrupted; finished outputs are kept, run again to resume",
              file=sys.stderr)
        return 130
    except OSError as e:  # the output disappeared, filled up or became read-only during the run
        where = f" {e.filename}" if e.filename else ""
        _report(args, f"error: cannot read or write{where}: {e.strerror or one_line(e)}", debug)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a bug in medvol: one line, the traceback with --debug
        hint = "" if debug else " (run again with --debug for the traceback)"
        _report(args, f"internal error: {type(e).__name__}: {one_line(e)}{hint}", debug)
        return EXIT_INTERNAL
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _report(args, message: str, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    print(f"medvol {args.command}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
