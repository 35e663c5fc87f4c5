"""SparK's sparse encoder: masked voxels never influence visible features or norm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvol.methods import SparK
from medvol.networks import UNet3D, mask_at, masked_norm, sparse_encode


def _inputs(seed=0, b=2, size=16, grid=4, ratio=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, size, size, size, generator=g)
    visible = (torch.rand(b, 1, grid, grid, grid, generator=g) > ratio).float()
    visible[:, :, 0, 0, 0] = 1.0  # every sample keeps a visible patch
    noise = torch.randn(x.shape, generator=g) * 5
    x_perturbed = x + noise * (1 - mask_at(visible, x.shape[2:]))  # changes masked voxels only
    return x, x_perturbed, visible


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
@pytest.mark.parametrize("downsample", ["conv", "pool"])
@torch.no_grad()
def test_masked_voxels_do_not_reach_visible_features(norm, downsample):
    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8, 16), norm=norm, downsample=downsample).train()
    x, x2, visible = _inputs()
    feats = sparse_encode(net, x, visible)
    feats2 = sparse_encode(net, x2, visible)
    for f, f2 in zip(feats, feats2):
        vis = mask_at(visible, f.shape[2:])
        torch.testing.assert_close(f * vis, f2 * vis, rtol=0, atol=1e-5)
        assert float((f * (1 - vis)).abs().max()) == 0.0  # masked positions stay empty
        assert float((f * vis).abs().max()) > 0
    # the dense encoder does see the masked voxels (so the check above can fail)
    dense, dense2 = net.encode(x)[-1], net.encode(x2)[-1]
    vis = mask_at(visible, dense.shape[2:])
    assert float(((dense - dense2) * vis).abs().max()) > 1e-3


def test_batch_norm_running_stats_ignore_masked_voxels():
    torch.manual_seed(0)
    x, x2, visible = _inputs(seed=1)
    a = UNet3D(channels=(4, 8, 16), norm="batch").train()
    b = UNet3D(channels=(4, 8, 16), norm="batch").train()
    b.load_state_dict(a.state_dict())
    initial = a.encoder.levels[1].convs[0].adn.N.running_mean.clone()
    sparse_encode(a, x, visible)
    sparse_encode(b, x2, visible)
    assert not torch.equal(a.encoder.levels[1].convs[0].adn.N.running_mean, initial)  # the statistics moved
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if "running" in k:
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
    a.eval()  # eval: running statistics, still nothing leaks
    f, f2 = sparse_encode(a, x, visible)[-1], sparse_encode(a, x2, visible)[-1]
    torch.testing.assert_close(f, f2, rtol=0, atol=1e-5)


def test_masked_norm_equals_norm_of_visible_voxels():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 4, 4, 4, generator=g) * 3 + 1
    vis = (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.5).float()
    inorm = nn.InstanceNorm3d(4, affine=True)
    nn.init.normal_(inorm.weight)
    nn.init.normal_(inorm.bias)
    y = masked_norm(inorm, x, vis)
    for i in range(2):
        sel = vis[i, 0] > 0
        for c in range(4):
            v = x[i, c][sel]
            ref = (v - v.mean()) / (v.var(unbiased=False) + inorm.eps).sqrt() * inorm.weight[c] + inorm.bias[c]
            torch.testing.assert_close(y[i, c][sel], ref, rtol=1e-4, atol=1e-5)
    gnorm = nn.GroupNorm(2, 4)
    y = masked_norm(gnorm, x, vis)
    sel = vis[0, 0] > 0
    v = x[0, :2][:, sel]  # group 0 of sample 0: channels 0-1, visible voxels
    ref = (v - v.mean()) / (v.var(unbiased=False) + gnorm.eps).sqrt()
    torch.testing.assert_close(y[0, :2][:, sel], ref, rtol=1e-4, atol=1e-5)
    bnorm = nn.BatchNorm3d(4).train()
    y = masked_norm(bnorm, x, vis)
    rows = x.movedim(1, -1)[vis[:, 0] > 0]
    torch.testing.assert_close(bnorm.running_mean, 0.1 * rows.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y.movedim(1, -1)[vis[:, 0] > 0], (rows - rows.mean(0)) /
                               (rows.var(0, unbiased=False) + bnorm.eps).sqrt(), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="unsupported norm"):
        masked_norm(nn.LayerNorm(4), x, vis)


def test_spark_reconstruction_ignores_masked_input_and_trains():
    torch.manual_seed(0)
    method = SparK(UNet3D(channels=(4, 8, 16)))
    assert method.patch_size == (4, 4, 4)
    x, x2, visible = _inputs(seed=3)
    mask = visible < 0.5
    torch.testing.assert_close(method.reconstruct(x, mask), method.reconstruct(x2, mask), rtol=0, atol=1e-5)
    out = method({"image": x, "mask": mask})
    out["loss"].backward()
    assert out["loss"].ndim == 0 and abs(float(out["mask_ratio"]) - float(mask.float().mean())) < 1e-6
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in method.mask_tokens)
    assert method.backbone.encoder.levels[0].convs[0].conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch grid"):
        method({"image": x, "mask": torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="out_channels"):
        SparK(UNet3D(channels=(4, 8), out_channels=2))
    from medvol.networks import SwinBackbone
    with pytest.raises(TypeError, match="UNet3D"):
        SparK(SwinBackbone(feature_size=12, depths=(1, 1, 1, 1)))
