"""The U-Net bundles' structure; CAiD, global+local contrastive and few-shot segmentation run end to end on real MRI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, bundle_cli, bundle_ddp, bundle_workflow, copy_labeled_hippo, run_bundle
from ignite.engine import Events
from monai.bundle import ConfigParser

SSL_BUNDLES = ["caid", "global_local_contrastive"]
# the U-Net bundles; the structure tests below cover all of them
ALL_BUNDLES = [*SSL_BUNDLES, "fewshot_segmentation", "patch_clustering", "pixel_clustering", "simclr", "byol",
               "models_genesis", "spark", "mae", "lovt"]
SCHEMA = BUNDLES_DIR / "meta_schema.json"
TINY = {"backbone_options": {"unet": {"channels": [4, 8, 16], "norm": "instance"}}}
# configs MONAI Label reads alone (BundleInferTask parses configs/inference.json by itself): not overlays
STANDALONE = {("fewshot_segmentation", "inference.json")}


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory) -> Path:
    """Six labeled hippocampus volumes (MSD layout)."""
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("hippo"), 6)


def _ssl_overrides(bundle: str, data: Path, out: Path, **kw) -> dict:
    base = {"dataset_dir": str(data), "output_dir": str(out), "max_epochs": 2, "batch_size": 2, "val_fraction": 0.2,
            "pad_size": [32, 48, 32], **TINY}
    if bundle == "caid":
        base.update({"roi_size": [16, 16, 16], "method#queue_size": 16, "method#hidden_dim": 16})
    else:
        base.update({"roi_size": [16, 16, 8], "method#hidden_dim": 16, "method#local_levels": 2,
                     "method#local_grid": [2, 2, 2]})
    return {**base, **kw}


@pytest.fixture(scope="module")
def caid_run(hippo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caid")
    run_bundle("caid", **_ssl_overrides("caid", hippo, out))
    return out


# ---- structure ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_bundle_layout_and_metadata(bundle):
    root = BUNDLES_DIR / bundle
    needed = ["configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/multi_gpu_train.json",
              "configs/logging.conf", "docs/README.md", "LICENSE"]
    if bundle == "fewshot_segmentation":
        needed.append("configs/evaluate.json")
    assert [f for f in needed if not (root / f).is_file()] == []
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))  # raises if invalid
    train = json.loads((root / "configs" / "train.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "dataset_dir", "output_dir", "device", "network_def", "max_epochs"):
        assert key in train, f"{bundle}/train.json lacks {key}"


def test_schema_rejects_incomplete_metadata(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((BUNDLES_DIR / "caid" / "configs" / "metadata.json").read_text(encoding="utf-8"))
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(tmp_path / "m.json"), filepath=str(SCHEMA))


NETWORK_IDS = ("network_def", "backbone", "backbone_options")


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_network_def_is_stated_once(bundle):
    """Overlays inherit the network from train.json; MONAI Label's standalone inference.json states the same one."""
    configs = BUNDLES_DIR / bundle / "configs"
    train = json.loads((configs / "train.json").read_text(encoding="utf-8"))
    for path in sorted(configs.glob("*.json")):
        if path.name in ("train.json", "metadata.json"):
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if (bundle, path.name) in STANDALONE:
            assert {k: cfg[k] for k in NETWORK_IDS} == {k: train[k] for k in NETWORK_IDS}
        else:
            assert not set(NETWORK_IDS) & set(cfg), f"{path.name} restates {set(NETWORK_IDS) & set(cfg)}"


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_verify_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    root = BUNDLES_DIR / bundle / "configs"
    files = [root / "inference.json"] if (bundle, "inference.json") in STANDALONE else \
        [root / "train.json", root / "inference.json"]
    verify_net_in_out(net_id="network_def", meta_file=str(root / "metadata.json"),
                      config_file=[str(f) for f in files], n=2, device="cpu")


# ---- runs --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_caid_trains_and_embeds(caid_run, hippo):
    state = torch.load(caid_run / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state)
    assert (caid_run / "checkpoints" / "last.pt").is_file()
    assert list((caid_run / "tensorboard").iterdir())
    run_bundle("caid", ["train.json", "inference.json"], dataset_dir=str(hippo / "imagesTr"),
               output_dir=str(caid_run), pad_size=[32, 48, 32], **TINY)
    vectors = sorted((caid_run / "embeddings").glob("*.npy"))
    assert len(vectors) == 6
    emb = np.stack([np.load(v) for v in vectors])
    assert emb.shape == (6, 16) and np.isfinite(emb).all() and emb.std(axis=0).max() > 0


