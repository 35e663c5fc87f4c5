"""Patient-level targets for MIL: reading the CSV, encoding per task, the fold-fitted loss and the metrics.

Tasks (``TASKS``):

- ``"binary"``: one column with two distinct values. ``0/1``, ``false/true``, ``no/yes``, ``n/y``,
  ``negative/positive`` map to 0/1 in that order; any other pair maps in sorted order (``F`` -> 0, ``M`` -> 1).
  The mapping is recorded in :class:`TargetSpec` (and in ``metrics.json``).
- ``"multilabel"``: several such binary columns, one logit each.
- ``"multiclass"``: one categorical column; classes sorted (numerically when all are numbers) -> indices.
- ``"regression"``: one or more float columns; standardised with the TRAINING fold's mean/std for the loss and
  un-standardised for every output and metric.

Missing values (empty, ``nan``, ``na``, ``n/a``, ``none``, ``null``, ``?``) in any target column drop that row
from the run, with a warning naming how many and a few ids; rows are never silently imputed.

Loss (:class:`MILTaskLoss`, fitted on the training fold): ``BCEWithLogitsLoss(pos_weight=neg/pos)`` per label
(CLEAR passed the class ratio as ``weight``, which scales every element instead of the positive term),
``CrossEntropyLoss``, or ``MSELoss`` on standardised targets. Metrics (:func:`compute_metrics`) take
probabilities / continuous outputs, never thresholded ones, for AUROC (CLEAR computed AUROC on 0/1 outputs).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from torch.nn.modules.loss import _Loss

from medvol.errors import ConfigError, DataError

__all__ = ["TASKS", "TargetSpec", "TargetTable", "load_targets", "MILTaskLoss", "pos_weight", "compute_metrics"]

TASKS = ("binary", "multilabel", "multiclass", "regression")
MISSING = {"", "nan", "na", "n/a", "none", "null", "?"}
_KNOWN_PAIRS = [("0", "1"), ("false", "true"), ("no", "yes"), ("n", "y"), ("negative", "positive"), ("neg", "pos")]


def _norm(value: str) -> str:
    return str(value).strip()


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _binary_mapping(values: Sequence[str], column: str, source: str) -> dict[str, int]:
    distinct = sorted(set(values))
    if len(distinct) > 2:
        raise DataError(source, f"column {column!r} has {len(distinct)} distinct values {distinct[:6]}: a binary "
                                "target needs two (use task 'multiclass')")
    if len(distinct) < 2:
        raise DataError(source, f"column {column!r} has a single value {distinct}: nothing to predict")
    numbers = [_as_number(v) for v in distinct]
    if all(n is not None for n in numbers) and sorted(numbers) == [0.0, 1.0]:  # "0"/"1", "0.0"/"1.0"
        return {v: int(n) for v, n in zip(distinct, numbers)}
    lowered = {v.lower(): v for v in distinct}
    for neg, pos in _KNOWN_PAIRS:
        if set(lowered) == {neg, pos}:
            return {lowered[neg]: 0, lowered[pos]: 1}
    return {distinct[0]: 0, distinct[1]: 1}


@dataclass
class TargetSpec:
    """What is predicted: the task, its columns and the value encoding (JSON-serialisable via ``asdict``).

    Args:
        task: one of ``TASKS``.
        columns: target column names.
        mappings: binary/multilabel: per column raw value -> 0/1; multiclass: the column's raw value -> index.
        classes: multiclass: class names in index order (empty otherwise).
    """

    task: str
    columns: tuple[str, ...]
    mappings: dict[str, dict[str, int]] = field(default_factory=dict)
    classes: tuple[str, ...] = ()

    @property
    def n_outputs(self) -> int:
        """Logits per bag."""
        if self.task == "binary":
            return 1
        return len(self.classes) if self.task == "multiclass" else len(self.columns)

    @property
    def stratify(self) -> bool:
        """Whether folds can be stratified on the (single) encoded target."""
        return self.task in ("binary", "multiclass")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TargetSpec:
        return cls(d["task"], tuple(d["columns"]), {k: dict(v) for k, v in d.get("mappings", {}).items()},
                   tuple(d.get("classes", ())))


@dataclass
class TargetTable:
    """Encoded targets: ``y`` is (n, len(columns)) float64, class indices for multiclass (n, 1)."""

    ids: list[str]
    y: np.ndarray
    spec: TargetSpec
    groups: list[str] | None = None


def load_targets(
    csv_path: str | os.PathLike,
    target_columns: str | Sequence[str],
    task: str,
    id_column: str = "id",
    group_column: str | None = None,
) -> TargetTable:
    """Read and encode the targets CSV (one row per case).

    Args:
        csv_path: CSV with a header row.
        target_columns: one column name or several.
        task: one of ``TASKS``.
        id_column: column holding the case id (the embedding file stem, or what ``id_regex`` extracts).
        group_column: optional patient column: cases of one group never straddle folds. ``None``: no groups.

    Raises:
        ConfigError: for an unknown task or a column count that does not fit the task.
        DataError: for an unreadable CSV, missing columns, duplicate ids or values that do not fit the task.
    """
    if task not in TASKS:
        raise ConfigError(f"task={task!r} must be one of {TASKS}")
    columns = (target_columns,) if isinstance(target_columns, str) else tuple(target_columns)
    if not columns:
        raise ConfigError("target_columns is empty: name at least one target column")
    if task in ("binary", "multiclass") and len(columns) != 1:
        raise ConfigError(f"task={task!r} takes one target column, got {list(columns)} (use 'multilabel' for "
                          "several binary columns)")
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot read the targets CSV ({e})") from e
    header = list(rows[0]) if rows else []
    missing_cols = [c for c in (id_column, *columns, *([group_column] if group_column else [])) if c not in header]
    if missing_cols:
        raise DataError(path, f"missing column(s) {missing_cols}; the header has {header}")
    kept, dropped = [], []
    for row in rows:
        if any(_norm(row[c]).lower() in MISSING for c in columns) or not _norm(row[id_column]):
            dropped.append(_norm(row[id_column]) or "<empty id>")
        else:
            kept.append(row)
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} row(s) with a missing target in {list(columns)} dropped "
                      f"(e.g. {', '.join(dropped[:5])})", stacklevel=2)
    ids = [_norm(r[id_column]) for r in kept]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(path, f"duplicate ids in column {id_column!r}: {duplicates[:5]} (one row per case; use "
                              "group_column for several volumes of one patient)")
    raw = {c: [_norm(r[c]) for r in kept] for c in columns}
    spec = TargetSpec(task, columns)
    if task in ("binary", "multilabel"):
        spec.mappings = {c: _binary_mapping(raw[c], c, str(path)) for c in columns}
        y = np.array([[spec.mappings[c][raw[c][i]] for c in columns] for i in range(len(kept))], dtype=np.float64)
    elif task == "multiclass":
        values = raw[columns[0]]
        distinct = sorted(set(values))
        if all(_as_number(v) is not None for v in distinct):
            distinct.sort(key=float)
        if len(distinct) < 2:
            raise DataError(path, f"column {columns[0]!r} has a single class {distinct}: nothing to predict")
        spec.classes = tuple(distinct)
        spec.mappings = {columns[0]: {v: i for i, v in enumerate(distinct)}}
        y = np.array([[spec.mappings[columns[0]][v]] for v in values], dtype=np.float64)
    else:
        y = np.empty((len(kept), len(columns)), dtype=np.float64)
        for j, c in enumerate(columns):
            numbers = [_as_number(v) for v in raw[c]]
            bad = [v for v, n in zip(raw[c], numbers) if n is None or not math.isfinite(n)]
            if bad:
                raise DataError(path, f"column {c!r} has non-numeric values {bad[:5]} for a regression target")
            y[:, j] = numbers
    groups = [_norm(r[group_column]) for r in kept] if group_column else None
    return TargetTable(ids, y.reshape(len(kept), -1), spec, groups)


def pos_weight(y: np.ndarray) -> np.ndarray:
    """``neg / pos`` per label column of 0/1 targets (n, L); 1.0 (with a warning) where a class is absent."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    weight = np.ones(y.shape[1])
    ok = (pos > 0) & (neg > 0)
    weight[ok] = neg[ok] / pos[ok]
    if not ok.all():
        warnings.warn(f"pos_weight: label column(s) {np.flatnonzero(~ok).tolist()} have only one class in the "
                      "training fold; using 1.0", stacklevel=2)
    return weight


