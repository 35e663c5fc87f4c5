"""Input checks that turn silent garbage into a clear :class:`~medvol.errors.DataError` naming the file.

- :class:`EnsureFinite` / :class:`EnsureFinited`: NaN or infinite voxels raise (or are replaced when
  ``fill_value`` is given).
- :class:`RejectConstant` / :class:`RejectConstantd`: a volume whose voxels all have one value (an empty scan,
  a blank export) raises instead of being normalised into division-by-zero noise.
- :class:`CheckAlignedd`: an image and its label must share the voxel grid (shape and affine).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from medvol.errors import DataError

__all__ = ["source_of", "EnsureFinite", "EnsureFinited", "RejectConstant", "RejectConstantd", "CheckAlignedd"]


def source_of(img, default: str = "<array>") -> str:
    """The file a MetaTensor was loaded from (``filename_or_obj``), for error messages."""
    if isinstance(img, MetaTensor):
        return str(img.meta.get("filename_or_obj", default))
    return default


class EnsureFinite(Transform):
    """Raise on NaN/inf voxels, or replace them with ``fill_value``.

    Args:
        fill_value: ``None`` (default) raises :class:`DataError`; a number replaces non-finite voxels.

    Raises:
        DataError: when the volume has non-finite voxels and ``fill_value`` is None; names the file.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, fill_value: float | None = None):
        self.fill_value = fill_value

    def __call__(self, img):
        data = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if not data.is_floating_point():
            return img
        bad = ~torch.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return img
        if self.fill_value is None:
            n_nan = int(torch.isnan(data).sum())
            raise DataError(source_of(img), f"{n_bad} non-finite voxels ({n_nan} NaN, {n_bad - n_nan} inf) of "
                            f"{data.numel()}; fix the file or set fill_value")
        out = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
        out[bad.numpy() if isinstance(out, np.ndarray) else bad] = self.fill_value
        return out


class EnsureFinited(MapTransform):
    """Dictionary version of :class:`EnsureFinite`."""

    backend = EnsureFinite.backend

    def __init__(self, keys: KeysCollection, fill_value: float | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.check = EnsureFinite(fill_value)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.check(d[key])
        return d


class RejectConstant(Transform):
    """Raise when every voxel of the volume has the same value: there is nothing to learn from it.

    Raises:
        DataError: naming the file and the value (an empty or blank scan; or a mask listed as an image).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img):
        data = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if data.numel() and bool(data.amin() == data.amax()):
            raise DataError(source_of(img), f"constant volume (every voxel is {float(data.flatten()[0]):g}): an "
                            "empty or blank scan, nothing to learn from; remove it from the dataset")
        return img


class RejectConstantd(MapTransform):
    """Dictionary version of :class:`RejectConstant`."""

    backend = RejectConstant.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.check = RejectConstant()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.check(d[key])
        return d


class CheckAlignedd(MapTransform):
    """Check that each ``keys`` volume (e.g. the label) lies on the grid of ``reference_key`` (the image).

    Args:
        keys: volumes to check (missing ones are skipped, so unlabeled items pass).
        reference_key: the volume whose grid is the reference.
        atol: tolerance on affine entries in mm (default 1e-3 plus 0.1 % of the voxel size).

    Raises:
        DataError: naming both files, when spatial shape or affine differ.
    """

    def __init__(self, keys: KeysCollection = "label", reference_key: str = "image", atol: float = 1e-3):
        super().__init__(keys, allow_missing_keys=True)
        self.reference_key, self.atol = reference_key, atol

    def __call__(self, data):
        d = dict(data)
        ref = d[self.reference_key]
        for key in self.key_iterator(d):
            other = d[key]
            pair = f"{source_of(other)} does not match image {source_of(ref)}"
            if tuple(other.shape[1:]) != tuple(ref.shape[1:]):
                raise DataError(source_of(other), f"{key} {pair}: shape {tuple(other.shape[1:])} vs "
                                f"{tuple(ref.shape[1:])}")
            if isinstance(ref, MetaTensor) and isinstance(other, MetaTensor):
                a, b = ref.affine.double(), other.affine.double()
                tol = self.atol + 1e-3 * float(torch.linalg.norm(a[:3, :3], dim=0).max())
                if float((a - b).abs().max()) > tol:
                    raise DataError(source_of(other), f"{key} {pair}: affines differ by "
                                    f"{float((a - b).abs().max()):.4g} mm")
        return d
