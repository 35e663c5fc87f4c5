"""MaskedReconstructionLoss against a slow loop written from the MAE / SparK formula; patchify round trips."""

from __future__ import annotations

import pytest
import torch

from medvol.losses import MaskedReconstructionLoss
from medvol.losses.masked_reconstruction import patchify, unpatchify


def slow_reference(x, y, mask, patch, norm=True, eps=1e-6):
    """Loop over every patch: normalize the target patch (unbiased var), mean squared error, mean over masked."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch
    total, count = 0.0, 0
    for i in range(b):
        for gd in range(d // pd):
            for gh in range(h // ph):
                for gw in range(w // pw):
                    if not mask[i, 0, gd, gh, gw]:
                        continue
                    sl = (i, slice(None), slice(gd * pd, (gd + 1) * pd), slice(gh * ph, (gh + 1) * ph),
                          slice(gw * pw, (gw + 1) * pw))
                    t = y[sl].double()
                    if norm:
                        t = (t - t.mean()) / (t.var() + eps) ** 0.5
                    total += float(((x[sl].double() - t) ** 2).mean())
                    count += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_matches_slow_reference(norm):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 2, 8, 4, 6, generator=g), torch.rand(2, 2, 8, 4, 6, generator=g) * 3
    mask = torch.rand(2, 1, 4, 2, 2, generator=g) < 0.6
    mask[0, 0, 0, 0, 0] = True
    loss = MaskedReconstructionLoss((2, 2, 3), norm_target=norm)(x, y, mask)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - slow_reference(x, y, mask, (2, 2, 3), norm)) < 1e-5


def test_only_masked_patches_count_and_reductions():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 1, 4, 4, 4, generator=g), torch.randn(1, 1, 4, 4, 4, generator=g)
    mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1, 0, 1] = True  # one patch: voxels [2:4, 0:2, 2:4]
    loss = MaskedReconstructionLoss(2)
    base = loss(x, y, mask)
    x2 = x.clone()
    x2[..., :2, :, :] += 100.0  # change visible patches only
    torch.testing.assert_close(loss(x2, y, mask), base)
    t = y[0, 0, 2:4, 0:2, 2:4]
    expected = ((x[0, 0, 2:4, 0:2, 2:4] - (t - t.mean()) / (t.var() + 1e-6).sqrt()) ** 2).mean()
    torch.testing.assert_close(base, expected)
    none = MaskedReconstructionLoss(2, reduction="none")(x, y, mask)
    assert none.shape == (1, 8) and int((none != 0).sum()) == 1
    torch.testing.assert_close(MaskedReconstructionLoss(2, reduction="sum")(x, y, mask), expected)
    # a perfect reconstruction of the normalized target gives 0; no mask = all patches
    rec = unpatchify((lambda p: (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt())(
        patchify(y, 2)), 2, (2, 2, 2))
    assert float(loss(rec, y)) < 1e-10
    rec.requires_grad_(True)
    loss(rec, y, mask).backward()
    assert rec.grad is not None and float(rec.grad[..., :2, :, :].abs().sum()) == 0.0


def test_patchify_order_matches_flattened_mask_and_errors():
    x = torch.arange(2 * 4 * 4 * 2, dtype=torch.float32).reshape(1, 2, 4, 4, 2)
    rows = patchify(x, (2, 2, 2))  # (1, 4, 16)
    assert rows.shape == (1, 4, 16)
    # patch n = (gd, gh) row-major; its rows hold exactly that block's voxels
    block = x[0, :, 2:4, 0:2, 0:2]
    assert sorted(rows[0, 2].tolist()) == sorted(block.flatten().tolist())
    torch.testing.assert_close(unpatchify(rows, 2, (2, 2, 1)), x)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 5, 4, 4), 2)
    with pytest.raises(ValueError, match="patch grid"):
        MaskedReconstructionLoss(2)(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="reduction"):
        MaskedReconstructionLoss(2, reduction="max")
