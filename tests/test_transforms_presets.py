"""CT/MRI presets on real scans: orientation, resampling, intensity, crop/pad, labels following images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Spacingd

from medvol.errors import DataError, find_error
from medvol.io import LoadVolume
from medvol.transforms import CheckAlignedd, EnsureFinite, ct_preset, get_preset, mri_preset

HIPPO_IMG = "hippocampus/imagesTr/hippocampus_004.nii.gz"
HIPPO_LAB = "hippocampus/labelsTr/hippocampus_004.nii.gz"


def test_ct_window_maps_hu_to_unit_range(demo_dir):
    path = demo_dir / "ct" / "example_ct_sm.nii.gz"
    hu = LoadVolume()(path)
    out = ct_preset(crop_foreground=False, orientation=None)({"image": str(path)})["image"]
    expected = np.clip((hu.numpy() + 1000.0) / 2000.0, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    narrow = ct_preset(window=(-160, 240), crop_foreground=False, orientation=None)({"image": str(path)})["image"]
    assert float(narrow.min()) == 0.0 and float(narrow.max()) == 1.0
    assert float((narrow == 0).float().mean()) > float((out == 0).float().mean())  # more voxels clipped


def test_ct_resampling_and_crop(demo_dir):
    data = {"image": str(demo_dir / "ct" / "example_ct.nii.gz")}
    full = ct_preset(spacing=(6.0, 6.0, 6.0), crop_foreground=False)(data)["image"]
    out = ct_preset(spacing=(6.0, 6.0, 6.0))(data)["image"]
    np.testing.assert_allclose(out.pixdim.numpy(), [6, 6, 6], atol=1e-5)
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    assert full.shape[1:] == (62, 51, 57)  # 122x101x112 voxels at 3 mm resampled to 6 mm
    assert out.shape[1:] != full.shape[1:] and all(o <= f for o, f in zip(out.shape[1:], full.shape[1:]))
    for axis in (1, 2, 3):  # the crop is tight: both end planes of every axis touch the body (> -900 HU)
        assert float(out.select(axis, 0).max()) > 0.05 and float(out.select(axis, -1).max()) > 0.05


def test_mri_labels_follow_images(demo_dir):
    data = {"image": str(demo_dir / HIPPO_IMG), "label": str(demo_dir / HIPPO_LAB)}
    raw_label = np.asarray(nib.load(data["label"]).dataobj)
    out = mri_preset(size=(48, 64, 48), crop_foreground=False)(data)
    img, lab = out["image"], out["label"]
    assert img.shape == lab.shape == (1, 48, 64, 48)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    torch.testing.assert_close(img.affine, lab.affine)
    # pure pad (no resampling): every label voxel is still there, at the same world position
    assert int((lab > 0).sum()) == int((raw_label > 0).sum())
    assert set(torch.unique(lab).tolist()) == {0.0, 1.0, 2.0}
    world = nib.load(data["label"]).affine @ np.r_[np.argwhere(raw_label == 2)[0], 1.0]
    idx = np.rint(np.linalg.inv(lab.affine.numpy()) @ world)[:3].astype(int)
    assert float(lab[0, idx[0], idx[1], idx[2]]) == 2.0


def test_mri_resampling_uses_nearest_for_labels(demo_dir):
    data = {"image": str(demo_dir / HIPPO_IMG), "label": str(demo_dir / HIPPO_LAB)}
    out = mri_preset(spacing=(0.7, 0.7, 0.7))(data)
    np.testing.assert_allclose(out["label"].pixdim.numpy(), [0.7, 0.7, 0.7], atol=1e-5)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}  # no interpolated label values
    assert len(torch.unique(out["image"])) > 100  # images are interpolated linearly
    raw = np.asarray(nib.load(data["label"]).dataobj)
    ratio = float((out["label"] > 0).sum()) * 0.7**3 / float((raw > 0).sum())
    assert 0.9 < ratio < 1.1  # structure volume preserved


def test_mri_percentiles_per_volume(demo_dir):
    out = mri_preset(percentiles=(1, 99), crop_foreground=False)({"image": str(demo_dir / HIPPO_IMG)})["image"]
    raw = LoadVolume()(demo_dir / HIPPO_IMG).numpy()
    lo, hi = np.percentile(raw, [1, 99])
    assert out.shape == raw.shape
    np.testing.assert_allclose(out.numpy(), np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mri_with_n4_runs_before_resampling(demo_dir):
    pre = mri_preset(n4=True, n4_kwargs={"shrink_factor": 2}, spacing=(2.0, 2.0, 2.0))
    names = [type(t).__name__ for t in pre.transforms]
    spacing_at = next(i for i, t in enumerate(pre.transforms) if isinstance(t, Spacingd))  # KeySafeSpacingd
    assert names.index("N4BiasFieldCorrectiond") < spacing_at
    out = pre({"image": str(demo_dir / HIPPO_IMG)})["image"]
    np.testing.assert_allclose(out.pixdim.numpy(), [2, 2, 2], atol=1e-5)
    assert torch.isfinite(out).all()


def test_nrrd_with_flipped_cosines_ends_in_ras(demo_dir):
    out = mri_preset()({"image": str(demo_dir / "nrrd" / "breast1_image.nrrd"),
                        "label": str(demo_dir / "nrrd" / "breast1_label.nrrd")})
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    assert int((out["label"] > 0).sum()) > 0


def test_misaligned_label_names_both_files(demo_dir):
    other = demo_dir / "hippocampus/labelsTr/hippocampus_006.nii.gz"  # a different case, different shape
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps transform errors
        mri_preset()({"image": str(demo_dir / HIPPO_IMG), "label": str(other)})
    cause = find_error(err.value, DataError)
    assert cause is not None
    assert str(other) in str(cause) and str(demo_dir / HIPPO_IMG) in str(cause)


def test_shifted_label_affine_is_rejected(demo_dir):
    loader = LoadVolume()
    img, lab = loader(demo_dir / HIPPO_IMG), loader(demo_dir / HIPPO_LAB)
    lab.affine[0, 3] += 5.0
    with pytest.raises(DataError, match="affines differ by 5"):
        CheckAlignedd("label")({"image": img, "label": lab})


def test_nan_voxels(demo_dir):
    img = LoadVolume()(demo_dir / HIPPO_IMG)
    img[0, 1, 2, 3] = float("nan")
    with pytest.raises(DataError, match=r"hippocampus_004.nii.gz: 1 non-finite voxels \(1 NaN"):
        EnsureFinite()(img)
    fixed = EnsureFinite(fill_value=0.0)(img)
    assert float(fixed[0, 1, 2, 3]) == 0.0 and torch.isfinite(fixed).all()


def test_constant_volume_is_refused_with_its_file_name(demo_dir, tmp_path):
    img = LoadVolume()(demo_dir / HIPPO_IMG)
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.full(img.shape[1:], 7.0, np.float32), np.eye(4)), blank)
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps it; find_error unwraps (as the CLI does)
        mri_preset(keys=["image"])({"image": str(blank)})
    assert "blank.nii.gz: constant volume (every voxel is 7)" in str(find_error(info.value, DataError))
    assert mri_preset(keys=["image"])({"image": str(demo_dir / HIPPO_IMG)})["image"].std() > 0


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown preset 'pet'"):
        get_preset("pet")
    with pytest.raises(ValueError, match="window"):
        ct_preset(window=(100, -100))
    with pytest.raises(ValueError, match="spacing must be three positive"):
        mri_preset(spacing=(1, 1))
    with pytest.raises(ValueError, match="percentiles"):
        mri_preset(percentiles=(99, 1))
