"""The lecl_slice_embedding bundle: layout, metadata, shared ids, training + inference on real MRI with a lesion
mask, the HDF5 bags it writes, the slice_mil bundle reading them, one-line config errors and DDP on CPU."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, bundle_cli, bundle_ddp, bundle_parser, bundle_workflow
from ignite.engine import Events
from monai.bundle import ConfigParser

from medvol.apps.cli import main
from medvol.io import LoadVolume
from medvol.io.bags import file_sha256
from medvol.mil import read_bag

BUNDLE = BUNDLES_DIR / "lecl_slice_embedding"
CONFIGS = BUNDLE / "configs"
TINY = {"encoder_options": {"mambaout": {"dims": [8, 16], "depths": [1, 1]}}, "spatial_size": 32}
TINY_METHOD = {"method#proj_dim": 16, "method#hidden_dim": 32, "method#pred_hidden_dim": 32}
SHARED = ("network_def", "encoder", "encoder_options", "in_channels", "slice_size", "spatial_size", "context",
          "windows", "preset", "spacing", "axis")


def _set_cli(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def lesion_data(demo_dir, tmp_path_factory) -> Path:
    """breast1 MRI with its lesion mask (imagesTr/labelsTr) next to three unlabeled hippocampus MRIs."""
    root = tmp_path_factory.mktemp("lecl_data")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    shutil.copy(demo_dir / "nrrd" / "breast1_image.nrrd", root / "imagesTr" / "breast1.nrrd")
    shutil.copy(demo_dir / "nrrd" / "breast1_label.nrrd", root / "labelsTr" / "breast1.nrrd")
    for f in sorted((demo_dir / "hippocampus" / "imagesTr").iterdir())[:3]:
        shutil.copy(f, root / "imagesTr" / f.name)
    return root


@pytest.fixture(scope="module")
def trained(lesion_data, tmp_path_factory) -> tuple[Path, list[float]]:
    """Two tiny epochs; returns the output folder and the lesion fraction of every training batch."""
    out = tmp_path_factory.mktemp("lecl_run")
    # seed 1: MONAI's partition_dataset keeps breast1 (the only lesion mask, item 0) in training (seed 0 validates it)
    wf = bundle_workflow(BUNDLE.name, "train.json", dataset_dir=str(lesion_data), output_dir=str(out), max_epochs=2,
                         batch_size=8, samples_per_volume=6, val_fraction=0.25, warmup_epochs=1, lesion_prob=1.0,
                         seed=1, **TINY, **TINY_METHOD)
    fractions: list[float] = []
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: fractions.append(float(e.state.output["lesion_fraction"])))
    wf.run()
    wf.finalize()
    return out, fractions


# ---- structure ---------------------------------------------------------------------------------------------


def test_layout_metadata_and_defaults():
    for name in ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/inference.json",
                 "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md"):
        assert (BUNDLE / name).is_file(), name
    licence = (BUNDLES_DIR / "caid" / "LICENSE").read_text(encoding="utf-8")
    assert (BUNDLE / "LICENSE").read_text(encoding="utf-8") == licence
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(BUNDLES_DIR / "meta_schema.json"))
    train = json.loads((CONFIGS / "train.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "dataset_dir", "output_dir", "device", "network_def", "max_epochs", "seed", "resume",
                "val_fraction", "encoder", "context", "windows", "preset", "spatial_size", "lesion_prob",
                "lesion_weight", "temperature", "lesion_boxes_csv", "split_file"):
        assert key in train, key
    assert (train["encoder"], train["spatial_size"], train["momentum"], train["momentum_schedule"]) == \
        ("mambaout", 224, 0.99, "cosine")
    assert train["optimizer"]["_target_"] == "torch.optim.AdamW" and train["temperature"] == 1.0
    parser = ConfigParser(train)
    parser.update({"bundle_root": "/tmp"})
    assert parser.get_parsed_content("learning_rate") == pytest.approx(1e-4 * 64 / 256)


def test_inference_overlay_inherits_the_shared_ids():
    """inference.json is an overlay: encoder and slicing settings come from train.json, stated once."""
    train = json.loads((CONFIGS / "train.json").read_text(encoding="utf-8"))
    inference = json.loads((CONFIGS / "inference.json").read_text(encoding="utf-8"))
    assert set(SHARED) <= set(train) and not set(SHARED) & set(inference)
    merged = bundle_parser(BUNDLE.name, "inference.json")
    assert merged.get_parsed_content("axis") == 2 and merged.get_parsed_content("slice_size") == [224, 224]


def test_verify_net_in_out_and_metadata_match_the_default_encoder():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "inference.json")], n=1, device="cpu")
    meta = json.loads((CONFIGS / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]
    parser = bundle_parser(BUNDLE.name, "inference.json")
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "GatedCNNSliceEncoder" and net.out_dim == meta["outputs"]["pred"]["num_channels"]
    assert meta["inputs"]["image"]["num_channels"] == parser.get_parsed_content("in_channels") == 3


@pytest.mark.parametrize("encoder,options,windows,channels", [
    ("resnet18", {"widen_factor": 0.125}, None, 3),
    ("vit", {"img_size": "@slice_size", "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2}, None, 3),
    ("mambaout", {"dims": [8, 16], "depths": [1, 1]}, ["lung", "soft_tissue", "bone"], 9),
])
def test_encoder_and_windows_choices_resolve(encoder, options, windows, channels, tmp_path):
    parser = ConfigParser(json.loads((CONFIGS / "train.json").read_text(encoding="utf-8")))
    parser.update({"bundle_root": str(tmp_path), "encoder": encoder, "encoder_options": {encoder: options},
                   "spatial_size": 32, "windows": windows, "preset": "ct" if windows else "mri"})
    method = parser.get_parsed_content("method")
    assert parser.get_parsed_content("in_channels") == channels
    x = torch.rand(2, channels, 32, 32)
    loss = method({"image_v1": x, "image_v2": x.flip(-1), "is_lesion": torch.tensor([True, False])})["loss"]
    assert torch.isfinite(loss) and method.backbone is parser.get_parsed_content("network_def")


# ---- runs --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_then_inference_writes_one_bag_per_volume(trained, lesion_data, tmp_path):
    out, fractions = trained
    model = out / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    parser = bundle_parser(BUNDLE.name, "inference.json", **TINY)
    assert set(state) == set(parser.get_parsed_content("network_def").state_dict())  # the encoder only
    assert (out / "checkpoints" / "last.pt").is_file() and list((out / "tensorboard").iterdir())
    assert max(fractions) > 0  # lesion pairs from breast1's mask reached the loss

    bundle_workflow(BUNDLE.name, ["train.json", "inference.json"], dataset_dir=str(lesion_data), output_dir=str(out),
                    **TINY).run()
    images = sorted((lesion_data / "imagesTr").iterdir())
    bags = sorted((out / "embeddings").glob("*.h5"))
    assert [b.stem for b in bags] == sorted(p.name.split(".")[0] for p in images)
    sha = file_sha256(model)
    for image in images:
        bag = read_bag(out / "embeddings" / (image.name.split(".")[0] + ".h5"))
        volume = LoadVolume(ensure_channel_first=False)(str(image))
        n = volume.shape[2]  # these volumes are axial: RAS axis 2 is their stored axis 2
        assert bag.feats.shape == (n, 16) and np.isfinite(bag.feats).all()
        np.testing.assert_array_equal(bag.slice_index, np.arange(n))
        assert (bag.axis, bag.checkpoint_sha256, bag.source) == (2, sha, str(image))
        np.testing.assert_allclose(bag.spacing, np.linalg.norm(volume.affine[:3, :3].numpy(), axis=0), rtol=1e-5)
        assert bag.feats.std(axis=0).max() > 0  # slices differ

    # `medvol embed` with the same bundle ids and checkpoint writes the same bags
    cli_out = tmp_path / "cli"
    assert main(["embed", str(lesion_data), str(cli_out), "--bundle", str(BUNDLE), "--checkpoint", str(model),
                 *_set_cli(TINY)]) == 0
    for bag in bags:
        a, b = read_bag(bag), read_bag(cli_out / bag.name)
        np.testing.assert_allclose(a.feats, b.feats, rtol=1e-5, atol=1e-6)
        assert (a.checkpoint_sha256, a.source, a.axis) == (b.checkpoint_sha256, b.source, b.axis)


@pytest.mark.slow
def test_slice_mil_bundle_reads_the_bags(trained, demo_dir, tmp_path):
    """Bags of the 20 hippocampus MRIs -> slice_mil cross-validation (target: hippocampus volume above median)."""
    bags = tmp_path / "bags"
    assert main(["embed", str(demo_dir / "hippocampus"), str(bags), "--bundle", str(BUNDLE), "--checkpoint",
                 str(trained[0] / "models" / "model.pt"), *_set_cli(TINY)]) == 0
    rows = []
    for label in sorted((demo_dir / "hippocampus" / "labelsTr").glob("*.nii.gz")):
        img = nib.load(label)
        rows.append([label.name[: -len(".nii.gz")], float((np.asarray(img.dataobj) > 0).sum())])
    median = float(np.median([r[1] for r in rows]))
    with open(tmp_path / "targets.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "large"], *[[c, "yes" if v > median else "no"] for c, v in rows]])
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "slice_mil" / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(bags), "targets_csv": str(tmp_path / "targets.csv"),
                   "target_columns": ["large"], "output_dir": str(tmp_path / "mil"), "num_folds": 2, "max_epochs": 2,
                   "network_def#hidden_dim": 16, "network_def#attention_dim": 8, "plot_cases": 1, "device": "cpu"})
    parser.get_parsed_content("run")
    metrics = json.loads((tmp_path / "mil" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 20 and len(metrics["per_fold"]) == 2 and 0 <= metrics["pooled"]["auroc"] <= 1


# ---- user errors and scale-out (subprocesses: what a user sees) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_dir", "unknown_encoder", "windows_with_mri", "missing_boxes_csv"])
def test_wrong_config_gives_one_clear_line(case, lesion_data, tmp_path):
    data = tmp_path / "nope" if case == "missing_dir" else lesion_data
    extra = {"unknown_encoder": ["--encoder", "resnet"], "windows_with_mri": ["--windows", "['lung']"],
             "missing_boxes_csv": ["--lesion_boxes_csv", str(tmp_path / "boxes.csv")]}.get(case, [])
    proc = bundle_cli(["--config_file", "bundles/lecl_slice_embedding/configs/train.json", "--bundle_root",
                        "bundles/lecl_slice_embedding", "--dataset_dir", str(data), "--output_dir", str(tmp_path / "o"),
                        "--max_epochs", "1", *extra])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medvol: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = {"missing_dir": "does not exist", "unknown_encoder": "unknown slice encoder 'resnet'",
                "windows_with_mri": "use preset 'ct'", "missing_boxes_csv": "boxes.csv: cannot read"}[case]
    assert expected in errors[0], errors[0]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(lesion_data, tmp_path):
    out = tmp_path / "ddp"
    overrides = {"dataset_dir": str(lesion_data), "output_dir": str(out), "max_epochs": 1, "batch_size": 4,
                 "samples_per_volume": 4, "val_fraction": 0, **TINY, **TINY_METHOD}
    proc = bundle_ddp("lecl_slice_embedding", overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "models" / "model.pt").is_file()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["method"])  # saved unwrapped
    assert any(k.startswith("momentum_backbone.") for k in state["method"])
