"""Augmentation recipes for self-supervised views, composed from MONAI transforms.

Each factory returns a ``Compose`` (or ``OneOf``), so it nests in a config's transform list.

- :func:`intensity_augmentation`: the 3D analogue of ColorJitter + blur (scale/shift intensity, gamma,
  Gaussian smoothing and noise), drawn independently for each view.
- :func:`flip_augmentation`: random flips (left-right only by default: anatomy is not symmetric otherwise).
- CAiD's and Models Genesis' context distortions: :mod:`medvol.transforms.distortion`.
- :func:`lecl_view_augmentation`: CLEAR / MoCo v3's asymmetric 2D view augmentation of LeCL's slice views.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    EnsureTyped,
    Identityd,
    OneOf,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

from medvol.transforms.intensity import RandSolarized

__all__ = ["intensity_augmentation", "flip_augmentation", "lecl_view_augmentation"]


def intensity_augmentation(key: str, prob: float = 0.8, strength: float = 0.4, blur_prob: float = 0.5,
                           noise_prob: float = 0.2) -> Compose:
    """Random intensity changes of one view (for images normalised to [0, 1]).

    Args:
        key: the view to augment (call once per view so each view gets its own draw).
        prob: probability of each of scale, shift and gamma (ColorJitter's 0.8).
        strength: relative size of scale/shift (ColorJitter brightness/contrast 0.4).
        blur_prob: probability of Gaussian smoothing (sigma 0.5-1.5 voxels).
        noise_prob: probability of additive Gaussian noise (std 0.05).
    """
    return Compose([
        RandScaleIntensityd(key, factors=strength, prob=prob),
        RandShiftIntensityd(key, offsets=strength / 4, prob=prob),
        RandAdjustContrastd(key, gamma=(1 - strength, 1 + strength), prob=prob),
        RandGaussianSmoothd(key, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5), prob=blur_prob),
        RandGaussianNoised(key, std=0.05, prob=noise_prob),
    ])


def flip_augmentation(keys, prob: float = 0.5, spatial_axes=(0,)) -> Compose:
    """Independent random flips along each of ``spatial_axes``, applied identically to ``keys``.

    The default flips only the first (left-right in RAS) axis: mirrored hemispheres are plausible anatomy,
    while flipping anterior-posterior or superior-inferior would make features invariant to exactly the
    orientation a segmentation of anterior/posterior structures needs. Pass ``(0, 1, 2)`` for all axes.
    """
    return Compose([RandFlipd(keys, prob=prob, spatial_axis=axis) for axis in spatial_axes])


def lecl_view_augmentation(keys: Sequence[str] = ("image_v1", "image_v2"), asymmetric: bool = True,
                           brightness: float = 0.4, contrast: float = 0.4, jitter_prob: float = 0.8,
                           blur_sigma: tuple[float, float] = (0.1, 2.0), solarize_threshold: float = 0.5,
                           flip_axis: int = 0, clip: tuple[float, float] | None = (0.0, 1.0)) -> Compose:
    """CLEAR / MoCo v3 2D view augmentation, each view with its own random draws.

    Per view: flip along ``flip_axis`` (p 0.5; 0 = the first in-plane axis, left-right on RAS axial slices),
    with probability ``jitter_prob`` brightness ``v * U(1 - b, 1 + b)`` then contrast around the image mean
    ``(v - m) * U(1 - c, 1 + c) + m`` (torchvision's ColorJitter; saturation/hue/grayscale do not apply to
    intensity channels), clip to ``clip``, Gaussian blur (sigma per axis in ``blur_sigma`` pixels), solarize.
    ``asymmetric`` (BYOL / MoCo v3): view 1 blur p 1.0, view 2 blur p 0.1 and solarize p 0.2; otherwise
    (MoCo v2) blur p 0.5 and no solarize for every view. Views come out as plain tensors.

    Args:
        keys: the view keys (exactly two when ``asymmetric``).
        clip: intensity range after jitter (windowed CT is in [0, 1]); ``None`` does not clip.

    Raises:
        ValueError: for ``asymmetric`` with a number of keys other than two, or probabilities outside [0, 1].
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if asymmetric and len(keys) != 2:
        raise ValueError(f"asymmetric augmentation needs exactly two view keys, got {keys!r}.")
    if not 0.0 <= jitter_prob <= 1.0:
        raise ValueError(f"jitter_prob must be in [0, 1], got {jitter_prob!r}.")
    steps = []
    for i, key in enumerate(keys):
        blur_p, solarize_p = ((1.0, 0.0), (0.1, 0.2))[i] if asymmetric else (0.5, 0.0)
        jitter = Compose([RandScaleIntensityd(key, factors=brightness, prob=1.0),
                          RandScaleIntensityFixedMeand(key, factors=contrast, fixed_mean=True, prob=1.0)])
        steps += [RandFlipd(key, prob=0.5, spatial_axis=flip_axis),
                  OneOf([jitter, Identityd(key)], weights=[jitter_prob, 1.0 - jitter_prob])]
        if clip is not None:
            steps.append(ScaleIntensityRanged(key, a_min=clip[0], a_max=clip[1], b_min=clip[0], b_max=clip[1],
                                              clip=True))
        steps += [RandGaussianSmoothd(key, sigma_x=blur_sigma, sigma_y=blur_sigma, prob=blur_p),
                  RandSolarized(key, prob=solarize_p, threshold=solarize_threshold,
                                max_value=1.0 if clip is None else clip[1] + clip[0])]
    steps.append(EnsureTyped(keys, data_type="tensor", track_meta=False))
    return Compose(steps)
