"""The IXI parcellation benchmark's definitions: the coarse DLMUSE label set and the fixed split."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO / "benchmarks" / "labels" / "ixi_dlmuse_coarse.json"
SPLIT = REPO / "benchmarks" / "splits" / "ixi_parcellation.json"


def _mapping():
    spec = json.loads(LABELS.read_text(encoding="utf-8"))
    orig = [m for c in spec["classes"] for m in c["muse"]]
    target = [k for k, c in enumerate(spec["classes"], start=1) for _ in c["muse"]]
    return spec, orig, target


def test_label_set_is_a_function_of_muse_indices():
    spec, orig, _ = _mapping()
    names = [c["name"] for c in spec["classes"]]
    assert 10 <= len(names) <= 16 and len(set(names)) == len(names)  # the "about 10-16 structures"
    assert len(set(orig)) == len(orig), "a MUSE index in two classes"
    assert not set(orig) & set(spec["background"]), "a MUSE index both mapped and background"
    assert "pseudo ground truth" in spec["description"]


def test_split_is_disjoint_with_a_test_set_of_at_least_30():
    split = json.loads(SPLIT.read_text(encoding="utf-8"))
    assert all(len(split[p]) == len(set(split[p])) for p in ("pool", "validation", "test")), "a case twice in a part"
    parts = [set(split[p]) for p in ("pool", "validation", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 145
    assert len(split["test"]) >= 30 and len(split["validation"]) >= 10


def test_every_parcellation_label_is_mapped_and_every_class_is_present(shared_data):
    """On all 145 real DLMUSE files: each written index is a class or named background, each MUSE ROI of the
    list's single-structure range (< 300) is mapped or background, and every class occurs in every volume;
    MONAI's MapLabelValue with the mapping gives the same coarse map as a lookup table."""
    import nibabel as nib
    from monai.transforms import MapLabelValue

    root = shared_data / "ixi_t1"
    spec, orig, target = _mapping()
    known = {int(r["Index"]) for r in csv.DictReader(open(root / "MUSE_listROIs.csv", encoding="utf-8"))}
    assert {i for i in known if i < 300} <= set(orig) | set(spec["background"])
    assert set(orig) <= known
    lut = np.zeros(256, np.uint8)
    lut[orig] = target
    split = json.loads(SPLIT.read_text(encoding="utf-8"))
    cases = sorted(split["pool"] + split["validation"] + split["test"])
    for case in cases:
        img = nib.load(root / "dlmuse_seg" / f"{case}_T1_DLMUSE.nii.gz")
        seg = np.asarray(img.dataobj)
        present = set(np.unique(seg).tolist())
        assert present <= set(orig) | set(spec["background"]), f"{case}: unmapped {present - set(orig)}"
        coarse = lut[seg]
        assert set(np.unique(coarse).tolist()) == set(range(len(spec["classes"]) + 1)), case
        brain_ml = (coarse > 0).sum() * float(np.prod(img.header.get_zooms()[:3])) / 1000
        assert 700 < brain_ml < 2000, (case, brain_ml)  # a whole brain's volume, not a few voxels
    # MapLabelValue leaves unlisted values as they are: the background indices are mapped to 0 explicitly
    remap = MapLabelValue(orig_labels=orig + spec["background"], target_labels=target + [0] * len(spec["background"]),
                          dtype=np.uint8)
    assert np.array_equal(remap(seg), coarse)


@pytest.mark.parametrize("part", ["pool", "validation", "test"])
def test_split_cases_exist(shared_data, part):
    split = json.loads(SPLIT.read_text(encoding="utf-8"))
    root = shared_data / "ixi_t1"
    missing = [c for c in split[part] if not (root / "t1" / f"{c}_T1.nii.gz").is_file()
               or not (root / "dlmuse_seg" / f"{c}_T1_DLMUSE.nii.gz").is_file()]
    assert not missing, missing
