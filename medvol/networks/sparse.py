"""Sparse (masked) forward pass of a :class:`~medvol.networks.UNet3D` encoder, as in SparK.

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023.
A CNN sees a masked volume as if the masked patches were absent (submanifold sparse convolution), emulated on
dense tensors:

- the input's masked patches are zeroed, and every feature map is multiplied by the visibility mask at its own
  resolution after each convolution, norm, dropout and activation, so a masked position is 0 whenever a
  convolution reads it (its value cannot leak into a visible output);
- every norm layer computes its statistics over the visible positions only (:func:`masked_norm`): instance and
  group norm per sample over the visible voxels, batch norm over the visible voxels of the whole batch (SparK's
  ``SparseBatchNorm``, running statistics updated from those).

The visibility mask is given on the patch grid, ``spatial / patch_size`` with ``patch_size`` the encoder's total
downsampling factor (``UNet3D.spatial_divisor``), so every level's mask is the grid mask repeated (a max-pool
window never straddles a visible and a masked patch). Outputs at visible positions depend only on the visible
input voxels; ``tests/test_networks_sparse.py`` checks it by perturbing the masked voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["masked_norm", "mask_at", "sparse_encode"]


def mask_at(visible: torch.Tensor, size) -> torch.Tensor:
    """The (B, 1, *grid) 0/1 visibility mask repeated to ``size`` (each grid cell -> one block of voxels).

    Raises:
        ValueError: when ``size`` is not a multiple of the grid.
    """
    grid = tuple(visible.shape[2:])
    size = tuple(int(s) for s in size)
    if any(s % g for s, g in zip(size, grid)):
        raise ValueError(f"feature size {size} is not a multiple of the mask grid {grid}.")
    return F.interpolate(visible.float(), size=size, mode="nearest")  # integer factors: exact repetition


def masked_norm(norm: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Apply ``norm`` (instance, group or batch norm) to ``x`` with statistics over ``visible`` positions only.

    Args:
        norm: a ``torch.nn`` InstanceNorm, GroupNorm or BatchNorm layer (its affine parameters, ``eps`` and, for
            batch norm, running statistics and momentum are used), or ``nn.Identity``.
        x: features (B, C, *spatial).
        visible: 0/1 mask (B, 1, *spatial), 1 = visible.

    Returns:
        The normalized features, 0 at the masked positions.

    Raises:
        TypeError: for another kind of layer, or an instance norm that tracks running statistics.

    Example:
        >>> x, vis = torch.randn(2, 4, 4, 4, 4), (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
        >>> y = masked_norm(nn.InstanceNorm3d(4), x, vis)
        >>> bool((y * (1 - vis)).abs().max() == 0)
        True
    """
    if isinstance(norm, nn.Identity):
        return x * visible
    b, c = x.shape[:2]
    if isinstance(norm, _BatchNorm):
        if not norm.training and norm.track_running_stats:
            return norm(x) * visible  # running statistics: a per-channel affine map, nothing leaks
        rows = x.movedim(1, -1)[visible[:, 0] > 0]  # (N_visible, C)
        momentum = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(norm.num_batches_tracked)
        out = F.batch_norm(rows, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, momentum,
                           norm.eps)
        y = torch.zeros_like(x.movedim(1, -1))
        y[visible[:, 0] > 0] = out.to(y.dtype)
        return y.movedim(-1, 1)
    if isinstance(norm, _InstanceNorm):
        if norm.track_running_stats:
            raise TypeError("masked_norm: an InstanceNorm with track_running_stats=True is not supported.")
        groups = c
    elif isinstance(norm, nn.GroupNorm):
        groups = norm.num_groups
    else:
        raise TypeError(f"masked_norm: unsupported norm layer {type(norm).__name__} (instance, group or batch).")
    xg = x.float().reshape(b, groups, c // groups, -1)  # (B, G, C/G, V)
    m = visible.float().reshape(b, 1, 1, -1)
    count = (m.sum(-1, keepdim=True) * (c // groups)).clamp(min=1.0)  # (B, 1, 1, 1) visible values per group
    mean = (xg * m).sum((2, 3), keepdim=True) / count
    var = ((xg - mean).square() * m).sum((2, 3), keepdim=True) / count  # biased, as torch's norms
    y = ((xg - mean) / (var + norm.eps).sqrt()).reshape(x.shape)
    if norm.weight is not None:
        shape = (1, c) + (1,) * (x.ndim - 2)
        y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y.to(x.dtype) * visible


def _sparse_block(block: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One MONAI ``Convolution`` (conv, then its ADN children in order) with re-masking after every step."""
    x = block.conv(x)
    vis = mask_at(visible, x.shape[2:])
    x = x * vis
    adn = getattr(block, "adn", None)
    if adn is not None:
        for name, layer in adn.named_children():
            x = masked_norm(layer, x, vis) if name == "N" else layer(x) * vis
    return x


def sparse_encode(backbone: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
    """The encoder maps of a ``UNet3D`` (fine -> coarse) computed on the visible patches only.

    Args:
        backbone: a :class:`~medvol.networks.UNet3D` (its ``encoder.levels``: optional ``pool``, ``convs``).
        x: input (B, C, *spatial), spatial divisible by ``backbone.spatial_divisor``.
        visible: (B, 1, *grid) 0/1 mask on the patch grid ``spatial / spatial_divisor``, 1 = visible.

    Returns:
        One map per encoder level, 0 at masked positions.

    Raises:
        ValueError: when the mask's grid does not match ``x`` and the backbone's downsampling.

    Example:
        >>> from medvol.networks import UNet3D
        >>> net = UNet3D(channels=(4, 8, 16))
        >>> vis = (torch.rand(1, 1, 4, 4, 4) > 0.6).float()
        >>> [tuple(f.shape[2:]) for f in sparse_encode(net, torch.rand(1, 1, 16, 16, 16), vis)]
        [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    """
    backbone.check_input(x)
    grid = tuple(s // d for s, d in zip(x.shape[2:], backbone.spatial_divisor))
    if visible.ndim != x.ndim or visible.shape[0] != x.shape[0] or tuple(visible.shape[2:]) != grid:
        raise ValueError(f"visible mask of shape {tuple(visible.shape)} does not match the patch grid {grid} of "
                         f"an input {tuple(x.shape)} (patch = spatial_divisor {backbone.spatial_divisor}).")
    visible = visible.to(x.device, torch.float32)
    x = x * mask_at(visible, x.shape[2:])
    out = []
    for level in backbone.encoder.levels:
        if hasattr(level, "pool"):
            x = level.pool(x)
            x = x * mask_at(visible, x.shape[2:])
        for block in level.convs:
            x = _sparse_block(block, x, visible)
        out.append(x)
    return out
