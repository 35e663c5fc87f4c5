"""medvol.mil: patient-level prediction from per-slice embeddings with attention MIL (CLEAR's downstream task).

Bags (:mod:`medvol.mil.data`) are HDF5 files of slice embeddings, one per volume; targets
(:mod:`medvol.mil.targets`) come from a CSV; :class:`CrossValidator` runs patient-level k-fold
cross-validation of :class:`medvol.networks.mil.ABMIL` / :class:`~medvol.networks.mil.PMA` and writes
metrics, predictions and attention (:mod:`medvol.mil.report`); :class:`MILPredictor` applies the fold models.
"""

from __future__ import annotations

from .crossval import CrossValidator, FoldTraining, make_folds, split_validation, train_fold
from .data import Bag, BagDataset, bag_case_id, collate_bags, feature_stats, find_bags, read_bag, write_bag
from .inference import MILPredictor, network_factory, predict_bags
from .report import plot_attention_top_slices, summarise_folds, top_slices, write_metrics
from .targets import TASKS, MILTaskLoss, TargetSpec, TargetTable, compute_metrics, load_targets, pos_weight

__all__ = [
    "Bag",
    "BagDataset",
    "bag_case_id",
    "collate_bags",
    "feature_stats",
    "find_bags",
    "read_bag",
    "write_bag",
    "TASKS",
    "TargetSpec",
    "TargetTable",
    "load_targets",
    "MILTaskLoss",
    "pos_weight",
    "compute_metrics",
    "make_folds",
    "split_validation",
    "FoldTraining",
    "train_fold",
    "predict_bags",
    "CrossValidator",
    "MILPredictor",
    "plot_attention_top_slices",
    "summarise_folds",
    "top_slices",
    "write_metrics",
]
