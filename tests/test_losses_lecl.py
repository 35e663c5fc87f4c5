"""LeCLLoss: plain MoCo v3 without lesions, per-anchor reference of CLEAR's lesion denominator, monotonicity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvol.losses import LeCLLoss, MoCoLoss


def moco_v3(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's contrastive_loss: CE(q k^T / T, arange(N)) * 2T on normalised q, k."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.t() / tau, torch.arange(q.shape[0])) * (2 * tau)


def reference(q: torch.Tensor, k: torch.Tensor, is_lesion: list[bool], tau: float, w: float) -> list[float]:
    """Per anchor i: -log(e^{s_ii} / (sum_j e^{s_ij} + sum_{l lesion, l != i} e^{w s_il})) * 2T, s = q.k / T."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    n = q.shape[0]
    out = []
    for i in range(n):
        s = [float(q[i] @ k[j]) / tau for j in range(n)]
        den = sum(math.exp(v) for v in s) + sum(math.exp(w * s[j]) for j in range(n) if is_lesion[j] and j != i)
        out.append(-math.log(math.exp(s[i]) / den) * 2 * tau)
    return out


def test_without_lesions_equals_moco_v3_exactly():
    torch.manual_seed(0)
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    for tau in (1.0, 0.2):
        loss = LeCLLoss(temperature=tau, lesion_weight=10.0)
        plain = moco_v3(q, k, tau)
        assert torch.equal(loss(q, k), plain)
        assert torch.equal(loss(q, k, torch.zeros(6, dtype=torch.bool)), plain)


def test_without_lesions_is_moco_in_batch_times_2t():
    """LeCLLoss is built on MoCoLoss: per anchor, the in-batch MoCo loss scaled by MoCo v3's 2T."""
    torch.manual_seed(6)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    per_anchor = LeCLLoss(temperature=0.5, reduction="none")(q, k)
    assert torch.equal(per_anchor, MoCoLoss(temperature=0.5, reduction="none")(q, k) * (2 * 0.5))
    assert isinstance(LeCLLoss(), MoCoLoss)


@pytest.mark.parametrize("tau,w", [(1.0, 1.0), (1.0, 10.0), (0.2, 3.0)])
def test_matches_reference_with_lesions(tau, w):
    torch.manual_seed(1)
    q, k = torch.randn(7, 8), torch.randn(7, 8)
    flags = [True, False, True, False, False, True, False]
    loss = LeCLLoss(temperature=tau, lesion_weight=w, reduction="none")(q, k, torch.tensor(flags))
    ref = reference(q, k, flags, tau, w)
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    mean = LeCLLoss(temperature=tau, lesion_weight=w)(q, k, torch.tensor(flags, dtype=torch.uint8))
    assert math.isclose(float(mean), sum(ref) / len(ref), rel_tol=1e-5)


def test_lesion_term_strictly_increases_loss_for_similar_lesion_keys():
    torch.manual_seed(2)
    base = F.normalize(torch.randn(1, 16), dim=1)
    k = F.normalize(torch.randn(6, 16), dim=1)
    k[[1, 3]] = F.normalize(base + 0.05 * torch.randn(2, 16), dim=1)  # two similar lesion keys
    q = k + 0.1 * torch.randn(6, 16)
    is_lesion = torch.tensor([False, True, False, True, False, False])
    per_anchor_plain = LeCLLoss(1.0, 5.0, reduction="none")(q, k)
    per_anchor_lesion = LeCLLoss(1.0, 5.0, reduction="none")(q, k, is_lesion)
    assert bool((per_anchor_lesion > per_anchor_plain).all())  # every anchor sees >= 1 lesion key l != i
    # lesion anchors 1 and 3 see the similar other lesion key with weight w: the largest increase
    increase = per_anchor_lesion - per_anchor_plain
    assert float(increase[[1, 3]].min()) > float(increase[[0, 2, 4, 5]].max())
    # a larger weight on positive similarities makes the extra terms larger
    assert float(LeCLLoss(1.0, 10.0)(q, k, is_lesion)) > float(LeCLLoss(1.0, 5.0)(q, k, is_lesion))


def test_single_lesion_anchor_only_masks_itself():
    torch.manual_seed(3)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    is_lesion = torch.tensor([False, False, True, False])
    per_anchor = LeCLLoss(1.0, 2.0, reduction="none")(q, k, is_lesion)
    plain = LeCLLoss(1.0, 2.0, reduction="none")(q, k)
    assert torch.equal(per_anchor[2], plain[2])  # its only lesion key is its own positive: removed
    assert bool((per_anchor[[0, 1, 3]] > plain[[0, 1, 3]]).all())


def test_symmetric_and_gradients():
    torch.manual_seed(4)
    q1, q2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    k1, k2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    is_lesion = torch.tensor([True, False, True, False, False])
    loss = LeCLLoss(1.0, 10.0)
    sym = loss.symmetric(q1, k1, q2, k2, is_lesion)
    torch.testing.assert_close(sym, loss(q1, k2, is_lesion) + loss(q2, k1, is_lesion))
    sym.backward()
    assert k1.grad is None and k2.grad is None  # keys come from the momentum encoder
    for g in (q1.grad, q2.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_low_precision_inputs():
    torch.manual_seed(5)
    q, k = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    is_lesion = torch.tensor([True, True, False, False])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LeCLLoss(1.0, 10.0)(q, k, is_lesion)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LeCLLoss(1.0, 10.0)(q.float(), k.float(), is_lesion))


def test_errors():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        LeCLLoss()(q, q, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_lesion.*float32"):
        LeCLLoss()(q, q, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(4, 7\)"):
        LeCLLoss()(q, torch.randn(4, 7))
    with pytest.raises(ValueError, match="lesion_weight.*-1"):
        LeCLLoss(lesion_weight=-1)
    with pytest.raises(ValueError, match="temperature.*inf"):
        LeCLLoss(temperature=float("inf"))
