"""DICOM series faults on real series: gantry tilt (resampled or refused), truncated slices (named), and no false
alarm on the real series of the demo and shared data (docs/reliability.md)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DEMO_DIR
from scipy import ndimage

from medvol.apps.cli import main
from medvol.errors import DataError
from medvol.io import LoadVolume, check_dicom_series, read_dicom_series
from medvol.io.dicom import GANTRY_TILT_ENV

DEMO_SERIES = DEMO_DIR / "dicom" / "hippocampus_study1"
_UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # UIDs of the rewritten copies (not those of the source)


def _series_files(folder: Path) -> list[str]:
    uid = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))[0]
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def tilted_copy(src: Path, dst: Path, angle_deg: float, step_mm: float) -> dict:
    """Rewrite the slices of a real series as a gantry-tilted acquisition: same pixels, orientation rows
    (1, 0, 0) and (0, cos t, -sin t) (slice normal (0, sin t, cos t)), positions stepping along (0, 0, step_mm).

    Returns the geometry: ``row``, ``col``, ``step`` (LPS vectors), ``origin`` and the source pixel arrays.
    """
    dst.mkdir(parents=True)
    t = math.radians(angle_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(t), -math.sin(t)])
    step = np.array([0.0, 0.0, step_mm])
    files = _series_files(src)
    origin = np.array([float(v) for v in sitk.ReadImage(files[0]).GetMetaData("0020|0032").split("\\")])
    for k, name in enumerate(files):
        img = sitk.ReadImage(name)
        sop_class = img.GetMetaData("0008|0016").strip(" \x00") if img.HasMetaDataKey("0008|0016") else ""
        if not sop_class:  # the anonymised CT has none, and GDCM will not write a file without it
            img.SetMetaData("0008|0016", "1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
        img.SetMetaData("0008|0018", f"{_UID_ROOT}.3.{k + 1}")
        img.SetMetaData("0020|000d", f"{_UID_ROOT}.1")
        img.SetMetaData("0020|000e", f"{_UID_ROOT}.2")
        img.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in (*row, *col)))
        img.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in origin + k * step))
        img.SetMetaData("0018|1120", f"{angle_deg:g}")  # Gantry/Detector Tilt
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(dst / f"IM{k:04d}.dcm"))
        writer.Execute(img)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(files))  # (z, y, x) in slice order
    return {"row": row, "col": col, "step": step, "origin": origin, "pixels": pixels, "angle": angle_deg}


SOURCES = {
    # (folder, tilt angle, step between slice positions in mm)
    "demo_mr": (lambda: DEMO_SERIES, 14.0, 1.0),
    # the Siemens CT of the issue: positions along (0, 0, 5) mm, normal (0, 0.24, 0.97)
    "siemens_ct": (lambda: _shared("totalseg_ct/dicom_ct"), 14.0, 5.0),
}


def _shared(rel: str) -> Path:
    import os

    root = os.environ.get("MEDVOL_DATA")
    if not root or not (Path(root) / rel).is_dir():
        pytest.skip(f"MEDVOL_DATA is not set or lacks {rel}")
    return Path(root) / rel


@pytest.fixture(params=sorted(SOURCES))
def tilted(request, tmp_path):
    folder, angle, step = SOURCES[request.param]
    geometry = tilted_copy(folder(), tmp_path / "tilted", angle, step)
    return tmp_path / "tilted", geometry


def test_tilted_series_is_resampled_onto_an_orthogonal_grid(tilted):
    folder, g = tilted
    image = read_dicom_series(folder)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    normal = np.cross(g["row"], g["col"])
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-5)  # slice axis along the true normal
    along = float(g["step"] @ normal)  # 5 mm * cos 14 deg = 4.85 mm for the CT
    np.testing.assert_allclose(image.GetSpacing()[2], along, rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), g["origin"], atol=1e-3)
    # each slice k really lies k * (step - (step . n) n) in-plane off the stacked position: resampling moves
    # slice k back by that offset, i.e. output[k] = input[k] shifted by k * offset / spacing (bilinear)
    perp = g["step"] - along * normal
    sx, sy = image.GetSpacing()[:2]
    shift = np.array([perp @ g["col"] / sy, perp @ g["row"] / sx])  # (y, x) voxels per slice
    assert np.abs(shift).max() > 0.2  # the tilt moves slices by a visible fraction of a voxel
    out, src = sitk.GetArrayFromImage(image).astype(np.float64), g["pixels"].astype(np.float64)
    for k in range(out.shape[0]):
        expected = ndimage.shift(src[k], k * shift, order=1, mode="nearest")
        m = int(math.ceil(abs(k * shift[0]))) + 2  # rows shifted in from outside the field of view
        rows = slice(m, out.shape[1] - m)
        np.testing.assert_allclose(out[k, rows, 1:-1], expected[rows, 1:-1], atol=1.01)  # int16 rounding
    # and the reader says so (MONAI metadata, manifests)
    loaded = LoadVolume()(str(folder))
    assert "gantry tilt of 14.0 degrees" in loaded.meta["medvol_note"]


def test_tilted_series_fails_when_asked(tilted, monkeypatch):
    folder, _ = tilted
    for call in (lambda: read_dicom_series(folder, gantry_tilt="fail"), lambda: check_dicom_series(folder, "fail")):
        with pytest.raises(DataError) as err:
            call()
        assert str(err.value).startswith(str(folder)) and "gantry tilt of 14.0 degrees" in str(err.value)
        assert "slice normal is (0.00, 0.24, 0.97)" in str(err.value)
    monkeypatch.setenv(GANTRY_TILT_ENV, "fail")  # the run-wide default (medvol preprocess --gantry-tilt)
    with pytest.raises(DataError, match="gantry tilt"):
        LoadVolume()(str(folder))
    monkeypatch.setenv(GANTRY_TILT_ENV, "sideways")
    with pytest.raises(ValueError, match="MEDVOL_GANTRY_TILT must be one of resample, fail"):
        read_dicom_series(folder)


def test_preprocess_resamples_or_fails_tilted_ct(tmp_path):
    src = tmp_path / "in"
    tilted_copy(DEMO_SERIES, src / "tilted", 14.0, 1.0)
    shutil.copytree(DEMO_SERIES, src / "straight")
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--preset", "mri"]) == 0
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = {Path(r["source"]).name: r for r in csv.DictReader(f)}
    assert rows["tilted"]["status"] == "ok" and "gantry tilt of 14.0 degrees" in rows["tilted"]["note"]
    assert "resampled onto an orthogonal grid" in rows["tilted"]["note"]
    assert rows["straight"]["status"] == "ok" and not rows["straight"]["note"]
    assert main(["preprocess", str(src), str(tmp_path / "strict"), "--preset", "mri", "--gantry-tilt", "fail"]) == 1
    with open(tmp_path / "strict" / "manifest.csv", newline="") as f:
        rows = {Path(r["source"]).name: r for r in csv.DictReader(f)}
    assert rows["tilted"]["status"] == "failed" and rows["tilted"]["error"].startswith(str(src / "tilted"))
    assert "gantry tilt of 14.0 degrees" in rows["tilted"]["error"] and rows["straight"]["status"] == "ok"


def _real_series(shared: bool) -> list[Path]:
    series = [DEMO_SERIES]
    if shared:
        root = _shared("dicom")
        series += sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob("*.dcm")) and "dti" not in str(p))
        series.append(_shared("totalseg_ct/dicom_ct"))
    return series


@pytest.mark.parametrize("shared", [False, True], ids=["demo", "shared"])
def test_real_untilted_series_read_as_itk_reads_them(shared):
    # no false alarm: every real series (oblique MR, compressed, multi-frame, CT) reads exactly as plain ITK
    for folder in _real_series(shared):
        ours = read_dicom_series(folder)
        plain = sitk.ReadImage(_series_files(folder))
        assert not ours.HasMetaDataKey("medvol_note"), folder
        assert ours.GetSize() == plain.GetSize() and np.allclose(ours.GetDirection(), plain.GetDirection())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(plain))


@pytest.mark.parametrize("where, cut", [("middle", 0.5), ("middle", 0.01), ("first", 0.5), ("last", 0.5)])
def test_truncated_slice_is_named(where, cut, tmp_path):
    folder = Path(shutil.copytree(DEMO_SERIES, tmp_path / "series"))
    files = _series_files(folder)  # in slice order
    victim = Path({"middle": files[len(files) // 2], "first": files[0], "last": files[-1]}[where])
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * cut)])
    for call in (lambda: LoadVolume()(str(folder)), lambda: check_dicom_series(folder)):
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        assert message.startswith(str(folder)) and f"DICOM file {victim.name} in this series cannot be read" in message
        assert "truncated or corrupt" in message and "non-uniform" not in message and "0x" not in message
