"""Frozen-embedding evaluation: k-NN and linear probes of volume embeddings, cross-validated without leaks.

What a pretrained encoder is worth without fine-tuning: fit a simple model on its frozen volume embeddings and
measure it on held-out cases. :func:`probe` runs, for each probe,

- **outer folds** (:func:`medvol.mil.crossval.make_folds`): stratified for classification, grouped by subject
  when a group column is given (a patient's volumes never straddle train and test), every case tested once;
- **inner folds** inside each outer training part (grouped and stratified the same way): the hyperparameter is
  chosen there (``GridSearchCV``), never on the outer test cases;
- the metrics of :func:`medvol.mil.targets.compute_metrics` on each outer test part (AUROC from probabilities,
  never from thresholded outputs; MAE / RMSE / r / R^2 for regression), reported as mean and standard deviation
  over folds (sample standard deviation) and on the pooled out-of-fold predictions.

Probes (:data:`PROBES`):

- ``"knn"``: k nearest neighbours by cosine distance (rows L2-normalised), distance-weighted votes / means;
  ``k`` from :data:`KNN_GRID` (those below the inner training size).
- ``"linear"``: standardised features, then logistic regression (binary, multiclass; ``C`` from
  :data:`C_GRID`) or ridge regression (``alpha`` from :data:`ALPHA_GRID`).

``pca_components`` puts a PCA in front of every probe, its size chosen in the inner folds as well (from
``pca_components`` values below the training size): the baseline "PCA of downsampled voxels"
(:func:`medvol.evaluation.voxels.voxel_features`) is ``probe(voxels, ..., pca_components=(8, 16, 32, 64))``.

Example:
    >>> import numpy as np
    >>> from medvol.mil.targets import TargetSpec, TargetTable
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0.0, 1.0], 20)[:, None]
    >>> x = rng.normal(size=(40, 8)) + 2 * y
    >>> table = TargetTable([f"c{i}" for i in range(40)], y, TargetSpec("binary", ("label",)))
    >>> result = probe(x, table, probes=("linear",), num_folds=4, inner_folds=3)
    >>> result["linear"]["mean"]["auroc"] > 0.9
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from medvol.errors import ConfigError
from medvol.mil.crossval import make_folds
from medvol.mil.report import summarise_folds
from medvol.mil.targets import TargetTable, compute_metrics

__all__ = ["PROBES", "KNN_GRID", "C_GRID", "ALPHA_GRID", "probe"]

PROBES = ("knn", "linear")
KNN_GRID = (1, 3, 5, 10, 20, 50)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
_TASKS = ("binary", "multiclass", "regression")


def _inner_cv(labels: np.ndarray | None, groups: np.ndarray | None, n_splits: int, seed: int):
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if groups is not None:
        return (StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed) if labels is not None
                else GroupKFold(n_splits, shuffle=True, random_state=seed))
    return (StratifiedKFold(n_splits, shuffle=True, random_state=seed) if labels is not None
            else KFold(n_splits, shuffle=True, random_state=seed))


def _estimator(name: str, task: str, n_train: int, inner_folds: int, pca_components: Sequence[int] | None,
               seed: int):
    """The pipeline of probe ``name`` and its hyperparameter grid (sizes that fit an inner training part)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    inner_train = n_train - math.ceil(n_train / inner_folds)  # the smallest inner training part
    steps, grid = [], {}
    if pca_components:
        sizes = [c for c in pca_components if c < inner_train]
        if not sizes:
            raise ConfigError(f"pca_components {list(pca_components)} are all >= the inner training size "
                              f"({inner_train} cases)")
        steps += [("scale0", StandardScaler()), ("pca", PCA(random_state=seed))]
        grid["pca__n_components"] = sizes
    if name == "knn":
        ks = [k for k in KNN_GRID if k <= inner_train] or [1]
        knn = KNeighborsRegressor if task == "regression" else KNeighborsClassifier
        steps += [("norm", Normalizer()), ("model", knn(metric="euclidean", weights="distance"))]
        grid["model__n_neighbors"] = ks
    elif name == "linear":
        steps.append(("scale", StandardScaler()))
        if task == "regression":
            steps.append(("model", Ridge()))
            grid["model__alpha"] = list(ALPHA_GRID)
        else:
            steps.append(("model", LogisticRegression(max_iter=5000)))
            grid["model__C"] = list(C_GRID)
    else:
        raise ConfigError(f"probe {name!r} must be one of {PROBES}")
    return Pipeline(steps), grid


def _scoring(task: str) -> str:
    return {"binary": "roc_auc", "multiclass": "roc_auc_ovr", "regression": "neg_mean_absolute_error"}[task]


