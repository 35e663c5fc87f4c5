"""KeySafeSpacingd on MONAI Label's input (an ``image_path`` string next to ``image``), which crashes Spacingd."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR
from monai.bundle import ConfigParser
from monai.transforms import Compose, Invertd, Spacingd

from medvol.io import LoadVolumed
from medvol.transforms import KeySafeSpacingd, get_preset

HIPPO_IMG = "hippocampus/imagesTr/hippocampus_004.nii.gz"


def _loaded(path):
    # what MONAI Label hands to the bundle's preprocessing: the request plus image_path (a string)
    return LoadVolumed("image")({"image": str(path), "image_path": str(path), "model": "seg", "device": "cpu"})


def test_monai_spacingd_crashes_on_image_path(demo_dir):
    """The bug being worked around (if MONAI fixes it, this test says so and KeySafeSpacingd can go)."""
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd("image", pixdim=(2.0, 2.0, 2.0))(_loaded(demo_dir / HIPPO_IMG))


def test_key_safe_spacingd_resamples_and_keeps_image_path(demo_dir):
    path = demo_dir / HIPPO_IMG
    data = _loaded(path)
    data["image_meta_dict"] = {"kept": 1}  # a real metadata dict is still updated, as Spacingd does
    out = KeySafeSpacingd("image", pixdim=(2.0, 2.0, 2.0))(data)
    assert out["image_path"] == str(path) and out["model"] == "seg"
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [2, 2, 2], atol=1e-5)
    assert out["image_meta_dict"]["kept"] == 1 and "filename_or_obj" in out["image_meta_dict"]
    reference = Spacingd("image", pixdim=(2.0, 2.0, 2.0))({"image": _loaded(path)["image"]})["image"]
    torch.testing.assert_close(out["image"].as_tensor(), reference.as_tensor())


def test_key_safe_spacingd_inverts(demo_dir):
    path = demo_dir / HIPPO_IMG
    pre = Compose([LoadVolumed("image"), KeySafeSpacingd("image", pixdim=(2.0, 2.0, 2.0))])
    data = pre({"image": str(path), "image_path": str(path)})
    data["pred"] = data["image"].clone()
    out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    assert out["pred"].shape[1:] == nib.load(path).shape and out["image_path"] == str(path)


@pytest.mark.parametrize("preset", ["mri", "ct"])
def test_presets_with_spacing_accept_image_path(demo_dir, preset):
    path = demo_dir / HIPPO_IMG
    out = get_preset(preset, keys=["image"], spacing=(2.0, 2.0, 2.0), crop_foreground=False)(
        {"image": str(path), "image_path": str(path)})
    assert out["image_path"] == str(path)
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [2, 2, 2], atol=1e-5)


def test_fewshot_inference_preprocessing_accepts_image_path(demo_dir):
    """The bundle's inference.json preprocessing, with resampling on, on MONAI Label's data dictionary."""
    root = BUNDLES_DIR / "fewshot_segmentation"
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), "spacing": [1.5, 1.5, 1.5]})
    path = demo_dir / HIPPO_IMG
    out = parser.get_parsed_content("preprocessing")({"image": str(path), "image_path": str(path)})
    assert out["image_path"] == str(path)
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [1.5, 1.5, 1.5], atol=1e-5)
    assert json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]
