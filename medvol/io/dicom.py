"""DICOM series: discovery, validation and loading (SimpleITK/GDCM, so JPEG, JPEG 2000, JPEG-LS and RLE load).

A DICOM volume is referenced by its folder (``/data/ct/series1``) or, when a folder holds several series, by
``FOLDER#SERIES_INSTANCE_UID``. Slices are ordered by their position along the slice normal (GDCM's
ordering); a series whose slices repeat positions (diffusion, time series: 4D) or skip positions (missing
slices) is rejected with a :class:`~medvol.errors.DataError` instead of being stacked into a wrong volume, and
so is a series with a slice file that cannot be read (truncated, corrupt): the message names that file.

Gantry tilt: CT slices acquired with a tilted gantry are parallel planes whose positions step *obliquely* to
their normal. ITK stacks them along the normal, which shears the anatomy (each slice is off by
``step * sin(tilt)`` in-plane). :func:`read_dicom_series` detects it from the slice positions against the
orientation and, by default (``gantry_tilt="resample"``, as dcm2niix does), resamples the slices onto an
orthogonal grid: same size and in-plane spacing, slice spacing ``step * cos(tilt)``, linear interpolation.
``gantry_tilt="fail"`` rejects such a series instead. The default can be set for a whole run (also in worker
processes) with the ``MEDVOL_GANTRY_TILT`` environment variable (``medvol preprocess --gantry-tilt``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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
    "check_dicom_series",
    "is_series_uid",
    "gantry_tilt_policy",
    "GANTRY_TILT_POLICIES",
    "GANTRY_TILT_ENV",
]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_POSITION_TAG = "0020|0032"
_ORIENTATION_TAG = "0020|0037"
_SERIES_UID_TAG = "0020|000e"
GANTRY_TILT_POLICIES = ("resample", "fail")
GANTRY_TILT_ENV = "MEDVOL_GANTRY_TILT"
TILT_NOTE_KEY = "medvol_note"  # metadata key of the image that says it was resampled (reported in manifests)
# a series counts as tilted when its slice positions drift off the normal by more than this (total, mm) and
# by more than ~0.06 degrees: far above the rounding of positions/orientations written by scanners
_TILT_MIN_DRIFT_MM = 0.05
_TILT_MIN_RATIO = 1e-3
# DICOM UIDs are digits and dots (PS3.5 9.1); GDCM also reports '' for series without a UID
_ITK_PREFIX = re.compile(r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?")
_UID = re.compile(r"^[0-9A-Za-z._-]{1,128}$")


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


def is_series_uid(uid: str) -> bool:
    """True for text that can be a Series Instance UID: digits, dots (and letters, ``_``, ``-`` GDCM tolerates);
    never a path (no ``/``, no ``..``), so it is safe in an output file name."""
    return bool(_UID.match(uid)) and ".." not in uid


def gantry_tilt_policy(policy: str | None = None) -> str:
    """``policy``, else ``$MEDVOL_GANTRY_TILT``, else ``"resample"``; one of :data:`GANTRY_TILT_POLICIES`.

    Raises:
        ValueError: for any other value (naming where it came from).
    """
    value = policy or os.environ.get(GANTRY_TILT_ENV) or "resample"
    if value not in GANTRY_TILT_POLICIES:
        where = "gantry_tilt" if policy else f"${GANTRY_TILT_ENV}"
        raise ValueError(f"{where} must be one of {', '.join(GANTRY_TILT_POLICIES)}, got {value!r}")
    return value


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


def _vector(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.strip(" \x00").split("\\")], dtype=np.float64)


def _slice_geometry(files: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions (n, 3) in file order, slice normal) from the headers, or None when they do not carry them."""
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey(_POSITION_TAG):
            return None
        positions.append(_vector(reader.GetMetaData(_POSITION_TAG))[:3])
        if normal is None:
            if reader.HasMetaDataKey(_ORIENTATION_TAG):
                iop = _vector(reader.GetMetaData(_ORIENTATION_TAG))
                normal = np.cross(iop[:3], iop[3:6])
                normal /= np.linalg.norm(normal) or 1.0
            else:
                normal = np.array([0.0, 0.0, 1.0])
    return np.asarray(positions), normal


