"""Bags of slice embeddings: the HDF5 format, a dataset joining bags with targets, and padding collation.

One HDF5 file per volume, ``<case>.h5``, written by ``medvol embed`` (or :func:`write_bag`):

- dataset ``feats``: float32 (n_slices, D), one embedding per slice;
- dataset ``slice_index``: int64 (n_slices,), the slice positions along ``axis`` of the volume as
  :class:`medvol.io.LoadVolume` returns it (channel removed);
- attributes ``source`` (str, the volume path), ``spacing`` (3 floats), ``checkpoint_sha256`` (str), ``axis`` (int).

The case id is the file stem, or the first group of ``id_regex`` matched against the stem (e.g. ``"^(.*)_T1$"``
turns ``IXI012-HH-1211_T1.h5`` into ``IXI012-HH-1211``). Every instance of a bag stays with its case.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from medvol.errors import DataError
from medvol.io.atomic import atomic_path

__all__ = ["Bag", "write_bag", "read_bag", "find_bags", "bag_case_id", "BagDataset", "collate_bags", "feature_stats"]

BAG_SUFFIXES = (".h5", ".hdf5")


@dataclass
class Bag:
    """One volume's bag; ``feats`` is ``None`` when read with ``load_features=False``."""

    case_id: str
    path: str
    n_slices: int
    dim: int
    slice_index: np.ndarray
    feats: np.ndarray | None = None
    source: str = ""
    spacing: tuple[float, ...] = ()
    checkpoint_sha256: str = ""
    axis: int = -1


def write_bag(
    path: str | os.PathLike,
    feats: np.ndarray,
    slice_index: np.ndarray | None = None,
    source: str = "",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    checkpoint_sha256: str = "",
    axis: int = 2,
) -> Path:
    """Write one bag atomically in the format above; ``slice_index`` ``None`` means ``0..n_slices-1``.

    Raises:
        ValueError: if ``feats`` is not a non-empty 2-D array or ``slice_index`` does not match it.
    """
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"feats must be (n_slices >= 1, D), got shape {feats.shape}")
    index = np.arange(len(feats)) if slice_index is None else np.asarray(slice_index)
    index = index.astype(np.int64)
    if index.shape != (len(feats),):
        raise ValueError(f"slice_index must be ({len(feats)},), got shape {index.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("feats", data=feats)
            f.create_dataset("slice_index", data=index)
            f.attrs["source"] = str(source)
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
            f.attrs["checkpoint_sha256"] = str(checkpoint_sha256)
            f.attrs["axis"] = int(axis)
    return path


def bag_case_id(path: str | os.PathLike, id_regex: str | None = None) -> str:
    """The case id of a bag file: its stem, or the first group of ``id_regex`` when the stem matches it."""
    stem = Path(path).name
    for suffix in BAG_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if id_regex:
        match = re.search(id_regex, stem)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return stem


def _attr(f: h5py.File, name: str, default):
    value = f.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def read_bag(path: str | os.PathLike, load_features: bool = True, id_regex: str | None = None) -> Bag:
    """Read (and check) one bag file.

    Raises:
        DataError: naming the file, when it is not HDF5, lacks ``feats``, has a non-2-D or empty ``feats``, a
            ``slice_index`` of another length, or non-finite features.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "feats" not in f:
                raise DataError(path, f"no 'feats' dataset (found {sorted(f.keys())})")
            ds = f["feats"]
            if ds.ndim != 2 or ds.shape[0] == 0 or ds.shape[1] == 0:
                raise DataError(path, f"'feats' must be (n_slices >= 1, D >= 1), got shape {ds.shape}")
            n, dim = (int(s) for s in ds.shape)
            index = np.asarray(f["slice_index"][()], dtype=np.int64) if "slice_index" in f else np.arange(n)
            if index.shape != (n,):
                raise DataError(path, f"'slice_index' has shape {index.shape} but 'feats' has {n} slices")
            feats = np.asarray(ds[()], dtype=np.float32) if load_features else None
            spacing = tuple(float(s) for s in np.atleast_1d(_attr(f, "spacing", ())))
            bag = Bag(bag_case_id(path, id_regex), str(path), n, dim, index, feats, str(_attr(f, "source", "")),
                      spacing, str(_attr(f, "checkpoint_sha256", "")), int(_attr(f, "axis", -1)))
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(path, f"not a readable HDF5 bag ({' '.join(str(e).split()) or type(e).__name__})") from e
    if feats is not None and not np.isfinite(feats).all():
        raise DataError(path, f"'feats' has {int((~np.isfinite(feats)).sum())} non-finite values")
    return bag


def find_bags(dataset_dir: str | os.PathLike) -> list[Path]:
    """Sorted bag files (``*.h5``, ``*.hdf5``) directly in ``dataset_dir``.

    Raises:
        DataError: if the folder does not exist or holds no bag file.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(root, "embeddings folder not found")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(BAG_SUFFIXES)
                   and not p.name.startswith("."))
    if not paths:
        raise DataError(root, f"no bag files ({', '.join(BAG_SUFFIXES)}) in the folder")
    return paths


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
