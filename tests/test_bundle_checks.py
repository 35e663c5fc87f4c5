"""Every bundle passes MONAI's bundle checks and the model-zoo checks that apply before weights are released.

MONAI: ``verify_metadata`` (against the schema copy in ``bundles/``), ``verify_net_in_out`` with its defaults
(batch 1, ``n = p = any = 1``) plus the bundle's default training batch with the output shape the metadata
states, and ``ckpt_export`` (TorchScript) whose module gives the eager network's output on a real volume.
``check_properties`` of the train / inference / evaluate workflows is in ``tests/test_bundle_configs.py``.

model-zoo (ci/verify_bundle.py, ci/utils.py, .pre-commit-config.yaml), in this project's own words: the files a
bundle must have, ``version`` listed in ``changelog``, ``large_files.yml`` in the zoo's schema, and JSON in the
format of the zoo's ``pretty-format-json`` hook. What cannot apply yet is listed in docs/bundles.md
("Checking a bundle").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import BUNDLES_DIR, DEMO_DIR, REPO_ROOT

SCHEMA = BUNDLES_DIR / "meta_schema.json"
# bundle -> the config that defines its network_def alone (fewshot_segmentation's inference.json is standalone)
NETWORK_CONFIG = {
    "caid": "train.json",
    "fewshot_segmentation": "inference.json",
    "global_local_contrastive": "train.json",
    "lecl_slice_embedding": "train.json",
    "patch_clustering": "train.json",
    "pixel_clustering": "train.json",
    "slice_mil": "train.json",
    "simclr": "train.json",
    "byol": "train.json",
    "models_genesis": "train.json",
    "pcrlv2": "train.json",
    "swinunetr_ssl": "train.json",
    "voco": "train.json",
    "spark": "train.json",
    "mae": "train.json",
    "lovt": "train.json",
}
BUNDLES = sorted(NETWORK_CONFIG)
# bundles whose inference loads one models/model.pt (slice_mil's loads the k fold models of a cross-validation)
WITH_WEIGHTS = [b for b in BUNDLES if b != "slice_mil"]
# SwinUNETR does not compile with torch.jit.script (MONAI's own Swin bundles are not scripted either): these
# bundles export by tracing (`ckpt_export ... --use_trace True --input_shape ...`), at the metadata's smallest input.
# LoVT's network_def is the image-report model whose forward(image) is the image path (the text encoder, a
# transformers model, does not script); tracing exports that image path
TRACED = {"swinunetr_ssl", "voco", "lovt"}


def test_every_bundle_is_checked():
    """A new bundle joins these checks: the list above is every folder under bundles/."""
    assert sorted(p.parent.parent.name for p in BUNDLES_DIR.glob("*/configs/metadata.json")) == BUNDLES


def _paths(bundle: str) -> tuple[Path, Path, Path]:
    configs = BUNDLES_DIR / bundle / "configs"
    return BUNDLES_DIR / bundle, configs / "metadata.json", configs / NETWORK_CONFIG[bundle]


def _parser(bundle: str):
    from monai.bundle import ConfigParser

    root, meta, config = _paths(bundle)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(root)
    return parser


def _shape(spec: list, n: int = 1) -> list[int]:
    """A metadata ``spatial_shape`` at ``n`` (``"16*n"`` -> 16 n; ``"*"`` -> ``n``; ints unchanged)."""
    out = []
    for s in spec:
        if isinstance(s, int):
            out.append(s)
        elif s == "*":
            out.append(n)
        elif re.fullmatch(r"\d+\*n", s):
            out.append(int(s.split("*")[0]) * n)
        else:
            raise AssertionError(f"spatial_shape entry {s!r} is not one this test knows")
    return out


def _io(bundle: str) -> tuple[dict, dict]:
    fmt = json.loads(_paths(bundle)[1].read_text(encoding="utf-8"))["network_data_format"]
    return fmt["inputs"]["image"], fmt["outputs"]["pred"]  # the keys MONAI's verify_net_in_out reads


# ---- MONAI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(_paths(bundle)[1]), filepath=str(SCHEMA))  # raises ValueError when invalid


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out_with_monai_defaults(bundle):
    """``python -m monai.bundle verify_net_in_out network_def`` as the zoo runs it: batch 1, n = 1."""
    from monai.bundle import verify_net_in_out

    root, meta, config = _paths(bundle)
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), device="cpu",
                      bundle_root=str(root))


# LeCL's default batch is 64 slices of 224 x 224 through MambaOut-Femto: tens of seconds on a CPU
DEFAULT_BATCH = [pytest.param(b, marks=pytest.mark.slow) if b == "lecl_slice_embedding" else b for b in BUNDLES]


@pytest.mark.parametrize("bundle", DEFAULT_BATCH)
def test_network_at_the_default_batch_gives_the_metadata_output_shape(bundle):
    """MONAI checks channels and dtype at batch 1; here the whole output shape, at the training batch size."""
    parser = _parser(bundle)
    inp, out = _io(bundle)
    train = json.loads((BUNDLES_DIR / bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    batch = int(train["batch_size"])
    net = parser.get_parsed_content("network_def").eval()
    for n in (1, 2) if batch <= 8 else (1,):  # n = 2 too for the volume bundles (small batches)
        x = torch.rand(batch, inp["num_channels"], *_shape(inp["spatial_shape"], n))
        with torch.no_grad():
            y = net(x)
        spatial = list(x.shape[2:]) if out["spatial_shape"] == inp["spatial_shape"] else _shape(out["spatial_shape"], n)
        assert list(y.shape) == [batch, out["num_channels"], *spatial], (bundle, n, tuple(y.shape))
        assert torch.isfinite(y).all()


def test_unet_metadata_keeps_the_bottleneck_above_one_voxel():
    """At the smallest input the metadata allows, the default U-Net's bottleneck has more than one voxel: an
    instance norm over a single voxel is undefined (torch raises), which is what ``8*n`` at n = 1 gave."""
    for bundle in ("caid", "fewshot_segmentation", "global_local_contrastive", "patch_clustering",
                   "pixel_clustering"):
        net = _parser(bundle).get_parsed_content("network_def")
        size = _shape(_io(bundle)[0]["spatial_shape"])
        bottleneck = [s // d for s, d in zip(size, net.spatial_divisor)]
        assert all(s % d == 0 for s, d in zip(size, net.spatial_divisor)) and np.prod(bottleneck) > 1, bundle
    too_small = _parser("caid").get_parsed_content("network_def").eval()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        too_small(torch.rand(1, 1, 8, 8, 8))


def _real_input(bundle: str) -> torch.Tensor:
    """A real MSD hippocampus MRI in the layout the bundle's network takes (intensities scaled to [0, 1])."""
    path = sorted((DEMO_DIR / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    vol = torch.as_tensor(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    if bundle == "lecl_slice_embedding":  # 3 adjacent axial slices (2.5D context) at the encoder's 224 x 224
        mid = vol.shape[2] // 2
        slices = vol[:, :, mid - 1:mid + 2].permute(2, 0, 1)[None]
        return torch.nn.functional.interpolate(slices, size=(224, 224), mode="bilinear", align_corners=False)
    if bundle == "slice_mil":  # a bag: one 288-feature row per axial slice (12 x 24 average-pooled slice)
        rows = torch.nn.functional.adaptive_avg_pool2d(vol.permute(2, 0, 1)[:, None], (12, 24)).flatten(1)
        return rows[None, None]  # (B, 1, N, D)
    spec = _io(bundle)[0]["spatial_shape"]
    if len(spec) == 2:  # a 2D network (LoVT's radiograph encoder): the middle axial slice
        vol = vol[:, :, vol.shape[2] // 2]
    if all(isinstance(s, int) for s in spec):  # a fixed input (MAE's ViT: learned position embeddings)
        vol = vol[tuple(slice(0, min(s, t)) for s, t in zip(vol.shape, spec))]
        size = list(spec)
    else:  # pad to the next multiple the metadata states (16 or 64)
        m = _shape(spec)[0]
        size = [m * -(-s // m) for s in vol.shape]
    pad = [p for s, t in zip(reversed(vol.shape), reversed(size)) for p in (0, t - s)]
    return torch.nn.functional.pad(vol, pad)[None, None]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export_torchscript_matches_eager_on_a_real_volume(bundle, tmp_path):
    """``python -m monai.bundle ckpt_export network_def`` (torch.jit.script) from a saved state dict; the
    exported module loads and gives the eager network's output."""
    from monai.bundle import ckpt_export

    root, meta, config = _paths(bundle)
    torch.manual_seed(0)
    net = _parser(bundle).get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    x = _real_input(bundle)
    trace = {"use_trace": True, "input_shape": list(x.shape)} if bundle in TRACED else {}
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(meta), config_file=str(config), bundle_root=str(root), **trace)
    scripted = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu").eval()
    with torch.no_grad():
        eager, exported = net(x), scripted(x)
        assert exported.shape == eager.shape and torch.isfinite(eager).all()
        torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-5)


def test_released_demo_checkpoint_still_loads():
    """The TorchScript changes kept every state-dict key: the shipped pixel-clustering weights load strictly."""
    from medvol.networks import build_backbone

    state = torch.load(REPO_ROOT / "medvol" / "data" / "pixel_clustering_hippocampus_unet8.pt", weights_only=True)
    net = build_backbone("unet", channels=(8, 16, 32, 64), out_channels=state["head.conv.weight"].shape[0])
    net.load_state_dict(state, strict=True)
    torch.jit.script(net.eval())


def test_slice_mil_network_def_builds_fresh_fold_networks():
    """slice_mil's network_def is a real network (MONAI's checks need one); the cross-validation still builds a
    fresh network of its architecture per fold, with the bags' in_dim."""
    from medvol.mil.inference import network_factory

    template = _parser("slice_mil").get_parsed_content("network_def")
    factory = network_factory(template)
    fold = factory(in_dim=18, n_outputs=2)
    assert fold is not template and fold.in_dim == 18 and fold.n_outputs == 2 and type(fold) is type(template)
    assert fold.hidden_dim == template.hidden_dim


# ---- model-zoo -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_zoo_required_files_and_changelog(bundle):
    root = BUNDLES_DIR / bundle
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json"):
        assert (root / name).is_file(), f"{bundle}: {name} missing"
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] in meta["changelog"], f"{bundle}: version {meta['version']} not in changelog"


@pytest.mark.parametrize("bundle", WITH_WEIGHTS)
def test_zoo_large_files_schema(bundle):
    """large_files.yml lists the checkpoint inference loads, with the zoo's keys; no url while unreleased."""
    entries = yaml.safe_load((BUNDLES_DIR / bundle / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt"]
    for e in entries:
        assert set(e) == {"path", "url", "hash_val", "hash_type"}, e
        assert e["hash_type"] in ("md5", "sha1", "sha256", "sha512")
        assert bool(e["url"]) == bool(e["hash_val"]), "a released file needs its hash"
    inference = json.loads((BUNDLES_DIR / bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    # released weights at <bundle_root>/models/model.pt first (tests/test_bundle_export.py checks what it resolves to)
    assert inference["ckpt_path"] == "$medvol.engines.default_checkpoint(@bundle_root, @output_dir)"


def test_zoo_json_format():
    """The zoo's ``pretty-format-json --no-sort-keys --indent=4``: 4 spaces, key order kept, non-ASCII escaped."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bundle_config_stats", REPO_ROOT / "scripts" / "bundle_config_stats.py")
    stats = module_from_spec(spec)
    spec.loader.exec_module(stats)
    assert stats.canonical({"b": "é", "a": [1]}) == '{\n    "b": "\\u00e9",\n    "a": [\n        1\n    ]\n}\n'
    files = sorted(BUNDLES_DIR.glob("*.json")) + sorted(BUNDLES_DIR.glob("*/configs/*.json"))
    bad = [f for f in files if f.read_text(encoding="utf-8") != stats.canonical(json.loads(f.read_text("utf-8")))]
    assert bad == [], "run: python scripts/bundle_config_stats.py --fix"
