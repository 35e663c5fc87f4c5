"""Sinkhorn-Knopp equipartition of soft cluster assignments (SwAV).

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["sinkhorn"]


def _distributed(flag: bool | None) -> bool:
    active = dist.is_available() and dist.is_initialized()
    if flag and not active:
        raise RuntimeError("sinkhorn(distributed=True) needs an initialised torch.distributed process group")
    return active if flag is None else bool(flag)


def _logsumexp(x: torch.Tensor, dim: int, across_ranks: bool) -> torch.Tensor:
    """log(sum(exp(x))) along ``dim``, also summing over all ranks when ``across_ranks`` (keepdim=True)."""
    if not across_ranks:
        return torch.logsumexp(x, dim=dim, keepdim=True)
    m = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)  # same shift on every rank
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    dist.all_reduce(s)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor, n_iters: int = 3, epsilon: float = 0.05, distributed: bool | None = None
) -> torch.Tensor:
    """Soft assignments of N samples to K prototypes with equal prototype mass (SwAV's Sinkhorn-Knopp).

    Computes ``Q = exp(scores / epsilon)`` and alternately normalises it so every prototype gets mass 1/K and
    every sample mass 1/B (B = N x world size), ``n_iters`` times, then returns Q scaled so each row sums to 1.
    Same steps as SwAV's ``distributed_sinkhorn``, computed in the log domain (log-sum-exp, i.e. the maximum is
    subtracted before every ``exp``), so large scores or a small ``epsilon`` give no overflow and no all-zero row.
    Runs in float32 (float64 if ``scores`` is float64), with autocast disabled.

    Args:
        scores: (N, K) similarities of samples to prototypes, e.g. cosine similarities.
        n_iters: number of Sinkhorn iterations (SwAV: 3).
        epsilon: entropic regularisation; smaller gives harder assignments (SwAV: 0.05).
        distributed: all-reduce the prototype sums over ranks (SwAV's batch across GPUs). ``None``: when
            ``torch.distributed`` is initialised; ``False``: never; ``True``: required.

    Returns:
        (N, K) assignments; rows sum to 1, columns sum to about N/K (exactly in the limit of many iterations).

    Raises:
        ValueError: ``scores`` not 2D, ``n_iters`` < 1 or ``epsilon`` <= 0.
        RuntimeError: ``distributed=True`` without an initialised process group.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)           # (N, D) embeddings
        >>> prototypes = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)  # (K, D)
        >>> q = sinkhorn(z @ prototypes.T)   # (N, K) targets for the swapped prediction loss
        >>> q.shape, torch.allclose(q.sum(dim=1), torch.ones(64))
        (torch.Size([64, 10]), True)
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2D (N samples, K prototypes), got shape {tuple(scores.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    across = _distributed(distributed)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    n, k = scores.shape
    world = dist.get_world_size() if across else 1
    log_b, log_k = math.log(n * world), math.log(k)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_q = scores.detach().to(dtype) / epsilon  # (N, K), log of SwAV's Q.t()
        log_q = log_q - _logsumexp(_logsumexp(log_q, 0, across), 1, False)  # total mass 1
        for _ in range(n_iters):
            log_q = log_q - _logsumexp(log_q, 0, across) - log_k  # each prototype (column) gets mass 1/K
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # each sample (row) mass 1/B
        return torch.exp(log_q + log_b)  # rows sum to 1
