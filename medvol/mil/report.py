"""Outputs of a MIL run: predictions/metrics/attention tables (written atomically) and the attention figure."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medvol.io.atomic import atomic_path, atomic_write_text
from medvol.mil.targets import TargetSpec

__all__ = [
    "plot_top_attended",
    "write_json",
    "write_csv",
    "write_attention_csv",
    "prediction_header",
    "prediction_values",
    "summarise_folds",
    "write_metrics",
    "top_slices",
    "plot_attention_top_slices",
]

logger = logging.getLogger(__name__)


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as ``null``)."""
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else format(float(value), ".9g")  # .9g round-trips float32 exactly
    return str(value)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a CSV atomically; floats with 9 significant digits, NaN as an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_fmt(v) for v in row] for row in rows])
    return atomic_write_text(path, buf.getvalue())


def write_attention_csv(path: str | os.PathLike, slice_index: np.ndarray, attention: np.ndarray) -> Path:
    """``slice_index,attention`` per instance of one bag."""
    return write_csv(path, ["slice_index", "attention"], [[int(i), float(a)] for i, a in zip(slice_index, attention)])


def _output_names(spec: TargetSpec) -> list[str]:
    if spec.task == "multiclass":
        return [f"prob_{spec.columns[0]}_{c}" for c in spec.classes]
    prefix = "pred" if spec.task == "regression" else "prob"
    return [f"{prefix}_{c}" for c in spec.columns]


def prediction_header(spec: TargetSpec, with_truth: bool = True) -> list[str]:
    """Column names after ``id``/``fold``: true targets (encoded; regression in original units), then outputs
    (``prob_<col>`` probabilities, multiclass ``prob_<col>_<class>``; regression ``pred_<col>``), then
    thresholded/argmax predictions ``pred_<col>`` for classification."""
    names = list(spec.columns) if with_truth else []
    names += _output_names(spec)
    if spec.task != "regression":
        names += [f"pred_{c}" for c in spec.columns]
    return names


def prediction_values(spec: TargetSpec, outputs: np.ndarray, y_true: np.ndarray | None = None) -> list:
    """Values for :func:`prediction_header` for one case (``outputs`` (n_outputs,), ``y_true`` (n_columns,))."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(-1)
    values: list = [] if y_true is None else [
        float(v) if spec.task == "regression" else int(v) for v in np.asarray(y_true).reshape(-1)]
    values += [float(v) for v in outputs]
    if spec.task == "multiclass":
        values.append(int(outputs.argmax()))
    elif spec.task != "regression":
        values += [int(v >= 0.5) for v in outputs]
    return values


def summarise_folds(per_fold: Sequence[Mapping[str, float]]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (ddof=1) of each metric over folds, ignoring NaN."""
    keys = [k for k in per_fold[0] if k != "fold" and isinstance(per_fold[0][k], (int, float, np.floating))]
    mean, std = {}, {}
    for k in keys:
        vals = np.array([f.get(k, np.nan) for f in per_fold], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        mean[k] = float(finite.mean()) if len(finite) else float("nan")
        std[k] = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
    return mean, std


def write_metrics(output_dir: str | os.PathLike, per_fold: Sequence[Mapping], pooled: Mapping, info: Mapping) -> dict:
    """Write ``metrics.json`` (info, per fold, mean, std, pooled out-of-fold) and ``metrics_per_fold.csv``
    (one row per fold, then ``mean`` and ``std`` rows). Returns the ``metrics.json`` content (NaN as ``None``)."""
    output_dir = Path(output_dir)
    mean, std = summarise_folds(per_fold)
    summary = _clean({**info, "per_fold": list(per_fold), "mean": mean, "std": std, "pooled": dict(pooled)})
    write_json(output_dir / "metrics.json", summary)
    keys = list(mean)
    rows = [[f.get("fold", i)] + [f.get(k, float("nan")) for k in keys] for i, f in enumerate(per_fold)]
    rows += [["mean"] + [mean[k] for k in keys], ["std"] + [std[k] for k in keys]]
    write_csv(output_dir / "metrics_per_fold.csv", ["fold"] + keys, rows)
    return summary


def top_slices(slice_index: np.ndarray, attention: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    """The ``k`` most attended ``(slice_index, attention)`` pairs, highest first."""
    order = np.argsort(-np.asarray(attention), kind="stable")[:k]
    return [(int(slice_index[i]), float(attention[i])) for i in order]


def _slice_images(source: str, axis: int, indices: Sequence[int]) -> list[np.ndarray] | None:
    if not source or axis not in (0, 1, 2):
        return None
    try:
        from medvol.io.readers import LoadVolume

        volume = np.asarray(LoadVolume(ensure_channel_first=False)(source))
        if any(not 0 <= i < volume.shape[axis] for i in indices):
            return None
        return [np.rot90(np.take(volume, i, axis=axis)) for i in indices]
    except Exception as e:  # the figure is a by-product: an unreadable source only drops the images
        logger.info("attention figure: source %s not drawn (%s)", source, e)
        return None


def plot_attention_top_slices(cases: Sequence[Mapping], path: str | os.PathLike, top_k: int = 3) -> Path | None:
    """One row per case: attention over slice index with the ``top_k`` slices marked, then those slices as images
    when the bag's ``source`` volume is readable (otherwise the curve alone).

    Args:
        cases: dicts with ``id``, ``slice_index``, ``attention``, and optionally ``source``, ``axis``, ``title``.
        path: PNG to write (atomically).
        top_k: slices to mark and draw.

    Returns:
        The path, or ``None`` when ``cases`` is empty.
    """
    if not cases:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(4 + 2.6 * top_k, 2.6 * len(cases)))
    axes = fig.subplots(len(cases), 1 + top_k, squeeze=False)
    for row, case in zip(axes, cases):
        index, att = np.asarray(case["slice_index"]), np.asarray(case["attention"])
        order = np.argsort(index, kind="stable")
        best = top_slices(index, att, top_k)
        row[0].plot(index[order], att[order], lw=1.2)
        row[0].scatter([b[0] for b in best], [b[1] for b in best], color="tab:red", zorder=3, s=18)
        row[0].set_title(case.get("title") or str(case["id"]), fontsize=8)
        row[0].set_xlabel("slice index (top: " + ", ".join(str(b[0]) for b in best) + ")", fontsize=8)
        row[0].set_ylabel("attention", fontsize=8)
        images = _slice_images(str(case.get("source", "")), int(case.get("axis", -1)), [b[0] for b in best])
        for j, ax in enumerate(row[1:]):
            ax.axis("off")
            if images is not None and j < len(images):
                ax.imshow(images[j], cmap="gray")
                ax.set_title(f"slice {best[j][0]}  a={best[j][1]:.3f}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


def plot_top_attended(cases: list[dict], path: Path, n: int, top_k: int) -> None:
    """The ``n`` cases with the highest first output, with the volume when the bag names a readable source."""
    chosen = sorted(cases, key=lambda c: (-c["score"], c["id"]))[:n]
    plot_attention_top_slices([{**c, "source": c["bag"].source, "axis": c["bag"].axis} for c in chosen], path,
                              top_k)
