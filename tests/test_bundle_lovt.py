"""bundles/lovt end to end on real chest X-rays with notes: train (LoVT, and the ConVIRT overlay), then inference
writing image / sentence / report embeddings to HDF5 and per-sentence attention pictures."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import run_bundle

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
