"""Atomic file writing: a temp file in the destination folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the old complete file or the new complete file, never a
half-written one, even when the writer is killed. Temp files are hidden (``.NAME.PID.tmp``) and removed on
error; :func:`remove_stale_temps` clears the ones a killed process left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_stale_temps", "save_nifti"]

_TMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on error it is deleted.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "notes.txt") as tmp:  # written to a temp name, renamed on success
        ...     _ = tmp.write_text("done")
        >>> sorted(p.name for p in folder.iterdir())
        ['notes.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete temp files a killed writer left for ``path``; returns how many were removed."""
    path = Path(path)
    removed = 0
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def save_nifti(array, affine, path: str | os.PathLike, dtype=None) -> Path:
    """Save a 3D array as NIfTI with ``affine`` (RAS, as in MONAI/nibabel), atomically and reproducibly.

    ``.nii.gz`` files are compressed in memory with a zero timestamp and no embedded file name, so writing
    the same array twice gives byte-identical files (resumed batch runs match uninterrupted ones).

    Args:
        array: (X, Y, Z) array, or (1, X, Y, Z) channel-first; torch tensors and MetaTensors are accepted.
        affine: 4x4 voxel-to-world matrix in RAS convention.
        path: destination ending in ``.nii`` or ``.nii.gz``.
        dtype: output data type; ``None`` keeps the array's type.

    Raises:
        ValueError: when the array is not 3D or the path has another extension.
    """
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise ValueError(f"NIfTI output must end in .nii or .nii.gz, got {path}")
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume for {path}, got shape {array.shape}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    affine = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(path, data)
