"""Patient-level k-fold cross-validation of a MIL network on bags of slice embeddings.

Per fold (what CLEAR's ``train_mil`` should have done; its bugs are listed in docs/methods/slice_mil.md):

1. held-out cases from (Stratified)(Group)KFold over cases, never over slices: a bag moves as a whole, and with
   ``group_column`` all cases of a patient move together;
2. the remaining cases split into train / inner validation (``val_fraction``, stratified where possible);
3. a FRESH network from the factory, initialised after ``torch.manual_seed(seed + fold)``;
4. the loss fitted on the training cases (``pos_weight`` = neg/pos, regression mean/std);
5. Adam, early stopping on validation loss, the best weights kept with ``copy.deepcopy(model.state_dict())``;
6. the best weights evaluated on the held-out cases.

Outputs in ``output_dir``: ``run.json`` (what :class:`medvol.mil.inference.MILPredictor` needs),
``folds/fold_{k}/model.pt`` and ``fold.json``, ``metrics.json``, ``metrics_per_fold.csv``, ``predictions.csv``,
``attention/<case>.csv`` and ``attention_top_slices.png``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import pydoc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)
from torch import nn
from torch.utils.data import DataLoader, Subset

from medvol.errors import ConfigError
from medvol.io.atomic import atomic_path
from medvol.mil.data import BagDataset, collate_bags, feature_stats
from medvol.mil.inference import network_factory, predict_bags
from medvol.mil.report import (
    plot_top_attended,
    prediction_header,
    prediction_values,
    write_attention_csv,
    write_csv,
    write_json,
    write_metrics,
)
from medvol.mil.targets import MILTaskLoss, TargetSpec, compute_metrics, load_targets

__all__ = ["make_folds", "split_validation", "FoldTraining", "train_fold", "CrossValidator"]

logger = logging.getLogger(__name__)


def make_folds(n_cases: int, num_folds: int = 5, seed: int = 1337, labels: np.ndarray | None = None,
               groups: Sequence[str] | None = None) -> list[np.ndarray]:
    """Held-out case indices of each fold (every case in exactly one).

    StratifiedKFold with ``labels`` (binary/multiclass), KFold otherwise; their group variants
    (StratifiedGroupKFold / GroupKFold) with ``groups``, so a group is never split. Shuffled with ``seed``.

    Raises:
        ConfigError: when there are fewer cases (or groups) than folds.
    """
    units = len(set(groups)) if groups is not None else n_cases
    if num_folds < 2 or units < num_folds:
        raise ConfigError(f"num_folds={num_folds} needs 2 <= num_folds <= the number of "
                          f"{'groups' if groups is not None else 'cases'} ({units})")
    x = np.zeros((n_cases, 1))
    if groups is not None:
        splitter = (StratifiedGroupKFold(num_folds, shuffle=True, random_state=seed) if labels is not None
                    else GroupKFold(num_folds, shuffle=True, random_state=seed))
        splits = splitter.split(x, labels, groups=np.asarray(groups))
    elif labels is not None:
        splits = StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(x, labels)
    else:
        splits = KFold(num_folds, shuffle=True, random_state=seed).split(x)
    return [np.sort(test) for _, test in splits]


def split_validation(indices: np.ndarray, val_fraction: float, seed: int, labels: np.ndarray | None = None,
                     groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split training cases into (train, validation), stratified by ``labels`` when every class has 2+ cases and
    group-aware with ``groups``. ``val_fraction`` 0 (or fewer than 2 cases/groups) gives no validation."""
    indices = np.asarray(indices)
    units = len(set(groups)) if groups is not None else len(indices)
    if val_fraction <= 0 or units < 2:
        return indices, indices[:0]
    strat = labels if labels is not None and np.unique(labels, return_counts=True)[1].min() >= 2 else None
    if groups is not None:
        g = np.asarray(groups)
        n_splits = max(2, round(1 / val_fraction))
        if strat is not None and len(set(g)) >= n_splits:
            tr, va = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(indices, strat, g))
        else:
            tr, va = next(GroupShuffleSplit(1, test_size=val_fraction, random_state=seed).split(indices, groups=g))
        return np.sort(indices[tr]), np.sort(indices[va])
    n_val = max(1, int(round(val_fraction * len(indices))))
    if strat is not None and n_val < len(np.unique(strat)):
        strat = None  # too few validation cases to hold every class
    tr, va = train_test_split(indices, test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


@dataclass
class FoldTraining:
    """Result of :func:`train_fold`; ``best_state`` is a deep copy taken at ``best_epoch`` (0-based)."""

    best_state: dict
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)


