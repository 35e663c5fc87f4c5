"""Bags of slice embeddings: the HDF5 format, its reader and writer, and the writer of ``medvol embed``.

One HDF5 file per volume, ``<case>.h5``, written by ``medvol embed`` (:func:`write_slice_bag`) or
:func:`write_bag`:

- dataset ``feats``: float32 (n_slices, D), one embedding per slice;
- dataset ``slice_index``: int64 (n_slices,), the slice positions along ``axis`` of the volume as
  :class:`medvol.io.LoadVolume` returns it (channel removed);
- attributes ``source`` (str, the volume path), ``spacing`` (3 floats), ``checkpoint_sha256`` (str), ``axis`` (int).

The case id is the file stem, or the first group of ``id_regex`` matched against the stem (e.g. ``"^(.*)_T1$"``
turns ``IXI012-HH-1211_T1.h5`` into ``IXI012-HH-1211``). Every instance of a bag stays with its case.

``slice_index`` and ``axis`` refer to the volume as loaded (what the MIL attention figure reads back), not to the
reoriented grid the encoder saw: :func:`source_slice_index` maps axis 2 of the RAS grid back through the affines
(for an IXI T1 stored sagittally, RAS axial slices are source axis 1). With resampling, each slice maps to the
nearest source slice. Output names (:func:`bag_filename`): ``<case>.h5``, ``_<uid>`` added for one series of a
multi-series DICOM folder, flat so the ``slice_mil`` bundle reads the folder as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from medvol.errors import DataError
from medvol.io.atomic import atomic_path
from medvol.io.datalist import case_name
from medvol.io.dicom import split_series_ref

__all__ = ["Bag", "write_bag", "read_bag", "find_bags", "bag_case_id", "BAG_SUFFIXES", "source_slice_index",
           "write_slice_bag", "file_sha256", "bag_filename"]

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


def source_slice_index(positions, axis: int, grid_affine, source_affine, source_shape) -> tuple[int, np.ndarray]:
    """Map slice positions along ``axis`` of the preprocessed grid to (source axis, source slice positions).

    The centre voxel of each grid slice is taken through ``inv(source_affine) @ grid_affine``; the source axis is
    the one the grid's slice axis runs along most. Exact for reorientation (signed axis permutations), nearest
    slice after resampling.
    """
    grid_affine = np.asarray(grid_affine, dtype=np.float64).reshape(4, 4)
    to_source = np.linalg.inv(np.asarray(source_affine, dtype=np.float64).reshape(4, 4)) @ grid_affine
    src_axis = int(np.argmax(np.abs(to_source[:3, axis])))
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    shape = np.asarray(source_shape).reshape(-1)
    # voxel (x, y, z) of the grid with the slice axis at pos; the other axes at 0 (any value: no effect for
    # permutations, and after resampling the slice axis barely depends on them)
    points = np.zeros((len(pos), 4))
    points[:, axis], points[:, 3] = pos, 1.0
    coords = points @ to_source.T  # (n, 4) source voxel coordinates
    index = np.clip(np.rint(coords[:, src_axis]), 0, int(shape[src_axis]) - 1).astype(np.int64)
    return src_axis, index


def _spacing(affine) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64).reshape(4, 4)[:3, :3], axis=0))


def write_slice_bag(path: str | os.PathLike, feats, data: Mapping, axis: int, checkpoint_sha256: str,
                    source: str | None = None) -> dict:
    """Write one bag from the embeddings and the keys :class:`RecordSourceGridd` / ``VolumeToSlicesd`` left.

    Returns:
        manifest fields: ``shape`` and ``spacing`` of the source volume, ``n_slices``, ``dim``.

    Raises:
        DataError: when the volume left no slice to embed (e.g. every slice below ``skip_empty_threshold``).
    """
    source = str(data.get("source", "")) if source is None else str(source)
    feats = feats.detach().cpu().float().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(source, f"no slice to embed (embeddings of shape {feats.shape}); check skip_empty_threshold")
    shape = [int(s) for s in np.asarray(data["source_shape"]).reshape(-1)[:3]]
    src_axis, index = source_slice_index(np.asarray(data["slice_index"]), axis, data["grid_affine"],
                                         data["source_affine"], shape)
    spacing = _spacing(data["source_affine"])
    write_bag(path, feats, index, source, spacing, checkpoint_sha256, src_axis)
    return {"shape": tuple(shape), "spacing": spacing, "n_slices": int(feats.shape[0]), "dim": int(feats.shape[1])}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bag_filename(source: str) -> str:
    """``<case>.h5`` for a volume path (``<case>_<uid>.h5`` for one series of a multi-series DICOM folder)."""
    folder, uid = split_series_ref(source)
    stem = case_name(folder)
    return f"{stem}_{uid}.h5" if uid else f"{stem}.h5"