@pytest.mark.slow
def test_global_local_runs_both_stages(hippo, tmp_path):
    wf = bundle_workflow("global_local_contrastive", **_ssl_overrides("global_local_contrastive", hippo, tmp_path,
                                                                global_epochs=1))
    method = wf.parser.get_parsed_content("method")
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.setdefault(method.stage, dict(e.state.output)))
    encoder_after_global = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: encoder_after_global.update(
        {k: v.clone() for k, v in method.backbone.encoder.state_dict().items()}))
    wf.run()
    wf.finalize()
    assert set(seen) == {"global", "local"}
    assert "loss_global" in seen["global"] and "loss_local" in seen["local"]
    for k, v in method.backbone.encoder.state_dict().items():  # frozen during the local stage
        assert torch.equal(v, encoder_after_global[k]), k
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("bundle", SSL_BUNDLES)
def test_ssl_without_validation_saves_every_epoch(bundle, hippo, tmp_path):
    wf = run_bundle(bundle, **_ssl_overrides(bundle, hippo, tmp_path, val_fraction=0, max_epochs=1))
    assert len(wf.parser.get_parsed_content("datalist_split")[1]) == 0
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_ssl_resume_matches_uninterrupted(hippo, tmp_path):
    full = run_bundle("caid", **_ssl_overrides("caid", hippo, tmp_path / "full"))
    part = bundle_workflow("caid", **_ssl_overrides("caid", hippo, tmp_path / "part"))
    part.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # as if killed after epoch 1
    part.run()
    resumed = run_bundle("caid", **_ssl_overrides("caid", hippo, tmp_path / "part", resume=True))
    assert resumed.parser.get_parsed_content("train#trainer").state.epoch == 2
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["method"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert full is not None


@pytest.mark.slow
def test_fewshot_finetune_evaluate_infer(caid_run, hippo, tmp_path, capsys):
    ckpt = caid_run / "models" / "model.pt"
    common = {"dataset_dir": str(hippo), "output_dir": str(tmp_path), "roi_size": [16, 32, 16], **TINY}
    wf = bundle_workflow("fewshot_segmentation", **common, pretrained_checkpoint=str(ckpt), num_labeled=2, seed=1,
                   max_epochs=1, iterations_per_epoch=3)
    net = wf.parser.get_parsed_content("network_def")
    pretrained = torch.load(ckpt, weights_only=True)
    for key, value in net.state_dict().items():  # encoder and decoder loaded, the 3-class head is new
        if key.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(value, pretrained[key], msg=key)
    assert net.head.conv.weight.shape[0] == 3
    assert len(wf.parser.get_parsed_content("labeled")) == 2
    wf.run()
    wf.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()

    capsys.readouterr()
    run_bundle("fewshot_segmentation", ["train.json", "evaluate.json"], **common)  # MONAI's MetricsSaver files
    rows = list(csv.DictReader(open(tmp_path / "eval" / "val_mean_dice_raw.csv")))
    assert len(rows) == 6 and list(rows[0]) == ["filename", "class0", "class1", "mean"]
    assert sorted(Path(r["filename"]).name for r in rows) == sorted(p.name for p in (hippo / "imagesTr").iterdir())
    mean_dice = float(dict(csv.reader(open(tmp_path / "eval" / "metrics.csv")))["val_mean_dice"])
    per_case = np.array([[float(r["class0"]), float(r["class1"])] for r in rows])
    assert 0 <= mean_dice <= 1 and mean_dice == pytest.approx(np.nanmean(per_case), abs=1e-4)
    summary = list(csv.DictReader(open(tmp_path / "eval" / "val_mean_dice_summary.csv")))
    assert [r["class"] for r in summary] == ["class0", "class1", "mean"]
    printed = capsys.readouterr().out
    assert f"val_mean_dice {mean_dice:.4f} over 6 volumes (anterior " in printed and str(tmp_path / "eval") in printed

    run_bundle("fewshot_segmentation", "inference.json", **{**common, "dataset_dir": str(hippo / "imagesTr")})
    for image in sorted((hippo / "imagesTr").iterdir()):
        seg = nib.load(tmp_path / "segmentations" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        src = nib.load(image)
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_monai_label_style_inference(caid_run, hippo, tmp_path):
    """Mimic MONAI Label's bundle infer task: ids from inference.json, checkpoint.get('model', checkpoint)."""
    root = BUNDLES_DIR / "fewshot_segmentation"
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    image_key = next(iter(meta["network_data_format"]["inputs"]))
    pred_key = next(iter(meta["network_data_format"]["outputs"]))
    labels = meta["network_data_format"]["outputs"][pred_key]["channel_def"]
    assert (image_key, pred_key) == ("image", "pred") and labels == {"0": "background", "1": "anterior",
                                                                     "2": "posterior"}
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), "dataset_dir": str(hippo), "output_dir": str(tmp_path), **TINY})
    for needed in ("network_def", "preprocessing", "postprocessing", "inferer"):
        assert needed in parser
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    net.load_state_dict(checkpoint.get("model", checkpoint))
    image = str(sorted((hippo / "imagesTr").iterdir())[0])
    data = parser.get_parsed_content("preprocessing")({image_key: image})
    with torch.no_grad():
        data[pred_key] = parser.get_parsed_content("inferer")(data[image_key][None], net.eval())[0]
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if type(t).__name__ != "SaveImaged"]
    from monai.transforms import Compose

    out = Compose(post)(data)
    assert out[pred_key].shape[1:] == nib.load(image).shape


# ---- user errors and scale-out (subprocesses: what a user sees) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "label_without_image", "unknown_backbone"])
def test_wrong_config_gives_one_clear_line(case, hippo, tmp_path):
    data = {"missing_dir": tmp_path / "nope", "empty_dir": tmp_path / "empty", "label_without_image": tmp_path / "lw",
            "unknown_backbone": hippo}[case]
    if case == "empty_dir":
        data.mkdir()
    if case == "label_without_image":
        shutil.copytree(hippo, data)
        (data / "imagesTr" / "hippocampus_004.nii.gz").unlink()
    extra = ["--backbone", "resnet"] if case == "unknown_backbone" else []
    bundle = "fewshot_segmentation" if case == "label_without_image" else "caid"
    proc = bundle_cli(["--config_file", f"bundles/{bundle}/configs/train.json", "--bundle_root", f"bundles/{bundle}",
                 "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--max_epochs", "1", *extra])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medvol: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = {"missing_dir": "does not exist", "empty_dir": "no volumes found",
                "label_without_image": "hippocampus_004.nii.gz: label has no matching image",
                "unknown_backbone": "unknown backbone 'resnet'"}[case]
    assert expected in errors[0]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(hippo, tmp_path):
    out = tmp_path / "ddp"
    overrides = _ssl_overrides("caid", hippo, out, max_epochs=1)
    proc = bundle_ddp("caid", overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "models" / "model.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["method"])  # saved unwrapped
