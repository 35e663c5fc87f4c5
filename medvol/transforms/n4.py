"""N4 bias field correction as MONAI transforms, on SimpleITK's ``N4BiasFieldCorrectionImageFilter``.

N4 (Tustison et al., "N4ITK: Improved N3 Bias Correction", IEEE TMI 29(6):1310-1320, 2010) models the
slowly varying MRI gain field as a B-spline in log space. The field is fitted on an image shrunk by
``shrink_factor`` (fast), then evaluated on the full-resolution grid, and the image is divided by it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type, ensure_tuple

__all__ = ["N4BiasFieldCorrection", "N4BiasFieldCorrectiond"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _to_sitk(array: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """(X, Y[, Z]) array -> SimpleITK image of size (X, Y[, Z]); GetImageFromArray wants (Z, Y, X) order."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing([float(s) for s in spacing])
    return image


def _from_sitk(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).T  # (Z, Y, X) -> (X, Y, Z)


class N4BiasFieldCorrection(Transform):
    """Remove the multiplicative bias (gain) field of a channel-first image with N4, channel by channel.

    The fit runs on the image and mask shrunk by ``shrink_factor``; the log bias field is then evaluated at
    full resolution and the output is ``image / exp(log_bias)``. The SimpleITK image gets the voxel spacing
    of the MetaTensor affine; origin and direction keep SimpleITK's defaults. The B-spline lattice spans the
    image with a fixed number of control points per axis, so neither changes the fit more than slightly.

    Non-positive intensities: N4 works on ``log(intensity)``; SimpleITK raises no error for voxels <= 0
    but cannot use them (the fit degrades silently). When the minimum inside the mask is <= 0 (e.g. CT in
    HU), the channel is shifted by ``c`` so that this minimum becomes 1% of the in-mask intensity range (1 if
    the range is 0), the field ``b`` is fitted to ``x + c``, and the output is ``(x + c) / b - c``.
    Otherwise ``c = 0`` and the output is ``x / b``.

    Args:
        shrink_factor: integer down-sampling of every spatial axis for the fit; 1 fits at full resolution.
        num_iterations: maximum iterations per fitting level; its length is the number of levels (the
            control-point lattice doubles at each level).
        convergence_threshold: stop a level when the change of the field falls below this value.
        spline_order: B-spline order of the field.
        num_control_points: control points per spatial axis at the first level (int or one per axis);
            must be greater than ``spline_order``.
        num_threads: threads of the N4 filter; None uses SimpleITK's global default. Pin it for
            reproducible timings and results.
        spacing: voxel spacing handed to SimpleITK (float or one per axis); None takes it from the
            MetaTensor affine, or 1 for plain arrays/tensors.
        return_bias_field: also return the bias field ``exp(log_bias)`` (same shape and type as the image).

    Example:
        >>> import torch
        >>> from monai.data import MetaTensor
        >>> gain = torch.linspace(0.5, 1.5, 32).reshape(1, 32, 1, 1)  # a smooth bias along the first axis
        >>> img = MetaTensor(100.0 * gain * torch.ones(1, 32, 32, 32), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
        >>> corrected, bias = N4BiasFieldCorrection(num_threads=1, return_bias_field=True)(img)
        >>> corrected.affine is not None, corrected.dtype, bias.shape
        (True, torch.float32, torch.Size([1, 32, 32, 32]))
        >>> bool(corrected.std() / corrected.mean() < img.std() / img.mean())  # flatter than the input
        True
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        shrink_factor: int = 4,
        num_iterations: Sequence[int] | int = (50, 50, 50, 50),
        convergence_threshold: float = 0.001,
        spline_order: int = 3,
        num_control_points: Sequence[int] | int = 4,
        num_threads: int | None = None,
        spacing: Sequence[float] | float | None = None,
        return_bias_field: bool = False,
    ) -> None:
        self.shrink_factor = _positive_int("shrink_factor", shrink_factor)
        iterations = ensure_tuple(num_iterations)
        if not iterations:
            raise ValueError("num_iterations must have one entry per fitting level, got an empty sequence.")
        self.num_iterations = tuple(_positive_int("num_iterations", i) for i in iterations)
        if not float(convergence_threshold) >= 0:
            raise ValueError(f"convergence_threshold must be >= 0, got {convergence_threshold!r}.")
        self.convergence_threshold = float(convergence_threshold)
        self.spline_order = _positive_int("spline_order", spline_order)
        self.num_control_points = tuple(
            _positive_int("num_control_points", n) for n in ensure_tuple(num_control_points)
        )
        if min(self.num_control_points) <= self.spline_order:
            raise ValueError(
                f"num_control_points must be > spline_order={self.spline_order}, got {num_control_points!r}."
            )
        self.num_threads = None if num_threads is None else _positive_int("num_threads", num_threads)
        if spacing is not None and min(ensure_tuple(spacing)) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing!r}.")
        self.spacing = spacing
        self.return_bias_field = return_bias_field

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None
    ) -> NdarrayOrTensor | tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Correct ``img`` (C, X, Y[, Z]).

        Args:
            img: channel-first image, float or integer; a MetaTensor keeps its metadata.
            mask: voxels used for the fit, (1 or C, X, Y[, Z]), non-zero = inside; None computes an Otsu
                mask per channel (``sitk.OtsuThreshold(image, 0, 1, 200)``).

        Returns:
            The corrected image (same type as ``img``, float32), and the bias field if ``return_bias_field``.

        Raises:
            ValueError: wrong dimensionality, NaN/inf voxels, mask of the wrong shape, or an empty mask.
        """
        x = convert_data_type(img, np.ndarray, dtype=np.float64)[0]
        if x.ndim not in (3, 4):
            raise ValueError(f"img must be channel-first with 2 or 3 spatial dims (C, X, Y[, Z]), got {x.shape}.")
        if not np.isfinite(x).all():
            raise ValueError("img contains NaN or infinite values; N4 needs finite intensities.")
        spatial = x.shape[1:]
        masks = None
        if mask is not None:
            masks = convert_data_type(mask, np.ndarray)[0] != 0
            if masks.shape[1:] != spatial or masks.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"mask must have shape (1 or {x.shape[0]}, *{spatial}), got {masks.shape}.")
        spacing = self._spacing(img, len(spatial))
        control_points = self.num_control_points
        control_points = control_points * len(spatial) if len(control_points) == 1 else control_points
        if len(control_points) != len(spatial):
            raise ValueError(f"num_control_points must have 1 or {len(spatial)} entries, got {control_points}.")
        corrected, bias = np.empty_like(x), np.empty_like(x)
        for c in range(x.shape[0]):
            m = None if masks is None else masks[min(c, masks.shape[0] - 1)]
            corrected[c], bias[c] = self._correct_channel(x[c], m, spacing, control_points, c)
        out = convert_to_dst_type(corrected, dst=img, dtype=np.float32)[0]
        if not self.return_bias_field:
            return out
        return out, convert_to_dst_type(bias, dst=img, dtype=np.float32)[0]

    def _spacing(self, img: NdarrayOrTensor, ndim: int) -> tuple[float, ...]:
        if self.spacing is not None:
            spacing = ensure_tuple(self.spacing)
            spacing = spacing * ndim if len(spacing) == 1 else spacing
            if len(spacing) != ndim:
                raise ValueError(f"spacing must have 1 or {ndim} entries, got {self.spacing!r}.")
            return tuple(float(s) for s in spacing)
        if isinstance(img, MetaTensor):
            return tuple(float(s) for s in affine_to_spacing(img.affine, r=ndim))
        return (1.0,) * ndim

    def _correct_channel(self, x, mask, spacing, control_points, channel):
        """One channel: (X, Y[, Z]) float64 -> (corrected, bias field)."""
        image = _to_sitk(x.astype(np.float32), spacing)
        what = "mask" if mask is not None else "the Otsu mask"
        if mask is None:
            mask = _from_sitk(sitk.OtsuThreshold(image, 0, 1, 200)) != 0
        if not mask.any():
            raise ValueError(f"{what} of channel {channel} is empty: N4 needs voxels to fit the bias field.")
        lo, hi = float(x[mask].min()), float(x[mask].max())
        offset = 0.0 if lo > 0 else (0.01 * (hi - lo) if hi > lo else 1.0) - lo
        fit_image = image if offset == 0 else _to_sitk((x + offset).astype(np.float32), spacing)
        mask_image = _to_sitk(mask.astype(np.uint8), spacing)
        if self.shrink_factor > 1:
            factors = [self.shrink_factor] * x.ndim
            small, small_mask = sitk.Shrink(fit_image, factors), sitk.Shrink(mask_image, factors)
            if not sitk.GetArrayViewFromImage(small_mask).any():
                raise ValueError(
                    f"mask of channel {channel} is empty after shrinking by shrink_factor={self.shrink_factor}; "
                    "use a smaller shrink_factor or a larger mask."
                )
        else:
            small, small_mask = fit_image, mask_image
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations(list(self.num_iterations))  # length = number of fitting levels
        n4.SetConvergenceThreshold(self.convergence_threshold)
        n4.SetSplineOrder(self.spline_order)
        n4.SetNumberOfControlPoints(list(control_points))
        if self.num_threads is not None:
            n4.SetNumberOfThreads(self.num_threads)
        n4.Execute(small, small_mask)
        bias = np.exp(_from_sitk(n4.GetLogBiasFieldAsImage(fit_image)).astype(np.float64))
        return (x + offset) / bias - offset, bias


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary version of :class:`N4BiasFieldCorrection`.

    Args:
        keys: keys of the images to correct.
        mask_key: key of a mask (1 or C channels, non-zero = inside) used for every key; None uses an Otsu mask.
        shrink_factor: see :class:`N4BiasFieldCorrection`.
        num_iterations: see :class:`N4BiasFieldCorrection`.
        convergence_threshold: see :class:`N4BiasFieldCorrection`.
        spline_order: see :class:`N4BiasFieldCorrection`.
        num_control_points: see :class:`N4BiasFieldCorrection`.
        num_threads: see :class:`N4BiasFieldCorrection`.
        spacing: see :class:`N4BiasFieldCorrection`.
        return_bias_field: also store the bias field (same type and metadata as the image).
        bias_field_key: where the bias field goes, formatted with ``key`` (default ``"{key}_bias_field"``).
        allow_missing_keys: don't raise if a key is missing.

    Example:
        >>> import torch
        >>> from monai.data import MetaTensor
        >>> img = MetaTensor(torch.linspace(50.0, 150.0, 32).reshape(1, 32, 1, 1).expand(1, 32, 32, 32))
        >>> t = N4BiasFieldCorrectiond("image", mask_key="brain", num_threads=1, return_bias_field=True)
        >>> out = t({"image": img, "brain": img > 60})
        >>> sorted(out)
        ['brain', 'image', 'image_bias_field']
    """

    backend = N4BiasFieldCorrection.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: Hashable | None = None,
        shrink_factor: int = 4,
        num_iterations: Sequence[int] | int = (50, 50, 50, 50),
        convergence_threshold: float = 0.001,
        spline_order: int = 3,
        num_control_points: Sequence[int] | int = 4,
        num_threads: int | None = None,
        spacing: Sequence[float] | float | None = None,
        return_bias_field: bool = False,
        bias_field_key: str = "{key}_bias_field",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.bias_field_key = bias_field_key
        if return_bias_field and len({bias_field_key.format(key=k) for k in self.keys}) < len(self.keys):
            raise ValueError(f"bias_field_key={bias_field_key!r} must contain '{{key}}' when several keys are given.")
        self.n4 = N4BiasFieldCorrection(
            shrink_factor, num_iterations, convergence_threshold, spline_order, num_control_points,
            num_threads, spacing, return_bias_field,
        )  # fmt: skip

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = None if self.mask_key is None else d[self.mask_key]
        for key in self.key_iterator(d):
            result = self.n4(d[key], mask)
            if self.n4.return_bias_field:
                d[key], d[self.bias_field_key.format(key=key)] = result
            else:
                d[key] = result
        return d
