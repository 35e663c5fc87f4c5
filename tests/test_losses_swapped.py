"""Swapped-prediction losses (SwAV / radioSSL) against slow references and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.losses import PixelSwappedCELoss, SwappedPredictionLoss

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
