"""VoCo's, PCRLv2's and SwinUNETR-SSL's losses against slow references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.losses import InfoNCELoss, SiameseCosineLoss, VoCoLoss, VoCoRegularizationLoss, voco_logits


def _cos(a, b):
    return float(sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))


def test_voco_logits_are_relu_cosines():
    crops, bases = torch.randn(3, 5), torch.randn(4, 5)
    logits = voco_logits(crops, bases)
    for n in range(3):
        for k in range(4):
            assert logits[n, k].item() == pytest.approx(max(0.0, _cos(crops[n].tolist(), bases[k].tolist())), abs=1e-6)


def test_voco_loss_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.rand(2, 3, 4)
    labels = torch.tensor([[0.5, 0.5, 0, 0], [0, 0.25, 0, 0.75], [1, 0, 0, 0]]).repeat(2, 1, 1)
    pos_num = pos_den = neg_num = neg_den = 0.0
    for y, logit in zip(labels.flatten().tolist(), logits.flatten().tolist()):
        if y > 0:
            pos_num += -y * math.log(1 - abs(y - logit) + 1e-6)
            pos_den += y
        else:
            neg_num += logit**2
            neg_den += 1
    expected = pos_num / (pos_den + 1e-6) + neg_num / (neg_den + 1e-6)
    assert VoCoLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_voco_loss_is_zero_for_perfect_predictions_and_grows_with_error():
    labels = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert VoCoLoss()(labels.clone(), labels).item() == pytest.approx(0.0, abs=1e-5)
    worse = VoCoLoss()(torch.tensor([[0.3, 0.7, 0.1, 0.0]]), labels).item()
    worst = VoCoLoss()(torch.tensor([[0.0, 1.0, 0.5, 0.5]]), labels).item()
    assert 0 < worse < worst


def test_voco_regularization_matches_pairwise_loop_and_stops_gradient_of_the_second_base():
    torch.manual_seed(1)
    bases = torch.randn(2, 4, 6, requires_grad=True)
    loss = VoCoRegularizationLoss()(bases)
    expected = 0.0
    for b in range(2):
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        expected += sum(max(0.0, _cos(bases[b, i].tolist(), bases[b, j].tolist())) ** 2 for i, j in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    loss.backward()
    # the last base is only ever the detached partner of a pair: no gradient reaches it
    assert torch.count_nonzero(bases.grad[:, -1]) == 0 and torch.count_nonzero(bases.grad[:, 0]) > 0
    with pytest.raises(ValueError, match="K >= 2"):
        VoCoRegularizationLoss()(torch.randn(1, 6))


def test_siamese_cosine_loss_is_negative_cosine_with_stop_gradient():
    p = torch.randn(3, 5, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    loss = SiameseCosineLoss()(p, z)
    expected = -sum(_cos(p[i].tolist(), z[i].tolist()) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad is not None and torch.count_nonzero(p.grad) > 0
    assert SiameseCosineLoss(reduction="none")(p, z).shape == (3,)


def _tang_contrast(x_i, x_j, temperature):
    """The contrastive loss of Tang et al. 2022 (research-contributions ``Contrast``), element by element."""
    z = [v / v.norm() for v in torch.cat([x_i, x_j])]
    n, b = len(z), x_i.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / temperature) / denom)
    return total / n


def test_swin_ssl_contrastive_term_equals_tang_et_al():
    """SwinSSL's NT-Xent (InfoNCELoss with view labels, temperature 0.5) is the paper's contrastive loss."""
    torch.manual_seed(2)
    x1, x2 = torch.randn(3, 8), torch.randn(3, 8)
    loss = InfoNCELoss(0.5)(torch.cat([x1, x2]), torch.arange(3).repeat(2))
    assert loss.item() == pytest.approx(_tang_contrast(x1, x2, 0.5), rel=1e-5)
