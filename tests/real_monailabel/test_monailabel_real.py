"""The few-shot segmentation bundle in the real MONAI Label (0.8.5): infer task, train task and the server.

Runs only where ``monailabel`` is importable (``make test-monailabel`` builds that environment) and
``MEDVOL_DATA`` points at the shared datasets; elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("monailabel.tasks.infer.bundle", reason="MONAI Label is not installed in this environment: run "
                    "`make test-monailabel` (builds the separate .venv-monailabel; see docs/monailabel.md)")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import BUNDLES_DIR, REPO_ROOT  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

from medvol.apps.monailabel_app import prepare_app  # noqa: E402

BUNDLE = BUNDLES_DIR / "fewshot_segmentation"
NAME = "fewshot_segmentation"
CT_NAME = "fewshot_ct"
CT_OVERRIDES = {"preset": "ct", "spacing": [6.0, 6.0, 6.0]}  # resampling on: the Spacingd / image_path path
HIPPO_CASES = ["hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_008"]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def hippo(shared_data, tmp_path_factory) -> Path:
    """Four labeled hippocampus MRIs (MSD layout) copied from the shared data."""
    root = tmp_path_factory.mktemp("hippo")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
        for case in HIPPO_CASES:
            shutil.copy(shared_data / "hippocampus" / sub / f"{case}.nii.gz", root / sub)
    return root


@pytest.fixture(scope="module")
def checkpoint(hippo, tmp_path_factory) -> Path:
    """A model from the bundle's own CLI training (2 labeled volumes, a few iterations)."""
    out = tmp_path_factory.mktemp("seg_run")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
           "--bundle_root", str(BUNDLE), "--dataset_dir", str(hippo), "--output_dir", str(out),
           "--num_labeled", "2", "--max_epochs", "1", "--iterations_per_epoch", "4"]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "models" / "model.pt"


@pytest.fixture(scope="module")
def app(checkpoint, tmp_path_factory) -> Path:
    """App folder prepared by the medvol command, as a user runs it: one MRI model and one CT model."""
    app_dir = tmp_path_factory.mktemp("app") / "medvol_app"
    proc = subprocess.run([_bin("medvol"), "monailabel-app", str(app_dir), "--bundle", str(BUNDLE),
                           "--checkpoint", str(checkpoint), "--studies", "/data/studies", "--port", "8123"],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"monailabel start_server --app {app_dir} --studies /data/studies --conf models {NAME} " \
           "--conf zoo_source github --host 127.0.0.1 --port 8123" in proc.stdout
    prepare_app(app_dir, BUNDLE, checkpoint=checkpoint, name=CT_NAME, overrides=CT_OVERRIDES)
    assert (app_dir / "main.py").is_file() and (app_dir / "model" / NAME / "models" / "model.pt").is_file()
    return app_dir


def _infer(task: BundleInferTask, image: Path) -> nib.Nifti1Image:
    result_file, result_json = task({"image": str(image), "device": "cpu"})
    assert result_json["label_names"] == {"anterior": 1, "posterior": 2}
    return nib.load(result_file)


def _assert_label_on_grid(seg: nib.Nifti1Image, image: Path):
    src = nib.load(image)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2}


def test_infer_task_loads_bundle(app):
    task = BundleInferTask(str(app / "model" / NAME), conf={})
    assert task.is_valid()
    assert task.labels == {"anterior": 1, "posterior": 2}  # channel_def, background dropped
    assert task.type == "segmentation" and task.dimension == 3


def test_infer_hippocampus_mri(app, shared_data, tmp_path):
    image = shared_data / "hippocampus" / "imagesTr" / "hippocampus_014.nii.gz"
    seg = _infer(BundleInferTask(str(app / "model" / NAME), conf={}), image)
    _assert_label_on_grid(seg, image)
    assert int((np.asarray(seg.dataobj) > 0).sum()) > 0
    # the same segmentation as the bundle's own inference.json run by monai.bundle
    (tmp_path / "in").mkdir()
    shutil.copy(image, tmp_path / "in")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE),
                           "--dataset_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                           "--ckpt_path", str(app / "model" / NAME / "models" / "model.pt")],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = nib.load(tmp_path / "out" / "segmentations" / "hippocampus_014_seg.nii.gz")
    agree = float((np.asarray(cli.dataobj) == np.asarray(seg.dataobj)).mean())
    assert agree > 0.999, agree


