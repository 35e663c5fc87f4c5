"""bundles/lovt end to end on real chest X-rays with notes: train (LoVT, and the ConVIRT overlay), then inference
writing image / sentence / report embeddings to HDF5 and per-sentence attention pictures."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import bundle_ddp, run_bundle

TINY = {"image_size": 64, "proj_dim": 16, "batch_size": 4, "max_epochs": 1, "val_fraction": 0.25,
        "text_encoder": "scratch", "text_options": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "backbone_options": {"unet": {"channels": [4, 8, 16], "num_convs": 1}}, "device": "cpu", "amp": False}


@pytest.fixture
def cxr_table(tmp_path):
    if not os.environ.get("MEDVOL_DATA"):
        pytest.skip("MEDVOL_DATA is not set: the bundle test reads real chest X-rays and notes")
    root = Path(os.environ["MEDVOL_DATA"]) / "image_reports" / "covid_cxr_notes"
    with (root / "pairs.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:10]
    table = tmp_path / "pairs.json"
    table.write_text(json.dumps([{"image": str(root / r["image"]), "report": r["clinical_notes"],
                                  "subject": r["patientid"]} for r in rows]), encoding="utf-8")
    return table


@pytest.mark.slow
def test_lovt_bundle_trains_and_writes_embeddings_and_attention(cxr_table, tmp_path):
    import h5py

    out = tmp_path / "run"
    overrides = {**TINY, "dataset_dir": str(cxr_table), "output_dir": str(out)}
    run_bundle("lovt", "train.json", **overrides)
    assert (out / "models" / "model.pt").is_file()
    run_bundle("lovt", ["train.json", "inference.json"], **overrides)
    with h5py.File(out / "inference" / "embeddings.h5", "r") as f:
        n = f["image"].shape[0]
        assert n == 10 and f["report"].shape == (10, 16) and f["sentence"].shape[1] == 16
        assert f["sentence"].shape[0] == len(f["sentence_item"]) == len(f["sentence_text"]) >= 10
        assert f["image_path"][0].decode().endswith("ARDSSevere.png")
    pngs = sorted((out / "inference" / "attention").glob("*.png"))
    assert len(pngs) == 8 and pngs[0].stat().st_size > 1000
    assert list((out / "inference" / "tensorboard").glob("events.*"))


@pytest.mark.slow
def test_convirt_overlay_trains_global_only(cxr_table, tmp_path):
    out = tmp_path / "convirt"
    wf = run_bundle("lovt", ["train.json", "convirt.json"], **TINY, dataset_dir=str(cxr_table), output_dir=str(out))
    method = wf.parser.get_parsed_content("method")
    assert method.lambda_local == 0 and not method.model.has_local and method.sentence_sampling == "random"
    assert (out / "models" / "model.pt").is_file()



def _header_report(path, shape) -> str:
    return (f"Hippocampus MRI {path.name}. The volume has {shape[0]} by {shape[1]} by {shape[2]} voxels. "
            "Mean spacing is one millimetre.")


@pytest.fixture
def volume_table(tmp_path):
    """Four demo hippocampus MRIs with one short text each, built from the file header (a plumbing test of the
    3D path, not a result): the reports differ only in their numbers."""
    import nibabel as nib
    from conftest import DEMO_DIR

    rows = []
    for path in sorted((DEMO_DIR / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:4]:
        rows.append({"image": str(path), "subject": path.name, "report": _header_report(path, nib.load(path).shape)})
    table = tmp_path / "volumes.json"
    table.write_text(json.dumps(rows), encoding="utf-8")
    return table


@pytest.fixture
def slice_table(tmp_path):
    """The middle axial slice of four demo MRIs as 8-bit PNGs with the same header texts (2D plumbing, no result)."""
    import nibabel as nib
    import numpy as np
    from conftest import DEMO_DIR
    from PIL import Image

    rows = []
    for path in sorted((DEMO_DIR / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:4]:
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        sl = vol[..., vol.shape[2] // 2]
        png = tmp_path / (path.name.split(".")[0] + ".png")
        Image.fromarray((255 * (sl - sl.min()) / max(float(np.ptp(sl)), 1e-6)).astype(np.uint8)).save(png)
        rows.append({"image": png.name, "subject": path.name, "report": _header_report(path, vol.shape)})
    table = tmp_path / "slices.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "subject", "report"])
        writer.writeheader()
        writer.writerows(rows)
    return table


TINY_3D = {**TINY, "volume_size": [32, 32, 32], "val_fraction": 0.25, "batch_size": 2}
# (MONAI workflow type, configs merged in order, data): train.json and every overlay on it. The inference overlay
# runs no MONAI evaluator (it writes embeddings and attention pictures, medvol.engines.image_report), so it is
# resolved as a plain workflow (type None), as slice_mil's
WORKFLOWS = [("train", ["train.json"], "slices"), (None, ["train.json", "inference.json"], "slices"),
             ("train", ["train.json", "convirt.json"], "slices"), ("train", ["train.json", "clip.json"], "slices"),
             ("train", ["train.json", "volume.json"], "volumes"),
             (None, ["train.json", "volume.json", "inference.json"], "volumes")]


@pytest.mark.parametrize("workflow_type,files,data", WORKFLOWS,
                         ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_lovt_monai_bundle_properties(workflow_type, files, data, slice_table, volume_table, tmp_path):
    """MONAI's ``check_properties`` on every train workflow and the inference overlay, resolved on demo data."""
    import torch
    from monai.bundle import ConfigWorkflow

    from medvol.bundles import bundle_path

    overrides = {**(TINY_3D if data == "volumes" else TINY), "output_dir": str(tmp_path / "out"),
                 "dataset_dir": str(volume_table if data == "volumes" else slice_table)}
    root = bundle_path("lovt")
    wf = ConfigWorkflow(config_file=[str(root / "configs" / f) for f in files], workflow_type=workflow_type,
                        meta_file=str(root / "configs" / "metadata.json"), bundle_root=str(root), **overrides)
    wf.initialize()
    if workflow_type is None:  # inference: the checkpoint it loads, then every id of the overlay resolves
        (tmp_path / "out" / "models").mkdir(parents=True)
        torch.save(wf.parser.get_parsed_content("network_def").state_dict(), tmp_path / "out" / "models" / "model.pt")
        assert len(wf.parser.get_parsed_content("datalist")) == 4
        assert wf.parser.get_parsed_content("ckpt_path").endswith("out/models/model.pt")
        return
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("train#trainer").state.max_epochs == 1


