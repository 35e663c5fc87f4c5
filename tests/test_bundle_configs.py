"""The bundle configs as files: canonical JSON, the size targets of issue "One house", self-contained folders, and
MONAI's bundle properties (``check_properties``) of every train.json and overlay, resolved on two demo volumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES_DIR, REPO_ROOT, copy_labeled_hippo

STATS_SCRIPT = REPO_ROOT / "scripts" / "bundle_config_stats.py"
BUNDLES = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "train.json").is_file())
TINY_UNET = {"backbone_options": {"unet": {"channels": [4, 8, 16]}}, "pad_size": [32, 48, 32], "roi_size": [16, 16, 16]}
TINY_SWIN = {"backbone_options": {"swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "norm": "group"}},
             "pad_size": [32, 48, 32], "roi_size": [32, 32, 32]}
TINY = {
    "caid": TINY_UNET,
    "global_local_contrastive": {**TINY_UNET, "roi_size": [16, 16, 8], "method#local_levels": 2,
                                 "method#local_grid": [2, 2, 2]},
    "patch_clustering": TINY_UNET,
    "pixel_clustering": {**TINY_UNET, "num_clusters": 3, "cluster_samples": 2000, "cluster_quota": 1000,
                         "kmeans_device": "cpu", "montage_volumes": 0},
    "fewshot_segmentation": TINY_UNET,
    "simclr": {**TINY_UNET, "method#hidden_dim": 16},
    "byol": {**TINY_UNET, "method#hidden_dim": 16},
    "models_genesis": {**TINY_UNET, "shuffle_blocks": 100},
    "pcrlv2": {**TINY_UNET, "local_size": [8, 8, 8], "num_local": 2},
    "swinunetr_ssl": {**TINY_SWIN, "max_holes": 5},
    "voco": {**TINY_SWIN, "voco_grid": [2, 2, 1], "base_size": [16, 24, 32], "method#hidden_dim": 16,
             "method#proj_dim": 16},
    "spark": TINY_UNET,
    "mae": {"backbone_options": {"unetr": {"img_size": "@roi_size", "hidden_size": 24, "mlp_dim": 48, "num_heads": 2,
                                           "feature_size": 4}}, "pad_size": [32, 48, 32], "roi_size": [32, 32, 32],
            "method#decoder_dim": 12, "method#decoder_heads": 2},
    "lecl_slice_embedding": {"encoder_options": {"mambaout": {"dims": [8, 16], "depths": [1, 1]}}, "spatial_size": 32},
}
# (bundle, MONAI workflow type, config files merged in order): every train.json and every overlay on it
WORKFLOWS = [(b, "train", ["train.json"]) for b in TINY] + [
    (b, "infer", ["train.json", "inference.json"]) for b in TINY] + [
    ("fewshot_segmentation", "infer", ["train.json", "evaluate.json"]),
    ("fewshot_segmentation", "infer", ["inference.json"]),  # standalone: MONAI Label reads it alone
]


def _stats_module():
    spec = importlib.util.spec_from_file_location("bundle_config_stats", STATS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(BUNDLES_DIR.glob("*/configs/*.json")),
                         ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_config_is_in_the_canonical_format(path):
    text = path.read_text(encoding="utf-8")
    assert text == _stats_module().canonical(json.loads(text)), \
        f"{path} is not in the canonical format: run python scripts/bundle_config_stats.py --fix"


def test_size_target():
    """Issue "One house": at most 150 lines per bundle on average (canonical format, metadata.json excluded)."""
    stats = _stats_module().stats(BUNDLES_DIR)
    assert stats["lines_per_bundle"] <= 150, stats


def test_repetition_does_not_grow():
    """Top-level entries repeated verbatim in another config file: 51.0 % before the issue (7 bundles), 37.5 % after
    it, 55.3 % with the 9 bundles of issue 15 (16 bundles; each new one repeats the flat keys and the `train`
    wiring of its siblings, see docs/bundles.md), 53.4 % with lovt. The guard keeps it from growing past that."""
    assert _stats_module().stats(BUNDLES_DIR)["repeated_fraction"] <= 0.54


@pytest.mark.xfail(strict=True, reason="issue target of 15 % not reached (53.4 % with 17 bundles): the flat "
                   "user-facing keys every bundle keeps with the same default (seed, resume, split_file, preset, "
                   "spacing, pad_size, ...) and the trainer wiring the bundles share are repeated; docs/bundles.md")
def test_repetition_target():
    assert _stats_module().stats(BUNDLES_DIR)["repeated_fraction"] <= 0.15


@pytest.mark.parametrize("bundle", BUNDLES)
def test_configs_reference_no_other_bundle(bundle):
    """A bundle folder copied alone still runs: its configs name no sibling bundle and no path outside the folder."""
    others = [b for b in BUNDLES if b != bundle]
    for path in (BUNDLES_DIR / bundle / "configs").glob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert "../" not in text and "bundles/" not in text, path
        assert not [b for b in others if f"/{b}" in text or f"'{b}'" in text], path


@pytest.fixture(scope="module")
def tiny_data(demo_dir, tmp_path_factory) -> Path:
    """Two labeled hippocampus MRIs (MSD layout)."""
    return copy_labeled_hippo(demo_dir, tmp_path_factory.mktemp("tiny"), 2)


def _workflow(bundle: str, workflow_type: str | None, files: list[str], run_id: str = "run", **overrides):
    from monai.bundle import ConfigWorkflow

    configs = BUNDLES_DIR / bundle / "configs"
    wf = ConfigWorkflow(config_file=[str(configs / f) for f in files], meta_file=str(configs / "metadata.json"),
                        workflow_type=workflow_type, bundle_root=str(BUNDLES_DIR / bundle), run_id=run_id, **overrides)
    wf.initialize()
    return wf


def _id(value) -> str:
    return "+".join(value) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("bundle,workflow_type,files", WORKFLOWS, ids=_id)
def test_monai_bundle_properties(bundle, workflow_type, files, tiny_data, tmp_path):
    """``ConfigWorkflow.check_properties()`` finds every required property id (train#trainer, train#dataset, ...)
    and no optional id under a wrong name; resolving them builds the trainer / evaluator on two volumes."""
    overrides = {"dataset_dir": str(tiny_data), "output_dir": str(tmp_path), **TINY[bundle]}
    if bundle == "pixel_clustering" and workflow_type == "train":  # training reads the pseudo-labels of `cluster`
        _workflow(bundle, None, files, run_id="cluster", **overrides).run()
    if workflow_type == "infer" and files[-1] == "inference.json" and bundle != "fewshot_segmentation":
        overrides["dataset_dir"] = str(tiny_data / "imagesTr")
    wf = _workflow(bundle, workflow_type, files, **overrides)
    if workflow_type == "infer":  # the evaluator needs the checkpoint it loads
        (tmp_path / "models").mkdir()
        torch.save(wf.parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    assert wf.check_properties() == []
    if workflow_type == "train":
        assert wf.parser.get_parsed_content("train#trainer").state.max_epochs == wf.parser["max_epochs"]


def test_slice_mil_configs_resolve(tmp_path):
    """slice_mil runs no MONAI engine (per-fold training in medvol.mil); its train.json and overlay still resolve."""
    from medvol.mil import CrossValidator, MILPredictor

    wf = _workflow("slice_mil", None, ["train.json"], dataset_dir=str(tmp_path), output_dir=str(tmp_path))
    assert isinstance(wf.parser.get_parsed_content("crossval"), CrossValidator)
    wf = _workflow("slice_mil", None, ["train.json", "inference.json"], dataset_dir=str(tmp_path),
                   model_dir=str(tmp_path))
    assert isinstance(wf.parser.get_parsed_content("predictor"), MILPredictor)
