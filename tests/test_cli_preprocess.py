"""``medvol preprocess`` end to end on real scans: bad inputs, manifest, resume, kill, workers, torchrun."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BAD_INPUTS, REPO_ROOT, copy_hippo, make_bad_inputs, make_mixed_input

from medvol.apps.cli import main
from medvol.transforms import mri_preset


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["source"]: row for row in csv.DictReader(f)}


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.nii.gz"))}


@pytest.fixture
def mixed_input(demo_dir, tmp_path):
    """Good MRI volumes (NIfTI, NRRD, DICOM) next to every kind of bad input."""
    return make_mixed_input(demo_dir, tmp_path / "in", 3)


def test_bad_inputs_fail_alone_and_good_ones_are_written(mixed_input, tmp_path, capsys):
    root, good, bad = mixed_input
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    assert main(["preprocess", str(root), str(out), "--preset", "mri"]) == 1
    rows = _manifest(out)
    assert len(rows) == len(good) + len(bad)
    for path, pattern in bad.values():
        row = rows[str(path)]
        assert row["status"] == "failed" and row["output"], row
        assert row["error"].startswith(str(path)), row["error"]  # the reason names the file
        assert __import__("re").search(pattern, row["error"]), row["error"]
        assert not Path(row["output"]).exists()
    for path in good:
        row = rows[str(path)]
        assert row["status"] == "ok", row
        assert Path(row["output"]).is_file() and float(row["seconds"]) > 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # inputs untouched
    assert (out / "mri" / good[0].name).is_file()  # the input tree is mirrored
    assert (out / "dicom" / "study1.nii.gz").is_file()
    assert "failed" in capsys.readouterr().err


def test_output_matches_preset_and_keeps_affine(demo_dir, tmp_path):
    src = copy_hippo(demo_dir, tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    assert main(["preprocess", str(tmp_path / "in"), str(out), "--preset", "mri", "--spacing", "1.5", "1.5", "1.5",
                 "--size", "32", "40", "32"]) == 0
    expected = mri_preset(spacing=(1.5, 1.5, 1.5), size=(32, 40, 32))({"image": str(src)})["image"]
    written = nib.load(out / src.name)
    np.testing.assert_allclose(written.affine, expected.affine.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(written.dataobj), expected[0].numpy(), atol=1e-6)
    row = _manifest(out)[str(src)]
    assert row["shape"] == "32x40x32" and row["spacing"] == "1.5x1.5x1.5"


def test_labels_are_written_and_follow(demo_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["preprocess", str(demo_dir / "hippocampus"), str(out), "--preset", "mri", "--qc"]) == 0
    rows = list(_manifest(out).values())
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows)
    img, lab = nib.load(rows[0]["output"]), nib.load(rows[0]["label_output"])
    assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2}
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_and_overwrite_redoes(mixed_input, tmp_path):
    root, good, bad = mixed_input
    out = tmp_path / "out"
    main(["preprocess", str(root), str(out), "--preset", "mri"])
    first, stamps = _outputs(out), {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    assert main(["preprocess", str(root), str(out), "--preset", "mri"]) == 1  # bad ones fail again
    rows = _manifest(out)
    assert all(rows[str(p)]["status"] == "skipped" for p in good)
    assert all(rows[str(p)]["status"] == "failed" for p, _ in bad.values())
    assert rows[str(good[0])]["shape"]  # skipped rows still describe the output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == stamps  # nothing rewritten
    assert main(["preprocess", str(root), str(out), "--preset", "mri", "--overwrite"]) == 1
    assert all(_manifest(out)[str(p)]["status"] == "ok" for p in good)
    assert _outputs(out) == first


@pytest.mark.slow
def test_killed_run_resumes_to_identical_result(demo_dir, tmp_path):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 12)
    reference = tmp_path / "reference"
    assert main(["preprocess", str(src), str(reference), "--preset", "mri", "--n4"]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medvol", "preprocess", str(src), str(out), "--preset", "mri", "--n4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: start-up plus 3 N4 runs can take minutes on a loaded machine
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.nii.gz"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished (or died) before it could be killed midway"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.nii.gz")))
    assert 0 < done < 12, f"the kill should land midway, {done} outputs were written"
    assert main(["preprocess", str(src), str(out), "--preset", "mri", "--n4"]) == 0
    rows = _manifest(out)
    assert [r["status"] for r in rows.values()].count("skipped") >= done
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert _outputs(out) == _outputs(reference)


@pytest.mark.slow
def test_two_workers_match_one(demo_dir, tmp_path):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 6)
    make_bad_inputs(demo_dir, src / "bad")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["preprocess", str(src), str(one), "--preset", "mri"]) == 1
    assert main(["preprocess", str(src), str(two), "--preset", "mri", "--workers", "2"]) == 1
    assert _outputs(one) == _outputs(two)
    a = {k: {c: v.replace(str(one), "OUT") for c, v in r.items() if c != "seconds"} for k, r in _manifest(one).items()}
    b = {k: {c: v.replace(str(two), "OUT") for c, v in r.items() if c != "seconds"} for k, r in _manifest(two).items()}
    assert a == b
    assert list(_manifest(two)) == list(_manifest(one))  # input order kept


@pytest.mark.slow
def test_torchrun_shards_and_merges(demo_dir, tmp_path):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 5)
    make_bad_inputs(demo_dir, src / "bad")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["preprocess", str(src), str(single), "--preset", "mri"]) == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medvol", "preprocess", str(src), str(sharded), "--preset", "mri"]
    proc = subprocess.run(cmd, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, cwd=REPO_ROOT)
    assert proc.returncode != 0, proc.stderr[-2000:]  # some inputs failed -> every rank exits 1
    assert "5 ok" in proc.stdout and f"{len(BAD_INPUTS)} failed" in proc.stdout, proc.stdout
    rows = _manifest(sharded)
    assert list(rows) == list(_manifest(single))
    assert [r["status"] for r in rows.values()] == [r["status"] for r in _manifest(single).values()]
    assert _outputs(sharded) == _outputs(single)
    assert not list(sharded.glob(".manifest*"))  # shard manifests merged and removed


def test_usage_errors_exit_2(demo_dir, tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "missing"), str(tmp_path / "o"), "--preset", "ct"]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 1)
    assert main(["preprocess", str(src), str(src / "out"), "--preset", "mri"]) == 2
    assert "inside input" in capsys.readouterr().err
    assert main(["preprocess", str(src), str(tmp_path / "o"), "--preset", "ct", "--n4"]) == 2
    assert main(["preprocess", str(src), str(tmp_path / "o"), "--preset", "ct", "--window", "5", "1"]) == 2
    assert "window" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["preprocess", str(src), str(tmp_path / "o"), "--preset", "pet"])
    assert err.value.code == 2
    labelled = tmp_path / "labelled"
    (labelled / "imagesTr").mkdir(parents=True)
    (labelled / "labelsTr").mkdir()
    shutil.copy(demo_dir / "hippocampus/labelsTr/hippocampus_004.nii.gz", labelled / "labelsTr")
    shutil.copy(demo_dir / "hippocampus/imagesTr/hippocampus_006.nii.gz", labelled / "imagesTr")
    assert main(["preprocess", str(labelled), str(tmp_path / "o2"), "--preset", "mri"]) == 2
    err_text = capsys.readouterr().err
    assert "labelsTr/hippocampus_004.nii.gz: label has no matching image" in err_text


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medvol", "preprocess", "--help"], capture_output=True,
                          encoding="utf-8", errors="replace",
                          timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout and "--workers" in proc.stdout


def test_demo_preprocessing_part(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "medvol preprocess" in out  # the equivalent commands are shown
    for name in ("hippocampus", "ct", "dicom", "nrrd"):
        assert (tmp_path / "demo" / "preprocessed" / name / "qc.png").is_file()
        rows = _manifest(tmp_path / "demo" / "preprocessed" / name)
        assert rows and all(r["status"] == "ok" for r in rows.values())


@pytest.mark.parametrize("argv", [["preprocess", "/nonexistent/in", "OUT", "--preset", "mri"],
                                  ["embed", "/nonexistent/in", "OUT", "--bundle", "bundles/lecl_slice_embedding"]])
def test_path_errors_come_before_the_heavy_imports(argv, tmp_path):
    """A wrong path is reported at once, before torch / MONAI are imported (they take seconds)."""
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code = (f"import sys; from medvol.apps.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'monai' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "/nonexistent/in does not exist" in proc.stderr
