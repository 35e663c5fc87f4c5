"""Reading one 3D volume from NIfTI, MetaImage, NRRD or a DICOM series, as a MONAI ``MetaTensor``.

:class:`VolumeReader` is a MONAI ``ImageReader``: NIfTI goes through nibabel (MONAI's default semantics),
MetaImage/NRRD/DICOM through SimpleITK, and every affine is returned in RAS like MONAI's readers. Anything
that is not one readable 3D volume raises :class:`~medvol.errors.DataError` naming the file: empty files,
truncated or corrupt archives, a text file with a NIfTI name, 2D or 4D data, a zero-size axis, a broken or
looping symbolic link. Gantry-tilted DICOM CT is resampled or rejected (``gantry_tilt``, see
:mod:`medvol.io.dicom`); a resampled volume says so in its metadata (``medvol_note``).

:class:`LoadVolume` / :class:`LoadVolumed` turn a path into a channel-first ``MetaTensor`` with this reader.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys, SpaceKeys, TransformBackends

from medvol.errors import DataError
from medvol.io.dicom import (
    TILT_NOTE_KEY,
    _quiet_itk,
    check_dicom_series,
    is_dicom_dir,
    read_dicom_series,
    split_series_ref,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "volume_suffix",
    "is_volume_path",
    "VolumeReader",
    "LoadVolume",
    "LoadVolumed",
    "check_volume",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNSIGNED_UPCAST = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The volume file suffix of ``path`` (``".nii.gz"``, ``".nrrd"``, ...) or ``None``."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a volume file name or a DICOM series reference (folder or ``FOLDER#UID``)."""
    if volume_suffix(path) is not None:
        return True
    folder, uid = split_series_ref(path)
    return uid is not None or is_dicom_dir(folder)


class _Volume:
    """What :meth:`VolumeReader.read` returns: the array (X, Y, Z), its RAS affine, its source and a note
    (e.g. that a gantry-tilted series was resampled; empty when there is nothing to say)."""

    def __init__(self, array: np.ndarray, affine: np.ndarray, source: str, note: str = ""):
        self.array, self.affine, self.source, self.note = array, affine, source, note


def _check_shape(shape, source: str) -> None:
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape):
        raise DataError(source, f"has a zero-size axis (shape {shape}): an empty volume")


def _squeeze_to_3d(array: np.ndarray, source: str) -> np.ndarray:
    _check_shape(array.shape, source)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise DataError(
            source,
            f"is a 4D volume (shape {tuple(array.shape)}); medvol expects one 3D volume per file: "
            "split the time/channel axis into separate files",
        )
    if array.ndim != 3:
        raise DataError(source, f"expected a 3D volume, got {array.ndim}D data of shape {tuple(array.shape)}")
    return array


def _nifti_header_size(raw: bytes) -> int:
    """``sizeof_hdr`` of a NIfTI header in either byte order: 348 (NIfTI-1), 540 (NIfTI-2), else 0."""
    for order in ("little", "big"):
        size = int.from_bytes(raw[:4], order) if len(raw) >= 4 else 0
        if size in (348, 540):
            return size
    return 0


def _read_nifti(path: Path) -> _Volume:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        # nibabel streams .nii.gz without checking the gzip CRC, so a corrupted archive would load as garbage
        # voxels; decompressing here verifies it (and costs no extra pass)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, f"not a valid NIfTI file: corrupt or truncated gzip data ({_reason(e)})") from e
    header_size = _nifti_header_size(raw)
    image_class = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(header_size)
    if image_class is None:
        raise DataError(path, "not a valid NIfTI file (no NIfTI-1/2 header)")
    try:
        img = image_class.from_bytes(raw)
        shape = img.shape
        array = np.asanyarray(img.dataobj) if all(shape) else None
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError,
            ValueError) as e:
        raise DataError(path, f"truncated or corrupt NIfTI data ({_reason(e)})") from e
    _check_shape(shape, str(path))  # before the data: nibabel flattens a (10, 0, 10) image to shape (0,)
    array = _squeeze_to_3d(array, str(path))
    return _Volume(array, np.asarray(img.affine, dtype=np.float64), str(path))


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    return _LPS_TO_RAS @ affine


def _sitk_to_volume(image: sitk.Image, source: str) -> _Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(source, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector)")
    _check_shape(image.GetSize(), source)
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X) for 3D, (T, Z, Y, X) for 4D
    array = np.ascontiguousarray(np.transpose(array, tuple(range(array.ndim))[::-1]))  # -> (X, Y, Z[, T])
    array = _squeeze_to_3d(array, source)
    note = image.GetMetaData(TILT_NOTE_KEY) if image.HasMetaDataKey(TILT_NOTE_KEY) else ""
    return _Volume(array, _sitk_affine_ras(image), source, note)