def test_infer_totalsegmentator_ct_with_resampling(app, shared_data):
    """CT preset with spacing set: Spacingd runs on MONAI Label's data (image + image_path string)."""
    config = json.loads((app / "model" / CT_NAME / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert config["preset"] == "ct" and config["spacing"] == [6.0, 6.0, 6.0]
    image = shared_data / "totalseg_ct" / "ct" / "example_ct.nii.gz"
    seg = _infer(BundleInferTask(str(app / "model" / CT_NAME), conf={}), image)
    _assert_label_on_grid(seg, image)


def test_train_task_one_epoch_from_model_pt(checkpoint, hippo, tmp_path):
    """BundleTrainTask with labels from a MONAI Label datastore; the new models/model.pt serves inference."""
    app_dir = tmp_path / "app"
    prepare_app(app_dir, BUNDLE, checkpoint=checkpoint, overrides={"iterations_per_epoch": 3})
    bundle_dir = app_dir / "model" / NAME
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in HIPPO_CASES[:3]:
        shutil.copy(hippo / "imagesTr" / f"{case}.nii.gz", studies)
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for case in HIPPO_CASES[:3]:
        datastore.save_label(case, str(hippo / "labelsTr" / f"{case}.nii.gz"), "final", {})
    assert len(datastore.datalist()) == 3

    before = torch.load(bundle_dir / "models" / "model.pt", weights_only=True)
    task = BundleTrainTask(str(bundle_dir), conf={})
    assert task.is_valid()
    request = {"model": NAME, "max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False}
    assert task(request, datastore) == {}

    after = torch.load(bundle_dir / "models" / "model.pt", weights_only=True)
    assert set(after) == set(before)
    weights = [k for k in before if before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in weights)
    # trained from the model MONAI Label found in models/model.pt (CheckpointLoader), not from a random init
    change = sum(float((after[k] - before[k]).abs().sum()) for k in weights)
    assert change < 0.5 * sum(float(before[k].abs().sum()) for k in weights)
    assert (bundle_dir / "checkpoints" / "last.pt").is_file()
    # the infer task picks up the trained model
    image = hippo / "imagesTr" / f"{HIPPO_CASES[3]}.nii.gz"
    _assert_label_on_grid(_infer(BundleInferTask(str(bundle_dir), conf={}), image), image)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_server_info_and_infer_on_loopback(app, hippo, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    image = hippo / "imagesTr" / "hippocampus_004.nii.gz"
    shutil.copy(image, studies)
    port = _free_port()
    cmd = [_bin("monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "models", NAME, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
           "--conf", "skip_trainers", "false", "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "server.log", "w")
    # the `monailabel` launcher runs `python -m monailabel.main` from PATH: as in an activated environment
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": _bin("") + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        info = None
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                status, body = _get(f"{base}/info/")
                if status == 200:
                    info = json.loads(body)
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        assert info is not None, (tmp_path / "server.log").read_text(encoding="utf-8")[-4000:]
        assert NAME in info["models"], info["models"]
        model = info["models"][NAME]
        assert model["labels"] == {"anterior": 1, "posterior": 2}
        assert (model["type"], model["dimension"], model["version"]) == ("segmentation", 3, "0.1.0")
        assert NAME in info.get("trainers", {})

        req = urllib.request.Request(f"{base}/infer/{NAME}?image=hippocampus_004&output=image", data=b"",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200
            (tmp_path / "result.nii.gz").write_bytes(r.read())
        _assert_label_on_grid(nib.load(tmp_path / "result.nii.gz"), image)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode is not None
