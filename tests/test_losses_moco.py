"""MoCoLoss: per-query reference with a queue, in-batch negatives, closed form, detached keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvol.losses import MoCoLoss


def reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float) -> list[float]:
    """Loop over queries: -log(exp(q.k+/T) / (exp(q.k+/T) + sum_neg exp(q.n/T)))."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    out = []
    for i in range(q.shape[0]):
        if queue is None:
            negatives = [k[j] for j in range(k.shape[0]) if j != i]
        else:
            negatives = list(F.normalize(queue.double(), dim=1))
        pos = math.exp(float(q[i] @ k[i]) / tau)
        den = pos + sum(math.exp(float(q[i] @ n) / tau) for n in negatives)
        out.append(-math.log(pos / den))
    return out


def test_matches_reference_with_queue():
    torch.manual_seed(0)
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    ref = reference(q, k, queue, 0.2)
    per_query = MoCoLoss(0.2, reduction="none")(q, k, queue)
    assert per_query.shape == (5,)
    torch.testing.assert_close(per_query.double(), torch.tensor(ref).double(), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(MoCoLoss(0.2)(q, k, queue)), sum(ref) / 5, rel_tol=1e-5)
    assert math.isclose(float(MoCoLoss(0.2, reduction="sum")(q, k, queue)), sum(ref), rel_tol=1e-5)


def test_in_batch_negatives_without_queue():
    torch.manual_seed(1)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    ref = reference(q, k, None, 0.5)
    assert math.isclose(float(MoCoLoss(0.5)(q, k)), sum(ref) / 6, rel_tol=1e-5)


def test_closed_form_identical_query_key_orthogonal_queue():
    tau = 0.2
    e = torch.eye(8)
    q = e[:2] * 2.0
    k = e[:2]
    queue = e[2:]  # 6 negatives orthogonal to every query
    expected = math.log(1 + 6 * math.exp(-1 / tau))
    assert math.isclose(float(MoCoLoss(tau)(q, k, queue)), expected, rel_tol=1e-5)


def test_keys_and_queue_are_detached_and_query_gets_gradient():
    torch.manual_seed(2)
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = torch.randn(16, 8, requires_grad=True)
    MoCoLoss()(q, k, queue).backward()
    assert k.grad is None and queue.grad is None
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_low_precision_inputs():
    torch.manual_seed(3)
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MoCoLoss()(q.bfloat16(), k.bfloat16(), queue.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, MoCoLoss()(q.bfloat16().float(), k.bfloat16().float(), queue.half().float()))


def test_errors():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3, 8\)"):
        MoCoLoss()(q, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"queue must have shape \(K, 8\).*\(10, 7\)"):
        MoCoLoss()(q, torch.randn(4, 8), torch.randn(10, 7))
    with pytest.raises(TypeError, match="queue"):
        MoCoLoss()(q, torch.randn(4, 8), torch.zeros(10, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature.*0"):
        MoCoLoss(temperature=0)
