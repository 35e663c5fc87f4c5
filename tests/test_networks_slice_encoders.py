"""2D slice encoders: output shapes, gradients, the Gated CNN block against its formula, the name factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks.slice_encoders import (
    SLICE_ENCODERS,
    GatedCNNBlock,
    GatedCNNSliceEncoder,
    ResNetSliceEncoder,
    ViTSliceEncoder,
    build_slice_encoder,
)

SMALL_VIT = dict(img_size=64, patch_size=16, hidden_size=48, num_layers=2, num_heads=4)


def _check_forward_backward(net: torch.nn.Module, out_dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    y = net(x)
    assert y.shape == (2, out_dim) == (2, net.out_dim) and torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # the two images get different embeddings
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"


@pytest.mark.parametrize(
    "name, kwargs, out_dim",
    [
        ("resnet18", {}, 512),
        ("ResNet34", {"widen_factor": 0.25}, 128),
        ("resnet50", {"widen_factor": 0.25}, 512),  # bottleneck: 4 x 128
        ("resnet18", {"widen_factor": 0.25, "out_dim": 32, "no_max_pool": True}, 32),
        ("vit", SMALL_VIT, 48),
        ("ViT", dict(SMALL_VIT, pool="mean", conv_stem=True, pos_embed_type="learnable"), 48),
        ("mambaout", {}, 256),
        ("MambaOut", {"dims": (8, 16), "depths": (1, 2), "drop_path_rate": 0.1}, 16),
    ],
)
def test_encoders_embed_and_backpropagate(name, kwargs, out_dim):
    _check_forward_backward(build_slice_encoder(name, in_channels=3, **kwargs), out_dim)


def test_encoder_classes_and_input_checks():
    assert isinstance(build_slice_encoder("RESNET18", in_channels=1), ResNetSliceEncoder)
    vit = build_slice_encoder("vit", in_channels=3, **SMALL_VIT)
    assert isinstance(vit, ViTSliceEncoder) and vit.vit.cls_token.requires_grad
    assert not hasattr(vit.vit, "classification_head")
    with pytest.raises(ValueError, match=r"size \(64, 64\)"):
        vit(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        vit(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="power-of-two"):
        ViTSliceEncoder(3, img_size=60, patch_size=12, hidden_size=48, num_heads=4, conv_stem=True)
    stem = ViTSliceEncoder(3, conv_stem=True, **SMALL_VIT).vit.patch_embedding.patch_embeddings
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 12, 24, 48, 48] and [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    with pytest.raises(ValueError, match="depth"):
        ResNetSliceEncoder(3, depth=101)
    with pytest.raises(ValueError, match="equal length"):
        GatedCNNSliceEncoder(3, dims=(8, 16), depths=(1,))


def test_vit_fused_attention_matches_the_einsum_path_and_is_batch_independent():
    torch.manual_seed(1)
    fused = ViTSliceEncoder(3, **SMALL_VIT).eval()
    plain = ViTSliceEncoder(3, fused_attention=False, **SMALL_VIT).eval()
    plain.load_state_dict(fused.state_dict())
    assert fused.vit.blocks[0].attn.use_flash_attention and not plain.vit.blocks[0].attn.use_flash_attention
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(x)[1:], fused(x[1:]), atol=1e-5, rtol=1e-5)


def test_gated_cnn_block_matches_its_formula():
    torch.manual_seed(2)
    block = GatedCNNBlock(dim=12, expansion_ratio=8 / 3, kernel_size=7, conv_ratio=0.5).eval()
    x = torch.randn(2, 9, 10, 12)  # (B, H, W, C) channels-last
    hidden, conv_ch = 32, 6
    h = F.linear(F.layer_norm(x, (12,), block.norm.weight, block.norm.bias, 1e-6), block.fc1.weight, block.fc1.bias)
    gate, ident, conv = h[..., :hidden], h[..., hidden:2 * hidden - conv_ch], h[..., 2 * hidden - conv_ch:]
    conv = F.conv2d(conv.permute(0, 3, 1, 2), block.conv.weight, block.conv.bias, padding=3, groups=conv_ch)
    value = torch.cat([ident, conv.permute(0, 2, 3, 1)], dim=-1)
    expected = x + F.linear(F.gelu(gate) * value, block.fc2.weight, block.fc2.bias)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - x).abs().mean() > 1e-3  # the residual branch is active


def test_zero_init_blocks_are_identities_and_drop_path_is_off_in_eval():
    x = torch.randn(2, 8, 8, 16)
    torch.testing.assert_close(GatedCNNBlock(16, zero_init=True)(x), x)
    net = GatedCNNSliceEncoder(3, dims=(8, 16), depths=(1, 1), zero_init=True)
    assert all(float(m.fc2.weight.detach().abs().sum()) == 0 for m in net.modules() if isinstance(m, GatedCNNBlock))
    torch.manual_seed(3)
    block = GatedCNNBlock(16, drop_path=0.5)
    block.eval()
    torch.testing.assert_close(block(x), x + block.branch(x))
    block.train()
    dropped = block(x)
    kept = (dropped - x).flatten(1).abs().sum(1) > 0  # per sample: branch dropped (0) or scaled by 1 / 0.5
    for i in range(2):
        expected = x[i] + 2 * block.branch(x)[i] if kept[i] else x[i]
        torch.testing.assert_close(dropped[i], expected, atol=1e-5, rtol=1e-5)


def test_mambaout_downsamples_by_32():
    net = GatedCNNSliceEncoder(1, dims=(4, 8, 16, 32), depths=(1, 1, 1, 1))
    sizes = []
    net.stages[-1].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape)))
    assert net(torch.randn(1, 1, 64, 96)).shape == (1, 32)
    assert sizes == [(1, 2, 3, 32)]  # channels-last last stage: 64/32 x 96/32


def test_build_slice_encoder_errors():
    names = "resnet18, resnet34, resnet50, vit, mambaout"
    with pytest.raises(ConfigError, match=f"unknown slice encoder 'swin2d'; valid names: {names}"):
        build_slice_encoder("swin2d", in_channels=3)
    with pytest.raises(ConfigError, match="fixes the depth"):
        build_slice_encoder("resnet18", in_channels=3, depth=50)
    assert SLICE_ENCODERS == ("resnet18", "resnet34", "resnet50", "vit", "mambaout")