class MILTaskLoss(_Loss):
    """The task's loss, fitted on the training fold, plus the logits -> outputs conversion.

    Args:
        spec: the target specification.
        y_train: the training fold's encoded targets (n, len(columns)), as in :class:`TargetTable`; ``None``
            with ``state`` when restoring a fitted loss for inference.
        state: a dict from :meth:`state` (``pos_weight`` / ``mean`` / ``std``) instead of ``y_train``.

    ``forward(input, target)``: logits (B, n_outputs) and raw encoded targets (B, len(columns)).
    """

    def __init__(self, spec: TargetSpec, y_train: np.ndarray | None = None, state: Mapping | None = None):
        super().__init__()
        if (y_train is None) == (state is None):
            raise ValueError("pass exactly one of y_train or state")
        self.spec = spec
        if state is None:
            y = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1)
            state = {}
            if spec.task in ("binary", "multilabel"):
                state["pos_weight"] = pos_weight(y).tolist()
            if spec.task == "regression":
                std = y.std(axis=0)
                state["mean"], state["std"] = y.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist()
        self._state = {k: [float(v) for v in vals] for k, vals in state.items()}
        for key, vals in self._state.items():
            self.register_buffer(key, torch.tensor(vals, dtype=torch.float32), persistent=False)

    def state(self) -> dict:
        """JSON-serialisable fitted values (``pos_weight``; ``mean``, ``std``)."""
        return dict(self._state)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        task = self.spec.task
        if task in ("binary", "multilabel"):
            return F.binary_cross_entropy_with_logits(input, target.float(), pos_weight=self.pos_weight)
        if task == "multiclass":
            return F.cross_entropy(input, target.reshape(-1).long())
        return F.mse_loss(input, (target.float() - self.mean) / self.std)

    @torch.no_grad()
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (sigmoid / softmax) or un-standardised regression predictions."""
        task = self.spec.task
        if task in ("binary", "multilabel"):
            return torch.sigmoid(logits)
        if task == "multiclass":
            return torch.softmax(logits, dim=-1)
        return logits * self.std + self.mean


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def compute_metrics(spec: TargetSpec, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """Metrics from probabilities / continuous predictions (never thresholded for AUROC).

    binary: ``auroc``, ``balanced_accuracy``, ``accuracy`` (threshold 0.5). multilabel: the same as macro means
    over labels plus ``auroc_<column>`` per label. multiclass: ``auroc`` (one-vs-rest, macro over classes present),
    ``balanced_accuracy``, ``accuracy`` (argmax). regression: ``mae``, ``rmse``, ``pearson_r``, ``r2`` (means
    over columns; per column as ``<metric>_<column>`` when there are several). Undefined values are NaN.

    Args:
        spec: the target specification.
        y_true: encoded targets (n, len(columns)).
        outputs: :meth:`MILTaskLoss.outputs` as an array (n, n_outputs).
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    task, cols = spec.task, spec.columns
    m: dict[str, float] = {}
    if task == "multiclass":
        y = y_true[:, 0].astype(int)
        per_class = [_auroc(y == c, out[:, c]) for c in range(out.shape[1])]
        m["auroc"] = float(np.nanmean(per_class)) if not all(map(math.isnan, per_class)) else float("nan")
        pred = out.argmax(axis=1)
        m["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        m["accuracy"] = float(accuracy_score(y, pred))
        return m
    per: dict[str, list[float]] = {}
    for j, c in enumerate(cols):
        yt, yo = y_true[:, j], out[:, j]
        if task == "regression":
            err = yo - yt
            vals = {"mae": float(mean_absolute_error(yt, yo)), "rmse": float(np.sqrt(np.mean(err**2))),
                    "pearson_r": float(np.corrcoef(yt, yo)[0, 1]) if yt.std() > 0 and yo.std() > 0 else float("nan"),
                    "r2": float(r2_score(yt, yo)) if len(yt) > 1 else float("nan")}
        else:
            pred = (yo >= 0.5).astype(int)
            vals = {"auroc": _auroc(yt, yo),
                    "balanced_accuracy": float(balanced_accuracy_score(yt, pred)) if len(np.unique(yt)) > 1
                    else float("nan"),
                    "accuracy": float(accuracy_score(yt, pred))}
        for k, v in vals.items():
            per.setdefault(k, []).append(v)
            if len(cols) > 1:
                m[f"{k}_{c}"] = v
    for k, vals in per.items():
        m[k] = float(np.nanmean(vals)) if not all(map(math.isnan, vals)) else float("nan")
    return m
