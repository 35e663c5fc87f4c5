"""``medvol probe``: frozen embeddings (or downsampled voxels) of a folder against a targets CSV, in one command.

Reads the features (:func:`read_features`), matches them to the targets by case id, runs the cross-validated
probes of :func:`medvol.evaluation.probe` and writes ``OUTPUT/probe.json`` (every fold, chosen hyperparameter
and metric, what was matched and what failed) and ``OUTPUT/probe.md`` (the table that is also printed).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError, DataError

__all__ = ["AUTO_PCA", "auto_task", "read_features", "run_probe", "markdown_table"]

#: PCA sizes tried (inside the folds) for the voxel baseline
AUTO_PCA = (8, 16, 32, 64)
# the metrics shown in the table per task: (key, label, higher is better)
SHOWN = {"binary": [("auroc", "AUROC", True), ("balanced_accuracy", "bal. acc.", True)],
         "multiclass": [("auroc", "AUROC (macro OvR)", True), ("balanced_accuracy", "bal. acc.", True)],
         "regression": [("mae", "MAE", False), ("r2", "R^2", True)]}


def auto_task(csv_path: str | os.PathLike, column: str) -> str:
    """binary for two distinct values, regression for numbers with more than 10 distinct values, else multiclass."""
    from medvol.mil.targets import MISSING

    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            values = [(row.get(column) or "").strip() for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(csv_path, f"cannot read the targets CSV ({e})") from e
    distinct = {v for v in values if v.lower() not in MISSING}
    if len(distinct) == 2:
        return "binary"
    try:
        numbers = [float(v) for v in distinct]
    except ValueError:
        return "multiclass"
    return "regression" if len(numbers) > 10 and all(map(math.isfinite, numbers)) else "multiclass"


def read_features(source: str | os.PathLike, voxels: bool = False, size: int = 16, pooling: str = "mean",
                  id_regex: str | None = None) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """``(case_ids, features, failures)`` from a folder of embedding files (``.h5`` bags of ``medvol embed``,
    ``.npy`` of the 3D bundles' inference; pooled to one row per volume) or, with ``voxels``, of volumes."""
    if voxels:
        from medvol.evaluation.voxels import voxel_features
        from medvol.io.bags import bag_case_id

        ids, x, failures = voxel_features(source, size=size, progress=True)
        return [bag_case_id(case, id_regex) for case in ids], x, failures
    from medvol.search.vectors import find_embedding_files, read_embedding

    ids, rows, failures, dims = [], [], {}, set()
    for path in find_embedding_files(source):
        try:
            record = read_embedding(path, pooling=pooling, id_regex=id_regex)
        except DataError as e:
            failures[str(path)] = str(e)
            continue
        ids.append(record.case_id)
        rows.append(record.vector)
        dims.add(int(record.vector.shape[0]))
    if not rows:
        raise DataError(source, f"no embedding could be read (e.g. {next(iter(failures.values()), '')})")
    if len(dims) > 1:
        raise DataError(source, f"embeddings of different dimensions {sorted(dims)}: one folder per checkpoint")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(source, f"several embedding files for case(s) {duplicates[:5]} (use --id-regex)")
    return ids, np.stack(rows).astype(np.float32), failures


def run_probe(source, targets, target: str, output, task: str = "auto", id_column: str = "id",
              group_column: str | None = None, voxels: bool = False, size: int = 16, pooling: str = "mean",
              id_regex: str | None = None, probes=("knn", "linear"), num_folds: int = 5, inner_folds: int = 3,
              seed: int = 1337, pca_components=None) -> dict:
    """Everything ``medvol probe`` does; returns the result that ``OUTPUT/probe.json`` holds."""
    from medvol.evaluation.probe import probe
    from medvol.mil.report import write_json
    from medvol.mil.targets import TargetTable, load_targets

    if task == "auto":
        task = auto_task(targets, target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_targets(targets, target, task, id_column=id_column, group_column=group_column)
    ids, x, failures = read_features(source, voxels=voxels, size=size, pooling=pooling, id_regex=id_regex)
    position = {case: i for i, case in enumerate(ids)}
    keep = [i for i, case in enumerate(table.ids) if case in position]
    if not keep:
        raise DataError(source, f"no case id matches the targets' {id_column!r} column (features e.g. {ids[:3]}, "
                                f"targets e.g. {table.ids[:3]}; use --id-column or --id-regex)")
    matched = TargetTable([table.ids[i] for i in keep], table.y[keep], table.spec,
                          None if table.groups is None else [table.groups[i] for i in keep])
    features = x[[position[c] for c in matched.ids]]
    if voxels and pca_components is None:
        pca_components = AUTO_PCA
    result = probe(features, matched, probes=probes, num_folds=num_folds, inner_folds=inner_folds, seed=seed,
                   pca_components=pca_components, progress=True)
    targeted = set(table.ids)
    result["info"].update({
        "source": str(source), "features": "voxels" if voxels else "embeddings", "voxel_size": size if voxels else None,
        "pooling": None if voxels else pooling, "targets": str(targets), "id_column": id_column,
        "group_column": group_column, "matched": len(keep),
        "targets_without_features": len(table.ids) - len(keep),
        "features_without_targets": sum(1 for c in ids if c not in targeted),
        "failed": failures, "warnings": [str(w.message) for w in caught]})
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "probe.json", result)
    from medvol.io.atomic import atomic_write_text

    atomic_write_text(output / "probe.md", markdown_table(result) + "\n")
    return result


def markdown_table(result: dict) -> str:
    """One row per probe: mean ± std over the outer folds and the pooled out-of-fold value of each shown metric."""
    info = result["info"]
    shown = SHOWN[info["task"]]
    head = "| probe | " + " | ".join(f"{label} (folds) | {label} (pooled)" for _, label, _ in shown) + " | chosen |"
    lines = [head, "|---|" + "---|---|" * len(shown) + "---|"]
    for name in (k for k in result if k != "info"):
        r = result[name]
        cells = []
        for key, _, _ in shown:
            cells += [f"{r['mean'].get(key, float('nan')):.3f} ± {r['std'].get(key, float('nan')):.3f}",
                      f"{r['pooled'].get(key, float('nan')):.3f}"]
        chosen = "; ".join(",".join(f"{k}={v}" for k, v in f["chosen"].items()) for f in r["folds"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen} |")
    grouped = f", grouped by {info['group_column']}" if info.get("group_column") else ""
    lines += ["", f"{info['target']} ({info['task']}): {info['matched']} cases with features and targets, "
                  f"{info['folds']} outer folds{grouped}, hyperparameters chosen in {info['inner_folds']} inner "
                  f"folds; {info['targets_without_features']} target rows without features, "
                  f"{info['features_without_targets']} feature rows without targets, {len(info['failed'])} "
                  f"unreadable files."]
    return "\n".join(lines)


def check_args(probes, num_folds: int, inner_folds: int) -> None:
    from medvol.evaluation.probe import PROBES

    if any(p not in PROBES for p in probes):
        raise ConfigError(f"--probes {list(probes)}: each must be one of {PROBES}")
    if num_folds < 2 or inner_folds < 2:
        raise ConfigError(f"--folds {num_folds} and --inner-folds {inner_folds} must both be at least 2")
