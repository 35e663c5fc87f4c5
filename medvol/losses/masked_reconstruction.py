"""Masked-patch reconstruction loss (MAE, SparK): MSE on the masked patches, per-patch normalized targets.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (``norm_pix_loss``) and Tian et al.,
"Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023 (SparK). Both
split the image into non-overlapping patches, normalize every target patch by its own mean and standard
deviation, and average the squared error over the voxels of a patch and then over the *masked* patches only::

    t_n = (y_n - mean(y_n)) / sqrt(var(y_n) + eps)           (var unbiased, over the P*C values of patch n)
    l_n = mean((x_n - t_n)^2)
    loss = sum_n m_n l_n / sum_n m_n                          (m_n = 1 for a masked patch)

:func:`patchify` / :func:`unpatchify` convert between volumes and patch rows in the row-major order of the patch
grid (the order of a ViT's patch tokens and of a flattened ``(B, *grid)`` mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_same_shape, no_autocast

__all__ = ["MaskedReconstructionLoss", "patchify", "unpatchify"]


def _patch_tuple(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    patch = (int(patch_size),) * spatial_dims if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims or min(patch) < 1:
        raise ValueError(f"patch_size={patch_size!r} needs {spatial_dims} positive sizes.")
    return patch


def patchify(x: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, P*C): one row per patch (grid row-major), voxels then channels within a row.

    Raises:
        ValueError: when a spatial size is not divisible by the patch size.

    Example:
        >>> patchify(torch.zeros(2, 1, 8, 8, 4), 4).shape
        torch.Size([2, 4, 64])
    """
    dims = x.ndim - 2
    patch = _patch_tuple(patch_size, dims)
    if any(s % p for s, p in zip(x.shape[2:], patch)):
        raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by the patch size {patch}.")
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    shape = [x.shape[0], x.shape[1]]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)  # (B, C, g0, p0, g1, p1, ...)
    order = [0] + [2 + 2 * d for d in range(dims)] + [3 + 2 * d for d in range(dims)] + [1]
    return x.permute(order).reshape(x.shape[0], -1, x.shape[1] * math.prod(patch))


def unpatchify(rows: torch.Tensor, patch_size: int | Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, P*C) on a patch grid -> (B, C, *spatial).

    Example:
        >>> x = torch.rand(2, 3, 8, 4, 4)
        >>> torch.equal(unpatchify(patchify(x, 2), 2, (4, 2, 2)), x)
        True
    """
    dims = len(grid)
    patch = _patch_tuple(patch_size, dims)
    b, n, pc = rows.shape
    volume = math.prod(patch)
    if n != math.prod(grid) or pc % volume:
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit the grid {tuple(grid)} of patches {patch}.")
    x = rows.reshape(b, *grid, *patch, pc // volume)  # (B, g0, g1, .., p0, p1, .., C)
    order = [0, 2 * dims + 1]
    for d in range(dims):
        order += [1 + d, 1 + dims + d]
    return x.permute(order).reshape(b, pc // volume, *(g * p for g, p in zip(grid, patch)))


class MaskedReconstructionLoss(_Loss):
    """MSE between a reconstruction and its (per-patch normalized) target on the masked patches.

    Args:
        patch_size: the masking patch (an int or one size per spatial dimension).
        norm_target: normalize each target patch by its mean and standard deviation (MAE ``norm_pix_loss``,
            SparK); ``False`` compares raw intensities.
        eps: added to the patch variance (1e-6 in both papers).
        reduction: ``"mean"`` (over the masked patches), ``"sum"`` (of the per-patch losses of the masked
            patches) or ``"none"`` (the (B, N) per-patch losses times the mask).

    Raises:
        ValueError: for an unknown ``reduction`` or a bad ``patch_size``.

    Example:
        >>> loss = MaskedReconstructionLoss(patch_size=4)
        >>> x, y = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
        >>> mask = torch.rand(2, 1, 2, 2, 2) < 0.6              # True = masked patch, loss there
        >>> loss(x, y, mask).shape
        torch.Size([])
    """

    def __init__(self, patch_size: int | Sequence[int], norm_target: bool = True, eps: float = 1e-6,
                 reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.patch_size = patch_size if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        _patch_tuple(self.patch_size, 1 if isinstance(patch_size, int) else len(self.patch_size))  # raises if bad
        self.norm_target, self.eps = bool(norm_target), float(eps)

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: the reconstruction (B, C, *spatial); computed in float32.
            target: the original image, same shape (detached: the target is data).
            mask: ``None`` = every patch; else bool/0-1 values on the patch grid, (B, 1, *grid) or (B, *grid),
                1 = masked (the loss counts there).

        Returns:
            A float32 scalar, or (B, N) per-patch losses for ``reduction="none"``.

        Raises:
            TypeError: if ``input``/``target`` are not floating-point tensors.
            ValueError: if the shapes differ, are not divisible by the patch size, or the mask does not match the
                patch grid.
        """
        check_same_shape(input, target)
        with no_autocast(input):
            pred = patchify(input.float(), self.patch_size)  # (B, N, P*C)
            tgt = patchify(target.detach().to(input.device).float(), self.patch_size)
            if self.norm_target:
                tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + self.eps).sqrt()
            per_patch = (pred - tgt).square().mean(-1)  # (B, N)
            if mask is None:
                m = torch.ones_like(per_patch)
            else:
                m = mask.to(per_patch.device, torch.float32).reshape(mask.shape[0], -1)
                if m.shape != per_patch.shape:
                    raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid: "
                                     f"{per_patch.shape[1]} patches per sample of {tuple(input.shape)}.")
            masked = per_patch * m
            if self.reduction == "none":
                return masked
            if self.reduction == "sum":
                return masked.sum()
            return masked.sum() / m.sum().clamp(min=1.0)
