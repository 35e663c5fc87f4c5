"""LocalContrastiveLoss: region grid, slow per-image/per-region reference, closed form, shuffled views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvol.losses import LocalContrastiveLoss


def reference(f1: torch.Tensor, f2: torch.Tensor, starts: list[list[int]], r: int, tau: float) -> float:
    """Loops over images and regions: window means, then NT-Xent with explicit negatives, both views anchors."""
    f1, f2 = f1.double(), f2.double()
    per_image = []
    for b in range(f1.shape[0]):
        emb = {0: [], 1: []}
        for v, f in enumerate((f1, f2)):
            for z0 in starts[0]:
                for y0 in starts[1]:
                    for x0 in starts[2]:
                        e = f[b, :, z0 : z0 + r, y0 : y0 + r, x0 : x0 + r].mean(dim=(1, 2, 3))
                        emb[v].append(F.normalize(e, dim=0))
        n = len(emb[0])
        losses = []
        for v in (0, 1):
            for i in range(n):
                anchor = emb[v][i]
                pos = math.exp(float(anchor @ emb[1 - v][i]) / tau)
                neg = sum(math.exp(float(anchor @ emb[w][j]) / tau) for w in (0, 1) for j in range(n) if j != i)
                losses.append(-math.log(pos / (pos + neg)))
        per_image.append(sum(losses) / len(losses))
    return sum(per_image) / len(per_image)


def test_region_starts():
    loss = LocalContrastiveLoss(grid_size=(3, 3, 3), region_size=3)
    # 6 window starts 0..5 in 3 bins [0,2) [2,4) [4,6): centres 1, 3, 5
    assert loss.region_starts((8, 8, 8)) == [[1, 3, 5]] * 3
    # large axis: half a spacing away from both borders
    # large axis: half a spacing away from both borders; smallest axis (size r + g - 1): every position
    assert loss.region_starts((32, 5, 12)) == [[5, 15, 25], [0, 1, 2], [1, 5, 8]]
    # every axis: distinct, increasing, inside the map, for all sizes >= r + g - 1
    for size in range(5, 40):
        (s,) = LocalContrastiveLoss(grid_size=(3,), region_size=3).region_starts((size,))
        assert s == sorted(set(s)) and s[0] >= 0 and s[-1] + 3 <= size
        assert abs(s[0] - (size - 3 - s[-1])) <= 1  # margins to both borders differ by at most one voxel


def test_matches_reference_on_non_cubic_map():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 8, 12, 10, 9), torch.randn(2, 8, 12, 10, 9)
    loss = LocalContrastiveLoss(temperature=0.1, grid_size=(3, 3, 3), region_size=3)
    starts = loss.region_starts(f1.shape[2:])
    assert starts == [[1, 5, 8], [1, 4, 6], [1, 3, 5]]
    expected = reference(f1, f2, starts, 3, 0.1)
    assert math.isclose(float(loss(f1, f2)), expected, rel_tol=1e-5)
    per_image = LocalContrastiveLoss(0.1, reduction="none")(f1, f2)
    assert per_image.shape == (2,)
    assert math.isclose(float(per_image.mean()), expected, rel_tol=1e-5)


def test_closed_form_one_hot_regions():
    # 2x2x2 grid of non-overlapping 2^3 windows, each window one-hot on its own channel, identical views
    loss = LocalContrastiveLoss(temperature=0.1, grid_size=2, region_size=2)
    starts = loss.region_starts((8, 8, 8))
    assert starts == [[1, 5]] * 3
    f = torch.zeros(1, 8, 8, 8, 8)
    c = 0
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                f[0, c, z0 : z0 + 2, y0 : y0 + 2, x0 : x0 + 2] = 1.0
                c += 1
    # positive cos = 1, the 2R - 2 = 14 negatives have cos = 0
    expected = math.log(math.exp(10.0) + 14) - 10.0
    assert math.isclose(float(loss(f, f.clone())), expected, rel_tol=1e-4)


def test_identical_views_beat_shuffled_regions():
    torch.manual_seed(1)
    f = torch.randn(2, 16, 9, 11, 10)
    loss = LocalContrastiveLoss(temperature=0.1, grid_size=(3, 3, 3), region_size=3)
    # view 2 = view 1 with its voxels shuffled: same features, regions no longer correspond
    perm = torch.randperm(9 * 11 * 10, generator=torch.Generator().manual_seed(0))
    shuffled = f.flatten(2)[:, :, perm].reshape(f.shape)
    same = float(loss(f, f.clone()))
    mixed = float(loss(f, shuffled))
    assert same < mixed
    starts = loss.region_starts(f.shape[2:])
    assert math.isclose(same, reference(f, f, starts, 3, 0.1), rel_tol=1e-5)
    assert math.isclose(mixed, reference(f, shuffled, starts, 3, 0.1), rel_tol=1e-5)


def test_2d_maps_and_int_grid():
    torch.manual_seed(2)
    f1, f2 = torch.randn(3, 4, 10, 7), torch.randn(3, 4, 10, 7)
    loss2d = LocalContrastiveLoss(grid_size=(3, 2), region_size=3)
    out = loss2d(f1, f2)
    # the same regions as a 3D map with a singleton axis and a 1 x 3 x 2 grid of 1 x 3 x 3 windows
    f1_3d = f1[:, :, None].expand(3, 4, 3, 10, 7)
    f2_3d = f2[:, :, None].expand(3, 4, 3, 10, 7)
    torch.testing.assert_close(out, LocalContrastiveLoss(grid_size=(1, 3, 2), region_size=3)(f1_3d, f2_3d))
    assert LocalContrastiveLoss(grid_size=2, region_size=2)(f1, f2).shape == ()


def test_gradients_and_low_precision():
    torch.manual_seed(3)
    f1 = torch.randn(2, 8, 8, 12, 10, requires_grad=True)
    f2 = torch.randn(2, 8, 8, 12, 10, requires_grad=True)
    loss = LocalContrastiveLoss()
    loss(f1, f2).backward()
    for g in (f1.grad, f2.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(f1.detach().bfloat16(), f2.detach().bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(f1.detach().bfloat16().float(), f2.detach().bfloat16().float()))


def test_errors():
    loss = LocalContrastiveLoss(grid_size=(3, 3, 3), region_size=3)
    with pytest.raises(ValueError, match=r"too small.*axis 1 has size 4, needs >= 5"):
        loss(torch.randn(1, 2, 8, 4, 8), torch.randn(1, 2, 8, 4, 8))
    with pytest.raises(ValueError, match=r"too small.*axis 0 has size 2"):
        loss(torch.randn(1, 2, 2, 8, 8), torch.randn(1, 2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 8, 8\) and \(1, 2, 8, 8, 7\)"):
        loss(torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 8, 8, 7))
    with pytest.raises(ValueError, match="3 axes.*2 spatial"):
        loss(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(TypeError, match="target"):
        loss(torch.randn(1, 2, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 regions"):
        LocalContrastiveLoss(grid_size=(1, 1, 1))
    with pytest.raises(ValueError, match="region_size.*0"):
        LocalContrastiveLoss(region_size=0)
    with pytest.raises(TypeError, match="grid_size.*2.5"):
        LocalContrastiveLoss(grid_size=(3, 2.5, 3))
