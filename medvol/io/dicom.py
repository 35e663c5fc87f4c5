"""DICOM series: discovery, validation and loading (SimpleITK/GDCM, so JPEG, JPEG 2000, JPEG-LS and RLE load).

A DICOM volume is referenced by its folder (``/data/ct/series1``) or, when a folder holds several series, by
``FOLDER#SERIES_INSTANCE_UID``. Slices are ordered by their position along the slice normal (GDCM's
ordering); a series whose slices repeat positions (diffusion, time series: 4D) or skip positions (missing
slices) is rejected with a :class:`~medvol.errors.DataError` instead of being stacked into a wrong volume.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvol.errors import DataError

__all__ = [
    "DICOM_SUFFIXES",
    "is_dicom_file",
    "is_dicom_dir",
    "split_series_ref",
    "list_series",
    "read_dicom_series",
]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_POSITION_TAG = "0020|0032"
_ORIENTATION_TAG = "0020|0037"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with a DICOM suffix or the ``DICM`` magic at byte 128 (extension-less exports)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """True when the folder directly contains at least one DICOM file."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(is_dicom_file(p) for p in path.iterdir() if not p.name.startswith("."))


def split_series_ref(ref: str | os.PathLike) -> tuple[Path, str | None]:
    """Split ``FOLDER#SERIES_UID`` into the folder and the UID (``None`` when no UID is given)."""
    text = str(ref)
    if "#" in text:
        folder, uid = text.rsplit("#", 1)
        return Path(folder), uid or None
    return Path(text), None


@contextlib.contextmanager
def _quiet_itk():
    """Silence ITK's console warnings ("No Series were found", ...): medvol reports its own, per file."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def list_series(folder: str | os.PathLike) -> list[str]:
    """Series Instance UIDs of the DICOM series GDCM finds directly in ``folder`` (sorted)."""
    with _quiet_itk():
        return sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _slice_positions(files: list[str]) -> np.ndarray | None:
    """Positions of the slices along their normal, or None when the headers do not carry them."""
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey(_POSITION_TAG):
            return None
        ipp = np.array([float(v) for v in reader.GetMetaData(_POSITION_TAG).split("\\")])
        if normal is None:
            if reader.HasMetaDataKey(_ORIENTATION_TAG):
                iop = np.array([float(v) for v in reader.GetMetaData(_ORIENTATION_TAG).split("\\")])
                normal = np.cross(iop[:3], iop[3:])
            else:
                normal = np.array([0.0, 0.0, 1.0])
        positions.append(float(ipp @ normal))
    return np.asarray(positions)


def _check_geometry(ref: str, files: list[str]) -> None:
    if len(files) < 2:
        return  # a single (possibly multi-frame) file: its geometry comes from one header
    pos = _slice_positions(files)
    if pos is None:
        return
    distinct = np.unique(np.round(pos, 3))
    if len(distinct) < len(files):
        raise DataError(
            ref,
            f"DICOM series has {len(files)} images at only {len(distinct)} distinct slice positions: a 4D/"
            "multi-volume series (e.g. diffusion or dynamic); split it into one series per volume",
        )
    steps = np.diff(np.sort(distinct))
    if steps.size and (steps.max() - steps.min()) > max(0.01 * float(np.median(steps)), 1e-3):
        raise DataError(
            ref,
            f"non-uniform slice spacing in DICOM series ({steps.min():.3f} to {steps.max():.3f} mm): "
            "missing or duplicated slices?",
        )


def read_dicom_series(ref: str | os.PathLike) -> sitk.Image:
    """Read and validate one DICOM series as a 3D SimpleITK image.

    Args:
        ref: a folder holding one series, or ``FOLDER#SERIES_UID``.

    Raises:
        DataError: folder missing, no readable series, several series without a UID, unknown UID,
            repeated slice positions (4D), non-uniform spacing, or a decoding failure.
    """
    folder, uid = split_series_ref(ref)
    ref = str(ref)
    if not folder.is_dir():
        raise DataError(ref, "DICOM folder does not exist")
    series = list_series(folder)
    if not series:
        raise DataError(ref, "no readable DICOM series in this folder (files are not DICOM or are corrupt)")
    if uid is None:
        if len(series) > 1:
            raise DataError(
                ref,
                f"folder holds {len(series)} DICOM series ({', '.join(series[:3])}"
                f"{', ...' if len(series) > 3 else ''}); name one as FOLDER#SERIES_UID",
            )
        uid = series[0]
    elif uid not in series:
        raise DataError(ref, f"no DICOM series with UID {uid} in this folder")
    reader = sitk.ImageSeriesReader()
    try:
        with _quiet_itk():
            files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
            _check_geometry(ref, files)
            reader.SetFileNames(files)
            image = reader.Execute()
    except DataError:
        raise
    except RuntimeError as e:
        raise DataError(ref, f"cannot decode DICOM series ({_first_line(e)})") from e
    return image


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages start with a source location line; the useful text is the last line
    return lines[-1] if lines else type(err).__name__
