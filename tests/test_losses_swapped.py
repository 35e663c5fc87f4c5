"""Swapped-prediction losses (SwAV / radioSSL) against slow references and closed forms, and ROI alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.losses import (
    PixelSwappedCELoss,
    SwappedPredictionLoss,
    overlap_points,
    roi_align_pair,
    sample_at,
    warp_to_view,
)
from medvol.transforms import RandCropPaird

# ---- SwappedPredictionLoss -----------------------------------------------------------------------------------


def swapped_reference(scores: torch.Tensor, q: torch.Tensor, t: float) -> float:
    """-1/N sum_n sum_k q_nk log( exp(s_nk / t) / sum_j exp(s_nj / t) ), written with explicit loops."""
    total = 0.0
    n, k = scores.shape
    for i in range(n):
        denom = sum(math.exp(float(scores[i, j]) / t) for j in range(k))
        for c in range(k):
            total -= float(q[i, c]) * math.log(math.exp(float(scores[i, c]) / t) / denom)
    return total / n


def test_swapped_matches_slow_reference_and_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 5, generator=g), dim=1)  # cosine-like scores in [-1, 1]
    q = torch.softmax(torch.randn(12, 5, generator=g), dim=1)
    loss = SwappedPredictionLoss(temperature=0.1)(scores, q)
    assert loss.item() == pytest.approx(swapped_reference(scores, q, 0.1), rel=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(scores / 0.1, q))


def test_softmax_runs_over_the_class_axis():
    """A softmax over the sample axis (radioSSL's bug) would give another value; the per-sample losses also
    depend only on their own row."""
    g = torch.Generator().manual_seed(1)
    scores, q = torch.randn(6, 4, generator=g), torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    per_sample = SwappedPredictionLoss(0.5, reduction="none")(scores, q)
    expected = -(q * torch.log_softmax(scores / 0.5, dim=1)).sum(1)
    wrong = -(q * torch.log_softmax(scores / 0.5, dim=0)).sum(1)
    torch.testing.assert_close(per_sample, expected)
    assert not torch.allclose(per_sample, wrong)
    shuffled = SwappedPredictionLoss(0.5, reduction="none")(scores.flip(0), q.flip(0))
    torch.testing.assert_close(shuffled, per_sample.flip(0))
    # (B, K, P) layout: class axis 1, points after it
    per_point = SwappedPredictionLoss(0.5, reduction="none")(scores.t()[None], q.t()[None])
    torch.testing.assert_close(per_point[0], per_sample)


def test_swapped_closed_forms_and_gradient():
    k, t = 7, 0.1
    loss = SwappedPredictionLoss(t)
    q = torch.softmax(torch.randn(3, k), dim=1)
    assert loss(torch.zeros(3, k), q).item() == pytest.approx(math.log(k), rel=1e-6)  # uniform prediction
    s = torch.tensor([[0.9, 0.1, -0.3]])
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    expected = -0.1 / t + math.log(sum(math.exp(v / t) for v in (0.9, 0.1, -0.3)))
    assert loss(s, onehot).item() == pytest.approx(expected, rel=1e-6)
    scores = torch.randn(5, k, requires_grad=True)
    target = torch.softmax(torch.randn(5, k), dim=1).requires_grad_()
    loss(scores, target).backward()
    torch.testing.assert_close(scores.grad, (torch.softmax(scores.detach() / t, 1) - target.detach()) / (t * 5))
    assert target.grad is None  # targets are detached
    assert SwappedPredictionLoss(t, reduction="sum")(scores, target).item() == pytest.approx(
        5 * loss(scores, target).item(), rel=1e-5)


def test_swapped_argument_errors():
    with pytest.raises(ValueError, match="temperature"):
        SwappedPredictionLoss(0.0)
    with pytest.raises(ValueError, match="reduction"):
        SwappedPredictionLoss(reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        SwappedPredictionLoss()(torch.zeros(4, 3), torch.zeros(4, 2))


# ---- PixelSwappedCELoss --------------------------------------------------------------------------------------


def pixel_reference(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    """Masked mean of -log softmax over channels, voxel by voxel."""
    total, count = 0.0, 0
    b, k = logits.shape[:2]
    for i in range(b):
        for idx in np.ndindex(*logits.shape[2:]):
            if not bool(mask[(i, 0, *idx)]):
                continue
            row = [float(logits[(i, c, *idx)]) for c in range(k)]
            lse = math.log(sum(math.exp(v) for v in row))
            total -= row[int(labels[(i, 0, *idx)])] - lse
            count += 1
    return total / count


def test_pixel_ce_matches_cross_entropy_and_masked_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 4, 5, generator=g)
    labels = torch.randint(0, 4, (2, 1, 3, 4, 5), generator=g)
    loss = PixelSwappedCELoss()
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels[:, 0]))
    torch.testing.assert_close(loss(logits, labels[:, 0].float()), F.cross_entropy(logits, labels[:, 0]))
    mask = torch.rand(2, 1, 3, 4, 5, generator=g) > 0.5
    assert loss(logits, labels, mask).item() == pytest.approx(pixel_reference(logits, labels, mask), rel=1e-5)
    none = PixelSwappedCELoss(reduction="none")(logits, labels, mask)
    assert none.shape == (2, 1, 3, 4, 5) and (none[~mask] == 0).all()
    assert PixelSwappedCELoss(reduction="sum")(logits, labels, mask).item() == pytest.approx(float(none.sum()))


def test_pixel_ce_closed_forms_and_empty_mask():
    loss = PixelSwappedCELoss()
    labels = torch.randint(0, 6, (1, 1, 4, 4, 4))
    assert loss(torch.zeros(1, 6, 4, 4, 4), labels).item() == pytest.approx(math.log(6), rel=1e-6)
    confident = 50.0 * F.one_hot(labels[:, 0], 6).movedim(-1, 1).float()
    assert loss(confident, labels).item() < 1e-12
    logits = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    empty = loss(logits, labels, torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and (logits.grad == 0).all()


def test_pixel_ce_errors():
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        PixelSwappedCELoss()(torch.zeros(1, 3, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 3))
    with pytest.raises(ValueError, match="target must have shape"):
        PixelSwappedCELoss()(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3, dtype=torch.long))


# ---- ROI alignment --------------------------------------------------------------------------------------------


def _coordinate_map(box: torch.Tensor, grid) -> torch.Tensor:
    """(1, 3, *grid) map whose cell g holds the source coordinate of its centre, a + (g + 1/2)(b - a)/G."""
    axes = [box[0, d] + (torch.arange(n, dtype=torch.float64) + 0.5) * (box[1, d] - box[0, d]) / n
            for d, n in enumerate(grid)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].float()


def test_overlap_points_closed_form():
    b1 = torch.tensor([[[0.0, 0, 0], [10, 10, 10]]])
    b2 = torch.tensor([[[4.0, 2, 6], [14, 12, 16]]])
    points, valid = overlap_points(b1, b2, (3, 2, 1))
    assert valid.tolist() == [True] and points.shape == (1, 3, 2, 1, 3)
    torch.testing.assert_close(points[0, :, 0, 0, 0], torch.tensor([5.0, 7, 9], dtype=torch.float64))
    torch.testing.assert_close(points[0, 0, :, 0, 1], torch.tensor([4.0, 8], dtype=torch.float64))
    assert float(points[0, 0, 0, 0, 2]) == 8.0
    far = torch.tensor([[[20.0, 0, 0], [30, 10, 10]]])
    assert overlap_points(b1, far, (2, 2, 2))[1].tolist() == [False]


def test_sample_at_reads_source_coordinates_on_any_grid():
    box = torch.tensor([[[3.0, 5, 0], [19, 13, 24]]])
    points = overlap_points(box, torch.tensor([[[0.0, 0, 0], [40, 40, 40]]]), (5, 4, 3))[0]
    for grid in [(16, 8, 24), (2, 1, 3), (4, 4, 4)]:  # voxel grid, coarse /8 grid, anisotropic
        feat = _coordinate_map(box[0].double(), grid)
        out = sample_at(feat, box, points)  # (1, 3, 5, 4, 3)
        got, want = out[0].movedim(0, -1).double(), points[0]
        cell = (box[0, 1] - box[0, 0]).double() / torch.tensor(grid, dtype=torch.float64)
        lo, hi = box[0, 0] + cell / 2, box[0, 1] - cell / 2  # centres of the first/last cell: exact in between
        inside = ((want >= lo) & (want <= hi))
        assert torch.allclose(got[inside], want[inside], atol=1e-4)
        assert ((got - want).abs() <= cell / 2 + 1e-4).all()  # border cells are clamped, never further off


def test_roi_align_pair_matches_anatomy_of_real_crops():
    """Crops of a volume that encodes its own voxel coordinates: both views agree at every aligned point."""
    shape = (40, 44, 36)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) + 0.5 for s in shape], indexing="ij"))  # (3, *shape)
    crop = RandCropPaird("image", roi_size=(16, 16, 16), scale_range=(0.5, 1.0), min_iou=0.3)
    for seed in range(4):
        crop.set_random_state(seed)
        d = crop({"image": coords})
        b1, b2 = d["box_v1"][None], d["box_v2"][None]
        v1, v2 = d["image_v1"][None], d["image_v2"][None]  # (1, 3, 16, 16, 16), values = source coordinates
        pooled1 = F.avg_pool3d(v1, 4)  # a /4 "token" grid of view 1
        a1, a2, valid = roi_align_pair(pooled1, v2, b1, b2, size=(6, 6, 6))
        points, _ = overlap_points(b1, b2, (6, 6, 6))
        assert valid.all() and a1.shape == a2.shape == (1, 3, 216)
        want = points[0].reshape(-1, 3).t().float()
        step1 = (b1[0, 1] - b1[0, 0]) / 4  # token size of view 1 in source voxels
        step2 = (b2[0, 1] - b2[0, 0]) / 16
        assert ((a1[0] - want).abs() <= step1[:, None] / 2 + 1e-3).all()
        assert ((a2[0] - want).abs() <= step2[:, None] / 2 + 1e-3).all()


def test_warp_to_view_nearest_labels():
    shape = (30, 34, 28)
    ids = torch.arange(math.prod(shape)).reshape(1, *shape)  # every source voxel has its own label
    crop = RandCropPaird("label", roi_size=(12, 12, 12), scale_range=(0.5, 1.0), min_iou=0.3, mode="nearest")
    crop.set_random_state(3)
    d = crop({"label": ids})
    b1, b2 = d["box_v1"][None], d["box_v2"][None]
    warped, inside = warp_to_view(d["label_v2"][None], b2, b1)
    assert warped.dtype == ids.dtype and inside.shape == (1, 1, 12, 12, 12)
    centres = overlap_points(b1, b1, (12, 12, 12))[0][0]  # view 1 voxel centres in source coordinates
    in_box2 = ((centres >= b2[0, 0].double()) & (centres < b2[0, 1].double())).all(-1)
    assert torch.equal(inside[0, 0], in_box2) and 0 < in_box2.float().mean() < 1
    src = torch.stack(torch.unravel_index(warped[0, 0][inside[0, 0]], shape), dim=-1).double() + 0.5
    step2 = ((b2[0, 1] - b2[0, 0]) / 12).double()
    assert ((src - centres[in_box2]).abs() <= step2 + 0.5 + 1e-6).all()  # within one voxel of view 2
    same, everywhere = warp_to_view(d["label_v1"][None], b1, b1)
    assert torch.equal(same, d["label_v1"][None]) and everywhere.all()
