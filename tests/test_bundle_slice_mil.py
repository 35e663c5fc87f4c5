"""The slice_mil MONAI bundle: layout, metadata, config resolution, and train + inference runs."""

from __future__ import annotations

import configparser
import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import BUNDLES_DIR, REPO_ROOT
from monai.bundle import ConfigParser
from test_mil_crossval import make_hippocampus_bags

from medvol.mil import CrossValidator
from medvol.mil.inference import network_factory
from medvol.networks.mil import ABMIL, PMA

BUNDLE = BUNDLES_DIR / "slice_mil"
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def test_bundle_layout_and_metadata():
    for name in ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/inference.json",
                 "configs/logging.conf", "docs/README.md"):
        assert (BUNDLE / name).is_file(), name
    assert "Apache License, Version 2.0" in (BUNDLE / "LICENSE").read_text(encoding="utf-8")
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "network_data_format", "changelog", "schema"):
        assert key in meta, key
    assert meta["schema"] == SCHEMA and meta["version"] in meta["changelog"]
    data_format = meta["network_data_format"]
    assert set(data_format) == {"inputs", "outputs"} and "pred" in data_format["outputs"]
    local_schema = BUNDLES_DIR / "meta_schema.json"  # offline copy of the MONAI schema, when the repo has one
    if local_schema.is_file():
        import jsonschema

        jsonschema.validate(meta, json.loads(local_schema.read_text(encoding="utf-8")))
    conf = configparser.ConfigParser()
    conf.read(BUNDLE / "configs" / "logging.conf")
    assert {"loggers", "handlers", "formatters", "logger_root"} <= set(conf.sections())


def test_train_config_resolves_to_a_network_factory_and_a_crossvalidator(tmp_path):
    train = json.loads((BUNDLE / "configs" / "train.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "dataset_dir", "targets_csv", "id_column", "target_columns", "task", "output_dir",
                "device", "network_def", "mil_pooling", "max_epochs", "num_folds", "seed", "run"):
        assert key in train, key
    assert train["seed"] == 1337 and train["max_epochs"] == 32 and train["patience"] == 8
    parser = ConfigParser(train)
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(tmp_path)})
    factory = network_factory(parser.get_parsed_content("network_def"))  # a network; its architecture per fold
    net_a, net_b = factory(in_dim=18, n_outputs=2), factory(in_dim=18, n_outputs=2)
    assert isinstance(net_a, ABMIL) and net_a is not net_b  # a new network on every call
    assert net_a.head[-1].out_features == 2 and net_a.hidden_dim == 256
    crossval = parser.get_parsed_content("crossval")
    assert isinstance(crossval, CrossValidator) and crossval.output_dir == tmp_path / "models"
    assert crossval.lr == 1e-4 and crossval.num_folds == 5 and crossval.standardize_features
    pma = ConfigParser(train)
    pma.update({"mil_pooling": "pma"})
    assert isinstance(network_factory(pma.get_parsed_content("network_def"))(in_dim=18), PMA)
    assert train["initialize"][0] == "$medvol.engines.config.install_error_hook()"  # the dialect of every bundle
    # an overlay of train.json
    inference = json.loads((BUNDLE / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert {"model_dir", "output_dir", "predictor", "run"} <= set(inference) and "dataset_dir" not in inference
    merged = ConfigParser()
    merged.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "inference.json")])
    assert {"bundle_root", "dataset_dir", "device", "network_def", "max_epochs"} <= set(merged.get())
    assert merged["network_def"] is None  # the predictor rebuilds the network recorded in run.json


@pytest.mark.slow
def test_bundle_train_then_inference(demo_dir, tmp_path):
    bag_dir, csv_path = make_hippocampus_bags(demo_dir, tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/slice_mil/configs/train.json",
           "--bundle_root", "bundles/slice_mil", "--dataset_dir", str(bag_dir), "--targets_csv", str(csv_path),
           "--target_columns", "['large']", "--task", "binary", "--output_dir", str(out), "--max_epochs", "2",
           "--num_folds", "2", "--network_def#hidden_dim", "16", "--network_def#attention_dim", "8",
           "--plot_cases", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 20 and len(metrics["per_fold"]) == 2 and 0 <= metrics["pooled"]["auroc"] <= 1
    assert (out / "folds" / "fold_1" / "model.pt").is_file() and (out / "attention_top_slices.png").is_file()
    assert "fold 2/2" in proc.stdout + proc.stderr  # progress reaches the bundle's log

    # train.json + the inference.json overlay, as `monai.bundle run` merges them (in-process: no second start-up)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "inference.json")])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(bag_dir), "model_dir": str(out),
                   "output_dir": str(tmp_path / "pred"), "plot_cases": 1})
    parser.get_parsed_content("run")
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r["n_models"] == "2" and 0 <= float(r["prob_large"]) <= 1 for r in rows)
    assert len(list((tmp_path / "pred" / "attention").glob("*.csv"))) == 20
