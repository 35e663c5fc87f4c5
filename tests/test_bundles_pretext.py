"""The PCRLv2, SwinUNETR self-supervised and VoCo bundles end to end on demo MRI, and few-shot loading of their
checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import bundle_ddp, bundle_workflow, copy_labeled_hippo, run_bundle
from monai.networks.nets import SwinUNETR
from test_bundles import test_bundle_layout_and_metadata as check_layout
from test_bundles import test_network_def_is_stated_once as check_network_def
from test_bundles import test_verify_net_in_out as check_net_in_out

BUNDLES = ["pcrlv2", "swinunetr_ssl", "voco"]
TINY_UNET = {"unet": {"channels": [4, 8, 16]}}
# group norm: SwinUNETR's conv block on the 1/32 map of a 32^3 crop sees one voxel, which instance norm refuses
TINY_SWIN = {"swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "norm": "group"}}
OVERRIDES = {
    "pcrlv2": {"backbone_options": TINY_UNET, "roi_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local": 2},
    "swinunetr_ssl": {"backbone_options": TINY_SWIN, "roi_size": [32, 32, 32], "method#contrast_dim": 16,
                      "max_holes": 5},
    # VoCo's default backbone is SwinUNETR (TINY_SWIN works, ~1 min on 2 cores); the U-Net keeps the test short
    "voco": {"backbone": "unet", "backbone_options": TINY_UNET, "voco_grid": [2, 2, 1], "base_size": [16, 24, 32],
             "roi_size": [16, 16, 16], "method#hidden_dim": 16, "method#proj_dim": 16},
}
# what the few-shot bundle must be built with to take each checkpoint, and the prefixes it transfers
FEWSHOT = {
    "pcrlv2": ({"backbone_options": TINY_UNET, "roi_size": [16, 16, 16], "pretrained_prefixes": ["encoder."]},
               "encoder."),
    "swinunetr_ssl": ({"backbone": "swinunetr", "backbone_options": TINY_SWIN, "roi_size": [32, 32, 32]},
                      "encoder.swinViT."),
    "voco": ({"backbone_options": TINY_UNET, "roi_size": [16, 16, 16]}, "encoder."),
}


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory) -> Path:
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("hippo"), 6)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_structure(bundle):
    """The checks every U-Net bundle passes: files, metadata schema, one network_def, verify_net_in_out."""
    check_layout(bundle)
    check_network_def(bundle)
    check_net_in_out(bundle)


def _overrides(bundle: str, data: Path, out: Path, **kw) -> dict:
    return {"dataset_dir": str(data), "output_dir": str(out), "max_epochs": 1, "batch_size": 2,
            "val_fraction": 0.2, "pad_size": [32, 48, 32], **OVERRIDES[bundle], **kw}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_trains_and_fewshot_loads_its_checkpoint(bundle, hippo, tmp_path):
    wf = run_bundle(bundle, **_overrides(bundle, hippo, tmp_path / "ssl"))
    losses = wf.parser.get_parsed_content("train#trainer").state.output
    assert torch.isfinite(losses["loss"]) and len([k for k in losses if k.startswith("loss_")]) >= 2
    ckpt = tmp_path / "ssl" / "models" / "model.pt"
    pretrained = torch.load(ckpt, weights_only=True)
    overrides, transferred = FEWSHOT[bundle]
    fewshot = bundle_workflow("fewshot_segmentation", dataset_dir=str(hippo), output_dir=str(tmp_path / "fs"),
                              pad_size=[32, 48, 32], pretrained_checkpoint=str(ckpt), num_labeled=2, **overrides)
    net = fewshot.parser.get_parsed_content("network_def")
    checked = 0
    for key, value in net.state_dict().items():
        if key.startswith(transferred):
            torch.testing.assert_close(value, pretrained[key], msg=key)
            checked += 1
    assert checked > 10
    fewshot.finalize()
    if bundle == "swinunetr_ssl":  # models/model_swinvit.pt has the published layout: SwinUNETR.load_from reads it
        checkpoint = torch.load(tmp_path / "ssl" / "models" / "model_swinvit.pt", weights_only=True)
        monai_net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
        monai_net.load_from(checkpoint)
        for key, value in monai_net.swinViT.state_dict().items():
            torch.testing.assert_close(value, pretrained["encoder.swinViT." + key], msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ddp_with_two_cpu_processes(bundle, hippo, tmp_path):
    proc = bundle_ddp(bundle, _overrides(bundle, hippo, tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["method"])
    if bundle == "swinunetr_ssl":
        keys = torch.load(tmp_path / "models" / "model_swinvit.pt", weights_only=True)["state_dict"]
        assert "module.patch_embed.proj.weight" in keys
