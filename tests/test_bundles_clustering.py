"""The patch_clustering and pixel_clustering bundles: structure, end-to-end runs on real MRI, user errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, bundle_cli, bundle_ddp, bundle_workflow, run_bundle
from ignite.engine import Events
from monai.bundle import ConfigParser

from medvol.cluster import KMeans
from medvol.errors import ConfigError, find_error
from medvol.networks import load_pretrained

BUNDLES = ["patch_clustering", "pixel_clustering"]
TINY = {"backbone_options": {"unet": {"channels": [4, 8, 16], "norm": "instance"}}}
K = 4


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory) -> Path:
    """Six hippocampus MRI volumes (labels not needed)."""
    root = tmp_path_factory.mktemp("hippo_ssl")
    (root / "imagesTr").mkdir()
    for f in sorted((demo_dir / "hippocampus" / "imagesTr").iterdir())[:6]:
        shutil.copy(f, root / "imagesTr" / f.name)
    return root


def _overrides(bundle: str, data: Path, out: Path, **kw) -> dict:
    base = {"dataset_dir": str(data), "output_dir": str(out), "max_epochs": 2, "batch_size": 2, "val_fraction": 0.2,
            "pad_size": [32, 48, 32], "roi_size": [16, 16, 16], **TINY}
    if bundle == "patch_clustering":
        base.update({"proj_dim": 8, "num_prototypes": 8})
    else:
        base.update({"num_clusters": K, "cluster_samples": 4000, "cluster_quota": 1000, "kmeans_device": "cpu",
                     "montage_volumes": 2})
    return {**base, **kw}


def _fewshot_network():
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "fewshot_segmentation" / "configs" / "train.json"))
    parser.update(TINY)
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def patch_run(hippo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patch")
    run_bundle("patch_clustering", **_overrides("patch_clustering", hippo, out))
    return out


# ---- structure ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_clustering_config_defaults(bundle):
    """Layout, metadata schema and network_def consistency: tests/test_bundles.py (ALL_BUNDLES)."""
    root = BUNDLES_DIR / bundle
    licence = (BUNDLES_DIR / "caid" / "LICENSE").read_text(encoding="utf-8")
    assert (root / "LICENSE").read_text(encoding="utf-8") == licence
    train = json.loads((root / "configs" / "train.json").read_text(encoding="utf-8"))
    for key in ("split_file", "seed", "resume", "preset"):
        assert key in train, f"{bundle}/train.json lacks {key}"
    assert train["preset"] == "mri"
    if bundle == "pixel_clustering":
        assert "cluster" in train and train["num_clusters"] == 10
    fewshot = json.loads((BUNDLES_DIR / "fewshot_segmentation" / "configs" / "train.json").read_text(encoding="utf-8"))
    assert train["backbone_options"] == fewshot["backbone_options"]  # same norm as fine-tuning
    parser = ConfigParser(train)
    parser.update({"bundle_root": str(root)})
    assert type(parser.get_parsed_content("network_def").encoder.levels[0].convs[0].adn.N).__name__ == \
        "InstanceNorm3d"


# ---- patch-level runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_patch_trains_embeds_and_feeds_fewshot(patch_run, hippo):
    state = torch.load(patch_run / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and not any(k.startswith("prototypes") for k in state)
    assert (patch_run / "checkpoints" / "last.pt").is_file() and list((patch_run / "tensorboard").iterdir())
    method_state = torch.load(patch_run / "checkpoints" / "last.pt", weights_only=True)["method"]  # 1 SGD step off
    torch.testing.assert_close(method_state["prototypes.weight"].norm(dim=1), torch.ones(8), atol=0.2, rtol=0)
    net = _fewshot_network()
    report = load_pretrained(net, patch_run / "models" / "model.pt", prefixes=("encoder.",))
    assert report["loaded"] and not report["missing"] and not report["skipped_shape"]
    for key, value in net.state_dict().items():
        if key.startswith("encoder."):
            torch.testing.assert_close(value, state[key], msg=key)
    run_bundle("patch_clustering", ["train.json", "inference.json"], dataset_dir=str(hippo / "imagesTr"),
               output_dir=str(patch_run), pad_size=[32, 48, 32], **TINY)
    emb = np.stack([np.load(v) for v in sorted((patch_run / "embeddings").glob("*.npy"))])
    assert emb.shape == (6, 16) and np.isfinite(emb).all() and emb.std(axis=0).max() > 0


@pytest.mark.slow
def test_patch_resume_matches_uninterrupted(hippo, tmp_path):
    run_bundle("patch_clustering", **_overrides("patch_clustering", hippo, tmp_path / "full"))
    part = bundle_workflow("patch_clustering", **_overrides("patch_clustering", hippo, tmp_path / "part"))
    part.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # as if killed after epoch 1
    part.run()
    run_bundle("patch_clustering", **_overrides("patch_clustering", hippo, tmp_path / "part", resume=True))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["method"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


# ---- pixel-level runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pixel_cluster_then_train_then_infer(hippo, tmp_path, count_fits):
    over = _overrides("pixel_clustering", hippo, tmp_path)
    with pytest.raises(Exception) as info:  # `run` before `cluster`
        run_bundle("pixel_clustering", **over)
    err = find_error(info.value, ConfigError)
    assert err is not None and "run `python -m monai.bundle run cluster" in str(err)

    run_bundle("pixel_clustering", run_id="cluster", **over)
    assert count_fits == [6000]  # one k-means fit streaming the whole dataset (6 volumes x 1000 voxels)
    rows = list(csv.DictReader(open(tmp_path / "pseudolabels" / "manifest.csv")))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert (tmp_path / "cluster_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").iterdir())
    assert KMeans.read_metadata(tmp_path / "pseudolabels" / "kmeans.npz")["feature_source"].startswith("handcrafted")

    run_bundle("pixel_clustering", run_id="cluster", **over)  # resumed: nothing refitted or rewritten
    assert count_fits == [6000]
    assert {r["status"] for r in csv.DictReader(open(tmp_path / "pseudolabels" / "manifest.csv"))} == {"skipped"}

    wf = bundle_workflow("pixel_clustering", **over)
    seen = {}
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.update(e.state.output))
    wf.run()
    wf.finalize()
    assert count_fits == [6000]  # training never fits k-means
    assert 0 < seen["overlap_fraction"] <= 1 and np.isfinite(seen["loss"])
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["head.conv.weight"].shape[0] == K
    net = _fewshot_network()
    report = load_pretrained(net, tmp_path / "models" / "model.pt")  # encoder + decoder, as fewshot does
    assert not report["skipped_shape"] and not report["missing"]

    run_bundle("pixel_clustering", ["train.json", "inference.json"], dataset_dir=str(hippo / "imagesTr"),
               output_dir=str(tmp_path), num_clusters=K, **TINY)
    for image in sorted((hippo / "imagesTr").iterdir()):
        out = nib.load(tmp_path / "cluster_maps" / image.name.replace(".nii.gz", "_clusters.nii.gz"))
        src = nib.load(image)
        assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
        values = np.unique(np.asarray(out.dataobj))
        assert values.min() >= 0 and values.max() < K


@pytest.mark.slow
def test_pixel_cluster_with_an_encoder_teacher(patch_run, hippo, tmp_path, count_fits):
    over = _overrides("pixel_clustering", hippo, tmp_path, teacher_checkpoint=str(patch_run / "models" / "model.pt"),
                      montage_volumes=0, val_fraction=0.0)
    run_bundle("pixel_clustering", run_id="cluster", **over)
    meta = KMeans.read_metadata(tmp_path / "pseudolabels" / "kmeans.npz")
    assert count_fits == [6000] and meta["spherical"] and meta["feature_source"].startswith("encoder UNet3D")
    assert str(patch_run / "models" / "model.pt") in meta["feature_source"]
    labels = [np.asarray(nib.load(p).dataobj) for p in sorted((tmp_path / "pseudolabels").glob("*.nii.gz"))]
    assert len(labels) == 6 and len(np.unique(np.concatenate([x.ravel() for x in labels]))) == K


# ---- user errors (subprocess: what a user sees) ------------------------------------------------------------


@pytest.mark.slow
def test_pixel_run_before_cluster_gives_one_line(hippo, tmp_path):
    out = tmp_path / "out"
    args = ["--config_file", "bundles/pixel_clustering/configs/train.json", "--bundle_root", "bundles/pixel_clustering",
            "--dataset_dir", str(hippo), "--output_dir", str(out), "--max_epochs", "1"]
    proc = bundle_cli(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medvol: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"run `python -m monai.bundle run cluster --config_file bundles/pixel_clustering/configs/train.json " \
           f"--dataset_dir {hippo} --output_dir {out}` first" in errors[0]


@pytest.mark.slow
def test_patch_ddp_with_two_cpu_processes(hippo, tmp_path):
    """The decoder and head get no gradient in patch clustering: DDP must still run (find_unused_parameters)."""
    out = tmp_path / "ddp"
    proc = bundle_ddp("patch_clustering", _overrides("patch_clustering", hippo, out, max_epochs=1))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "models" / "model.pt").is_file()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["method"])  # saved unwrapped
