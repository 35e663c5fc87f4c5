"""SparK and MAE bundles end to end on demo MRI via ``python -m monai.bundle run``: training, the embedding overlay,
DDP on two CPU processes, and the few-shot bundle loading what they saved."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import bundle_cli, bundle_ddp, bundle_workflow, copy_labeled_hippo, run_bundle

SPARK_TINY = {"backbone_options": {"unet": {"channels": [4, 8, 16]}}, "pad_size": [32, 48, 32],
              "roi_size": [16, 16, 16]}
UNETR_TINY = {"img_size": "@roi_size", "hidden_size": 24, "mlp_dim": 48, "num_heads": 2, "feature_size": 4}
MAE_TINY = {"backbone_options": {"unetr": UNETR_TINY}, "pad_size": [32, 48, 32], "roi_size": [32, 32, 32],
            "method#decoder_dim": 12, "method#decoder_heads": 2, "method#decoder_depth": 1}


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory):
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("hippo"), 4)


def _cli(bundle: str, configs: list[str], **overrides):
    files = "[" + ",".join(f"'bundles/{bundle}/configs/{c}'" for c in configs) + "]"
    args = ["--config_file", files, "--bundle_root", f"bundles/{bundle}",
            "--logging_file", f"bundles/{bundle}/configs/logging.conf"]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    proc = bundle_cli(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train_and_embed(bundle, tiny, hippo, out):
    _cli(bundle, ["train.json"], dataset_dir=str(hippo / "imagesTr"), output_dir=str(out), max_epochs=2,
         batch_size=2, val_fraction=0.25, **tiny)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["method"]
    run_bundle(bundle, ["train.json", "inference.json"], dataset_dir=str(hippo / "imagesTr"), output_dir=str(out),
               **tiny)
    emb = np.stack([np.load(p) for p in sorted((out / "embeddings").glob("*.npy"))])
    assert emb.shape[0] == 4 and np.isfinite(emb).all() and emb.std(axis=0).max() > 0
    return state, last


@pytest.mark.slow
def test_spark_bundle_trains_embeds_and_transfers(hippo, tmp_path):
    state, last = _train_and_embed("spark", SPARK_TINY, hippo, tmp_path / "spark")
    assert any(k.startswith("decoder.") for k in state) and "mask_tokens.0" in last
    wf = bundle_workflow("fewshot_segmentation", dataset_dir=str(hippo), output_dir=str(tmp_path / "fs"),
                         pretrained_checkpoint=str(tmp_path / "spark" / "models" / "model.pt"), **SPARK_TINY)
    net = wf.parser.get_parsed_content("network_def")
    for key, value in net.state_dict().items():  # the U-Net encoder and decoder transfer, the head is new
        if key.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(value, state[key], msg=key)
    assert net.head.conv.weight.shape[0] == 3


@pytest.mark.slow
def test_mae_bundle_trains_embeds_and_transfers(hippo, tmp_path):
    state, last = _train_and_embed("mae", MAE_TINY, hippo, tmp_path / "mae")
    assert "mask_token" in last and "decoder_pred.weight" in last
    wf = bundle_workflow("fewshot_segmentation", dataset_dir=str(hippo), output_dir=str(tmp_path / "fs"),
                         pretrained_checkpoint=str(tmp_path / "mae" / "models" / "model.pt"),
                         pretrained_prefixes=["encoder.vit."], backbone="unetr",
                         backbone_options={"unetr": UNETR_TINY}, roi_size=[32, 32, 32], pad_size=[32, 48, 32])
    net = wf.parser.get_parsed_content("network_def")
    vit = {k: v for k, v in net.state_dict().items() if k.startswith("encoder.vit.")}
    assert vit
    for key, value in vit.items():
        torch.testing.assert_close(value, state[key], msg=key)


@pytest.mark.slow
def test_mae_ddp_with_two_cpu_processes(hippo, tmp_path):
    """MAE (ViT encoder, light decoder) by the same multi_gpu_train.json overlay as every other bundle."""
    out = tmp_path / "ddp"
    proc = bundle_ddp("mae", {"dataset_dir": str(hippo / "imagesTr"), "output_dir": str(out), "max_epochs": 1,
                              "batch_size": 1, "val_fraction": 0.25, **MAE_TINY})
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (out / "models" / "model.pt").is_file() and not any(k.startswith("module.") for k in state["method"])


@pytest.mark.slow
def test_spark_ddp_with_two_cpu_processes(hippo, tmp_path):
    """SparK declares that every parameter gets a gradient (find_unused_parameters=False): DDP must agree."""
    out = tmp_path / "ddp"
    proc = bundle_ddp("spark", {"dataset_dir": str(hippo / "imagesTr"), "output_dir": str(out), "max_epochs": 1,
                                "batch_size": 1, "val_fraction": 0.25, **SPARK_TINY})
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (out / "models" / "model.pt").is_file() and not any(k.startswith("module.") for k in state["method"])
