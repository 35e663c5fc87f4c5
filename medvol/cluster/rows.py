"""Feature rows (n, d) from wherever they live: in memory, memory-mapped, HDF5, or a stream of batches.

k-means reads its inputs through these helpers so that it never needs the whole matrix in memory: a uniform
random subset of rows (:func:`take_rows`) to train on, then one pass over fixed-size chunks
(:func:`row_chunks`) to assign every row. In-memory float32 arrays are chunked as views (no copy); a
``numpy.memmap`` or an ``h5py.Dataset`` is read chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["as_float32_matrix", "as_rows", "is_batch_stream", "count_bad_rows", "row_chunks", "take_rows",
           "chunk_rows_for"]

_CHUNK_BYTES = 1 << 24  # 16 MiB of float32 per chunk: large enough for BLAS, small next to any feature matrix


def _check_dtype(dtype, name: str) -> None:
    if np.dtype(dtype).kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")


def _check_ndim(shape, name: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2D (n_samples, n_features), got shape {tuple(shape)}")


def count_bad_rows(x: np.ndarray) -> int:
    """Number of rows of the float array ``x`` (n, d) with a NaN or an infinite value.

    One reduction when all values are finite (the sum is finite); the exact per-row count only otherwise.
    """
    if x.size == 0:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(x.sum(dtype=np.float32)):
            return 0
    return int(np.count_nonzero(~np.isfinite(x).all(axis=1)))  # the sum may also overflow with finite values


def as_float32_matrix(x: Any, name: str = "x") -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor, shape (n, d)) as a C-contiguous float32 numpy array.

    Raises:
        TypeError: when ``x`` is not numeric (bool, complex, object, ...).
        ValueError: when ``x`` is not 2D, or has non-finite rows (the message gives how many).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    x = np.asarray(x)
    _check_dtype(x.dtype, name)
    _check_ndim(x.shape, name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = count_bad_rows(x)
    if bad:
        raise ValueError(f"{name} has {bad} of {x.shape[0]} rows with NaN or inf features")
    return x


def is_batch_stream(x: Any) -> bool:
    """True for an iterable of (n_i, d) batches (a generator, an iterator, ...), false for a matrix-like ``x``.

    Lists and tuples are matrices (rows of numbers), as for ``numpy.asarray``; anything with ``shape`` and
    ``__getitem__`` (numpy, memmap, h5py, torch) is a matrix too.
    """
    if isinstance(x, (list, tuple, np.ndarray, torch.Tensor)) or (hasattr(x, "shape") and hasattr(x, "__getitem__")):
        return False
    return hasattr(x, "__iter__")


def as_rows(x: Any, name: str = "x"):
    """``x`` as a 2D matrix that :func:`row_chunks` and :func:`take_rows` can read, without reading it whole.

    numpy arrays (memory-mapped ones included) and array-likes with ``shape``, ``dtype`` and slicing
    (``h5py.Dataset``) are returned as they are; tensors, lists and tuples are converted to float32 numpy.

    Raises:
        TypeError: not numeric. ValueError: not 2D (and, for converted inputs, NaN/inf rows).
    """
    if isinstance(x, (torch.Tensor, list, tuple)):
        return as_float32_matrix(x, name)
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")):
        x = np.asarray(x)
    _check_dtype(x.dtype, name)
    _check_ndim(x.shape, name)
    return x


def chunk_rows_for(d: int) -> int:
    """Rows per chunk for ``d`` float32 features (about 16 MiB, at least 1,024 rows)."""
    return max(1024, _CHUNK_BYTES // (4 * max(int(d), 1)))


def _float32(block) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def row_chunks(x, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` over the rows of the matrix ``x``, each block C-contiguous float32.

    Blocks of an in-memory C-contiguous float32 array are views; other inputs are read (converted) one block
    at a time, so memory stays at one block whatever the size of ``x``.
    """
    n, d = x.shape
    step = chunk_rows or chunk_rows_for(d)
    for start in range(0, n, step):
        yield start, _float32(x[start:start + step])


def take_rows(x, rows: np.ndarray | None, chunk_rows: int | None = None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique int64) of the matrix ``x`` as a new C-contiguous float32 array (m, d).

    ``None`` takes every row. numpy arrays (memory-mapped too) use fancy indexing, which touches only the pages
    of the selected rows; other array-likes (HDF5) are read in contiguous blocks from which the rows are picked.
    """
    if rows is None:
        return _float32(x[:]) if not isinstance(x, np.ndarray) else _float32(x)
    if isinstance(x, np.ndarray):
        return _float32(x[rows])
    n, d = x.shape
    step = min(chunk_rows or chunk_rows_for(d), 4096)  # small blocks: skip the ones with no selected row
    out = np.empty((len(rows), d), np.float32)
    starts = np.searchsorted(rows, np.arange(0, n + step, step))  # rows[starts[i]:starts[i+1]] in block i
    for i in np.flatnonzero(np.diff(starts)):
        lo, hi = starts[i], starts[i + 1]
        block = np.asarray(x[i * step:min((i + 1) * step, n)])
        out[lo:hi] = block[rows[lo:hi] - i * step]
    return out
