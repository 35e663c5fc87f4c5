"""RestorationLoss: MSE / L1 against torch, masked means over the masked voxels, broadcast and float masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvol.losses import RestorationLoss


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 6, 5, 4, generator=g), torch.rand(2, 1, 6, 5, 4, generator=g)


def test_unmasked_equals_torch(pair):
    x, y = pair
    torch.testing.assert_close(RestorationLoss("mse")(x, y), F.mse_loss(x, y))
    torch.testing.assert_close(RestorationLoss("L1")(x, y), F.l1_loss(x, y))
    torch.testing.assert_close(RestorationLoss("mse", reduction="sum")(x, y), F.mse_loss(x, y, reduction="sum"))
    torch.testing.assert_close(RestorationLoss("l1", reduction="none")(x, y), (x - y).abs())


def test_masked_mean_over_masked_voxels_only(pair):
    x, y = pair
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 0, :3] = True
    mask[1, 0, 2:, 1:4] = True
    expected = ((x - y)[mask] ** 2).mean()
    torch.testing.assert_close(RestorationLoss("mse")(x, y, mask), expected)
    torch.testing.assert_close(RestorationLoss("mse")(x, y, mask.float()), expected)
    expected_l1 = (x - y)[mask].abs().sum()
    torch.testing.assert_close(RestorationLoss("l1", reduction="sum")(x, y, mask), expected_l1)
    # changing the input outside the mask does not change the loss
    x2 = torch.where(mask, x, torch.full_like(x, 100.0))
    torch.testing.assert_close(RestorationLoss("mse")(x2, y, mask), expected)
    none = RestorationLoss("mse", reduction="none")(x, y, mask)
    assert none.shape == x.shape and float(none[~mask].abs().sum()) == 0.0


def test_broadcast_and_weighted_masks():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 4, 4, 4, generator=g), torch.rand(2, 3, 4, 4, 4, generator=g)
    mask = torch.rand(2, 1, 4, 4, 4, generator=g) > 0.5  # one mask for all 3 channels
    full = mask.expand_as(x)
    torch.testing.assert_close(RestorationLoss()(x, y, mask), ((x - y)[full] ** 2).mean())
    weights = torch.rand(2, 1, 4, 4, 4, generator=g)
    expected = ((x - y) ** 2 * weights).sum() / (weights.sum() * 3)
    torch.testing.assert_close(RestorationLoss()(x, y, weights), expected)


def test_identical_images_and_empty_mask(pair):
    x, _ = pair
    assert float(RestorationLoss("l1")(x, x.clone())) == 0.0
    xg = x.clone().requires_grad_(True)
    loss = RestorationLoss()(xg, x + 1.0, torch.zeros_like(x, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(xg.grad).all() and float(xg.grad.abs().sum()) == 0.0


def test_gradients_and_low_precision(pair):
    x, y = pair
    xg = x.clone().requires_grad_(True)
    RestorationLoss()(xg, y, y > 0.5).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RestorationLoss()(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.mse_loss(x.bfloat16().float(), y.bfloat16().float()))


def test_errors(pair):
    x, y = pair
    with pytest.raises(ValueError, match="'ssim'"):
        RestorationLoss("ssim")
    with pytest.raises(ValueError, match="'median'"):
        RestorationLoss(reduction="median")
    with pytest.raises(ValueError, match=r"\(2, 1, 6, 5, 4\) and \(2, 1, 6, 5\)"):
        RestorationLoss()(x, y[..., 0])
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 6, 5, 4\)"):
        RestorationLoss()(x, y, torch.ones(3, 1, 6, 5, 4))
    with pytest.raises(TypeError, match="target"):
        RestorationLoss()(x, (y > 0.5).long())