def _batch_loss(model: nn.Module, loss_fn: nn.Module, batch: dict, device) -> torch.Tensor:
    logits = model(batch["feats"].to(device), batch["mask"].to(device))
    return loss_fn(logits, batch["target"].to(device))


def train_fold(model: nn.Module, loss_fn: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None,
               max_epochs: int = 32, lr: float = 1e-4, weight_decay: float = 1e-5, patience: int = 8,
               device: str | torch.device = "cpu",
               on_epoch_end: Callable[[int, nn.Module, float, float], None] | None = None) -> FoldTraining:
    """Train with Adam and early stopping on validation loss; keep the best weights by deep copy.

    Args:
        model: takes ``(feats, mask)`` and returns logits.
        loss_fn: ``loss_fn(logits, target)``, e.g. :class:`MILTaskLoss`.
        train_loader / val_loader: loaders with :func:`collate_bags`; without ``val_loader`` the last epoch wins.
        max_epochs: upper bound on epochs.
        lr / weight_decay: Adam settings.
        patience: epochs without a lower validation loss before stopping.
        device: where to train.
        on_epoch_end: called as ``f(epoch, model, train_loss, val_loss)`` after each epoch (NaN val without val).

    Returns:
        :class:`FoldTraining`; the model is left with its LAST weights (load ``best_state`` yourself).
    """
    if max_epochs < 1 or patience < 1:
        raise ValueError(f"max_epochs={max_epochs} and patience={patience} must be >= 1")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = FoldTraining(copy.deepcopy(model.state_dict()), -1, float("inf"))
    stale = 0
    for epoch in range(max_epochs):
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = _batch_loss(model, loss_fn, batch, device)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch["id"]), count + len(batch["id"])
        train_loss = total / max(count, 1)
        val_loss = float("nan")
        if val_loader is not None:
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in val_loader:
                    total += float(_batch_loss(model, loss_fn, batch, device)) * len(batch["id"])
                    count += len(batch["id"])
            val_loss = total / max(count, 1)
        best.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        logger.debug("epoch %d: train loss %.4f, val loss %.4f", epoch, train_loss, val_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, train_loss, val_loss)
        if val_loader is None or val_loss < best.best_val_loss:
            # a deep copy: state_dict() tensors share storage with the live parameters (CLEAR kept a reference)
            best.best_state, best.best_epoch, best.best_val_loss = copy.deepcopy(model.state_dict()), epoch, val_loss
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def _describe(factory) -> dict | None:
    """``{"_target_": ..., **kwargs}`` for a partial of an importable callable with JSON kwargs, else None."""
    if not isinstance(factory, functools.partial) or factory.args:
        return None
    target = f"{factory.func.__module__}.{factory.func.__qualname__}"
    try:
        json.dumps(factory.keywords)
    except TypeError:
        return None
    return {"_target_": target, **factory.keywords} if pydoc.locate(target) is factory.func else None


