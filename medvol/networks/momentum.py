"""Momentum (exponential moving average) encoders: the key encoder of MoCo (He et al. 2020,
https://arxiv.org/abs/1911.05722), MoCo v3 and CAiD, and BYOL's cosine momentum schedule
(Grill et al. 2020, https://arxiv.org/abs/2006.07733).

Both functions accept ``DistributedDataParallel``/``DataParallel`` wrappers and work on the wrapped ``.module``,
so the momentum copy is a plain module and parameter names match on every rank.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["copy_momentum_encoder", "update_momentum", "cosine_momentum", "unwrap_module"]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside (possibly nested) ``DistributedDataParallel``/``DataParallel`` wrappers."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def copy_momentum_encoder(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (unwrapped from DDP) whose parameters do not require gradients.

    Example:
        >>> ema = copy_momentum_encoder(torch.nn.Linear(4, 2))
        >>> ema.weight.requires_grad
        False
    """
    ema = copy.deepcopy(unwrap_module(module))
    ema.requires_grad_(False)
    return ema


def _named(module: nn.Module, kind: str) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters() if kind == "parameters" else module.named_buffers())


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """In place: ``ema = m * ema + (1 - m) * model`` for every parameter; buffers (BN statistics) are copied.

    Args:
        model: the online network (gradients flow here).
        model_ema: its momentum copy, e.g. from :func:`copy_momentum_encoder`.
        m: momentum in [0, 1]; 1 keeps ``model_ema`` unchanged, 0 copies ``model``.

    Raises:
        ValueError: when ``m`` is outside [0, 1] or the two modules do not have the same parameter names/shapes.
    """
    m = float(m)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m={m} must be in [0, 1].")
    src, dst = unwrap_module(model), unwrap_module(model_ema)
    for kind in ("parameters", "buffers"):
        online, ema = _named(src, kind), _named(dst, kind)
        if [(n, t.shape) for n, t in online] != [(n, t.shape) for n, t in ema]:
            raise ValueError(
                f"model and model_ema have different {kind} (names or shapes); build model_ema with "
                "copy_momentum_encoder(model)."
            )
        if not online:
            continue
        targets, sources = [t for _, t in ema], [t.detach() for _, t in online]
        if kind == "parameters":
            torch._foreach_lerp_(targets, sources, 1.0 - m)  # ema + (1 - m) * (p - ema)
        else:
            for t, s in zip(targets, sources):
                t.copy_(s)


def cosine_momentum(base_m: float, step: int, total_steps: int) -> float:
    """Momentum rising from ``base_m`` at step 0 to 1.0 at ``total_steps`` along a half cosine (BYOL).

    ``m = 1 - (1 - base_m) * (cos(pi * step / total_steps) + 1) / 2``; steps past ``total_steps`` give 1.0.

    Raises:
        ValueError: when ``total_steps < 1`` or ``base_m`` is outside [0, 1].

    Example:
        >>> cosine_momentum(0.99, 0, 100), cosine_momentum(0.99, 100, 100)
        (0.99, 1.0)
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1.")
    if not 0.0 <= base_m <= 1.0:
        raise ValueError(f"base_m={base_m} must be in [0, 1].")
    t = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * t) + 1.0) / 2.0
