"""Volume-level embedding vectors for similar-case search, read from the files medvol writes.

Two kinds of embedding file are understood:

- a bag of slice embeddings, ``<case>.h5`` / ``.hdf5`` (``medvol embed``, :mod:`medvol.io.bags`): ``feats``
  (n_slices, D) is pooled to one vector (mean, or max) per volume; ``source``, ``spacing``, ``axis`` and
  ``checkpoint_sha256`` come with it;
- a volume embedding, ``<case>.npy`` (what the 3D bundles' inference writes,
  :class:`~medvol.transforms.SaveEmbeddingd`): a float vector (D,), or (n, D) rows that are pooled like a
  bag's. It records no source or checkpoint.

With the cosine metric every pooled vector is L2-normalised, so an L2 index ranks by cosine similarity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import DataError
from medvol.io.bags import BAG_SUFFIXES, bag_case_id, file_sha256, read_bag

__all__ = ["EMBEDDING_SUFFIXES", "POOLINGS", "METRICS", "EmbeddingRecord", "pool_rows", "prepare_vectors",
           "read_embedding", "find_embedding_files"]

EMBEDDING_SUFFIXES = (*BAG_SUFFIXES, ".npy")
POOLINGS = ("mean", "max")
METRICS = ("cosine", "l2")


@dataclass
class EmbeddingRecord:
    """One volume's pooled vector and what is known about where it came from (the id map's entry)."""

    vector: np.ndarray
    file: str
    case_id: str
    source: str = ""
    n_rows: int = 1
    dim: int = 0
    spacing: tuple[float, ...] = ()
    axis: int = -1
    checkpoint_sha256: str = ""
    file_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def item(self) -> dict:
        """The JSON-serialisable id-map entry (everything but the vector)."""
        return {"file": self.file, "case_id": self.case_id, "source": self.source, "n_rows": int(self.n_rows),
                "dim": int(self.dim), "spacing": [float(s) for s in self.spacing], "axis": int(self.axis),
                "checkpoint_sha256": self.checkpoint_sha256, "file_sha256": self.file_sha256, **self.extra}


def pool_rows(rows: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """One vector (D,) float32 from embeddings ``rows`` (n, D): their mean or element-wise max.

    Example:
        >>> pool_rows(np.array([[1.0, 0.0], [3.0, 2.0]]), "mean").tolist()
        [2.0, 1.0]
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        return rows.copy()
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"embeddings must be (n >= 1, D), got shape {rows.shape}")
    out = rows.mean(axis=0, dtype=np.float64) if pooling == "mean" else rows.max(axis=0)
    return np.asarray(out, dtype=np.float32)


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index stores them: float32 C-contiguous, L2-normalised rows for ``metric="cosine"``.

    Raises:
        ValueError: unknown metric, non-finite values, or (cosine) an all-zero row, which has no direction.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.ascontiguousarray(np.atleast_2d(np.asarray(x, dtype=np.float32)))
    if not np.isfinite(x).all():
        raise ValueError(f"{int((~np.isfinite(x)).sum())} non-finite values")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("an all-zero embedding has no direction (cosine metric)")
        x = np.ascontiguousarray(x / norms, dtype=np.float32)
    return x


def read_embedding(path: str | os.PathLike, pooling: str = "mean", id_regex: str | None = None) -> EmbeddingRecord:
    """Read one embedding file (bag or ``.npy``) and pool it to a volume vector (not normalised).

    Raises:
        DataError: naming the file: unreadable, wrong shape, empty, non-finite values, unknown suffix.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(BAG_SUFFIXES):
        bag = read_bag(path, load_features=True, id_regex=id_regex)
        vector = pool_rows(bag.feats, pooling)
        return EmbeddingRecord(vector, str(path), bag.case_id, bag.source, bag.n_slices, bag.dim, bag.spacing,
                               bag.axis, bag.checkpoint_sha256, file_sha256(path))
    if name.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any reader error means "not a usable .npy"
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(path, f"not a readable .npy embedding ({reason})") from None
        if not np.issubdtype(array.dtype, np.number) or array.ndim not in (1, 2) or 0 in array.shape:
            raise DataError(path, f"an embedding must be a numeric (D,) or (n, D) array, got {array.dtype} "
                                  f"{array.shape}")
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise DataError(path, f"{int((~np.isfinite(array)).sum())} non-finite values")
        vector = pool_rows(array, pooling)
        return EmbeddingRecord(vector, str(path), bag_case_id(path.with_suffix(".h5"), id_regex),
                               n_rows=1 if array.ndim == 1 else int(array.shape[0]), dim=int(vector.shape[0]),
                               file_sha256=file_sha256(path))
    raise DataError(path, f"not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")


def find_embedding_files(folder: str | os.PathLike) -> list[Path]:
    """Sorted embedding files (``.h5``, ``.hdf5``, ``.npy``) directly in ``folder`` (hidden files left out).

    Raises:
        DataError: if the folder does not exist or holds no embedding file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(root, "embeddings folder not found")
    paths = sorted(p for p in root.iterdir() if p.name.lower().endswith(EMBEDDING_SUFFIXES)
                   and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise DataError(root, f"no embedding files ({', '.join(EMBEDDING_SUFFIXES)}) in the folder")
    return paths
