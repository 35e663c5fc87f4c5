"""medvol.cluster.sinkhorn against SwAV's Sinkhorn-Knopp written out step by step (Caron et al. 2020)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medvol.cluster import sinkhorn


def _swav_reference(scores: torch.Tensor, n_iters: int, epsilon: float) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process, in float64, with explicit loops (slow, no stabilisation)."""
    q = torch.exp(scores.double() / epsilon).t()  # (K, B)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        for i in range(k):  # every prototype gets mass 1/K
            q[i] = q[i] / q[i].sum() / k
        for j in range(b):  # every sample gets mass 1/B
            q[:, j] = q[:, j] / q[:, j].sum() / b
    return (q * b).t()


def _cosine_scores(n: int = 256, k: int = 8, d: int = 16, skew: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(k, d, generator=g), dim=1)
    scores = z @ prototypes.t()  # (N, K) cosine similarities
    scores[:, 0] += skew  # prototype 0 attracts most samples
    return scores


@pytest.mark.parametrize("n_iters, epsilon", [(1, 0.05), (3, 0.05), (3, 0.5), (10, 0.1)])
def test_matches_swav_reference(n_iters, epsilon):
    scores = _cosine_scores(n=64, k=6)
    expected = _swav_reference(scores, n_iters, epsilon)
    q = sinkhorn(scores, n_iters=n_iters, epsilon=epsilon)
    assert q.shape == (64, 6) and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), expected, rtol=1e-4, atol=1e-6)
    q64 = sinkhorn(scores.double(), n_iters=n_iters, epsilon=epsilon)
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64, expected, rtol=1e-10, atol=1e-12)


def test_rows_sum_to_one_and_columns_equipartition_skewed_scores():
    n, k = 512, 8
    scores = _cosine_scores(n=n, k=k, skew=0.3)
    softmax_cols = torch.softmax(scores / 0.05, dim=1).sum(0)
    assert softmax_cols[0] > 3 * n / k  # without Sinkhorn prototype 0 takes over 3x its share
    q = sinkhorn(scores)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-5)
    assert (q.sum(0) - n / k).abs().max() < 0.2 * n / k  # 3 iterations: approximately N/K
    q = sinkhorn(scores, n_iters=100)
    assert (q.sum(0) - n / k).abs().max() < 1e-3 * n / k  # converges to an exact equipartition


def test_stable_with_large_scores():
    scores = _cosine_scores(n=128, k=10, skew=1.0) * 1000  # exp(scores / 0.05) overflows float32 and float64
    assert not torch.isfinite(_swav_reference(scores, 3, 0.05)).all()
    for eps in (0.05, 1e-3):
        q = sinkhorn(scores, epsilon=eps)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(1), torch.ones(128), rtol=0, atol=1e-5)


def test_low_precision_input_and_autocast():
    scores = _cosine_scores(n=64, k=4)
    expected = sinkhorn(scores.bfloat16().float())
    q = sinkhorn(scores.bfloat16())
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, sinkhorn(scores))


def test_distributed_single_process_group_matches(tmp_path):
    scores = _cosine_scores(n=32, k=4, skew=0.2)
    with pytest.raises(RuntimeError, match="process group"):
        sinkhorn(scores, distributed=True)
    expected = sinkhorn(scores)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.testing.assert_close(sinkhorn(scores), expected)  # auto: all-reduce path
        torch.testing.assert_close(sinkhorn(scores, distributed=False), expected)
    finally:
        dist.destroy_process_group()


def test_argument_errors():
    with pytest.raises(ValueError, match=r"2D .* got shape \(4,\)"):
        sinkhorn(torch.zeros(4))
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.zeros(4, 2), n_iters=0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(4, 2), epsilon=0.0)
