"""CT and MRI preprocessing presets: MONAI ``Compose`` pipelines from file paths to training-ready volumes.

Both presets: load (any format :class:`~medvol.io.LoadVolumed` reads) -> reject NaN/inf and misaligned labels
-> [MRI: optional N4 on the native grid] -> orientation (RAS) -> resample to ``spacing`` (linear for images,
nearest for labels) -> intensity (CT: HU window to [0, 1]; MRI: per-volume percentiles to [0, 1]) ->
foreground crop -> centre pad/crop to ``size``. Labels follow every spatial step of the image.

Example:
    >>> from medvol.transforms import mri_preset
    >>> pre = mri_preset(spacing=(1.0, 1.0, 1.0), size=(48, 64, 48))  # then pre({"image": "case.nii.gz"})
    >>> import torch
    >>> from monai.data import MetaTensor
    >>> mri = MetaTensor(1000 * torch.rand(1, 40, 50, 40), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1])))
    >>> out = mri_preset(keys=("image",), spacing=(1.0, 1.0, 1.0), size=(48, 64, 48), load=False)({"image": mri})
    >>> out["image"].shape, float(out["image"].min()), float(out["image"].max())
    (torch.Size([1, 48, 64, 48]), 0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    CropForegroundd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from medvol.errors import ConfigError
from medvol.io.readers import LoadVolumed
from medvol.transforms.slices import slice_channels
from medvol.transforms.spacing import KeySafeSpacingd
from medvol.transforms.validation import CheckAlignedd, EnsureFinited, RejectConstantd

__all__ = ["ForegroundThreshold", "ct_preset", "mri_preset", "get_preset", "slice_preset", "PRESETS"]


class ForegroundThreshold:
    """``select_fn`` for ``CropForegroundd``: voxels above ``threshold`` are foreground (picklable)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


def _check_triplet(name: str, value):
    if value is None:
        return None
    value = tuple(value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"{name} must be three positive numbers (X Y Z), got {value}")
    return value


def _pipeline(keys, load, bias_correction, intensity, spacing, size, crop_foreground, foreground_threshold,
              margin, orientation) -> Compose:
    """load -> checks -> [bias correction] -> orientation -> spacing -> intensity -> crop -> pad/crop."""
    keys = list(keys)
    image_key, label_keys = keys[0], keys[1:]
    spacing, size = _check_triplet("spacing", spacing), _check_triplet("size", size)
    steps = []
    if load:
        dtypes = [np.float32] + [None] * len(label_keys)  # labels keep their integer type
        steps.append(LoadVolumed(keys, dtype=dtypes, allow_missing_keys=True))
    steps += [EnsureFinited(image_key), RejectConstantd(image_key)]
    if label_keys:
        steps.append(CheckAlignedd(label_keys, reference_key=image_key))
    steps += bias_correction(image_key)
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        modes = ["bilinear"] + ["nearest"] * len(label_keys)
        steps.append(KeySafeSpacingd(keys, pixdim=spacing, mode=modes, allow_missing_keys=True))
    steps += intensity(image_key)
    if crop_foreground:
        steps.append(CropForegroundd(keys, source_key=image_key, select_fn=ForegroundThreshold(foreground_threshold),
                                     margin=margin, allow_smaller=True, allow_missing_keys=True))
    if size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=size, mode="constant", allow_missing_keys=True))
    return Compose(steps)


def ct_preset(
    keys: Sequence[str] = ("image", "label"),
    window: tuple[float, float] = (-1000.0, 1000.0),
    spacing: Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    crop_foreground: bool = True,
    foreground_threshold: float = 0.05,
    margin: int = 0,
    orientation: str | None = "RAS",
    load: bool = True,
) -> Compose:
    """CT preset: HU window ``window`` mapped linearly to [0, 1] and clipped.

    Args:
        keys: image key first, then label keys (missing label keys are skipped).
        window: (lowest HU, highest HU) mapped to 0 and 1.
        spacing: target voxel size in mm (X, Y, Z); ``None`` keeps the native grid.
        size: output spatial size (centre pad/crop); ``None`` keeps the cropped size.
        crop_foreground: crop to the bounding box of voxels above ``foreground_threshold`` (after windowing).
        foreground_threshold: in [0, 1] units after windowing (0.05 = -900 HU for the default window).
        margin: voxels kept around the foreground box.
        orientation: axis codes to reorient to; ``None`` keeps the stored orientation.
        load: start from file paths (True) or from already loaded MetaTensors (False).

    Raises:
        ValueError: for a window with low >= high, or spacing/size that are not three positive numbers.
    """
    lo, hi = window
    if lo >= hi:
        raise ValueError(f"window must be (low, high) with low < high, got {window}")
    return _pipeline(
        keys, load, lambda key: [],
        lambda key: [ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)],
        spacing, size, crop_foreground, foreground_threshold, margin, orientation)