@pytest.mark.slow
def test_lovt_trains_on_a_folder_free_table_without_shared_data(slice_table, tmp_path):
    """The 2D bundle end to end on demo slices (no MEDVOL_DATA): the image paths are relative to the table."""
    out = tmp_path / "run2d"
    run_bundle("lovt", "train.json", **TINY, dataset_dir=str(slice_table), output_dir=str(out))
    assert (out / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_lovt_volume_overlay_trains_and_embeds_3d(volume_table, tmp_path):
    """The 3D path end to end from the bundle: 3D U-Net tokens as regions, then HDF5 embeddings and attention."""
    import h5py
    import torch

    out = tmp_path / "run3d"
    overrides = {**TINY_3D, "dataset_dir": str(volume_table), "output_dir": str(out)}
    wf = run_bundle("lovt", ["train.json", "volume.json"], **overrides)
    assert wf.parser.get_parsed_content("spatial_dims") == 3
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert [v.ndim for k, v in state.items() if k.startswith("image.") and k.endswith("conv.weight")][0] == 5
    run_bundle("lovt", ["train.json", "volume.json", "inference.json"], **overrides)
    with h5py.File(out / "inference" / "embeddings.h5", "r") as f:
        assert f["image"].shape == (4, 16) and f["report"].shape == (4, 16) and f["sentence"].shape == (12, 16)
    assert len(list((out / "inference" / "attention").glob("*.png"))) == 4


@pytest.mark.slow
def test_lovt_ddp_with_two_cpu_processes(volume_table, tmp_path):
    """The 3D overlay under torchrun (gloo, 2 processes) by the shared multi_gpu_train.json."""
    import torch

    out = tmp_path / "ddp"
    # batch 2 per process: the projection heads' BatchNorm (and in-batch negatives) need at least 2 items
    overrides = {**TINY_3D, "dataset_dir": str(volume_table), "output_dir": str(out), "batch_size": 2}
    overrides.pop("device")
    proc = bundle_ddp("lovt", overrides, overlays=("volume.json",))
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (out / "models" / "model.pt").is_file() and not any(k.startswith("module.") for k in state["method"])
