"""Published checkpoints of other code load into medvol networks without renaming by hand (no download: the state
dicts are built here with the published key names and shapes)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medvol.errors import DataError
from medvol.networks import ModelsGenesisUNet3D, SwinBackbone, UNet3D, build_backbone, detect_layout, load_pretrained

# ---- Models Genesis (MrGiovanni/ModelsGenesis, pytorch/unet3d.py; Genesis_Chest_CT.pt) ------------------------


def _genesis_published(base: int = 32, n_class: int = 1) -> dict[str, torch.Tensor]:
    """``{"state_dict": ...}`` of the published ``UNet3D`` (DataParallel ``module.`` keys), written from its
    definition: ``DownTransition(in, depth)`` = LUConv(in, 32*2^d), LUConv(32*2^d, 32*2^(d+1)); ``UpTransition(in,
    out, depth)`` = ConvTranspose3d(in, out, 2, 2), LUConv(in + out // 2, 32*2^(d+1)), LUConv(same, same);
    ``OutputTransition(64, n)`` = Conv3d(64, n, 1). LUConv = conv1 (3x3x3) + bn1 (ContBatchNorm3d) + ReLU."""
    g = torch.Generator().manual_seed(0)
    state = {}

    def luconv(prefix, cin, cout):
        state[f"{prefix}.conv1.weight"] = torch.randn(cout, cin, 3, 3, 3, generator=g) * 0.05
        state[f"{prefix}.conv1.bias"] = torch.randn(cout, generator=g) * 0.05
        state[f"{prefix}.bn1.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
        state[f"{prefix}.bn1.bias"] = 0.1 * torch.randn(cout, generator=g)
        state[f"{prefix}.bn1.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        state[f"{prefix}.bn1.running_var"] = 1 + 0.1 * torch.rand(cout, generator=g)
        state[f"{prefix}.bn1.num_batches_tracked"] = torch.tensor(1000)

    names = {0: 2 * base, 1: 4 * base, 2: 8 * base, 3: 16 * base}  # down_tr64 ... down_tr512 at base 32
    cin = 1
    for depth in range(4):
        luconv(f"down_tr{names[depth]}.ops.0", cin, base * 2**depth)
        luconv(f"down_tr{names[depth]}.ops.1", base * 2**depth, base * 2 ** (depth + 1))
        cin = base * 2 ** (depth + 1)
    for in_ch, depth in ((16 * base, 2), (8 * base, 1), (4 * base, 0)):  # up_tr256, up_tr128, up_tr64
        out = base * 2 ** (depth + 1)
        state[f"up_tr{out}.up_conv.weight"] = torch.randn(in_ch, in_ch, 2, 2, 2, generator=g) * 0.05
        state[f"up_tr{out}.up_conv.bias"] = torch.randn(in_ch, generator=g) * 0.05
        luconv(f"up_tr{out}.ops.0", in_ch + in_ch // 2, out)
        luconv(f"up_tr{out}.ops.1", out, out)
    state["out_tr.final_conv.weight"] = torch.randn(n_class, 2 * base, 1, 1, 1, generator=g) * 0.05
    state["out_tr.final_conv.bias"] = torch.randn(n_class, generator=g) * 0.05
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}}


def test_models_genesis_published_keys_names_and_shapes():
    published = _genesis_published()["state_dict"]
    assert "module.down_tr64.ops.0.conv1.weight" in published and "module.up_tr256.up_conv.weight" in published
    assert published["module.down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert published["module.up_tr256.ops.0.conv1.weight"].shape == (256, 768, 3, 3, 3)
    net = ModelsGenesisUNet3D()  # the published size: base 32, 1 input and 1 output channel
    assert len(net.state_dict()) == len(published)
    assert sum(p.numel() for p in net.parameters()) == sum(
        v.numel() for k, v in published.items() if not k.endswith(("running_mean", "running_var", "tracked")))


def test_models_genesis_checkpoint_loads_every_key_and_changes_the_output(tmp_path):
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save(_genesis_published(), path)
    net = build_backbone("models_genesis", options={}).eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
    report = load_pretrained(net, path, prefixes=None, strict=True)
    assert report["layout"] == "models_genesis" and not report["dropped"]
    assert len(report["loaded"]) == len(net.state_dict()) and not report["missing"] and not report["unexpected"]
    published = _genesis_published()["state_dict"]
    state = net.state_dict()
    torch.testing.assert_close(state["encoder.down_tr64.ops.0.conv1.weight"],
                               published["module.down_tr64.ops.0.conv1.weight"])
    torch.testing.assert_close(state["head.weight"], published["module.out_tr.final_conv.weight"])
    with torch.no_grad():
        after = net(x)
    assert after.shape == before.shape == (1, 1, 16, 16, 16) and not torch.allclose(before, after)
    # fine-tuning: encoder + decoder from the checkpoint, a new 3-class head
    seg = ModelsGenesisUNet3D(out_channels=3)
    report = load_pretrained(seg, path)
    assert not report["missing"] and not report["skipped_shape"] and all(
        k.startswith(("encoder.", "decoder.")) for k in report["loaded"])


def test_models_genesis_wrong_size_and_wrong_network_are_clear_errors(tmp_path):
    path = tmp_path / "genesis.pt"
    torch.save(_genesis_published(base=4), path)
    load_pretrained(ModelsGenesisUNet3D(base_channels=4), path, prefixes=None, strict=True)  # the matching size
    with pytest.raises(DataError, match=r"genesis\.pt: does not fit ModelsGenesisUNet3D .*other shapes") as err:
        load_pretrained(ModelsGenesisUNet3D(base_channels=8), path, prefixes=None, strict=True)
    assert "encoder.down_tr16.ops.0.conv1.weight" in str(err.value)  # names the keys
    assert "\n" not in str(err.value)
    extra = _genesis_published(base=4)
    extra["state_dict"]["module.down_tr8.ops.0.activation.weight"] = torch.ones(4)  # a PReLU checkpoint
    with pytest.raises(DataError, match=r"1 unexpected \(encoder\.down_tr8\.ops\.0\.activation\.weight\)"):
        load_pretrained(ModelsGenesisUNet3D(base_channels=4), extra, prefixes=None, strict=True)
    assert load_pretrained(ModelsGenesisUNet3D(base_channels=4, act="prelu"), extra, prefixes=None)["missing"]
    with pytest.raises(DataError, match="models_genesis checkpoint .* fits medvol's ModelsGenesisUNet3D, not UNet3D"):
        load_pretrained(UNet3D(channels=(8, 16, 32, 64)), path)


def test_models_genesis_backbone_interface():
    net = ModelsGenesisUNet3D(base_channels=4, out_channels=2)
    feats = net.forward_features(torch.zeros(2, 1, 16, 24, 8))
    assert [f.shape[1] for f in feats["encoder"]] == list(net.encoder_channels) == [8, 16, 32, 64]
    assert [f.shape[1] for f in feats["decoder"]] == list(net.decoder_channels) == [32, 16, 8]
    assert feats["decoder"][-1].shape[2:] == (16, 24, 8)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 1, 12, 16, 16))


# ---- SwinUNETR self-supervised (Tang et al. 2022; MONAI's model_swinvit.pt) ---------------------------------------


def _swinvit_published(feature_size: int) -> dict:
    """``{"state_dict": ...}`` in the published layout: the Swin transformer under ``module.`` with timm-style
    ``mlp.fc1``/``fc2`` (what ``SwinUNETR.load_from`` reads), plus the pretext heads (rotation: Linear(dim, 4),
    contrastive: Linear(dim, 512), reconstruction: ConvTranspose3d(dim, 1, 32, 32)), dim = 16 x feature size."""
    torch.manual_seed(3)
    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size).swinViT
    state = {}
    for key, value in swin.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = torch.randn_like(value) if value.is_floating_point() else value
    dim = 16 * feature_size
    state.update({"module.rotation_head.weight": torch.randn(4, dim), "module.rotation_head.bias": torch.randn(4),
                  "module.contrastive_head.weight": torch.randn(512, dim),
                  "module.contrastive_head.bias": torch.randn(512),
                  "module.convTrans3d.weight": torch.randn(dim, 1, 32, 32, 32),
                  "module.convTrans3d.bias": torch.randn(1)})
    return {"state_dict": state}


@pytest.mark.slow  # SwinUNETR forward passes: ~10 s each on a loaded 2-core machine
def test_swinvit_ssl_checkpoint_loads_like_monais_load_from(tmp_path):
    published = _swinvit_published(12)
    keys = published["state_dict"]
    assert {"module.patch_embed.proj.weight", "module.layers1.0.blocks.0.mlp.fc1.weight",
            "module.layers4.0.blocks.1.attn.relative_position_bias_table",
            "module.layers2.0.downsample.reduction.weight"} <= set(keys)
    path = tmp_path / "model_swinvit.pt"
    torch.save(published, path)
    net = SwinBackbone(feature_size=12, out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
    report = load_pretrained(net, path, prefixes=("encoder.swinViT.",), strict=True)
    assert report["layout"] == "swinvit_ssl"
    # every published key is consumed: the transformer's loaded, the pretext heads dropped (and listed)
    heads = [k for k in keys if k.startswith(("module.rotation_head", "module.contrastive_head", "module.convTrans3d"))]
    assert sorted(report["dropped"]) == sorted(k[len("module."):] for k in heads)
    assert len(report["loaded"]) + len(report["dropped"]) == len(keys) and not report["unexpected"]
    # the same weights as MONAI's own reader of the published file
    reference = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    reference.load_from(published)
    ours = net.to_swinunetr_state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("swinViT."):
            torch.testing.assert_close(ours[key], value, msg=key)
    with torch.no_grad():
        assert not torch.allclose(before, net(x))
    # the default prefixes fill the transformer and say what stays at its initialisation
    report = load_pretrained(SwinBackbone(feature_size=12, out_channels=3), published)
    assert report["missing"] and all(not k.startswith("encoder.swinViT.") for k in report["missing"])


def test_swinvit_ssl_variants_and_errors():
    published = _swinvit_published(12)["state_dict"]
    research = {k.replace("module.", "module.swinViT.", 1) if not k.startswith(
        ("module.rotation", "module.contrastive", "module.convTrans")) else k: v for k, v in published.items()}
    assert detect_layout({k[7:]: v for k, v in research.items()}) == "swinvit_ssl"
    report = load_pretrained(SwinBackbone(feature_size=12), research, prefixes=("encoder.swinViT.",), strict=True)
    assert len(report["loaded"]) == len(published) - 6
    shape = r"encoder\.swinViT\.patch_embed\.proj\.weight \(24, 1, 2, 2, 2\) vs \(12, 1, 2, 2, 2\)"
    with pytest.raises(DataError, match=r"does not fit SwinBackbone \(swinvit_ssl layout.*other shapes.*" + shape):
        load_pretrained(SwinBackbone(feature_size=12), _swinvit_published(24), prefixes=("encoder.swinViT.",),
                        strict=True)
    with pytest.raises(DataError, match="swinvit_ssl checkpoint .* fits medvol's SwinBackbone, not UNet3D"):
        load_pretrained(UNet3D(channels=(4, 8)), published)


@pytest.mark.slow  # SwinUNETR forward passes: ~10 s each on a loaded 2-core machine
def test_monai_swinunetr_state_dict_loads_into_swin_backbone():
    torch.manual_seed(0)
    monai_net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    net = SwinBackbone(feature_size=12, out_channels=2)
    report = load_pretrained(net, {"state_dict": monai_net.state_dict()}, prefixes=None, strict=True)
    assert report["layout"] == "swinunetr" and len(report["loaded"]) == len(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), monai_net.eval()(x))


def test_fewshot_bundle_fine_tunes_from_published_models_genesis_weights(tmp_path, demo_dir):
    from conftest import bundle_workflow, copy_labeled_hippo

    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save(_genesis_published(base=4), path)
    data = copy_labeled_hippo(demo_dir, tmp_path / "data", 2)
    wf = bundle_workflow("fewshot_segmentation", dataset_dir=str(data), output_dir=str(tmp_path / "run"),
                         backbone="models_genesis", backbone_options={"models_genesis": {"base_channels": 4}},
                         pretrained_checkpoint=str(path))
    net = wf.parser.get_parsed_content("network_def")
    assert isinstance(net, ModelsGenesisUNet3D) and net.head.weight.shape[0] == 3
    published = _genesis_published(base=4)["state_dict"]
    torch.testing.assert_close(net.state_dict()["decoder.up_tr8.ops.1.conv1.weight"],
                               published["module.up_tr8.ops.1.conv1.weight"])