def mri_preset(
    keys: Sequence[str] = ("image", "label"),
    n4: bool = False,
    n4_kwargs: dict | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    spacing: Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    crop_foreground: bool = True,
    foreground_threshold: float = 0.05,
    margin: int = 0,
    orientation: str | None = "RAS",
    load: bool = True,
) -> Compose:
    """MRI preset: optional N4 bias correction, then per-volume percentile normalisation to [0, 1] (clipped).

    Args:
        keys: image key first, then label keys.
        n4: run :class:`~medvol.transforms.N4BiasFieldCorrectiond` on the native grid (before resampling).
        n4_kwargs: arguments for N4 (e.g. ``{"shrink_factor": 4}``).
        percentiles: (lower, upper) percentiles of the volume mapped to 0 and 1.
        spacing, size, crop_foreground, foreground_threshold, margin, orientation, load: as in :func:`ct_preset`.

    Raises:
        ValueError: for percentiles outside [0, 100] or not increasing; bad spacing/size.
    """
    lower, upper = percentiles
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {percentiles}")

    def bias_correction(key):
        if not n4:
            return []
        from medvol.transforms.n4 import N4BiasFieldCorrectiond

        return [N4BiasFieldCorrectiond(key, **(n4_kwargs or {}))]

    return _pipeline(
        keys, load, bias_correction,
        lambda key: [ScaleIntensityRangePercentilesd(key, lower=lower, upper=upper, b_min=0.0, b_max=1.0,
                                                     clip=True)],
        spacing, size, crop_foreground, foreground_threshold, margin, orientation)


PRESETS = {"ct": ct_preset, "mri": mri_preset}


def get_preset(name: str, **kwargs) -> Compose:
    """Build a preset by name (``"ct"`` or ``"mri"``); ``kwargs`` go to the preset function.

    Raises:
        ValueError: for an unknown name (the valid names are listed).
    """
    try:
        return PRESETS[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}") from None


def slice_preset(preset: str = "mri", keys: Sequence[str] = ("image", "label"), windows=None,
                       spacing: Sequence[float] | None = None, orientation: str = "RAS", **preset_kwargs) -> Compose:
    """Volume preprocessing before 2.5D slicing: load, check, orient (RAS), optionally resample, normalise.

    Without ``windows`` this is the CT or MRI preset without foreground crop or padding (CT: HU window to
    [0, 1]; MRI: per-volume percentiles to [0, 1]). With ``windows`` (CT only) intensities stay in HU, because
    the slicing transforms render each window as its own [0, 1] channel.

    Args:
        preset: ``"ct"`` or ``"mri"``.
        keys: image key first, then label keys (missing labels are skipped).
        windows: CT windows rendered later by the slicing transforms (``None``: the preset normalises).
        spacing: target voxel size (mm); ``None`` keeps the native grid (slice positions stay source slices).
        orientation: axis codes; the default RAS makes axis 2 the axial axis.
        preset_kwargs: more arguments of the preset (``window``, ``percentiles``, ``n4``, ...).

    Raises:
        ConfigError: for an unknown preset, or windows with the MRI preset.
    """
    name = str(preset).lower()
    if name not in ("ct", "mri"):
        raise ConfigError(f"preset must be 'ct' or 'mri', got {preset!r}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    if windows is None:
        try:
            return get_preset(name, keys=keys, spacing=spacing, crop_foreground=False, orientation=orientation,
                              **preset_kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"preset {name}: {e}") from None
    if name != "ct":
        raise ConfigError(f"windows are CT Hounsfield windows: use preset 'ct' or windows null (got preset {preset!r})")
    slice_channels(0, windows)  # validate
    image, labels = keys[0], keys[1:]
    steps = [LoadVolumed(keys, dtype=[np.float32] + [None] * len(labels), allow_missing_keys=True),
             EnsureFinited(image), RejectConstantd(image)]
    if labels:
        steps.append(CheckAlignedd(labels, reference_key=image))
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        steps.append(KeySafeSpacingd(keys, pixdim=spacing, mode=["bilinear"] + ["nearest"] * len(labels),
                              allow_missing_keys=True))
    return Compose(steps)
