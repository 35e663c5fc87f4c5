"""SSL views: crop pairs with coordinates, partition crops, CAiD distortions, on a real MRI volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.transforms import (
    RandCropPair,
    RandCropPaird,
    RandPartitionCropd,
    box_iou,
    caid_distortion,
    mri_preset,
)


@pytest.fixture(scope="module")
def volume(demo_dir):
    pre = mri_preset(keys=("image",), size=(40, 56, 48), crop_foreground=False)
    return pre({"image": str(demo_dir / "hippocampus/imagesTr/hippocampus_004.nii.gz")})["image"].as_tensor()


def test_crop_pair_content_and_boxes(volume):
    crop = RandCropPair(roi_size=(16, 16, 16), scale_range=(0.4, 1.0))
    crop.set_random_state(0)
    for _ in range(10):
        v1, v2, b1, b2 = crop(volume)
        assert v1.shape == v2.shape == (1, 16, 16, 16)
        for box in (b1, b2):
            assert np.all(box[0] >= 0) and np.all(box[1] <= np.array(volume.shape[1:]))
            assert np.all(box[1] > box[0])
    exact = RandCropPair(roi_size=(20, 28, 24), scale_range=(0.5, 0.5))  # crop side == roi: no resampling
    exact.set_random_state(3)
    v1, _, b1, _ = exact(volume)
    (x0, y0, z0), (x1, y1, z1) = b1.astype(int)
    torch.testing.assert_close(v1, volume[:, x0:x1, y0:y1, z0:z1])


def test_crop_pair_min_iou(volume):
    crop = RandCropPair(roi_size=(16, 16, 16), scale_range=(0.3, 0.8), min_iou=0.3)
    crop.set_random_state(1)
    ious = [box_iou(*crop(volume)[2:]) for _ in range(20)]
    assert min(ious) >= 0.3
    free = RandCropPair(roi_size=(16, 16, 16), scale_range=(0.3, 0.8))
    free.set_random_state(1)
    assert min(box_iou(*free(volume)[2:]) for _ in range(20)) < 0.3  # the constraint is what enforces it


def test_dict_crop_pair_aligns_keys_and_reproduces(volume):
    label = (volume > 0.5).float()
    t = RandCropPaird(["image", "label"], roi_size=(16, 16, 16), mode=["trilinear", "nearest"], scale_range=(0.3, 1))
    t.set_random_state(7)
    a = t({"image": volume, "label": label})
    t.set_random_state(7)
    b = t({"image": volume, "label": label})
    torch.testing.assert_close(a["image_v1"], b["image_v1"])
    torch.testing.assert_close(a["box_v2"], b["box_v2"])
    assert set(torch.unique(a["label_v1"]).tolist()) <= {0.0, 1.0}  # nearest keeps labels discrete
    # the same box for both keys: without resampling the label view is exactly the thresholded image view
    exact = RandCropPaird(["image", "label"], roi_size=(20, 28, 24), scale_range=(0.5, 0.5), mode=["trilinear",
                                                                                                 "nearest"])
    exact.set_random_state(2)
    c = exact({"image": volume, "label": label})
    torch.testing.assert_close((c["image_v2"] > 0.5).float(), c["label_v2"])


def test_partition_crops(volume):
    t = RandPartitionCropd("image", roi_size=(16, 16, 8), num_partitions=4, axis=2)
    t.set_random_state(0)
    for _ in range(5):
        crops = t({"image": volume, "case_index": 3})
        assert [c["partition"] for c in crops] == [0, 1, 2, 3]
        depth = volume.shape[3]
        for c in crops:
            assert c["image"].shape == (1, 16, 16, 8) and c["case_index"] == 3
            lo, hi = c["partition"] / 4, (c["partition"] + 1) / 4
            # the centre lies in its partition unless clamped at the volume border
            clamped = c["position"] * depth - 4 < 0.5 or c["position"] * depth + 4 > depth - 0.5
            assert lo - 1e-6 <= c["position"] <= hi + 1e-6 or clamped
        assert crops[0]["position"] < crops[-1]["position"]
    with pytest.raises(ValueError, match="smaller than roi_size"):
        RandPartitionCropd("image", roi_size=(64, 64, 64))({"image": volume})


@pytest.mark.parametrize("branch", ["cutout", "outpaint", "shuffle", "none"])
def test_caid_distortions(volume, branch):
    weights = {"cutout": (1, 0, 0, 0), "outpaint": (0, 1, 0, 0), "shuffle": (0, 0, 1, 0), "none": (0, 0, 0, 1)}
    x = volume[:, 8:32, 16:40, 12:36].clone() + 0.01  # strictly positive so zeroed voxels are visible
    t = caid_distortion("v", weights=weights[branch])
    t.set_random_state(0)
    y = t({"v": x.clone()})["v"]
    changed = (y != x).float().mean().item()
    zeros = (y == 0).float().mean().item()
    if branch == "none":
        torch.testing.assert_close(y, x)
    elif branch == "cutout":
        assert 0 < zeros < 0.6 and torch.equal(y[y != 0], x[y != 0])  # holes set to 0, the rest untouched
    elif branch == "outpaint":
        assert zeros > 0.3 and torch.equal(y[y != 0], x[y != 0])  # outside the kept boxes set to 0
    else:
        assert 0 < changed and zeros == 0
        torch.testing.assert_close(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)  # permuted