def _check_geometry(ref: str, files: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Reject 4D and gapped series; return (per-slice step vector, slice normal) of a gantry-tilted series."""
    if len(files) < 2:
        return None  # a single (possibly multi-frame) file: its geometry comes from one header
    geometry = _slice_geometry(files)
    if geometry is None:
        return None
    ipp, normal = geometry
    pos = ipp @ normal
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
    total = ipp[-1] - ipp[0]  # files are in GDCM's order (sorted along the normal)
    along = float(total @ normal)
    drift = float(np.linalg.norm(total - along * normal))
    if drift > max(_TILT_MIN_DRIFT_MM, _TILT_MIN_RATIO * abs(along)):
        return total / (len(files) - 1), normal
    return None


def _tilt_text(step: np.ndarray, normal: np.ndarray) -> str:
    cos = abs(float(step @ normal)) / float(np.linalg.norm(step))
    angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    def fmt(v):
        return ", ".join(f"{round(float(x), 2) + 0.0:.2f}" for x in v)  # + 0.0: no "-0.00"

    return (f"gantry tilt of {angle:.1f} degrees: slice positions step along ({fmt(step)}) mm while the slice "
            f"normal is ({fmt(normal)})")


def _resample_tilted(image: sitk.Image, step: np.ndarray) -> sitk.Image:
    """Resample a series ITK stacked along the normal onto the orthogonal grid its slices really lie on.

    ``image`` has ITK's geometry (origin = first slice, direction columns = row, column, normal; slice
    spacing = the distance between slice origins). Giving it the true, sheared geometry (third axis along
    ``step``) and resampling onto the grid with the same origin, size and in-plane spacing, third axis along the
    normal with spacing ``step . normal``, moves each slice in-plane by ``k * (step - (step . n) n)``.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = list(image.GetSpacing())
    along = float(step @ direction[:, 2])
    sheared = direction.copy()
    sheared[:, 2] = step / np.linalg.norm(step)
    true_geometry = sitk.Image(image)
    true_geometry.SetDirection(sheared.ravel().tolist())
    true_geometry.SetSpacing([spacing[0], spacing[1], float(np.linalg.norm(step))])
    grid = direction.copy()
    grid[:, 2] *= np.sign(along) or 1.0
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Resample(true_geometry, image.GetSize(), sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [spacing[0], spacing[1], abs(along)], grid.ravel().tolist(), float(stats.GetMinimum()),
                         image.GetPixelID())


