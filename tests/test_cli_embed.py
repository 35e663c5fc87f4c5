"""``medvol embed`` end to end on real scans: bad inputs, bag contents, slice mapping, resume, workers, torchrun,
usage errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BAD_INPUTS, BUNDLES_DIR, REPO_ROOT, copy_hippo, make_bad_inputs, make_mixed_input
from monai.bundle import ConfigParser

from medvol.apps.cli import main
from medvol.io import LoadVolume
from medvol.io.bags import file_sha256
from medvol.mil import read_bag

BUNDLE = BUNDLES_DIR / "lecl_slice_embedding"
TINY = {"encoder_options": {"mambaout": {"dims": [8, 16], "depths": [1, 1]}}, "spatial_size": 32}
SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["source"]: row for row in csv.DictReader(f)}


def _embed(src: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return main(["embed", str(src), str(out), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt), *SET, *extra])


def _bags(out: Path) -> dict[str, np.ndarray]:
    return {p.name: read_bag(p).feats for p in sorted(out.glob("*.h5"))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised tiny encoder built from the bundle's own network_def."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "inference.json")])
    parser.update({"bundle_root": str(BUNDLE), **TINY})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture
def mixed_input(demo_dir, tmp_path):
    """Good MRI volumes (NIfTI, NRRD, DICOM) next to every kind of bad input."""
    return make_mixed_input(demo_dir, tmp_path / "in", 2)


def test_bad_inputs_fail_alone_and_good_ones_are_embedded(mixed_input, checkpoint, tmp_path, capsys):
    root, good, bad = mixed_input
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    assert _embed(root, out, checkpoint) == 1
    rows = _manifest(out)
    assert len(rows) == len(good) + len(bad)
    assert {"source", "status", "output", "error", "shape", "spacing", "seconds", "n_slices", "dim"} <= set(
        next(iter(rows.values())))
    for path, pattern in bad.values():
        row = rows[str(path)]
        assert row["status"] == "failed" and row["output"], row
        assert row["error"].startswith(str(path)), row["error"]  # the reason names the file
        assert re.search(pattern, row["error"]), row["error"]
        assert not Path(row["output"]).exists()
    sha = file_sha256(checkpoint)
    for path in good:
        row = rows[str(path)]
        assert row["status"] == "ok", row
        bag = read_bag(row["output"])
        volume = LoadVolume(ensure_channel_first=False)(str(path))
        n = volume.shape[2]  # these volumes are stored axially (RAS axis 2 = stored axis 2)
        assert bag.feats.shape == (n, 16) and int(row["n_slices"]) == n and row["dim"] == "16"
        np.testing.assert_array_equal(bag.slice_index, np.arange(n))
        assert (bag.checkpoint_sha256, bag.source, bag.axis) == (sha, str(path), 2)
        assert row["shape"] == "x".join(str(s) for s in volume.shape)
        assert float(row["seconds"]) > 0
    assert (out / "study1.h5").is_file() and (out / "breast1.h5").is_file()  # flat <case>.h5 names
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # inputs untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "failed" in capsys.readouterr().err


def test_same_case_name_in_two_folders_fails_the_second(demo_dir, checkpoint, tmp_path):
    first = copy_hippo(demo_dir, tmp_path / "in" / "a", 1)[0]
    second = copy_hippo(demo_dir, tmp_path / "in" / "b", 1)[0]  # same file name: same <case>.h5
    assert _embed(tmp_path / "in", tmp_path / "out", checkpoint) == 1
    rows = _manifest(tmp_path / "out")
    assert rows[str(first)]["status"] == "ok" and rows[str(second)]["status"] == "failed"
    assert rows[str(second)]["error"].startswith(str(second)) and str(first) in rows[str(second)]["error"]


def test_skip_empty_threshold_keeps_a_subset_of_slices(demo_dir, checkpoint, tmp_path):
    src = copy_hippo(demo_dir, tmp_path / "in", 1)[0]
    assert _embed(tmp_path / "in", tmp_path / "some", checkpoint, "--set", "skip_empty_threshold=0.99") == 0
    volume = LoadVolume(ensure_channel_first=False)(str(src))
    bag = read_bag(tmp_path / "some" / "hippocampus_004.h5")
    assert 0 < bag.n_slices < volume.shape[2] and bag.feats.shape[0] == bag.n_slices
    assert np.all(np.diff(bag.slice_index) > 0) and bag.slice_index.max() < volume.shape[2]
    full = read_bag(next(iter(_embed_one(tmp_path, src, checkpoint))))
    np.testing.assert_allclose(bag.feats, full.feats[bag.slice_index], rtol=1e-5, atol=1e-6)  # same slices
    assert _embed(tmp_path / "in", tmp_path / "none", checkpoint, "--set", "skip_empty_threshold=2") == 1
    row = _manifest(tmp_path / "none")[str(src)]
    assert row["status"] == "failed" and row["error"].startswith(str(src))  # no slice left: the volume fails alone


def _embed_one(tmp_path: Path, src: Path, checkpoint: Path) -> list[Path]:
    out = tmp_path / "all"
    assert _embed(src.parent, out, checkpoint) == 0
    return sorted(out.glob("*.h5"))


def test_slice_index_refers_to_the_stored_volume(demo_dir, checkpoint, tmp_path):
    """A volume stored with its z axis reversed embeds the same RAS slices; slice_index points back to storage."""
    src = demo_dir / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"
    img = nib.load(src)
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = img.shape[2] - 1  # voxel z -> n - 1 - z, so the world geometry is unchanged
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(src, root / "plain.nii.gz")
    data = np.asarray(img.dataobj)[:, :, ::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip), root / "reversed.nii.gz")
    assert _embed(root, tmp_path / "out", checkpoint) == 0
    plain, reversed_ = read_bag(tmp_path / "out" / "plain.h5"), read_bag(tmp_path / "out" / "reversed.h5")
    n = img.shape[2]
    np.testing.assert_array_equal(plain.slice_index, np.arange(n))
    np.testing.assert_array_equal(reversed_.slice_index, np.arange(n)[::-1])
    np.testing.assert_allclose(reversed_.feats, plain.feats, rtol=1e-5, atol=1e-6)


def test_resume_skips_finished_and_overwrite_redoes(mixed_input, checkpoint, tmp_path):
    root, good, bad = mixed_input
    out = tmp_path / "out"
    _embed(root, out, checkpoint)
    first, stamps = _bags(out), {p: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert _embed(root, out, checkpoint) == 1  # bad ones fail again
    rows = _manifest(out)
    assert all(rows[str(p)]["status"] == "skipped" for p in good)
    assert all(rows[str(p)]["status"] == "failed" for p, _ in bad.values())
    assert all(rows[str(p)]["shape"] and rows[str(p)]["n_slices"] for p in good)  # skipped rows still describe
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps  # nothing rewritten
    assert _embed(root, out, checkpoint, "--overwrite") == 1
    assert all(_manifest(out)[str(p)]["status"] == "ok" for p in good)
    again = _bags(out)
    assert list(again) == list(first) and all(np.array_equal(first[k], again[k]) for k in first)


def _same_results(a: Path, b: Path) -> None:
    bags_a, bags_b = _bags(a), _bags(b)
    assert list(bags_a) == list(bags_b) and bags_a
    for name in bags_a:  # bit-identical, although 1 worker runs 2 torch threads and 2 workers 1 thread each
        np.testing.assert_array_equal(bags_a[name], bags_b[name], err_msg=name)
    keep = ("status", "error", "shape", "spacing", "n_slices", "dim")
    rows_a = {k: {c: r[c].replace(str(a), "OUT") for c in keep} for k, r in _manifest(a).items()}
    rows_b = {k: {c: r[c].replace(str(b), "OUT") for c in keep} for k, r in _manifest(b).items()}
    assert rows_a == rows_b and list(rows_a) == list(rows_b)  # input order kept


@pytest.mark.slow
def test_two_workers_match_one(demo_dir, checkpoint, tmp_path):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 4)
    make_bad_inputs(demo_dir, src / "bad")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _embed(src, one, checkpoint) == 1
    assert _embed(src, two, checkpoint, "--workers", "2") == 1
    _same_results(one, two)


@pytest.mark.slow
def test_torchrun_shards_and_merges(demo_dir, checkpoint, tmp_path):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 3)
    make_bad_inputs(demo_dir, src / "bad")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert _embed(src, single, checkpoint) == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medvol",
           "embed", str(src), str(sharded), "--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), *SET]
    proc = subprocess.run(cmd, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, cwd=REPO_ROOT)
    assert proc.returncode != 0, proc.stderr[-2000:]  # some inputs failed -> every rank exits 1
    assert "3 ok" in proc.stdout and f"{len(BAD_INPUTS)} failed" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    _same_results(single, sharded)
    assert not list(sharded.glob(".manifest*"))  # shard manifests merged and removed


def test_usage_errors_exit_2(demo_dir, checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 1)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist"),
        ([str(src), str(src / "out")], "inside input"),
        ([str(src), str(tmp_path / "o"), "--bundle", str(tmp_path / "nobundle")], "no configs/inference.json"),
        ([str(src), str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none.pt")],
         f"--checkpoint {tmp_path / 'none.pt'} does not exist"),
        ([str(src), str(tmp_path / "o"), "--set", "encoder=resnet18"], "does not fit the bundle's network_def"),
        ([str(src), str(tmp_path / "o"), "--set", "encoder=resnet"], "unknown slice encoder 'resnet'"),
        ([str(src), str(tmp_path / "o"), "--set", "spatial_size"], "--set expects KEY=VALUE"),
        ([str(src), str(tmp_path / "o"), "--workers", "0"], "--workers must be >= 1"),
        ([str(src), str(tmp_path / "o"), "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(src), str(tmp_path / "o"), "--device", "cuda"], "no CUDA device"))
    for args, message in cases:
        argv = ["embed", *args]
        if "--bundle" not in args:
            argv += ["--bundle", str(BUNDLE)]
        if "--checkpoint" not in args:
            argv += ["--checkpoint", str(checkpoint)]
        assert main([*argv, *SET]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("medvol embed: error:") and message in err, (args, err)
    assert not (tmp_path / "o").exists()  # nothing was written
    empty_bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", empty_bundle / "configs")
    assert main(["embed", str(src), str(tmp_path / "o"), "--bundle", str(empty_bundle), *SET]) == 2
    err = capsys.readouterr().err
    assert "the bundle has no trained checkpoint" in err and "train the bundle first, or pass --checkpoint" in err
    with pytest.raises(SystemExit) as err:
        main(["embed", str(src), str(tmp_path / "o")])  # --bundle is required
    assert err.value.code == 2


def test_default_checkpoint_is_the_bundles_model(demo_dir, checkpoint, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(checkpoint, bundle / "models" / "model.pt")
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 1)
    assert main(["embed", str(src), str(tmp_path / "o"), "--bundle", str(bundle), *SET]) == 0
    assert read_bag(next((tmp_path / "o").glob("*.h5"))).checkpoint_sha256 == file_sha256(checkpoint)


def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, "-m", "medvol", "embed", "--help"], capture_output=True,
                          encoding="utf-8", errors="replace",
                          timeout=120)
    assert proc.returncode == 0
    for option in ("--bundle", "--checkpoint", "--workers", "--overwrite", "--batch-size", "--device", "--set"):
        assert option in proc.stdout


def test_sagittally_stored_ixi_maps_axial_slices_to_stored_axis_1(shared_data, checkpoint, tmp_path):
    """IXI T1 is stored sagittally (120 x 120 x 90): the RAS axial slices are stored axis 1."""
    from monai.transforms import Orientation

    src = sorted((shared_data / "ixi_t1" / "t1").glob("*.nii.gz"))[0]
    (tmp_path / "list.csv").write_text(f"image\n{src}\n")
    assert _embed(tmp_path / "list.csv", tmp_path / "out", checkpoint) == 0
    bag = read_bag(tmp_path / "out" / src.name.replace(".nii.gz", ".h5"))
    loaded = LoadVolume()(str(src))
    stored, ras = loaded[0].numpy(), Orientation("RAS", labels=None)(loaded)[0].numpy()
    assert bag.axis == 1 and bag.n_slices == stored.shape[1] == ras.shape[2] == 120
    for k in (0, 37, 119):  # RAS slice k holds the voxels of stored slice slice_index[k]
        np.testing.assert_array_equal(np.sort(ras[:, :, k], axis=None),
                                      np.sort(np.take(stored, bag.slice_index[k], axis=1), axis=None))
    np.testing.assert_allclose(bag.spacing, (2.0, 2.0, 2.0), rtol=1e-5)


def test_odd_inputs_fail_alone(demo_dir, checkpoint, tmp_path):
    """A symbolic link loop and a CSV row whose series UID is a path each fail alone; no bag lands outside OUTPUT."""
    data = tmp_path / "data"
    good = copy_hippo(demo_dir, data, 1)[0]
    series = Path(shutil.copytree(demo_dir / "dicom" / "hippocampus_study1", data / "series"))
    (data / "a.nii.gz").symlink_to("b.nii.gz")
    (data / "b.nii.gz").symlink_to("a.nii.gz")
    rows = [str(good), f"{series}#../../../escaped", str(data / "a.nii.gz"), str(series)]
    (tmp_path / "list.csv").write_text("image\n" + "\n".join(rows) + "\n")
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    assert _embed(tmp_path / "list.csv", out, checkpoint) == 1
    manifest = _manifest(out)
    assert manifest[str(good)]["status"] == "ok" and manifest[str(series)]["status"] == "ok"
    bad_uid = manifest[f"{series}#../../../escaped"]
    assert bad_uid["status"] == "failed"
    assert bad_uid["error"] == f"{series}#../../../escaped: '../../../escaped' after '#' is not a DICOM Series " \
                               "Instance UID (digits and dots)"
    assert manifest[str(data / "a.nii.gz")]["error"] == f"{data / 'a.nii.gz'}: symbolic link loop (-> b.nii.gz)"
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p in (out, out.parent) for p in new), sorted(new)  # nothing outside OUTPUT


def test_resume_redoes_a_damaged_bag(demo_dir, checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 2)
    out = tmp_path / "out"
    assert _embed(src, out, checkpoint) == 0
    first = _bags(out)
    rows = _manifest(out)
    bags = sorted(out.glob("*.h5"))
    assert all(int(r["output_bytes"]) == Path(r["output"]).stat().st_size for r in rows.values())
    data = bags[0].read_bytes()
    bags[0].write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert _embed(src, out, checkpoint) == 0
    statuses = {Path(r["output"]).name: r["status"] for r in _manifest(out).values()}
    assert statuses == {bags[0].name: "ok", bags[1].name: "skipped"}
    assert "existing output not trusted" in capsys.readouterr().err
    again = _bags(out)
    assert all(np.array_equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("content", [b"", b"patient notes, not a checkpoint\n" * 40, "half"])
def test_unreadable_checkpoint_is_one_short_line(demo_dir, checkpoint, tmp_path, capsys, content):
    src = tmp_path / "in"
    copy_hippo(demo_dir, src, 1)
    bad = tmp_path / "model.pt"
    bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2] if content == "half" else content)
    assert _embed(src, tmp_path / "out", bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 250, err
    assert err.startswith(f"medvol embed: error: checkpoint {bad}: ")