def _save_state(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class CrossValidator:
    """Patient-level k-fold cross-validation of a MIL network (see the module docstring for each fold's steps).

    Args:
        dataset_dir: folder of bag files (``<case>.h5``, see :mod:`medvol.mil.data`).
        targets_csv: CSV with ``id_column`` and the target columns.
        target_columns: one or several column names.
        task: ``"binary"``, ``"multilabel"``, ``"multiclass"`` or ``"regression"``.
        output_dir: where the outputs go (created).
        id_column: the CSV's case id column.
        group_column: optional patient column (several volumes of a patient never straddle folds).
        id_regex: extracts the case id from a bag's file stem (first group); ``None`` uses the stem.
        network_def: a callable ``f(in_dim=, n_outputs=)`` returning a fresh network (a bundle's
            ``"_mode_": "callable"`` component), or a dict of :func:`build_mil_network` arguments; ``None``: ABMIL.
        num_folds / seed: outer folds and the seed of splits (fold k's network and loader use ``seed + k``).
        val_fraction: inner validation fraction of each training fold (0: no early stopping).
        max_epochs / patience / lr / weight_decay / batch_size: training settings.
        device: e.g. ``"cpu"``, ``"cuda"``.
        standardize_features: standardise instances with the per-feature mean/std of the fold's training cases
            (``set_input_stats`` of the network; stored in ``model.pt``). ``False`` feeds features as they are.
        cache: keep every bag in memory (default) instead of reading per batch.
        num_workers: DataLoader workers.
        plot_cases / top_k: cases in the attention figure (0: no figure) and slices marked per case.
    """

    def __init__(self, dataset_dir, targets_csv, target_columns, task: str, output_dir, id_column: str = "id",
                 group_column: str | None = None, id_regex: str | None = None, network_def=None,
                 num_folds: int = 5, seed: int = 1337, val_fraction: float = 0.2, max_epochs: int = 32,
                 patience: int = 8, lr: float = 1e-4, weight_decay: float = 1e-5, batch_size: int = 64,
                 device: str | torch.device = "cpu", standardize_features: bool = True, cache: bool = True,
                 num_workers: int = 0, plot_cases: int = 4, top_k: int = 3) -> None:
        if not 0 <= float(val_fraction) < 1:
            raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
        self.dataset_dir, self.targets_csv, self.output_dir = Path(dataset_dir), Path(targets_csv), Path(output_dir)
        self.target_columns = [target_columns] if isinstance(target_columns, str) else list(target_columns)
        self.task, self.id_column, self.group_column, self.id_regex = task, id_column, group_column, id_regex
        self.factory = network_factory(network_def)
        self.num_folds, self.seed, self.val_fraction = int(num_folds), int(seed), float(val_fraction)
        self.max_epochs, self.patience, self.lr, self.weight_decay = int(max_epochs), int(patience), lr, weight_decay
        self.batch_size, self.device, self.cache, self.num_workers = int(batch_size), device, cache, num_workers
        self.plot_cases, self.top_k = int(plot_cases), int(top_k)
        self.standardize_features = bool(standardize_features)

    def _loader(self, dataset, idx, shuffle: bool, seed: int) -> DataLoader:
        return DataLoader(Subset(dataset, idx.tolist()), batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=collate_bags, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(seed))

    def run(self) -> dict:
        """Run every fold and write the outputs; returns the ``metrics.json`` content."""
        table = load_targets(self.targets_csv, self.target_columns, self.task, self.id_column, self.group_column)
        spec = table.spec
        dataset = BagDataset(self.dataset_dir, dict(zip(table.ids, table.y)), self.id_regex, self.cache)
        ids = dataset.case_ids
        row = {case: i for i, case in enumerate(table.ids)}
        y = table.y[[row[c] for c in ids]]
        groups = [table.groups[row[c]] for c in ids] if table.groups is not None else None
        folds = make_folds(len(ids), self.num_folds, self.seed, y[:, 0] if spec.stratify else None, groups)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        info = {"task": spec.task, "target_columns": list(spec.columns), "target_spec": spec.to_dict(),
                "n_cases": len(ids), "in_dim": dataset.in_dim, "n_outputs": spec.n_outputs,
                "missing_bags": dataset.missing_bags, "missing_targets": dataset.missing_targets,
                "num_folds": self.num_folds, "seed": self.seed, "id_regex": self.id_regex,
                "standardize_features": self.standardize_features,
                "network": _describe(self.factory), "folds": [[ids[i] for i in f] for f in folds]}
        write_json(self.output_dir / "run.json", info)
        per_fold, rows, outputs, plotted = [], [], np.zeros((len(ids), spec.n_outputs)), []
        for k, test in enumerate(folds):
            metrics, fold_rows, fold_plotted = self._run_fold(k, len(folds), test, dataset, spec, y, groups, outputs)
            per_fold.append(metrics)
            rows += fold_rows
            plotted += fold_plotted
        header = ["id", "fold"] + (["group"] if groups else []) + prediction_header(spec)
        write_csv(self.output_dir / "predictions.csv", header, sorted(rows, key=lambda r: r[0]))
        pooled = compute_metrics(spec, y, outputs)  # every case is held out exactly once
        summary = write_metrics(self.output_dir, per_fold, pooled, {k: v for k, v in info.items() if k != "folds"})
        plot_top_attended(plotted, self.output_dir / "attention_top_slices.png", self.plot_cases, self.top_k)
        return summary

    def _run_fold(self, k: int, n_folds: int, test: np.ndarray, dataset: BagDataset, spec: TargetSpec,
                  y: np.ndarray, groups: list[str] | None, outputs: np.ndarray) -> tuple[dict, list, list]:
        """Train and evaluate fold ``k``; fills ``outputs[test]``; returns (metrics, prediction rows, plot cases)."""
        ids, fold_seed = dataset.case_ids, self.seed + k
        rest = np.setdiff1d(np.arange(len(ids)), test)
        tr, va = split_validation(rest, self.val_fraction, fold_seed, y[rest, 0] if spec.stratify else None,
                                  None if groups is None else [groups[i] for i in rest])
        loss_fn = MILTaskLoss(spec, y[tr]).to(self.device)
        torch.manual_seed(fold_seed)  # a fresh network with a fold-specific initialisation
        model = self.factory(in_dim=dataset.in_dim, n_outputs=spec.n_outputs)
        if self.standardize_features:
            if not hasattr(model, "set_input_stats"):
                raise ConfigError(f"standardize_features=True needs a network with set_input_stats (ABMIL, PMA); "
                                  f"{type(model).__name__} has none: set standardize_features to False")
            model.set_input_stats(*(torch.from_numpy(s) for s in feature_stats(dataset, tr)))
        model = model.to(self.device)
        result = train_fold(model, loss_fn, self._loader(dataset, tr, True, fold_seed),
                            self._loader(dataset, va, False, fold_seed) if len(va) else None,
                            self.max_epochs, self.lr, self.weight_decay, self.patience, self.device)
        model.load_state_dict(result.best_state)
        fold_dir = self.output_dir / "folds" / f"fold_{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        _save_state(result.best_state, fold_dir / "model.pt")
        case_ids, out, attention, index = predict_bags(model, self._loader(dataset, test, False, fold_seed),
                                                       loss_fn, self.device)
        outputs[test] = out  # the loader keeps the order of `test`
        metrics = {"fold": k, "n_test": len(test), "best_epoch": result.best_epoch,
                   **compute_metrics(spec, y[test], out)}
        write_json(fold_dir / "fold.json", {
            "fold": k, "seed": fold_seed, "loss_state": loss_fn.state(), "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "history": result.history, "metrics": metrics,
            "train_ids": [ids[i] for i in tr], "val_ids": [ids[i] for i in va], "test_ids": case_ids})
        rows, plotted = [], []
        for j, i in enumerate(test):
            rows.append([ids[i], k] + ([groups[i]] if groups else []) + prediction_values(spec, out[j], y[i]))
            if attention[j] is not None:
                write_attention_csv(self.output_dir / "attention" / f"{ids[i]}.csv", index[j], attention[j])
                plotted.append({"id": ids[i], "slice_index": index[j], "attention": attention[j],
                                "score": float(out[j][0]), "bag": dataset.bags[i],
                                "title": f"{ids[i]} (fold {k}, output {out[j][0]:.3g})"})
        logger.info("fold %d/%d: %d train, %d val, %d test cases; best epoch %d (val loss %.4f); %s", k + 1, n_folds,
                    len(tr), len(va), len(test), result.best_epoch, result.best_val_loss,
                    ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if m not in ("fold", "n_test", "best_epoch")))
        return metrics, rows, plotted
