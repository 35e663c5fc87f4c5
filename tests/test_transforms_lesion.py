"""Lesion boxes (mask, CSV), lesion-aware view pairs on the breast MR with its mask, the LeCL view augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose, Orientationd, ScaleIntensityd

from medvol.errors import DataError
from medvol.io import LoadVolume, LoadVolumed, load_lesion_boxes
from medvol.transforms import (
    LesionBoxesd,
    RandLesionSliceViewsd,
    RandSolarize,
    lecl_view_augmentation,
    lesion_boxes_from_mask,
)
from medvol.transforms.slices import fit_box


@pytest.fixture(scope="module")
def breast(demo_dir):
    keys = ["image", "label"]
    pre = Compose([LoadVolumed(keys), Orientationd(keys, axcodes="RAS", labels=None), ScaleIntensityd("image")])
    return pre({"image": str(demo_dir / "nrrd" / "breast1_image.nrrd"),
                "label": str(demo_dir / "nrrd" / "breast1_label.nrrd")})  # (1, 45, 120, 21), image in [0, 1]


def _reference_boxes(label: np.ndarray) -> dict[int, list[int]]:
    """Slice -> [x0, y0, x1, y1] of the mask, straight from numpy (the breast lesion is one component)."""
    out = {}
    for z in range(label.shape[2]):
        xs, ys = np.nonzero(label[:, :, z] > 0)
        if xs.size:
            out[z] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return out


def test_boxes_from_mask_match_numpy(breast):
    ref = _reference_boxes(breast["label"][0].numpy())
    boxes = lesion_boxes_from_mask(breast["label"])
    assert sorted(ref) == [8, 9, 10] and boxes.shape == (3, 6)
    assert set(boxes[:, 0].tolist()) == {0.0}  # one lesion
    for row in boxes:
        assert row[2:].tolist() == ref[int(row[1])]
    # two separate blobs are two lesions; a speck below min_voxels is dropped
    mask = np.zeros((20, 20, 6))
    mask[2:5, 2:5, 1:3] = 1
    mask[10:16, 12:15, 4] = 1
    mask[18, 18, 0] = 1
    rows = lesion_boxes_from_mask(mask, min_voxels=2)
    assert rows.tolist() == [[0, 1, 2, 2, 5, 5], [0, 2, 2, 2, 5, 5], [1, 4, 10, 12, 16, 15]]


def test_lesion_pairs_are_centred_on_the_lesion(breast):
    image = breast["image"][0].numpy()
    ref = _reference_boxes(breast["label"][0].numpy())
    jitter, lo, hi = 0.15, 0.3, 0.9
    t = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=None, crop_size_range=(lo, hi), jitter=jitter,
                              context=1, remove_source=False).set_random_state(0)
    offsets = []
    for _ in range(30):
        out = t(breast)
        z = int(out["slice_index"])
        assert bool(out["is_lesion"]) and z in ref
        bx0, by0, bx1, by1 = ref[z]
        assert out["lesion_box"].tolist() == ref[z]
        x0, y0, x1, y1 = out["box_v1"].tolist()
        assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1  # the whole lesion box is in the crop
        cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2  # so is its centre (not CLEAR's box corner)
        for centre, a, b, side, n in ((cx, x0, x1, 45, bx1 - bx0), (cy, y0, y1, 120, by1 - by0)):
            size = b - a
            assert lo * side - 1 <= size <= max(hi * side, n / (1 - 2 * jitter)) + 2
            assert abs((a + b) / 2 - centre) <= jitter * size + 1  # jitter bounded by the crop size
            offsets.append(((a + b) / 2 - centre) / size)
        # the view is that crop of slice z: check the centre channel where the crop lies inside the slice
        v1 = out["image_v1"]
        assert v1.shape == (3, x1 - x0, y1 - y0)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        np.testing.assert_array_equal(v1[1, ix0 - x0:min(x1, 45) - x0, iy0 - y0:min(y1, 120) - y0].numpy(),
                                      image[ix0:min(x1, 45), iy0:min(y1, 120), z])
        assert out["box_v2"].tolist() == [0, 0, 45, 120]  # whole slice (spatial_size=None: no aspect padding)
        np.testing.assert_array_equal(out["image_v2"][1].numpy(), image[:, :, z])
        np.testing.assert_array_equal(out["image_v2"][0].numpy(), image[:, :, z - 1])  # context channel
    assert np.ptp(offsets) > jitter / 2  # the jitter is really random


def test_resized_views_and_whole_slice_box(breast):
    t = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=(32, 32)).set_random_state(1)
    out = t(breast)
    assert out["image_v1"].shape == out["image_v2"].shape == (3, 32, 32)
    assert out["box_v2"].tolist() == list(fit_box(45, 120, (32, 32))) == [-37, 0, 83, 120]
    assert not {"image", "label"} & set(out)  # sources removed so samples collate
    batch = list_data_collate([t(breast) for _ in range(4)])
    assert batch["image_v1"].shape == (4, 3, 32, 32)
    assert batch["is_lesion"].dtype == torch.bool and batch["is_lesion"].shape == (4,)
    assert batch["box_v1"].shape == (4, 4)


def test_random_pairs_without_lesions(breast):
    no_lesion = dict(breast, label=torch.zeros_like(breast["label"]))
    t = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=(16, 16)).set_random_state(2)
    for _ in range(10):
        out = t(no_lesion)
        assert not bool(out["is_lesion"]) and torch.isnan(out["lesion_box"]).all()
    t = RandLesionSliceViewsd(lesion_prob=0.0, spatial_size=(16, 16), remove_source=False).set_random_state(3)
    slices = set()
    for _ in range(40):
        out = t(breast)
        assert not bool(out["is_lesion"])
        slices.add(int(out["slice_index"]))
        for key in ("box_v1", "box_v2"):  # RandomResizedCrop: inside the slice, area 8-100 %, aspect 3/4-4/3
            x0, y0, x1, y1 = out[key].tolist()
            assert 0 <= x0 < x1 <= 45 and 0 <= y0 < y1 <= 120
            area, aspect = (x1 - x0) * (y1 - y0) / (45 * 120), (y1 - y0) / (x1 - x0)
            assert 0.07 <= area <= 1.0 and 0.7 <= aspect <= 1.4
    assert len(slices) > 8  # any slice, not only lesion slices
    half = RandLesionSliceViewsd(lesion_prob=0.5, spatial_size=(16, 16)).set_random_state(4)
    flags = [bool(half(breast)["is_lesion"]) for _ in range(40)]
    assert 8 < sum(flags) < 32


def test_same_seed_same_views(breast):
    a = RandLesionSliceViewsd(spatial_size=(24, 24)).set_random_state(5)
    b = RandLesionSliceViewsd(spatial_size=(24, 24)).set_random_state(5)
    for _ in range(5):
        x, y = a(breast), b(breast)
        assert x["box_v1"].tolist() == y["box_v1"].tolist() and bool(x["is_lesion"]) == bool(y["is_lesion"])
        torch.testing.assert_close(x["image_v2"], y["image_v2"])


def test_precomputed_boxes_give_the_same_draws(breast):
    boxed = LesionBoxesd("label", remove_mask=True)(breast)
    assert "label" not in boxed and boxed["boxes"].tolist() == lesion_boxes_from_mask(breast["label"]).tolist()
    from_mask = RandLesionSliceViewsd(spatial_size=(16, 16)).set_random_state(8)
    from_boxes = RandLesionSliceViewsd(label_key=None, boxes_key="boxes", spatial_size=(16, 16)).set_random_state(8)
    for _ in range(6):
        a, b = from_mask(breast), from_boxes(boxed)
        assert a["box_v1"].tolist() == b["box_v1"].tolist() and int(a["slice_index"]) == int(b["slice_index"])
        torch.testing.assert_close(a["image_v1"], b["image_v1"])


def test_csv_boxes(breast, tmp_path):
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("case,slice,x1,y1,x2,y2\nbreast1,9,15,44,24,56\nother,3,1,2,5,6\nother,4,1,2,5,7\n")
    boxes = load_lesion_boxes(csv_path)
    assert sorted(boxes) == ["breast1", "other"]
    assert boxes["breast1"].tolist() == [[0, 9, 15, 44, 24, 56]]
    assert boxes["other"][:, 0].tolist() == [0, 1]  # each CSV row is its own lesion
    data = {"image": breast["image"], "boxes": boxes["breast1"]}
    t = RandLesionSliceViewsd(label_key=None, boxes_key="boxes", lesion_prob=1.0, spatial_size=(16, 16),
                              jitter=0.0).set_random_state(6)
    out = t(data)
    assert bool(out["is_lesion"]) and int(out["slice_index"]) == 9 and "boxes" not in out
    x0, y0, x1, y1 = out["box_v1"].tolist()
    assert x0 <= 15 and y0 <= 44 and x1 >= 24 and y1 >= 56 and abs((x0 + x1) / 2 - 19.5) <= 0.5
    # DeepLesion style: one box column, 1-based slices, x = image column
    dl = tmp_path / "dl.csv"
    dl.write_text('File_name,Key_slice_index,Bounding_boxes\ncase_a,10,"44.0, 15.0, 56.0, 24.0"\n')
    rows = load_lesion_boxes(dl, "File_name", "Key_slice_index", "Bounding_boxes", slice_base=1, transpose_xy=True)
    assert rows["case_a"].tolist() == [[0, 9, 15, 44, 24, 56]]


def test_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case,slice,x1,y1\nbreast1,9,15,44\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) x2, y2"):
        load_lesion_boxes(bad)
    bad.write_text("case,slice,x1,y1,x2,y2\nbreast1,9,15,44,24,56\nbreast1,nine,15,44,24,56\n")
    with pytest.raises(DataError, match=r"bad\.csv: row 3"):
        load_lesion_boxes(bad)
    bad.write_text("case,slice,x1,y1,x2,y2\nbreast1,9,24,44,15,56\n")
    with pytest.raises(DataError, match="row 2: empty box"):
        load_lesion_boxes(bad)
    with pytest.raises(DataError, match="missing.csv"):
        load_lesion_boxes(tmp_path / "missing.csv")


def test_argument_and_data_checks(breast):
    with pytest.raises(ValueError, match="jitter"):
        RandLesionSliceViewsd(jitter=0.5)
    with pytest.raises(ValueError, match="label_key"):
        RandLesionSliceViewsd(label_key=None, boxes_key=None)
    with pytest.raises(KeyError, match="allow_missing_keys"):
        RandLesionSliceViewsd()({"image": breast["image"]})
    lenient = RandLesionSliceViewsd(lesion_prob=1.0, allow_missing_keys=True, spatial_size=(8, 8))
    out = lenient({"image": breast["image"]})
    assert not bool(out["is_lesion"])
    with pytest.raises(ValueError, match="outside the 21 slices"):
        RandLesionSliceViewsd(boxes_key="boxes")({"image": breast["image"], "boxes": [[30, 1, 1, 4, 4]]})


def test_view_augmentation(breast):
    views = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=(32, 32)).set_random_state(7)(breast)
    same = dict(views, image_v2=views["image_v1"].clone())
    aug = lecl_view_augmentation()
    aug.set_random_state(0)
    out = aug(same)
    for key in ("image_v1", "image_v2"):
        assert type(out[key]) is torch.Tensor and out[key].shape == (3, 32, 32)
        assert float(out[key].min()) >= 0.0 and float(out[key].max()) <= 1.0
    assert not torch.allclose(out["image_v1"], views["image_v1"])  # view 1 is always blurred
    assert not torch.allclose(out["image_v1"], out["image_v2"])  # independent draws per view
    assert out["is_lesion"] is views["is_lesion"]  # other keys pass through
    aug.set_random_state(0)
    torch.testing.assert_close(aug(same)["image_v2"], out["image_v2"])
    with pytest.raises(ValueError, match="exactly two"):
        lecl_view_augmentation(keys=("a", "b", "c"))
    sym = lecl_view_augmentation(keys=("a", "b", "c"), asymmetric=False)
    assert sym({k: views["image_v1"] for k in "abc"})["c"].shape == (3, 32, 32)


def test_solarize():
    x = torch.linspace(0, 1, 11).reshape(1, 1, 11)
    out = RandSolarize(prob=1.0, threshold=0.5)(x)
    expected = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(RandSolarize(prob=0.0)(x), x)
    assert math.isclose(float(out.max()), 0.5)


def test_brain_tumours_two_lesions_and_windowed_aorta(shared_data):
    """Larger real scans: brain1 has two tumour components; the aorta CT gets windowed lesion views."""
    root = shared_data / "pyradiomics_nrrd"
    image, label = LoadVolume()(root / "brain1_image.nrrd"), LoadVolume()(root / "brain1_label.nrrd")
    boxes = lesion_boxes_from_mask(label)
    assert len(set(boxes[:, 0])) == 2
    t = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=(32, 32)).set_random_state(9)
    seen = set()
    for _ in range(12):
        out = t({"image": image, "label": label})
        z, (x0, y0, x1, y1) = int(out["slice_index"]), out["box_v1"].tolist()
        row = [r for r in boxes if r[1] == z and r[2:].tolist() == out["lesion_box"].tolist()]
        assert row, "the lesion box must be one of the mask's boxes on that slice"
        seen.add(row[0][0])
        bx0, by0, bx1, by1 = row[0][2:]
        assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1
    assert seen == {0.0, 1.0}
    ct = LoadVolume()(shared_data / "totalseg_ct" / "ct" / "aorta_ct_cropped_1.5mm.nii.gz")
    aorta = LoadVolume()(shared_data / "totalseg_ct" / "ct" / "aorta_label.nii.gz")
    views = RandLesionSliceViewsd(lesion_prob=1.0, spatial_size=(32, 32), context=0,
                                  windows=["soft_tissue", "bone"]).set_random_state(10)({"image": ct, "label": aorta})
    assert views["image_v1"].shape == (2, 32, 32) and bool(views["is_lesion"])
    assert 0.0 <= float(views["image_v1"].min()) and float(views["image_v1"].max()) <= 1.0
