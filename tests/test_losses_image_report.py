"""Image-report alignment losses against slow references written from the formulas (LoVT, ConVIRT, CLIP)."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.losses import GlobalAlignmentLoss, LocalIntraSampleLoss, spatial_positive_weights


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def slow_global(a, b, tau, w_ab, w_ba, groups=None):
    n = a.shape[0]

    def direction(x, y):
        total = 0.0
        for i in range(n):
            logits = [_cos(x[i], y[j]) / tau for j in range(n)
                      if j == i or groups is None or groups[i] != groups[j]]
            own = _cos(x[i], y[i]) / tau
            total += -own + math.log(sum(math.exp(v) for v in logits))
        return total / n

    return w_ab * direction(a, b) + w_ba * direction(b, a)


def slow_local(a, b, pos, tau, mask, weights):
    bsz, n, _ = a.shape
    out_ab = out_ba = 0.0
    for s in range(bsz):
        valid = [j for j in range(n) if mask[s, j]]
        wsum = sum(float(weights[s, j]) for j in valid)
        for i in valid:
            p = {j: float(pos[i, j]) for j in valid}
            psum = sum(p.values())
            for direction, (x, y) in enumerate(((a, b), (b, a))):
                scores = {j: _cos(x[s, i], y[s, j]) / tau for j in valid}
                value = -sum(p[j] / psum * scores[j] for j in valid) + math.log(sum(math.exp(v)
                                                                                  for v in scores.values()))
                value *= float(weights[s, i]) / wsum
                if direction == 0:
                    out_ab += value
                else:
                    out_ba += value
    return out_ab / bsz, out_ba / bsz


def test_global_matches_reference_and_weights():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    loss = GlobalAlignmentLoss(temperature=0.1, lambda_a2b=0.75, lambda_b2a=0.25)
    assert float(loss(a, b)) == pytest.approx(slow_global(a, b, 0.1, 0.75, 0.25), rel=1e-5)
    groups = torch.tensor([0, 0, 1, 2, 2, 3])  # items 0/1 and 3/4 share a report: not each other's negatives
    assert float(loss(a, b, groups)) == pytest.approx(slow_global(a, b, 0.1, 0.75, 0.25, groups.tolist()),
                                                      rel=1e-5)
    a2b, b2a = loss.directional(a, b)
    assert float(a2b) != pytest.approx(float(b2a))  # the two directions differ, so the weights matter


def test_global_learned_temperature_gets_a_gradient():
    loss = GlobalAlignmentLoss(temperature=0.07, lambda_a2b=0.5, lambda_b2a=0.5, learn_temperature=True)
    assert loss.temperature == pytest.approx(0.07)
    a = torch.randn(4, 8)
    loss(a, a + 0.1 * torch.randn(4, 8)).backward()
    assert loss.log_scale.grad is not None and float(loss.log_scale.grad) != 0.0


def test_local_matches_reference_with_spatial_positives_mask_and_weights():
    torch.manual_seed(1)
    a, b = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)
    pos = spatial_positive_weights((3, 3), threshold=0.5, smooth_lambda=1.0).double()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padded elements count nowhere
    weights = torch.rand(2, 9, dtype=torch.float64) + 0.1
    ab, ba = LocalIntraSampleLoss(0.3).directional(a, b, pos, mask, weights)
    ref_ab, ref_ba = slow_local(a, b, pos, 0.3, mask, weights)
    assert float(ab) == pytest.approx(ref_ab, rel=1e-6)
    assert float(ba) == pytest.approx(ref_ba, rel=1e-6)
    # sentence case: identity positives
    ab, _ = LocalIntraSampleLoss(0.3).directional(a, b, None, mask, weights)
    assert float(ab) == pytest.approx(slow_local(a, b, torch.eye(9), 0.3, mask, weights)[0], rel=1e-6)


def test_local_padding_values_do_not_change_the_loss():
    a, b = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, True, False, False]])
    loss = LocalIntraSampleLoss(0.3)
    before = float(loss(a, b, mask=mask))
    a[0, 3:], b[0, 3:] = 100.0, -100.0
    assert float(loss(a, b, mask=mask)) == pytest.approx(before, rel=1e-6)


def test_spatial_positive_weights_2d_and_3d_kernel():
    w = spatial_positive_weights((4, 4), threshold=0.5, smooth_lambda=1.0)
    d01 = 1 / math.sqrt(32)  # neighbour distance over the diagonal of a 4 x 4 grid
    assert float(w[0, 1]) == pytest.approx(math.exp(-d01))
    assert float(w[0, 15]) == 0.0  # opposite corner: distance 3*sqrt(2)/sqrt(32) = 0.75 > 0.5
    w3 = spatial_positive_weights((2, 3, 4), threshold=0.3)
    assert w3.shape == (24, 24) and torch.allclose(w3, w3.t())
    d = 1 / math.sqrt(4 + 9 + 16)
    assert float(w3[0, 1]) == pytest.approx(math.exp(-d))  # neighbour along the last (fastest) axis
    assert float(w3[0, 12]) == pytest.approx(math.exp(-d))  # neighbour along the first axis
    with pytest.raises(ValueError):
        spatial_positive_weights((2, 2), spacing=(1.0,))


def test_aligned_embeddings_give_lower_local_loss():
    torch.manual_seed(2)
    a = torch.randn(2, 16, 8)
    loss = LocalIntraSampleLoss(0.3)
    assert float(loss(a, a)) < float(loss(a, torch.randn(2, 16, 8)))  # identity positives (sentences)
