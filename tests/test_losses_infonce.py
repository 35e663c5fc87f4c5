"""InfoNCELoss: slow per-pair reference, SimCLR NT-Xent equivalence, G^R / G^D- / G^D masks, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvol.losses import InfoNCELoss


def reference(z: torch.Tensor, mask: torch.Tensor, tau: float) -> list[float]:
    """Straight from the formula: one SimCLR problem per positive pair (i, j), loops over anchors and pairs."""
    z = z.double()
    n = z.shape[0]
    out = []
    for i in range(n):
        for j in range(n):
            if i == j or mask[i, j] != 1:
                continue
            s = [float(F.cosine_similarity(z[i], z[k], dim=0)) / tau for k in range(n)]
            den = math.exp(s[j]) + sum(math.exp(s[k]) for k in range(n) if k != i and mask[i, k] == 0)
            out.append(-math.log(math.exp(s[j]) / den))
    return out


def labels_to_mask(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, None] == labels[None, :]).long()


def simclr_nt_xent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Standard SimCLR NT-Xent on 2N views [a_1..a_N, b_1..b_N]: CE over all non-self similarities."""
    n2 = z.shape[0]
    z = F.normalize(z, dim=1)
    sim = (z @ z.t() / tau).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    target = (torch.arange(n2) + n2 // 2) % n2
    return F.cross_entropy(sim, target)


def chaitanya_batch(m: int = 3, parts: int = 4):
    """m volumes x S partitions x 2 views; returns volume, partition and sample ids per row."""
    vol = torch.arange(m).repeat_interleave(parts).repeat(2)
    part = torch.arange(parts).repeat(m).repeat(2)
    sample = vol * parts + part  # two views of the same slice share this id
    return vol, part, sample


def test_matches_reference_with_labels():
    torch.manual_seed(0)
    z = torch.randn(10, 7)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 4])  # groups of 3, 2, 2 and a singleton
    loss = InfoNCELoss(temperature=0.1, reduction="none")(z, labels)
    ref = reference(z, labels_to_mask(labels), 0.1)
    assert loss.shape == (len(ref),) == (3 * 2 + 2 * 1 + 2 * 1 + 2 * 1,)
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    mean = InfoNCELoss(temperature=0.1)(z, labels)
    assert math.isclose(float(mean), sum(ref) / len(ref), rel_tol=1e-5)
    total = InfoNCELoss(temperature=0.1, reduction="sum")(z, labels)
    assert math.isclose(float(total), sum(ref), rel_tol=1e-5)


def test_equals_simclr_nt_xent_for_two_views():
    torch.manual_seed(1)
    n = 6
    z = torch.randn(2 * n, 16)
    labels = torch.arange(n).repeat(2)
    for tau in (0.1, 0.5):
        torch.testing.assert_close(InfoNCELoss(tau)(z, labels), simclr_nt_xent(z, tau), rtol=1e-5, atol=1e-6)


def test_mask_equals_labels_and_bool_mask():
    torch.manual_seed(2)
    z = torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask = labels_to_mask(labels)
    mask.fill_diagonal_(-1)  # the diagonal is ignored whatever it holds
    loss = InfoNCELoss(0.2)
    torch.testing.assert_close(loss(z, mask), loss(z, labels))
    torch.testing.assert_close(loss(z, labels_to_mask(labels).bool()), loss(z, labels))


def test_chaitanya_strategies_match_reference():
    torch.manual_seed(3)
    vol, part, sample = chaitanya_batch()
    z = torch.randn(vol.shape[0], 12)
    tau = 0.1
    loss = InfoNCELoss(tau)
    # G^R: positives = the other view of the same slice
    g_r = labels_to_mask(sample)
    # G^D-: same positives; same-partition slices of other volumes are neither positive nor negative
    g_dm = g_r.clone()
    g_dm[(part[:, None] == part[None, :]) & (sample[:, None] != sample[None, :])] = -1
    # G^D: positives = same partition of any volume, both views
    g_d = labels_to_mask(part)
    values = {}
    for name, mask in (("GR", g_r), ("GD-", g_dm), ("GD", g_d)):
        ref = reference(z, mask, tau)
        values[name] = float(loss(z, mask))
        assert math.isclose(values[name], sum(ref) / len(ref), rel_tol=1e-5), name
    torch.testing.assert_close(loss(z, part), loss(z, g_d))
    # removing negatives lowers every pair's loss, so G^D- < G^R on the same positives
    assert values["GD-"] < values["GR"]
    per_pair_r = InfoNCELoss(tau, reduction="none")(z, g_r)
    per_pair_dm = InfoNCELoss(tau, reduction="none")(z, g_dm)
    assert bool((per_pair_dm < per_pair_r).all())


def test_closed_form_orthogonal_pairs():
    tau = 0.1
    e = torch.eye(3)
    z = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2]]) * 3.0  # scale is removed by the normalisation
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # each pair: s_pos = 1/tau, 4 negatives with s = 0
    expected = math.log(1 + 4 * math.exp(-1 / tau))
    assert math.isclose(float(InfoNCELoss(tau)(z, labels)), expected, rel_tol=1e-6)


def test_anchor_without_negatives_gives_zero_and_finite_gradients():
    z = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[0, 1, -1, -1], [1, 0, 0, 0], [-1, 0, 0, 1], [-1, 0, 1, 0]])
    per_pair = InfoNCELoss(0.1, reduction="none")(z, mask)
    assert per_pair.shape == (4,)
    assert float(per_pair[0].detach()) == 0.0  # anchor 0 has no negatives: exp(s)/exp(s)
    per_pair.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gradients_flow():
    torch.manual_seed(4)
    z = torch.randn(8, 6, requires_grad=True)
    loss = InfoNCELoss(0.1)(z, torch.arange(4).repeat(2))
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_low_precision_inputs_are_computed_in_float32():
    torch.manual_seed(5)
    z = torch.randn(8, 16).bfloat16()
    labels = torch.arange(4).repeat(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = InfoNCELoss(0.1)(z, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, InfoNCELoss(0.1)(z.float(), labels))
    assert InfoNCELoss(0.1)(z.half(), labels).dtype == torch.float32


def test_errors():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no positive pair"):
        InfoNCELoss()(z, torch.arange(4))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        InfoNCELoss()(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        InfoNCELoss()(z, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[2\]"):
        InfoNCELoss()(z, torch.full((4, 4), 2))
    with pytest.raises(TypeError, match="float32"):
        InfoNCELoss()(z, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        InfoNCELoss()(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        InfoNCELoss()(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="-0.5"):
        InfoNCELoss(temperature=-0.5)
    with pytest.raises(TypeError, match="temperature"):
        InfoNCELoss(temperature="0.1")
    with pytest.raises(ValueError, match="'avg'"):
        InfoNCELoss(reduction="avg")
