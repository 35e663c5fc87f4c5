"""Argument checks and float32 helpers shared by the losses of :mod:`medvol.losses`.

Every loss validates its hyper-parameters and inputs with the same messages, computes its logits in float32
under :func:`no_autocast`, and reduces per-sample values with :func:`reduce_loss` (MONAI's reduction names).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "REDUCTIONS",
    "check_temperature",
    "check_reduction",
    "check_embeddings",
    "check_same_shape",
    "no_autocast",
    "reduce_loss",
]

REDUCTIONS = ("mean", "sum", "none")


def check_temperature(value: float, name: str = "temperature") -> float:
    """Return ``value`` as a float, or raise if it is not a finite number > 0 (temperatures, weights).

    Raises:
        TypeError: if ``value`` is not a real number (bools are refused).
        ValueError: if it is not finite or <= 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_reduction(reduction: str) -> str:
    """Return the reduction name ('mean' | 'sum' | 'none'; a ``monai.utils.LossReduction`` works too).

    Raises:
        ValueError: for any other value.
    """
    value = getattr(reduction, "value", reduction)
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return value


def check_embeddings(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a floating (N, D) tensor with N >= 1 and D >= 1.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.
        ValueError: if it is not 2D or has an empty dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got {tuple(x.shape)}.")


def check_same_shape(input: torch.Tensor, target: torch.Tensor) -> None:
    """Raise unless ``input`` and ``target`` are floating-point tensors of one shape (dense losses).

    Raises:
        TypeError: if either is not a floating-point tensor.
        ValueError: if their shapes differ.
    """
    for name, x in (("input", input), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}.")
    if input.shape != target.shape:
        raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and "
                         f"{tuple(target.shape)}.")


def no_autocast(x: torch.Tensor):
    """Context that disables autocast on ``x``'s device, so logits are computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def reduce_loss(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``values.mean()``, ``values.sum()`` or ``values`` itself for ``reduction`` 'mean', 'sum', 'none'."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values
