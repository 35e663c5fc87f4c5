"""2.5D slice samples on real scans: windows, context channels, border replication, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Orientationd

from medvol.io import LoadVolume, LoadVolumed
from medvol.transforms.slices import CT_WINDOWS, VolumeToSlices, VolumeToSlicesd


@pytest.fixture(scope="module")
def ct(demo_dir):
    return LoadVolume()(demo_dir / "ct" / "example_ct_sm.nii.gz")  # (1, 122, 101, 30) HU


@pytest.fixture(scope="module")
def breast(demo_dir):
    keys = ["image", "label"]
    pre = Compose([LoadVolumed(keys), Orientationd(keys, axcodes="RAS", labels=None)])
    return pre({"image": str(demo_dir / "nrrd" / "breast1_image.nrrd"),
                "label": str(demo_dir / "nrrd" / "breast1_label.nrrd")})  # (1, 45, 120, 21), lesion on z 8..10


def _window(hu, lo, hi):
    return np.clip((np.asarray(hu, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def test_windows_and_context_channels_match_the_hu_volume(ct):
    hu = ct[0].numpy()
    windows = [(-160.0, 240.0), "lung"]
    stack, z = VolumeToSlices(context=1, windows=windows, spatial_size=None, return_index=True)(ct)
    assert stack.shape == (30, 6, 122, 101) and stack.dtype == torch.float32
    assert z.tolist() == list(range(30))
    lung = CT_WINDOWS["lung"]
    # a known voxel: channels = window-major, then slice offsets -1, 0, +1
    i, j, k = 61, 50, 12
    expected = [_window(hu[i, j, k + o], -160, 240) for o in (-1, 0, 1)]
    expected += [_window(hu[i, j, k + o], *lung) for o in (-1, 0, 1)]
    np.testing.assert_allclose(stack[k, :, i, j].numpy(), expected, atol=1e-6)
    # whole planes: channel 0 of slice k is the soft-tissue rendering of slice k - 1
    np.testing.assert_allclose(stack[k, 0].numpy(), _window(hu[:, :, k - 1], -160, 240), atol=1e-6)
    np.testing.assert_allclose(stack[k, 5].numpy(), _window(hu[:, :, k + 1], *lung), atol=1e-6)
    # border slices replicate: slice 0 has no slice -1, slice 29 no slice 30
    torch.testing.assert_close(stack[0, 0], stack[0, 1])
    torch.testing.assert_close(stack[29, 2], stack[29, 1])
    assert not torch.equal(stack[1, 0], stack[1, 1])


def test_raw_intensities_context_and_stride(ct):
    stack, z = VolumeToSlices(context=2, spatial_size=None, stride=4, return_index=True)(ct)
    assert z.tolist() == [0, 4, 8, 12, 16, 20, 24, 28] and stack.shape == (8, 5, 122, 101)
    for n, k in enumerate(z.tolist()):
        for c, o in enumerate(range(-2, 3)):
            np.testing.assert_array_equal(stack[n, c].numpy(), ct[0, :, :, min(max(k + o, 0), 29)].numpy())


def test_resize_keeps_aspect_by_padding_with_the_window_minimum(ct):
    same = VolumeToSlices(context=0, windows=["soft_tissue"], spatial_size=(122, 101))(ct)
    native = VolumeToSlices(context=0, windows=["soft_tissue"], spatial_size=None)(ct)
    torch.testing.assert_close(same, native)  # native size: no padding, no interpolation
    out = VolumeToSlices(context=0, windows=["soft_tissue"], spatial_size=(64, 64))(ct)
    assert out.shape == (30, 1, 64, 64)
    # 122 x 101 padded to 122 x 122 (10 columns before, 11 after), then resized: border columns are padding
    assert float(out[..., :4].abs().max()) == 0.0 and float(out[..., -4:].abs().max()) == 0.0
    assert float(out[..., 20:44].max()) > 0.9  # body inside
    stretched = VolumeToSlices(context=0, windows=["soft_tissue"], spatial_size=(64, 64), keep_aspect=False)(ct)
    assert not torch.equal(out, stretched)
    mid = stretched[15, 0].mean().item()
    assert abs(mid - native[15, 0].mean().item()) < 0.02  # bilinear resize keeps the mean level


def test_skip_empty_slices_and_axis(ct):
    vol = ct.clone()
    vol[..., :5] = -2000.0  # five empty (below air) slices
    z = VolumeToSlices(spatial_size=(32, 32), skip_empty_threshold=-1500.0, return_index=True)(vol)[1]
    assert z.tolist() == list(range(5, 30))
    sag = VolumeToSlices(axis=0, context=0, spatial_size=None)(ct)
    assert sag.shape == (122, 1, 101, 30)
    torch.testing.assert_close(sag[60, 0], ct[0, 60].float())


def test_dictionary_version_aligns_image_and_label(breast):
    out = VolumeToSlicesd(["image", "label"], context=0, spatial_size=(48, 48), mode=("bilinear", "nearest"))(breast)
    assert out["image"].shape == out["label"].shape == (21, 1, 48, 48)
    assert out["slice_index"].tolist() == list(range(21))
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}  # nearest keeps label values
    lesion_slices = torch.nonzero(out["label"].amax(dim=(1, 2, 3))).flatten().tolist()
    assert lesion_slices == [8, 9, 10]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="axis"):
        VolumeToSlices(axis=3)
    with pytest.raises(ValueError, match="unknown window"):
        VolumeToSlices(windows=["liver_typo"])
    with pytest.raises(ValueError, match="low < high"):
        VolumeToSlices(windows=[(100, -100)])
    with pytest.raises(ValueError, match="channel-first 3D"):
        VolumeToSlices()(torch.zeros(4, 4, 4))


def test_empty_slice_selection_gives_empty_stack():
    from medvol.transforms.slices import VolumeToSlices

    stack = VolumeToSlices(spatial_size=(16, 16), skip_empty_threshold=10.0)(torch.zeros(1, 8, 8, 6))
    assert stack.shape == (0, 3, 16, 16)
