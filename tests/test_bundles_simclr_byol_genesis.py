"""The SimCLR, BYOL and Models Genesis bundles end to end on demo MRI: train (`monai.bundle` workflow), embed,
feed the few-shot bundle, and train under DDP with two CPU processes through the multi_gpu_train overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_ddp, bundle_workflow, copy_labeled_hippo, run_bundle
from ignite.engine import Events

BUNDLES = ["simclr", "byol", "models_genesis"]
TINY = {"backbone_options": {"unet": {"channels": [4, 8, 16], "norm": "instance"}}}
# what each pretext task trains, so what the few-shot bundle must be able to transfer
TRAINED = {"simclr": ("encoder.",), "byol": ("encoder.",), "models_genesis": ("encoder.", "decoder.")}


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory) -> Path:
    """Six labeled hippocampus volumes (MSD layout)."""
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("hippo"), 6)


def _overrides(bundle: str, data: Path, out: Path, **kw) -> dict:
    base = {"dataset_dir": str(data), "output_dir": str(out), "max_epochs": 2, "batch_size": 2, "val_fraction": 0.2,
            "pad_size": [32, 48, 32], "roi_size": [16, 16, 16], **TINY}
    if bundle == "models_genesis":
        base["shuffle_blocks"] = 200
    else:
        base["method#hidden_dim"] = 16
    return {**base, **kw}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_trains_embeds_and_feeds_fewshot(bundle, hippo, tmp_path):
    wf = bundle_workflow(bundle, **_overrides(bundle, hippo, tmp_path))
    method = wf.parser.get_parsed_content("method")
    losses = []
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    start = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    wf.run()
    wf.finalize()
    assert len(losses) == 4 and np.isfinite(losses).all()  # 2 epochs of 2 batches of 2 (4 training volumes)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and list((tmp_path / "tensorboard").iterdir())
    assert set(state) == set(start)  # the backbone alone, not the heads or the target network
    for key, value in state.items():  # what the pretext task trains has moved, the rest is as initialised
        if key.endswith("conv.weight") and key.startswith(TRAINED[bundle]):
            assert not torch.equal(value, start[key]), key
        elif bundle != "models_genesis" and not key.startswith("encoder."):  # decoder + head get no gradient
            assert torch.equal(value, start[key]), key

    # the few-shot bundle loads the checkpoint (as --pretrained_checkpoint on the command line)
    fewshot = bundle_workflow("fewshot_segmentation", dataset_dir=str(hippo), output_dir=str(tmp_path / "seg"),
                              roi_size=[16, 32, 16], pretrained_checkpoint=str(tmp_path / "models" / "model.pt"),
                              pretrained_prefixes=list(TRAINED[bundle]), num_labeled=2, max_epochs=1,
                              iterations_per_epoch=2, **TINY)
    net = fewshot.parser.get_parsed_content("network_def")
    for key, value in net.state_dict().items():
        if key.startswith(TRAINED[bundle]):
            torch.testing.assert_close(value, state[key], msg=key)
    assert net.head.conv.weight.shape[0] == 3
    fewshot.run()
    fewshot.finalize()
    assert (tmp_path / "seg" / "models" / "model.pt").is_file()

    run_bundle(bundle, ["train.json", "inference.json"], dataset_dir=str(hippo / "imagesTr"), output_dir=str(tmp_path),
               pad_size=[32, 48, 32], **TINY)
    emb = np.stack([np.load(v) for v in sorted((tmp_path / "embeddings").glob("*.npy"))])
    assert emb.shape == (6, 16) and np.isfinite(emb).all() and emb.std(axis=0).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ddp_with_two_cpu_processes(bundle, hippo, tmp_path):
    out = tmp_path / "ddp"
    proc = bundle_ddp(bundle, _overrides(bundle, hippo, out, max_epochs=1, val_fraction=0))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "models" / "model.pt").is_file()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["method"])  # saved unwrapped
