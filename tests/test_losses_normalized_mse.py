"""NormalizedMSELoss (BYOL): a per-pair loop over the paper's formula, closed-form values, stop-gradient, errors."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.losses import NormalizedMSELoss


def reference(q: torch.Tensor, z: torch.Tensor) -> list[float]:
    """BYOL Eq. 2, one pair at a time: sum_d (q_d / ||q|| - z_d / ||z||)^2."""
    out = []
    for qi, zi in zip(q.double().tolist(), z.double().tolist()):
        nq, nz = math.sqrt(sum(v * v for v in qi)), math.sqrt(sum(v * v for v in zi))
        out.append(sum((a / nq - b / nz) ** 2 for a, b in zip(qi, zi)))
    return out


def test_matches_reference():
    torch.manual_seed(0)
    q, z = torch.randn(6, 10), torch.randn(6, 10) * 3
    ref = reference(q, z)
    per_pair = NormalizedMSELoss(reduction="none")(q, z).double()
    torch.testing.assert_close(per_pair, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(NormalizedMSELoss()(q, z)), sum(ref) / 6, rel_tol=1e-5)
    assert math.isclose(float(NormalizedMSELoss(reduction="sum")(q, z)), sum(ref), rel_tol=1e-5)


def test_closed_form_and_scale_invariance():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([[5.0, 0.0], [0.0, -2.0], [1.0, 0.0]])
    torch.testing.assert_close(NormalizedMSELoss(reduction="none")(q, z), torch.tensor([0.0, 4.0, 2 - math.sqrt(2)]))
    torch.testing.assert_close(NormalizedMSELoss()(7 * q, z), NormalizedMSELoss()(q, z))


def test_target_is_detached_and_autocast_safe():
    q, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NormalizedMSELoss()(q.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and z.grad is None


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        NormalizedMSELoss()(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(TypeError, match="floating"):
        NormalizedMSELoss()(torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8))
    with pytest.raises(ValueError, match="reduction"):
        NormalizedMSELoss(reduction="max")