def _unreadable(path: str) -> str | None:
    """Why GDCM cannot read the header of ``path`` (None when it can)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return _first_line(e)
    return None


def _corrupt_slices(folder: Path, series_files: list[str], uid: str) -> list[tuple[str, str]]:
    """DICOM files in ``folder`` that GDCM left out of the series because it cannot read them.

    A file whose bytes carry the series UID belongs to the series for sure; other unreadable files (possibly a
    non-image object such as a structured report) are returned with ``"?"`` first so the caller can decide.
    """
    listed = {os.path.abspath(f) for f in series_files}
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or os.path.abspath(path) in listed:
            continue
        if not is_dicom_file(path):
            continue
        reason = _unreadable(str(path))
        if reason is None:
            continue  # readable: another series or a non-image object, not ours to judge
        try:
            ours = bool(uid) and uid.encode() in path.read_bytes()
        except OSError:
            ours = False
        found.append((("" if ours else "?") + path.name, reason))
    return found


def _corrupt_slice_error(ref: str, corrupt: list[tuple[str, str]]) -> DataError:
    names = [name.lstrip("?") for name, _ in corrupt]
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return DataError(ref, f"DICOM file{'s' if len(names) > 1 else ''} {listed} in this series cannot be read "
                     f"(truncated or corrupt: {corrupt[0][1]}); replace or remove {'them' if len(names) > 1 else 'it'}")


def check_dicom_series(ref: str | os.PathLike, gantry_tilt: str | None = None) -> list[str]:
    """Validate one DICOM series from its headers only (no pixel data is decoded); returns its files in order.

    Everything :func:`read_dicom_series` checks before decoding: the folder, the series, unreadable slice
    files, 4D and gapped series, and a gantry tilt with ``gantry_tilt="fail"``.

    Raises:
        DataError: as :func:`read_dicom_series`, except for decoding failures.
    """
    return _validated_series(ref, gantry_tilt_policy(gantry_tilt))[0]


def _validated_series(ref: str | os.PathLike, policy: str) -> tuple[list[str], tuple | None]:
    """(files in GDCM's order, (step, normal) of a tilted series or None), after every header check."""
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
    with _quiet_itk():
        try:
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            # GDCM silently leaves out slices it cannot parse: a truncated slice would become a gap (reported
            # as "non-uniform spacing") or, at either end, a volume one slice short. Name such files instead.
            corrupt = _corrupt_slices(folder, files, uid)
            sure = [c for c in corrupt if not c[0].startswith("?")]
            if sure:
                raise _corrupt_slice_error(ref, sure)
            try:
                tilt = _check_geometry(ref, files)
            except DataError:
                if corrupt:  # unreadable files of unknown series: the likely cause of the gap
                    raise _corrupt_slice_error(ref, corrupt) from None
                raise
        except RuntimeError as e:
            raise DataError(ref, f"cannot read the DICOM headers ({_first_line(e)})") from e
    if tilt is not None and policy == "fail":
        raise DataError(ref, f"{_tilt_text(*tilt)}; stacking the slices along the normal would shear the anatomy: "
                        "resample it (gantry_tilt='resample', medvol preprocess --gantry-tilt resample) or "
                        "reconstruct the series without tilt")
    return files, tilt


def read_dicom_series(ref: str | os.PathLike, gantry_tilt: str | None = None) -> sitk.Image:
    """Read and validate one DICOM series as a 3D SimpleITK image.

    Args:
        ref: a folder holding one series, or ``FOLDER#SERIES_UID``.
        gantry_tilt: what to do with a gantry-tilted series: ``"resample"`` onto an orthogonal grid or
            ``"fail"``; ``None``: ``$MEDVOL_GANTRY_TILT``, else ``"resample"`` (see the module docstring).

    Raises:
        DataError: folder missing, no readable series, several series without a UID, unknown UID, a slice
            file that cannot be read (named), repeated slice positions (4D), non-uniform spacing, a tilted
            series with ``gantry_tilt="fail"``, or a decoding failure (the slice that fails is named).
    """
    files, tilt = _validated_series(ref, gantry_tilt_policy(gantry_tilt))
    ref = str(ref)
    reader = sitk.ImageSeriesReader()
    with _quiet_itk():
        try:
            reader.SetFileNames(files)
            image = reader.Execute()
        except RuntimeError as e:
            bad = next(((Path(f).name, r) for f in files if (r := _undecodable(f)) is not None), None)
            if bad is not None:
                raise DataError(ref, f"DICOM file {bad[0]} in this series cannot be decoded (truncated or corrupt: "
                                f"{bad[1]}); replace or remove it") from e
            raise DataError(ref, f"cannot decode DICOM series ({_first_line(e)})") from e
    if tilt is not None:
        note = f"{_tilt_text(*tilt)}; resampled onto an orthogonal grid"
        logger.info(f"{ref}: {note}")
        image = _resample_tilted(image, tilt[0])
        image.SetMetaData(TILT_NOTE_KEY, note)
    return image


def _undecodable(path: str) -> str | None:
    try:
        sitk.ReadImage(path)
    except RuntimeError as e:
        return _first_line(e)
    return None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages start with a source location line; the useful text is the last line, without the
    # "ITK ERROR: GDCMImageIO(0x55d0...): " prefix (an object address tells a user nothing)
    return _ITK_PREFIX.sub("", lines[-1]) if lines else type(err).__name__
