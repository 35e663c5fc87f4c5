"""N4 bias field correction on real MRI: synthetic gain fields are removed, metadata and masks are honoured."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from medvol.transforms.n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond

HIPPO = "hippocampus/imagesTr/hippocampus_004.nii.gz"  # (1, 36, 52, 38), 1 mm, float32
IXI = "ixi_t1/t1/IXI012-HH-1211_T1.nii.gz"  # (1, 120, 120, 90), 2 mm, uint8 with scl_slope


def _load(path) -> MetaTensor:
    return LoadImage(ensure_channel_first=True, dtype=None)(str(path))


def _gain_field(shape, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field: exp(a * (x + 0.8 y^2 - 0.5 z)) on [-1, 1]^3 (no z term in 2D)."""
    x, y, *z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(amplitude * (x + 0.8 * y**2 - 0.5 * (z[0] if z else 0.0)))


def _otsu(volume: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.T, dtype=np.float32))
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1, 200)).T > 0


def _cv(volume: np.ndarray, mask: np.ndarray) -> float:
    return float(volume[mask].std() / volume[mask].mean())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _check_removes_field(img: MetaTensor, amplitude: float, **kwargs) -> tuple[float, float, float, float]:
    """Correct img and img * field; return CV (biased, corrected), field recovery and output invariance."""
    x = img[0].numpy().astype(np.float64)
    field = _gain_field(x.shape, amplitude)
    biased = img.clone().float()
    biased[0] = torch.as_tensor(x * field, dtype=torch.float32)
    n4 = N4BiasFieldCorrection(num_threads=1, return_bias_field=True, **kwargs)
    out, bias = n4(biased)
    out_clean, bias_clean = n4(img)
    mask = _otsu(x * field)
    # N4 also removes the scan's own inhomogeneity: the recovered synthetic part is the ratio of both fields.
    recovered = np.log(bias[0].numpy())[mask] - np.log(bias_clean[0].numpy())[mask]
    return (
        _cv(x * field, mask),
        _cv(out[0].numpy(), mask),
        _corr(recovered, np.log(field)[mask]),
        _corr(out[0].numpy()[mask], out_clean[0].numpy()[mask]),
    )


@pytest.fixture(scope="module")
def hippo(demo_dir) -> MetaTensor:
    return _load(demo_dir / HIPPO)


@pytest.fixture(scope="module")
def ixi_half(shared_data) -> MetaTensor:
    """IXI T1 at half resolution (60x60x45, 4 mm): the whole head, fast enough for a test."""
    img = _load(shared_data / IXI)
    return img[:, ::2, ::2, ::2]


def test_removes_synthetic_field_demo(hippo):
    cv_biased, cv_out, field_corr, _ = _check_removes_field(hippo, 0.3, shrink_factor=2, num_iterations=(30,) * 3)
    assert cv_out < 0.85 * cv_biased, (cv_biased, cv_out)
    assert field_corr > 0.85


def test_removes_synthetic_and_real_field_ixi(ixi_half):
    cv_biased, cv_out, field_corr, out_corr = _check_removes_field(
        ixi_half, 0.6, shrink_factor=2, num_iterations=(50,) * 3
    )
    assert cv_out < 0.85 * cv_biased, (cv_biased, cv_out)
    assert field_corr > 0.95
    assert out_corr > 0.9  # corrected(img * field) ~ corrected(img)


def test_matches_simpleitk_pipeline_and_keeps_metadata(demo_dir, hippo):
    out, bias = N4BiasFieldCorrection(num_threads=1, return_bias_field=True)(hippo)
    for result in (out, bias):
        assert isinstance(result, MetaTensor) and result.dtype == torch.float32
        assert result.shape == hippo.shape
        torch.testing.assert_close(result.affine, hippo.affine)
        assert result.meta["filename_or_obj"] == hippo.meta["filename_or_obj"]
    # reference written straight from SimpleITK, on the image SimpleITK reads itself ((Z, Y, X) arrays)
    image = sitk.ReadImage(str(demo_dir / HIPPO), sitk.sitkFloat32)
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetNumberOfThreads(1)
    n4.SetMaximumNumberOfIterations([50] * 4)
    n4.Execute(sitk.Shrink(image, [4] * 3), sitk.Shrink(mask, [4] * 3))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).T
    np.testing.assert_allclose(np.log(bias[0].numpy()), log_bias, atol=1e-4)
    np.testing.assert_allclose(out[0].numpy(), sitk.GetArrayFromImage(image).T / np.exp(log_bias), rtol=1e-4)


def test_array_types_channels_and_reproducibility(hippo):
    x = hippo[0].numpy()
    n4 = N4BiasFieldCorrection(num_iterations=(20,) * 3, num_threads=2)
    single = n4(x[None]).copy()
    assert isinstance(single, np.ndarray) and single.dtype == np.float32
    np.testing.assert_array_equal(n4(x[None]), single)  # pinned threads: same result twice
    # channels are corrected independently, each with its own Otsu mask
    two = n4(torch.as_tensor(np.stack([x * _gain_field(x.shape, 0.3), x])))
    assert type(two) is torch.Tensor and two.shape == (2, *x.shape)
    np.testing.assert_allclose(two[1].numpy(), single[0], rtol=1e-5)
    assert not np.allclose(two[0].numpy(), single[0], rtol=1e-2)
    # integer input
    as_int = n4(np.round(x[None]).astype(np.int16))
    assert as_int.dtype == np.float32 and np.isfinite(as_int).all()
    # one 2D slice (C, X, Y)
    biased_slice = x[:, :, 19] * _gain_field(x.shape[:2], 0.4)
    out_2d = N4BiasFieldCorrection(shrink_factor=2, num_iterations=(20,) * 3, num_threads=1)(biased_slice[None])
    mask_2d = _otsu(biased_slice)
    assert out_2d.shape == (1, *x.shape[:2])
    assert _cv(out_2d[0], mask_2d) < 0.85 * _cv(biased_slice, mask_2d)


