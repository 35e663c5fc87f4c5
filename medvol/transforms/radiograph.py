"""2D radiographs (PNG / JPEG / ...) as one-channel float images, and the image side of image-report pairs.

:class:`LoadRadiographd` reads an image file with Pillow as grayscale (RGB renderings are converted with
ITU-R 601 luma), scales it to [0, 1] and gives ``(1, H, W)`` (row = first spatial axis, as displayed), with
``meta["filename_or_obj"]`` set. An unreadable file is a :class:`~medvol.errors.DataError` naming it.
:func:`radiograph_preprocessing` resizes to a square ``size`` (aspect kept by padding, as LoVT's resize +
centre crop keeps the whole chest); :func:`radiograph_augmentation` is the training-time random part
(small affine, contrast), without flips: left and right matter in reports.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    Resized,
    ResizeWithPadOrCropd,
)

from medvol.errors import DataError

__all__ = ["LoadRadiograph", "LoadRadiographd", "radiograph_preprocessing", "radiograph_augmentation"]


class LoadRadiograph:
    """Path -> ``MetaTensor`` (1, H, W) float32 in [0, 1] (grayscale; 16-bit PNGs keep their range)."""

    def __call__(self, path) -> MetaTensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                    arr = np.asarray(img, dtype=np.float32)
                    peak = 65535.0 if arr.max() > 255 else 255.0
                else:
                    arr = np.asarray(img.convert("L"), dtype=np.float32)
                    peak = 255.0
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(path, f"cannot be read as an image ({e})") from e
        if arr.ndim != 2 or min(arr.shape) < 2:
            raise DataError(path, f"expected a 2D image, got shape {arr.shape}")
        t = torch.from_numpy(arr / peak)[None]
        return MetaTensor(t, meta={"filename_or_obj": str(path), "spatial_shape": tuple(arr.shape)})


class LoadRadiographd(MapTransform):
    """Dictionary version of :class:`LoadRadiograph`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadRadiograph()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def radiograph_preprocessing(keys: KeysCollection = "image", size: int = 128) -> Compose:
    """Load, resize the longer side to ``size`` and pad to ``size`` x ``size`` (deterministic part)."""
    return Compose([
        LoadRadiographd(keys),
        Resized(keys, spatial_size=size, size_mode="longest", mode="area"),
        ResizeWithPadOrCropd(keys, spatial_size=(size, size)),
    ])


def radiograph_augmentation(keys: KeysCollection = "image", rotate_deg: float = 10.0,
                            scale: float = 0.1, translate: float = 0.05, size: int = 128) -> list:
    """Random affine (rotation, scale, translation) and contrast, no flips (training-time random part)."""
    return [
        RandAffined(keys, prob=0.8, rotate_range=np.deg2rad(rotate_deg), scale_range=(scale, scale),
                    translate_range=(translate * size, translate * size), padding_mode="zeros"),
        RandAdjustContrastd(keys, prob=0.5, gamma=(0.8, 1.25)),
    ]