def _outputs(model, x: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """(n, n_outputs) in :func:`compute_metrics`' layout: P(class 1), class probabilities, or the prediction."""
    if task == "regression":
        return model.predict(x).reshape(len(x), 1)
    proba = model.predict_proba(x)
    full = np.zeros((len(x), n_classes))
    full[:, model.classes_.astype(int)] = proba  # classes absent from a training part keep probability 0
    return full[:, 1:2] if task == "binary" else full


def probe(x: np.ndarray, table: TargetTable, probes: Sequence[str] = PROBES, num_folds: int = 5,
          inner_folds: int = 3, seed: int = 1337, pca_components: Sequence[int] | None = None,
          progress: bool = False) -> dict:
    """Cross-validated k-NN / linear probes of ``x`` (n, D) for the targets of ``table`` (same row order).

    Args:
        x: one embedding (or feature) row per case of ``table``.
        table: targets from :func:`medvol.mil.targets.load_targets`: one column, task binary, multiclass or
            regression; ``table.groups`` (subjects) group the folds when present.
        probes: a subset of :data:`PROBES`.
        num_folds, inner_folds: outer folds (test) and inner folds (hyperparameter choice).
        seed: seed of both fold splits.
        pca_components: candidate PCA sizes chosen in the inner folds (None: no PCA).
        progress: a tqdm bar over probes x folds.

    Returns:
        ``{probe: {"mean": {...}, "std": {...}, "pooled": {...}, "folds": [{"metrics", "chosen", "n_train",
        "n_test"}], "params": grid}}`` plus ``"info"`` (task, n, dim, folds, seed, groups).

    Raises:
        ConfigError: a task other than binary / multiclass / regression, several target columns, a feature
            matrix whose row count is not the table's, or too few cases / groups for the folds.
    """
    from sklearn.model_selection import GridSearchCV

    spec = table.spec
    if spec.task not in _TASKS or len(spec.columns) != 1:
        raise ConfigError(f"a probe predicts one column with task binary, multiclass or regression; got task "
                          f"{spec.task!r} with columns {list(spec.columns)}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(table.ids):
        raise ConfigError(f"features {x.shape} do not match the {len(table.ids)} cases of the targets")
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise ConfigError(f"probes {list(probes)} must be a non-empty subset of {PROBES}")
    y = table.y[:, 0]
    labels = y.astype(int) if spec.task != "regression" else None
    groups = np.asarray(table.groups) if table.groups is not None else None
    n_classes = len(spec.classes) if spec.task == "multiclass" else 2
    folds = make_folds(len(y), num_folds, seed, labels, None if groups is None else list(groups))
    out: dict = {"info": {"task": spec.task, "target": spec.columns[0], "n": int(len(y)), "dim": int(x.shape[1]),
                          "folds": num_folds, "inner_folds": inner_folds, "seed": seed,
                          "grouped": groups is not None, "pca_components": list(pca_components or [])}}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(probes) * len(folds), desc="probe", unit="fold")
    for name in probes:
        per_fold, pooled = [], np.zeros((len(y), 1 if spec.task != "multiclass" else n_classes))
        grid_used = None
        for test in folds:
            train = np.setdiff1d(np.arange(len(y)), test)
            estimator, grid = _estimator(name, spec.task, len(train), inner_folds, pca_components, seed)
            grid_used = grid
            cv = _inner_cv(None if labels is None else labels[train], None if groups is None else groups[train],
                           inner_folds, seed)
            search = GridSearchCV(estimator, grid, scoring=_scoring(spec.task), cv=cv, refit=True, n_jobs=1,
                                  error_score=np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence / single-class inner-fold warnings: scored as NaN
                search.fit(x[train], y[train] if labels is None else labels[train],
                           **({"groups": groups[train]} if groups is not None else {}))
            outputs = _outputs(search.best_estimator_, x[test], spec.task, n_classes)
            pooled[test] = outputs
            per_fold.append({"metrics": compute_metrics(spec, table.y[test], outputs),
                             "chosen": {k.split("__", 1)[1]: _plain(v) for k, v in search.best_params_.items()},
                             "n_train": int(len(train)), "n_test": int(len(test))})
            if bar is not None:
                bar.update(1)
        mean, std = summarise_folds([f["metrics"] for f in per_fold])
        out[name] = {"mean": mean, "std": std, "pooled": compute_metrics(spec, table.y, pooled), "folds": per_fold,
                     "params": {k.split("__", 1)[1]: [_plain(v) for v in vs] for k, vs in grid_used.items()}}
    if bar is not None:
        bar.close()
    return out


def _plain(v):
    return v.item() if hasattr(v, "item") else v