def _read_itk_file(path: Path) -> _Volume:
    try:
        with _quiet_itk():  # ITK prints its own warning before raising; the DataError says it in one line
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"cannot read {volume_suffix(path)} file ({_reason(e)})") from e
    return _sitk_to_volume(image, str(path))


def _missing_reason(path: Path) -> str:
    if not path.is_symlink():
        return "file not found"
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop as RuntimeError
        return f"symbolic link loop (-> {target})"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop (-> {target})"
    return f"broken symbolic link (-> {target}, which does not exist)"


def _reason(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class VolumeReader(ImageReader):
    """MONAI ``ImageReader`` for one 3D volume: NIfTI, MetaImage (.mha/.mhd), NRRD (.nrrd/.nhdr) or DICOM series.

    Args:
        dtype: cast the voxel array to this type; ``None`` keeps the stored type (labels stay integers).
        gantry_tilt: gantry-tilted DICOM series: ``"resample"`` or ``"fail"`` (``None``: ``$MEDVOL_GANTRY_TILT``,
            else ``"resample"``); see :func:`medvol.io.read_dicom_series`.

    Example:
        >>> from monai.transforms import LoadImage
        >>> img = LoadImage(image_only=True, ensure_channel_first=True)(
        ...     "demo_data/nrrd/breast1_image.nrrd", reader=VolumeReader())
        >>> img.ndim, img.meta["filename_or_obj"].endswith("breast1_image.nrrd")
        (4, True)
    """

    def __init__(self, dtype=None, gantry_tilt: str | None = None):
        super().__init__()
        self.dtype, self.gantry_tilt = dtype, gantry_tilt

    def verify_suffix(self, filename) -> bool:
        return not isinstance(filename, (list, tuple)) and is_volume_path(filename)

    def read(self, data, **kwargs) -> _Volume:
        if isinstance(data, (list, tuple)):
            if len(data) != 1:
                raise ValueError(f"VolumeReader reads one volume at a time, got {len(data)} paths")
            data = data[0]
        source = str(data)
        folder, uid = split_series_ref(source)
        if uid is not None or folder.is_dir():
            return _sitk_to_volume(read_dicom_series(source, self.gantry_tilt), source)
        path = Path(source)
        if not path.exists():
            raise DataError(path, _missing_reason(path))
        if path.stat().st_size == 0:
            raise DataError(path, "empty file (0 bytes)")
        suffix = volume_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in ITK_SUFFIXES:
            return _read_itk_file(path)
        raise DataError(path, f"unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder")

    def get_data(self, img: _Volume) -> tuple[np.ndarray, dict]:
        array = img.array if self.dtype is None else img.array.astype(self.dtype, copy=False)
        meta = {
            MetaKeys.AFFINE: img.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "filename_or_obj": img.source,
        }
        if img.note:
            meta[TILT_NOTE_KEY] = img.note
        return array, meta


def _nifti_header(path: Path):
    """The NIfTI-1/2 header of ``path`` (only the first bytes are read, also from a ``.nii.gz``)."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"not a valid NIfTI file: corrupt or truncated gzip data ({_reason(e)})") from e
    size = _nifti_header_size(raw)
    header_class = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if header_class is None or len(raw) < size:
        raise DataError(path, "not a valid NIfTI file (no NIfTI-1/2 header)")
    try:
        return header_class.from_fileobj(io.BytesIO(raw[:size]))
    except (nib.spatialimages.HeaderDataError, ValueError, EOFError) as e:
        raise DataError(path, f"not a valid NIfTI file (bad header: {_reason(e)})") from e


def _check_shape_3d(shape, source: str) -> None:
    _check_shape(shape, source)
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise DataError(source, f"is a 4D volume (shape {shape}); medvol expects one 3D volume per file: "
                        "split the time/channel axis into separate files")
    if len(shape) != 3:
        raise DataError(source, f"expected a 3D volume, got {len(shape)}D data of shape {shape}")


def check_volume(source: str | os.PathLike, full: bool = False, gantry_tilt: str | None = None) -> None:
    """Check that ``source`` is one usable 3D volume, without the cost of loading it (unless ``full``).

    Header level (default): the file or DICOM folder exists, is not empty, has a readable header of a 3D
    volume without a zero-size axis (NIfTI: the first bytes, also of a ``.nii.gz``; an uncompressed ``.nii``
    must hold the data its header announces; MetaImage/NRRD: ITK's header and a ``.mhd``'s data file; DICOM:
    every slice header, see :func:`medvol.io.check_dicom_series`). ``full=True`` reads the voxels as training
    would (gzip CRC, truncated data, decoding) and rejects non-finite voxels.

    Raises:
        DataError: naming the file and the problem.
    """
    source = str(source)
    if full:
        volume = VolumeReader(gantry_tilt=gantry_tilt).read(source)
        if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
            bad = int((~np.isfinite(volume.array)).sum())
            raise DataError(source, f"{bad} non-finite voxels (NaN/inf) of {volume.array.size}")
        return
    folder, uid = split_series_ref(source)
    if uid is not None or folder.is_dir():
        check_dicom_series(source, gantry_tilt)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(path, _missing_reason(path))
    size = path.stat().st_size
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        header = _nifti_header(path)
        shape = header.get_data_shape()
        _check_shape_3d(shape, source)
        needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
        if suffix == ".nii" and size < needed:
            raise DataError(path, f"truncated NIfTI file ({size} bytes, its header announces {needed})")
        return
    if suffix in ITK_SUFFIXES:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with _quiet_itk():
                reader.ReadImageInformation()
        except RuntimeError as e:
            raise DataError(path, f"cannot read {suffix} header ({_reason(e)})") from e
        if reader.GetNumberOfComponents() != 1:
            raise DataError(path, f"has {reader.GetNumberOfComponents()} components per voxel (RGB/vector)")
        _check_shape_3d(reader.GetSize(), source)
        if suffix == ".mhd":
            for line in path.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                value = value.strip()
                if key.strip() == "ElementDataFile" and value not in ("LOCAL", "LIST") and "%" not in value:
                    if not (path.parent / value).is_file():
                        raise DataError(path, f"its data file {value} is missing")
        return
    raise DataError(path, f"unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder")


class LoadVolume(Transform):
    """Load one volume (any format :class:`VolumeReader` reads) as a ``MetaTensor`` with RAS affine.

    MONAI's ``LoadImage`` would also work with the reader, but it instantiates every default reader on
    construction and wraps reader errors in a generic message; this transform keeps the
    :class:`~medvol.errors.DataError` that names the file.

    Args:
        dtype: voxel type of the output (``np.float32`` by default; ``None`` keeps the stored type).
        ensure_channel_first: return (1, X, Y, Z) instead of (X, Y, Z) (default True).
        gantry_tilt: gantry-tilted DICOM series: ``"resample"`` or ``"fail"`` (``None``: ``$MEDVOL_GANTRY_TILT``,
            else ``"resample"``).

    Example:
        >>> img = LoadVolume()("demo_data/ct/example_ct_sm.nii.gz")
        >>> img.shape, img.pixdim
        (torch.Size([1, 122, 101, 30]), tensor([3., 3., 3.], dtype=torch.float64))
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, dtype=np.float32, ensure_channel_first: bool = True, gantry_tilt: str | None = None):
        self.reader = VolumeReader(dtype=dtype, gantry_tilt=gantry_tilt)
        self.ensure_channel_first = ensure_channel_first

    def __call__(self, filename) -> MetaTensor:
        array, meta = self.reader.get_data(self.reader.read(filename))
        if self.ensure_channel_first:
            array = array[None]
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
        if array.dtype in _UNSIGNED_UPCAST:  # torch lacks most ops (flip, ...) for uint16/32/64
            array = array.astype(_UNSIGNED_UPCAST[array.dtype])
        meta[MetaKeys.AFFINE] = torch.as_tensor(meta[MetaKeys.AFFINE], dtype=torch.float64)
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), meta=meta)


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume`.

    Args:
        keys: keys holding paths (e.g. ``("image", "label")``).
        dtype: a type, or a sequence of types matching ``keys`` (e.g. ``(np.float32, None)`` keeps labels
            integer); ``None`` keeps the stored type.
        ensure_channel_first: add the channel axis (default True).
        allow_missing_keys: skip keys that are absent (e.g. unlabeled images).
        gantry_tilt: gantry-tilted DICOM series: ``"resample"`` or ``"fail"`` (``None``: ``$MEDVOL_GANTRY_TILT``,
            else ``"resample"``).
    """

    backend = LoadVolume.backend

    def __init__(self, keys, dtype=np.float32, ensure_channel_first: bool = True, allow_missing_keys: bool = False,
                 gantry_tilt: str | None = None):
        super().__init__(keys, allow_missing_keys)
        dtypes = tuple(dtype) if isinstance(dtype, (list, tuple)) else (dtype,) * len(self.keys)
        if len(dtypes) != len(self.keys):
            raise ValueError(f"dtype must be one type or one per key ({len(self.keys)}), got {len(dtypes)}")
        self.loaders = {k: LoadVolume(t, ensure_channel_first, gantry_tilt) for k, t in zip(self.keys, dtypes)}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loaders[key](d[key])
        return d
