"""Volume reading: every supported format on real scans, DICOM against reference NIfTI, and bad inputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BAD_INPUTS, make_bad_inputs
from monai.transforms import Orientation

from medvol.errors import DataError
from medvol.io import LoadVolume, LoadVolumed, find_volumes, list_series, save_nifti

HIPPO = "hippocampus/imagesTr/hippocampus_004.nii.gz"


def _ras(img):
    return Orientation("RAS", labels=None)(img)


def test_nifti_matches_nibabel(demo_dir):
    path = demo_dir / HIPPO
    img = LoadVolume(dtype=None)(path)
    ref = nib.load(path)
    assert img.shape == (1, *ref.shape)
    np.testing.assert_array_equal(img[0].numpy(), np.asarray(ref.dataobj))
    np.testing.assert_allclose(img.affine.numpy(), ref.affine)
    assert img.meta["filename_or_obj"] == str(path)
    assert img.dtype == torch.float32 or LoadVolume()(path).dtype == torch.float32


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd"])
def test_itk_formats_round_trip(demo_dir, tmp_path, suffix):
    """The same real volume written by SimpleITK as MetaImage/NRRD loads with the NIfTI's voxels and affine."""
    src = demo_dir / "ct" / "example_ct_sm.nii.gz"
    out = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(out))
    a, b = LoadVolume()(src), LoadVolume()(out)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)


def test_nrrd_flipped_direction_reorients(demo_dir):
    img = LoadVolume()(demo_dir / "nrrd" / "breast1_image.nrrd")
    assert nib.aff2axcodes(img.affine.numpy()) == ("L", "P", "S")
    ras = _ras(img)
    assert nib.aff2axcodes(ras.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(ras.pixdim.numpy(), [0.6641, 0.6641, 2.1], atol=1e-3)
    # the physical position of the first voxel is the same whichever way the array is stored
    world = img.affine.numpy() @ np.array([0, 0, 0, 1.0])
    idx = np.linalg.inv(ras.affine.numpy()) @ world
    i, j, k = np.rint(idx[:3]).astype(int)
    assert float(ras[0, i, j, k]) == float(img[0, 0, 0, 0])


def test_demo_dicom_series(demo_dir):
    img = LoadVolume(dtype=None)(demo_dir / "dicom" / "hippocampus_study1")
    assert img.shape == (1, 35, 51, 32)
    np.testing.assert_allclose(img.pixdim.numpy(), [1, 1, 1], atol=1e-4)
    assert float(img.float().std()) > 0


DICOM_CASES = [
    "anatomical/001",
    "anatomical/001_implicit",
    "generic/compressed_j2k/001",
    "generic/compressed_jpeg/001",
    "generic/compressed_jpegls/001",
    "generic/compressed_rle/001",
    "hitachi/anatomical/001",
    "siemens_multiframe/anatomical/001",
]


@pytest.mark.shared_data
@pytest.mark.parametrize("case", DICOM_CASES)
def test_dicom_matches_reference_nifti(shared_data, case):
    """Each DICOM series (explicit/implicit VR, JPEG, JPEG 2000, JPEG-LS, RLE, multi-frame) equals its reference."""
    folder = shared_data / "dicom" / case
    img = _ras(LoadVolume(dtype=None)(folder))
    ref = _ras(LoadVolume(dtype=None)(str(folder) + "_ground_truth.nii.gz"))
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.pixdim.numpy(), ref.pixdim.numpy(), atol=1e-3)
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy(), atol=1e-3)


@pytest.mark.shared_data
def test_dicom_4d_series_is_rejected(shared_data):
    with pytest.raises(DataError, match=r"ge/dti/001: DICOM series has 8 images at only 4 distinct slice positions"):
        LoadVolume()(shared_data / "dicom" / "ge" / "dti" / "001")


@pytest.mark.shared_data
def test_dicom_slices_sorted_by_position_not_name(shared_data, tmp_path):
    """Renaming files in reverse order must not change the volume: slices are sorted by position."""
    src = shared_data / "totalseg_ct" / "dicom_ct"
    files = sorted(src.iterdir())
    dst = tmp_path / "renamed"
    dst.mkdir()
    for i, f in enumerate(reversed(files)):
        shutil.copy(f, dst / f"{i:03d}.dcm")
    a, b = LoadVolume(dtype=None)(src), LoadVolume(dtype=None)(dst)
    assert a.shape == (1, 512, 512, 20)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _copy_series(demo_dir, dst: Path, skip: set[int] = frozenset()) -> Path:
    src = demo_dir / "dicom" / "hippocampus_study1"
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.dcm"), key=lambda p: int(p.stem)):
        if int(f.stem) not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_dicom_missing_slice_is_rejected(demo_dir, tmp_path):
    folder = _copy_series(demo_dir, tmp_path / "gap", skip={16})
    with pytest.raises(DataError, match="non-uniform slice spacing"):
        LoadVolume()(folder)


def test_dicom_folder_with_two_series(demo_dir, shared_data, tmp_path):
    folder = _copy_series(demo_dir, tmp_path / "two")
    for f in (shared_data / "dicom" / "anatomical" / "001").iterdir():
        shutil.copy(f, folder / f"b_{f.name}")
    uids = list_series(folder)
    assert len(uids) == 2
    assert sorted(find_volumes(tmp_path)) == sorted(f"{folder}#{u}" for u in uids)
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        LoadVolume()(folder)
    shapes = sorted(tuple(LoadVolume()(f"{folder}#{u}").shape) for u in uids)
    assert shapes == [(1, 35, 51, 32), (1, 256, 256, 4)]


# ---- bad inputs: each raises DataError whose message starts with the file -----------------------------


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c != "nan"])  # NaN: see EnsureFinite tests
def test_bad_input_raises_data_error_naming_file(demo_dir, tmp_path, case):
    path, pattern = make_bad_inputs(demo_dir, tmp_path)[case]
    with pytest.raises(DataError) as err:
        LoadVolume()(path)
    message = str(err.value)
    assert message.startswith(str(path) + ": ")
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        LoadVolume()(tmp_path / "nope.nii.gz")


def test_dict_loader_keeps_label_dtype(demo_dir):
    d = LoadVolumed(("image", "label"), dtype=(np.float32, None))(
        {"image": demo_dir / HIPPO, "label": demo_dir / HIPPO.replace("images", "labels")})
    assert d["image"].dtype == torch.float32
    assert not d["label"].is_floating_point()
    assert set(torch.unique(d["label"]).tolist()) == {0, 1, 2}


def test_save_nifti_round_trip_is_reproducible(demo_dir, tmp_path):
    img = LoadVolume()(demo_dir / HIPPO)
    a, b = save_nifti(img, img.affine, tmp_path / "a.nii.gz"), save_nifti(img, img.affine, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()  # no time stamp or temp name in the gzip header
    back = LoadVolume()(a)
    np.testing.assert_array_equal(back.numpy(), img.numpy())
    np.testing.assert_allclose(back.affine.numpy(), img.affine.numpy())
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="must end in .nii"):
        save_nifti(img, img.affine, tmp_path / "x.nrrd")
