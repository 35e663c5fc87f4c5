"""Datalists from folders (with image/label pairing), MSD dataset.json and CSV."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from medvol.errors import DataError
from medvol.io import case_name, datalist_from_csv, datalist_from_folder, datalist_from_msd, find_volumes, load_datalist
from medvol.io.atomic import atomic_path, remove_stale_temps


def _hippo_subset(demo_dir, dst, n=3, labels=True):
    (dst / "imagesTr").mkdir(parents=True)
    if labels:
        (dst / "labelsTr").mkdir()
    names = sorted(p.name for p in (demo_dir / "hippocampus" / "imagesTr").iterdir())[:n]
    for name in names:
        shutil.copy(demo_dir / "hippocampus" / "imagesTr" / name, dst / "imagesTr" / name)
        if labels:
            shutil.copy(demo_dir / "hippocampus" / "labelsTr" / name, dst / "labelsTr" / name)
    return names


def test_case_name():
    assert case_name("/a/b/case_0000.nii.gz") == "case"
    # numbered files are different cases, not channels of one case
    assert case_name("/a/amos_0001.nii.gz") == "amos_0001" != case_name("/a/amos_0002.nii.gz")
    assert case_name("x/brain.nrrd") == "brain"
    assert case_name("x/series1") == "series1"
    assert case_name("x/series1#1.2.3") == "series1"


def test_folder_pairs_images_and_labels(demo_dir):
    datalist = datalist_from_folder(demo_dir / "hippocampus")
    assert len(datalist) == 20
    for item in datalist:
        assert item["image"].replace("imagesTr", "labelsTr") == item["label"]


def test_parent_folder_lists_every_format_and_never_a_label_map_as_image(demo_dir, caplog):
    # demo_data has no imagesTr at the top: 45 volumes below it, 21 of them label maps (issue: a parent
    # folder used to train on label maps as images)
    with caplog.at_level(logging.INFO, logger="medvol.io.datalist"):
        datalist = load_datalist(demo_dir)
    images = [d["image"] for d in datalist]
    assert len(find_volumes(demo_dir)) == 45 and len(datalist) == 24
    assert str(demo_dir / "dicom" / "hippocampus_study1") in images
    assert str(demo_dir / "ct" / "example_ct_sm.nii.gz") in images
    assert not any("labelsTr" in i or "_label" in i for i in images)
    assert not any(i.endswith(("LICENSE", ".csv", ".md")) for i in images)
    by_image = {d["image"]: d.get("label") for d in datalist}
    # the nested MSD layout is paired inside, the NRRD label paired with its image by base name
    hippo = str(demo_dir / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz")
    assert by_image[hippo] == hippo.replace("imagesTr", "labelsTr")
    assert by_image[str(demo_dir / "nrrd" / "breast1_image.nrrd")] == str(demo_dir / "nrrd" / "breast1_label.nrrd")
    assert sum(label is not None for label in by_image.values()) == 21
    assert f"{demo_dir}: 24 images, 21 with a label" in caplog.text


@pytest.mark.parametrize("label_path", ["ct_seg.nii.gz", "segmentations/liver.nii.gz", "masks/ct.nii.gz",
                                        "labels/ct.nii.gz", "aorta_label.nii.gz", "ct-mask.nii.gz"])
def test_label_maps_by_folder_or_name_are_not_images(demo_dir, tmp_path, caplog, label_path):
    src = demo_dir / "ct" / "example_ct_sm.nii.gz"
    shutil.copy(src, tmp_path / "ct.nii.gz")
    (tmp_path / label_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, tmp_path / label_path)
    with caplog.at_level(logging.INFO, logger="medvol.io.datalist"):
        datalist = datalist_from_folder(tmp_path)
    assert [d["image"] for d in datalist] == [str(tmp_path / "ct.nii.gz")]
    paired = datalist[0].get("label")
    if label_path in ("ct_seg.nii.gz", "ct-mask.nii.gz", "masks/ct.nii.gz", "labels/ct.nii.gz"):
        # same base name as the image (after the label token): paired
        assert paired == str(tmp_path / label_path)
    else:  # another base name: left out, and said so
        assert paired is None and "1 label maps left out" in caplog.text


def test_folder_of_only_label_maps_is_an_error(demo_dir, tmp_path):
    shutil.copy(demo_dir / "ct" / "example_ct_sm.nii.gz", tmp_path / "liver_seg.nii.gz")
    with pytest.raises(DataError, match="all 1 volumes look like label maps"):
        datalist_from_folder(tmp_path)


def test_unpaired_label_names_both_files(demo_dir, tmp_path):
    names = _hippo_subset(demo_dir, tmp_path)
    (tmp_path / "imagesTr" / names[0]).unlink()
    with pytest.raises(DataError) as err:
        datalist_from_folder(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "labelsTr" / names[0]) in msg
    assert str(tmp_path / "imagesTr") in msg and case_name(names[0]) in msg


def test_image_without_label(demo_dir, tmp_path):
    names = _hippo_subset(demo_dir, tmp_path)
    (tmp_path / "labelsTr" / names[1]).unlink()
    with pytest.raises(DataError, match=f"{names[1]}: image has no matching label"):
        datalist_from_folder(tmp_path)
    datalist = datalist_from_folder(tmp_path, allow_unlabeled=True)
    assert ["label" in d for d in datalist] == [True, False, True]


def test_nnunet_channel_suffix_pairs(demo_dir, tmp_path):
    names = _hippo_subset(demo_dir, tmp_path, n=2)
    for name in names:
        (tmp_path / "imagesTr" / name).rename(tmp_path / "imagesTr" / name.replace(".nii.gz", "_0000.nii.gz"))
    datalist = datalist_from_folder(tmp_path)
    assert [case_name(d["label"]) for d in datalist] == [case_name(n) for n in names]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        datalist_from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no volumes found"):
        datalist_from_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        find_volumes(tmp_path / "missing")


def test_msd_dataset_json(demo_dir, tmp_path):
    names = _hippo_subset(demo_dir, tmp_path, n=2)
    meta = {"name": "Hippocampus", "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"}
                                                for n in names], "test": [f"./imagesTr/{names[0]}"]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    datalist = load_datalist(tmp_path / "dataset.json")
    assert [d["image"] for d in datalist] == [str(tmp_path / "imagesTr" / n) for n in names]
    assert datalist_from_msd(tmp_path / "dataset.json", section="test") == [{"image": str(tmp_path / "imagesTr" /
                                                                                           names[0])}]
    meta["training"][1]["label"] = "./labelsTr/missing.nii.gz"
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="label './labelsTr/missing.nii.gz' does not exist"):
        datalist_from_msd(tmp_path / "dataset.json")
    with pytest.raises(DataError, match="no list 'validation'"):
        datalist_from_msd(tmp_path / "dataset.json", section="validation")


def test_csv_with_extra_columns(demo_dir, tmp_path):
    names = _hippo_subset(demo_dir, tmp_path, n=2)
    rows = ["image,label,age,sex", f"imagesTr/{names[0]},labelsTr/{names[0]},61.5,F", f"imagesTr/{names[1]},,40,M"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    datalist = datalist_from_csv(tmp_path / "list.csv")
    assert datalist[0] == {"image": str(tmp_path / "imagesTr" / names[0]),
                           "label": str(tmp_path / "labelsTr" / names[0]), "age": "61.5", "sex": "F"}
    assert "label" not in datalist[1] and datalist[1]["sex"] == "M"
    (tmp_path / "bad.csv").write_text("path\nx.nii.gz\n")
    with pytest.raises(DataError, match="no 'image' column"):
        datalist_from_csv(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("image\nnope.nii.gz\n")
    with pytest.raises(DataError, match="line 2 image 'nope.nii.gz' does not exist"):
        datalist_from_csv(tmp_path / "missing.csv")


def test_atomic_path_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    (tmp_path / ".out.bin.999.tmp").write_bytes(b"left by a killed run")
    assert remove_stale_temps(target) == 1
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
