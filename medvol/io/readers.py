"""Reading one 3D volume from NIfTI, MetaImage, NRRD or a DICOM series, as a MONAI ``MetaTensor``.

:class:`VolumeReader` is a MONAI ``ImageReader``: NIfTI goes through nibabel (MONAI's default semantics),
MetaImage/NRRD/DICOM through SimpleITK, and every affine is returned in RAS like MONAI's readers. Anything
that is not one readable 3D volume raises :class:`~medvol.errors.DataError` naming the file: empty files,
truncated or corrupt archives, a text file with a NIfTI name, 2D or 4D data.

:class:`LoadVolume` / :class:`LoadVolumed` turn a path into a channel-first ``MetaTensor`` with this reader.
"""

from __future__ import annotations

import gzip
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
from medvol.io.dicom import is_dicom_dir, read_dicom_series, split_series_ref

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "volume_suffix",
    "is_volume_path",
    "VolumeReader",
    "LoadVolume",
    "LoadVolumed",
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
    """What :meth:`VolumeReader.read` returns: the array (X, Y, Z), its RAS affine and its source."""

    def __init__(self, array: np.ndarray, affine: np.ndarray, source: str):
        self.array, self.affine, self.source = array, affine, source


def _squeeze_to_3d(array: np.ndarray, source: str) -> np.ndarray:
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


def _read_nifti(path: Path) -> _Volume:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        # nibabel streams .nii.gz without checking the gzip CRC, so a corrupted archive would load as garbage
        # voxels; decompressing here verifies it (and costs no extra pass)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, f"not a valid NIfTI file: corrupt or truncated gzip data ({_reason(e)})") from e
    header_size = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if header_size not in (348, 540):
        header_size = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else 0
    image_class = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(header_size)
    if image_class is None:
        raise DataError(path, "not a valid NIfTI file (no NIfTI-1/2 header)")
    try:
        img = image_class.from_bytes(raw)
        array = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError,
            ValueError) as e:
        raise DataError(path, f"truncated or corrupt NIfTI data ({_reason(e)})") from e
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
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X) for 3D, (T, Z, Y, X) for 4D
    array = np.ascontiguousarray(np.transpose(array, tuple(range(array.ndim))[::-1]))  # -> (X, Y, Z[, T])
    array = _squeeze_to_3d(array, source)
    return _Volume(array, _sitk_affine_ras(image), source)


def _read_itk_file(path: Path) -> _Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"cannot read {volume_suffix(path)} file ({_reason(e)})") from e
    return _sitk_to_volume(image, str(path))


def _reason(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class VolumeReader(ImageReader):
    """MONAI ``ImageReader`` for one 3D volume: NIfTI, MetaImage (.mha/.mhd), NRRD (.nrrd/.nhdr) or DICOM series.

    Args:
        dtype: cast the voxel array to this type; ``None`` keeps the stored type (labels stay integers).

    Example:
        >>> from monai.transforms import LoadImage
        >>> img = LoadImage(image_only=True, ensure_channel_first=True)(
        ...     "demo_data/nrrd/breast1_image.nrrd", reader=VolumeReader())
        >>> img.ndim, img.meta["filename_or_obj"].endswith("breast1_image.nrrd")
        (4, True)
    """

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype = dtype

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
            return _sitk_to_volume(read_dicom_series(source), source)
        path = Path(source)
        if not path.exists():
            raise DataError(path, "file not found")
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
        return array, meta


class LoadVolume(Transform):
    """Load one volume (any format :class:`VolumeReader` reads) as a ``MetaTensor`` with RAS affine.

    MONAI's ``LoadImage`` would also work with the reader, but it instantiates every default reader on
    construction and wraps reader errors in a generic message; this transform keeps the
    :class:`~medvol.errors.DataError` that names the file.

    Args:
        dtype: voxel type of the output (``np.float32`` by default; ``None`` keeps the stored type).
        ensure_channel_first: return (1, X, Y, Z) instead of (X, Y, Z) (default True).

    Example:
        >>> img = LoadVolume()("demo_data/ct/example_ct_sm.nii.gz")
        >>> img.shape, img.pixdim
        (torch.Size([1, 122, 101, 30]), tensor([3., 3., 3.], dtype=torch.float64))
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, dtype=np.float32, ensure_channel_first: bool = True):
        self.reader = VolumeReader(dtype=dtype)
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
    """

    backend = LoadVolume.backend

    def __init__(self, keys, dtype=np.float32, ensure_channel_first: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        dtypes = tuple(dtype) if isinstance(dtype, (list, tuple)) else (dtype,) * len(self.keys)
        if len(dtypes) != len(self.keys):
            raise ValueError(f"dtype must be one type or one per key ({len(self.keys)}), got {len(dtypes)}")
        self.loaders = {k: LoadVolume(t, ensure_channel_first) for k, t in zip(self.keys, dtypes)}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loaders[key](d[key])
        return d