def test_spacing_from_affine_or_argument(hippo):
    img = MetaTensor(hippo.as_tensor(), affine=torch.diag(torch.tensor([2.0, 3.0, 0.5, 1.0])))
    assert N4BiasFieldCorrection()._spacing(img, 3) == (2.0, 3.0, 0.5)
    assert N4BiasFieldCorrection()._spacing(img.numpy(), 3) == (1.0, 1.0, 1.0)
    assert N4BiasFieldCorrection(spacing=1.5)._spacing(img, 3) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="spacing must have 1 or 3 entries"):
        N4BiasFieldCorrection(spacing=(1.0, 2.0))(img)


def test_dict_user_mask_and_bias_field(hippo):
    x = hippo[0].numpy()
    box = np.zeros_like(x, dtype=np.uint8)
    box[:, :26] = 1  # one half of the crop
    mask = MetaTensor(torch.as_tensor((box * (x > 0))[None]), affine=hippo.affine)
    t = N4BiasFieldCorrectiond("image", mask_key="brain", num_threads=1, return_bias_field=True)
    out = t({"image": hippo, "brain": mask})
    assert set(out) == {"image", "brain", "image_bias_field"}
    corrected, bias = out["image"], out["image_bias_field"]
    assert isinstance(bias, MetaTensor) and bias.shape == hippo.shape
    torch.testing.assert_close(bias.affine, hippo.affine)
    torch.testing.assert_close(corrected * bias, hippo.float(), rtol=1e-4, atol=1e-3)  # positive: no shift
    # same as the array transform with that mask, different from the Otsu fit
    array_out = N4BiasFieldCorrection(num_threads=1)(hippo, mask)
    torch.testing.assert_close(corrected, array_out)
    otsu_bias = N4BiasFieldCorrection(num_threads=1, return_bias_field=True)(hippo)[1]
    assert (bias - otsu_bias).abs().max() > 0.05
    # missing keys
    t = N4BiasFieldCorrectiond(["image", "other"], num_threads=1, allow_missing_keys=True)
    assert set(t({"image": hippo})) == {"image"}


def test_non_positive_intensities_are_shifted(demo_dir, hippo):
    x = hippo[0].numpy().astype(np.float64) * _gain_field(hippo.shape[1:], 0.3)
    whole = np.ones((1, *x.shape))  # the mask holds the zero background, so the minimum in it is <= 0
    n4 = N4BiasFieldCorrection(num_iterations=(20,) * 3, num_threads=1)
    ref = n4(x[None], whole)
    shifted = n4(x[None] - 100.0, whole)  # same in-mask range: the same fit, the output shifted back
    np.testing.assert_allclose(shifted + 100.0, ref, atol=0.05)
    assert _cv(ref[0], _otsu(x)) < 0.85 * _cv(x, _otsu(x))
    ct = _load(demo_dir / "ct/example_ct_sm.nii.gz")  # int16 HU, negative inside the body
    out = N4BiasFieldCorrection(num_threads=1)(ct)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_shrink_factor_1_close_to_4(ixi_half):
    kwargs = {"num_iterations": (10, 10, 10), "num_threads": 1, "return_bias_field": True}
    full, bias_full = N4BiasFieldCorrection(shrink_factor=1, **kwargs)(ixi_half)
    fast, bias_fast = N4BiasFieldCorrection(shrink_factor=4, **kwargs)(ixi_half)
    mask = _otsu(ixi_half[0].numpy())
    assert _corr(full[0].numpy()[mask], fast[0].numpy()[mask]) > 0.99
    assert _corr(np.log(bias_full[0].numpy())[mask], np.log(bias_fast[0].numpy())[mask]) > 0.9


def test_errors(hippo):
    x = hippo[:, :16, :16, :16].numpy()
    n4 = N4BiasFieldCorrection(num_iterations=(5,))
    nan = x.copy()
    nan[0, 3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        n4(nan)
    with pytest.raises(ValueError, match="mask of channel 0 is empty"):
        n4(x, np.zeros_like(x))
    with pytest.raises(ValueError, match="Otsu mask of channel 0 is empty"):
        n4(np.full_like(x, 7.0))
    corner = np.zeros_like(x)
    corner[0, 0, 0, 0] = 1
    with pytest.raises(ValueError, match="empty after shrinking by shrink_factor=4"):
        n4(x, corner)
    with pytest.raises(ValueError, match="mask must have shape"):
        n4(x, np.ones((1, 16, 16, 15)))
    with pytest.raises(ValueError, match="channel-first"):
        n4(x[0, 0])
    with pytest.raises(ValueError, match="shrink_factor"):
        N4BiasFieldCorrection(shrink_factor=0)
    with pytest.raises(ValueError, match="num_control_points must be > spline_order=3"):
        N4BiasFieldCorrection(num_control_points=3)
    with pytest.raises(ValueError, match="num_iterations"):
        N4BiasFieldCorrection(num_iterations=())
    with pytest.raises(ValueError, match="bias_field_key"):
        N4BiasFieldCorrectiond(["a", "b"], return_bias_field=True, bias_field_key="bias")
