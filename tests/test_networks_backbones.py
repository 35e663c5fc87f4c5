"""Backbones: feature taps (shapes and values), decode levels, gradients, size checks, factory, bundle usage."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.networks.nets import SwinUNETR

from medvol.errors import ConfigError
from medvol.networks import BACKBONES, SwinBackbone, UNet3D, build_backbone

TINY_SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)


def _shapes(maps):
    return [tuple(m.shape) for m in maps]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet3D(in_channels=1, out_channels=2).eval()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return SwinBackbone(out_channels=2, **TINY_SWIN).eval()


def test_unet_feature_shapes_non_cubic(unet):
    x = torch.randn(1, 1, 32, 48, 32)
    feats = unet.forward_features(x)
    assert unet.encoder_channels == (16, 32, 64, 128) and unet.decoder_channels == (64, 32, 16)
    assert _shapes(feats["encoder"]) == [(1, 16, 32, 48, 32), (1, 32, 16, 24, 16), (1, 64, 8, 12, 8), (1, 128, 4, 6, 4)]
    assert _shapes(feats["decoder"]) == [(1, 64, 8, 12, 8), (1, 32, 16, 24, 16), (1, 16, 32, 48, 32)]
    with torch.no_grad():
        logits = unet(x)
        assert logits.shape == (1, 2, 32, 48, 32)
        torch.testing.assert_close(logits, unet.head(unet.decode(unet.encode(x))[-1]))
        full = unet.decode(feats["encoder"])
        for levels in (1, 2, 3):
            part = unet.decode(feats["encoder"], num_levels=levels)
            assert len(part) == levels
            for a, b in zip(part, full):
                torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_levels"):
        unet.decode(feats["encoder"], num_levels=4)
    with pytest.raises(ValueError, match="expected 4 encoder maps"):
        unet.decode(feats["encoder"][1:])


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8, 16), norm="batch", dropout=0.1)
    net(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unet_parameter_prefixes_and_encoder_state_dict(unet):
    assert {k.split(".")[0] for k in unet.state_dict()} == {"encoder", "decoder", "head"}
    enc = unet.encoder_state_dict()
    assert enc and all(k.startswith("encoder.") for k in enc)
    assert set(enc) == {k for k in unet.state_dict() if k.startswith("encoder.")}


def test_unet_without_skips_reads_only_the_bottleneck():
    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8, 16), skip=False).eval()
    feats = net.encode(torch.randn(1, 1, 16, 16, 16))
    assert net.decoder.levels[0].convs[0].conv.in_channels == 8  # no concatenated skip
    with torch.no_grad():
        out = net.decode(feats)
        noisy = [torch.randn_like(f) for f in feats[:-1]] + [feats[-1]]
        for a, b in zip(out, net.decode(noisy)):
            torch.testing.assert_close(a, b)
    assert _shapes(out) == [(1, 8, 8, 8, 8), (1, 4, 16, 16, 16)]


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_unet_norms_pool_and_interpolation(norm):
    net = UNet3D(channels=(4, 8), norm=norm, downsample="pool", upsample="interpolate", act="relu").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 16, 8)).shape == (1, 1, 8, 16, 8)
    keys = net.state_dict()
    assert ("encoder.levels.0.convs.0.adn.N.running_mean" in keys) == (norm == "batch")
    if norm == "group":
        assert net.encoder.levels[0].convs[0].adn.N.num_groups == 4
    with pytest.raises(ValueError, match="norm='layer'"):
        UNet3D(norm="layer")


def test_unet_bad_size_names_size_and_divisor(unet):
    with pytest.raises(ValueError, match=r"\(32, 30, 32\) is not divisible by 8 along spatial dimension 1"):
        unet(torch.randn(1, 1, 32, 30, 32))
    with pytest.raises(ValueError, match="input channel"):
        unet(torch.randn(1, 2, 32, 32, 32))
    aniso = UNet3D(channels=(4, 8, 16), strides=((2, 2, 1), (2, 2, 1)))
    assert aniso.spatial_divisor == (4, 4, 1)
    assert aniso.encode(torch.randn(1, 1, 8, 8, 3))[-1].shape == (1, 16, 2, 2, 3)
    with pytest.raises(ValueError, match="strides"):
        UNet3D(channels=(4, 8, 16), strides=(2,))


def test_swin_feature_shapes_and_equivalence_with_monai(swin):
    x = torch.randn(1, 1, 32, 32, 64)
    feats = swin.forward_features(x)
    assert _shapes(feats["encoder"]) == [
        (1, 12, 32, 32, 64),
        (1, 12, 16, 16, 32),
        (1, 24, 8, 8, 16),
        (1, 48, 4, 4, 8),
        (1, 96, 2, 2, 4),
        (1, 192, 1, 1, 2),
    ]
    assert _shapes(feats["decoder"]) == [
        (1, 96, 2, 2, 4),
        (1, 48, 4, 4, 8),
        (1, 24, 8, 8, 16),
        (1, 12, 16, 16, 32),
        (1, 12, 32, 32, 64),
    ]
    assert swin.encoder_channels == (12, 12, 24, 48, 96, 192) and swin.decoder_channels == (96, 48, 24, 12, 12)
    assert len(swin.decode(feats["encoder"], num_levels=2)) == 2
    # same weights in MONAI's own SwinUNETR give the same logits: the sub-modules are called in its order
    ref = SwinUNETR(in_channels=1, out_channels=2, **TINY_SWIN).eval()
    ref.load_state_dict(swin.to_swinunetr_state_dict())
    with torch.no_grad():
        out = swin(x)
        torch.testing.assert_close(out, ref(x))
        torch.testing.assert_close(out, swin.head(swin.decode(swin.encode(x))[-1]))
    round_trip = SwinBackbone.from_swinunetr_state_dict(ref.state_dict())
    assert set(round_trip) == set(swin.state_dict())
    assert {k.split(".")[0] for k in swin.state_dict()} == {"encoder", "decoder", "head"}


def test_swin_gradients_and_bad_size(swin):
    net = SwinBackbone(**TINY_SWIN, norm="group")
    net(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    with pytest.raises(ValueError, match=r"not divisible by 32 along spatial dimension 2 \(size 48\)"):
        swin.encode(torch.randn(1, 1, 32, 32, 48))


def test_build_backbone_names_and_error():
    assert set(BACKBONES) == {"unet", "swinunetr", "models_genesis", "unetr"}
    assert isinstance(build_backbone("UNet", channels=(4, 8)), UNet3D)
    assert isinstance(build_backbone("SwinUNETR", **TINY_SWIN), SwinBackbone)
    valid = "models_genesis, swinunetr, unet, unetr"
    with pytest.raises(ConfigError, match=f"unknown backbone 'resnet'; valid names: {valid}"):
        build_backbone("resnet")


def test_bundle_network_def_and_verify_net_in_out(tmp_path):
    config = {
        "network_def": {
            "_target_": "medvol.networks.UNet3D",
            "in_channels": 1,
            "out_channels": 3,
            "channels": [4, 8, 16],
        }
    }
    net = ConfigParser(config).get_parsed_content("network_def")
    assert isinstance(net, UNet3D)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    meta = {
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "spatial_shape": ["4*n", "4*n", "4*n"],
                    "dtype": "float32",
                }
            },
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3, "dtype": "float32"}},
        }
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=str(tmp_path / "train.json"),
        device="cpu",
        n=4,
    )
