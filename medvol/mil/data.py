"""Bags of slice embeddings for MIL: a dataset joining bags with targets, and padding collation.

The HDF5 bag format (one file per volume, written by ``medvol embed``) and its reader/writer live in
:mod:`medvol.io.bags`; they are re-exported here (``medvol.mil.read_bag``, ...) for MIL users.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medvol.errors import DataError
from medvol.io.bags import Bag, bag_case_id, find_bags, read_bag, write_bag

__all__ = ["Bag", "write_bag", "read_bag", "find_bags", "bag_case_id", "BagDataset", "collate_bags", "feature_stats"]

def _examples(ids: Sequence[str], k: int = 5) -> str:
    return ", ".join(list(ids)[:k]) + (", ..." if len(ids) > k else "")


class BagDataset(Dataset):
    """Bags of a folder, optionally joined with targets by case id.

    With ``targets``, the dataset holds the cases present on both sides, sorted by id; ids with a target but
    no bag file, and bag files without a target, are reported in one warning (counts and a few ids) and kept
    in ``missing_bags`` / ``missing_targets``. Items are dicts: ``id``, ``feats`` (n, D) float32,
    ``slice_index`` (n,) int64 and, with targets, ``target`` (float32 vector).

    Args:
        dataset_dir: folder of bag files, or a list of bag paths.
        targets: case id -> encoded target vector; ``None`` for inference (every bag).
        id_regex: see :func:`bag_case_id`; ``None`` uses the file stem.
        cache: read every bag's features once at construction (default); ``False`` reads them per item.
        in_dim: the expected feature size D; ``None`` takes the first bag's.

    Raises:
        DataError: for a corrupt bag, a bag whose D differs from the others (naming the file), two files with
            the same case id, or no case left after the join.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike | Sequence[str | os.PathLike],
        targets: Mapping[str, Sequence[float]] | None = None,
        id_regex: str | None = None,
        cache: bool = True,
        in_dim: int | None = None,
    ) -> None:
        paths = find_bags(dataset_dir) if isinstance(dataset_dir, (str, os.PathLike)) else list(dataset_dir)
        self.cache = cache
        by_id: dict[str, Bag] = {}
        for p in paths:
            bag = read_bag(p, load_features=cache, id_regex=id_regex)
            if in_dim is None:
                in_dim = bag.dim
            if bag.dim != in_dim:
                raise DataError(p, f"'feats' has D={bag.dim} but the other bags (or the model) have D={in_dim}")
            if bag.case_id in by_id:
                raise DataError(p, f"case id {bag.case_id!r} already comes from {by_id[bag.case_id].path}")
            by_id[bag.case_id] = bag
        self.in_dim = int(in_dim) if in_dim is not None else 0
        self.missing_bags: list[str] = []
        self.missing_targets: list[str] = []
        self.targets: dict[str, np.ndarray] = {}
        if targets is not None:
            self.missing_bags = sorted(set(targets) - set(by_id))
            self.missing_targets = sorted(set(by_id) - set(targets))
            if self.missing_bags or self.missing_targets:
                warnings.warn(
                    f"{len(self.missing_bags)} id(s) in the targets have no bag file"
                    f"{' (' + _examples(self.missing_bags) + ')' if self.missing_bags else ''}; "
                    f"{len(self.missing_targets)} bag file(s) have no target"
                    f"{' (' + _examples(self.missing_targets) + ')' if self.missing_targets else ''}; "
                    f"using the {len(set(by_id) & set(targets))} cases on both sides",
                    stacklevel=2,
                )
            by_id = {k: v for k, v in by_id.items() if k in targets}
            self.targets = {k: np.asarray(targets[k], dtype=np.float32).reshape(-1) for k in by_id}
            if not by_id:
                raise DataError(Path(paths[0]).parent if paths else "?", "no bag file matches an id of the targets "
                                "(check id_column / id_regex)")
        self.case_ids = sorted(by_id)
        self.bags = [by_id[k] for k in self.case_ids]

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict:
        bag = self.bags[i]
        feats = bag.feats if bag.feats is not None else read_bag(bag.path).feats
        item = {"id": bag.case_id, "feats": torch.from_numpy(feats), "slice_index": torch.from_numpy(bag.slice_index)}
        if self.targets:
            item["target"] = torch.from_numpy(self.targets[bag.case_id])
        return item


def collate_bags(batch: Sequence[dict]) -> dict:
    """Pad bags to the longest one: ``feats`` (B, N, D) zeros, ``mask`` (B, N) bool (True = real slice),
    ``slice_index`` (B, N) with -1 on padding, ``id`` list, and ``target`` (B, T) when the items have one."""
    n_max = max(int(item["feats"].shape[0]) for item in batch)
    dim = int(batch[0]["feats"].shape[1])
    feats = torch.zeros(len(batch), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
    index = torch.full((len(batch), n_max), -1, dtype=torch.int64)
    for b, item in enumerate(batch):
        n = int(item["feats"].shape[0])
        feats[b, :n], mask[b, :n], index[b, :n] = item["feats"], True, item["slice_index"]
    out = {"id": [item["id"] for item in batch], "feats": feats, "mask": mask, "slice_index": index}
    if "target" in batch[0]:
        out["target"] = torch.stack([item["target"] for item in batch])
    return out


def feature_stats(dataset: BagDataset, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over every instance of the bags ``indices`` (float64, merged bag
    by bag, so memory stays one bag); a standard deviation below 1e-6 (a constant feature) is returned as 1."""
    count, mean, m2 = 0, np.zeros(dataset.in_dim), np.zeros(dataset.in_dim)
    for i in indices:
        feats = dataset[int(i)]["feats"].numpy().astype(np.float64)
        n, bag_mean = len(feats), feats.mean(axis=0)
        delta = bag_mean - mean
        total = count + n
        m2 += ((feats - bag_mean) ** 2).sum(axis=0) + delta**2 * count * n / total  # Chan et al. merge
        mean += delta * n / total
        count = total
    std = np.sqrt(m2 / max(count, 1))
    return mean, np.where(std > 1e-6, std, 1.0)
