"""Local (region-level) contrastive loss of Chaitanya et al. 2020 on decoder feature maps, in 2D or 3D."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medvol.losses.utils import check_reduction, check_same_shape, check_temperature, no_autocast, reduce_loss

__all__ = ["LocalContrastiveLoss"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}.")
    return int(value)


class LocalContrastiveLoss(_Loss):
    """Region-level NT-Xent between two intensity-augmented views whose voxels correspond.

    Chaitanya et al., "Contrastive learning of global and local features for medical image segmentation with
    limited annotations", NeurIPS 2020 (local loss; their code uses 13 2D regions of 3x3 pixels), here on a
    regular grid of regions in any number of spatial dimensions.

    Regions: along each spatial axis of size S, the valid window starts 0..S-r (r = ``region_size``) are split
    into g (``grid_size``) equal bins and region k starts at the centre of bin k, ``floor((k + 1/2) (S-r+1) / g)``
    (evenly spaced, half a spacing away from the borders, distinct whenever S - r + 1 >= g; see
    :meth:`region_starts`). A region embedding is the mean feature over its r^d window, L2-normalised.

    Loss, for each image separately: with R regions per view and 2R embeddings, the anchor a region of either
    view, its positive the same region of the other view, its negatives the 2R - 2 other regions of both views
    (explicit negatives, no stride)::

        l = -log( exp(s_pos) / sum_{k != anchor} exp(s_k) ),   s = cos / temperature

    averaged over the 2R anchors (the symmetric loss), then reduced over the images.

    Args:
        temperature: tau > 0 (0.1 in Chaitanya et al.).
        grid_size: regions per spatial axis; an int (same for every axis of the input) or one int per axis,
            whose length then fixes the spatial dimensionality (default (3, 3, 3): 27 regions of a 3D map).
        region_size: edge r of the cubic (square) averaging window, in voxels of the feature map.
        reduction: over the B images: ``"mean"``, ``"sum"`` or ``"none"`` (a (B,) vector).

    Raises:
        TypeError: if ``temperature`` is not a number or a size is not an int.
        ValueError: if a size is < 1, the grid has fewer than 2 regions, or ``reduction`` is unknown.

    Example:
        >>> loss = LocalContrastiveLoss(grid_size=(3, 3, 3), region_size=3)
        >>> f1, f2 = torch.randn(2, 16, 8, 12, 10), torch.randn(2, 16, 8, 12, 10)
        >>> loss(f1, f2).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        grid_size: int | Sequence[int] = (3, 3, 3),
        region_size: int = 3,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_temperature(temperature)
        self.region_size = _positive_int(region_size, "region_size")
        if isinstance(grid_size, Sequence) and not isinstance(grid_size, str):
            if len(grid_size) < 1:
                raise ValueError(f"grid_size must not be empty, got {grid_size!r}.")
            self.grid_size: int | tuple[int, ...] = tuple(_positive_int(g, "grid_size") for g in grid_size)
            n_regions = math.prod(self.grid_size)
        else:
            self.grid_size = _positive_int(grid_size, "grid_size")  # same count on every spatial axis
            n_regions = self.grid_size
        if n_regions < 2:
            raise ValueError(f"grid_size must give at least 2 regions (the negatives), got {grid_size!r}.")

    def region_starts(self, spatial_shape: Sequence[int]) -> list[list[int]]:
        """First voxel index of every region window along each spatial axis.

        Args:
            spatial_shape: the feature map's spatial size, e.g. (D, H, W).

        Returns:
            One list of g_a start indices per axis a; region windows are ``[start, start + region_size)``.

        Raises:
            ValueError: if an axis is smaller than ``region_size`` or has fewer than g_a window positions.
        """
        grid = self._grid(len(spatial_shape))
        r = self.region_size
        starts = []
        for axis, (size, g) in enumerate(zip(spatial_shape, grid)):
            n_pos = int(size) - r + 1  # number of valid window starts along this axis
            if n_pos < g:
                raise ValueError(f"feature map of spatial shape {tuple(spatial_shape)} is too small for grid_size "
                                 f"{grid} with region_size {r}: axis {axis} has size {size}, needs >= {r + g - 1}.")
            starts.append([int((2 * k + 1) * n_pos // (2 * g)) for k in range(g)])  # floor((k + 1/2) n_pos / g)
        return starts

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: (B, C, *spatial) decoder features of view 1, e.g. (B, C, D, H, W); any float dtype.
            target: decoder features of view 2, same shape; voxel v of both views is the same location.

        Returns:
            A float32 scalar, or a (B,) vector for ``reduction="none"``.

        Raises:
            TypeError: if the inputs are not floating-point tensors.
            ValueError: if the shapes differ, the dimensionality does not match ``grid_size``, or the map is
                too small for the grid.
        """
        check_same_shape(input, target)
        if input.ndim < 3:
            raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(input.shape)}.")
        nd = input.ndim - 2
        starts = self.region_starts(input.shape[2:])
        grid = [len(s) for s in starts]
        r, b = self.region_size, input.shape[0]
        n_regions = math.prod(grid)
        with no_autocast(input):
            views = []
            for x in (input, target.to(input.device)):
                for axis, s in enumerate(starts):  # keep only the region windows: axis a -> g_a * r voxels
                    idx = (torch.tensor(s, device=x.device)[:, None] + torch.arange(r, device=x.device)).reshape(-1)
                    x = x.index_select(2 + axis, idx)
                # (B, C, g_1 * r, ..., g_d * r) -> (B, C, g_1, r, ..., g_d, r) -> window means (B, C, g_1, ..., g_d)
                x = x.float().reshape(*x.shape[:2], *[v for g in grid for v in (g, r)])
                x = x.mean(dim=tuple(3 + 2 * a for a in range(nd)))
                views.append(x.flatten(2).transpose(1, 2))  # (B, R, C)
            z = F.normalize(torch.cat(views, dim=1), dim=2)  # (B, 2R, C): view 1 regions, then view 2 regions
            sim = z @ z.transpose(1, 2) / self.temperature  # (B, 2R, 2R)
            eye = torch.eye(2 * n_regions, dtype=torch.bool, device=sim.device)
            sim = sim.masked_fill(eye, float("-inf"))  # an anchor is neither its own positive nor negative
            labels = (torch.arange(2 * n_regions, device=sim.device) + n_regions) % (2 * n_regions)  # other view
            losses = F.cross_entropy(sim.reshape(b * 2 * n_regions, -1), labels.repeat(b), reduction="none")
            losses = losses.reshape(b, 2 * n_regions).mean(dim=1)  # (B,)
        return reduce_loss(losses, self.reduction)

    def _grid(self, nd: int) -> tuple[int, ...]:
        if isinstance(self.grid_size, int):
            return (self.grid_size,) * nd
        if len(self.grid_size) != nd:
            raise ValueError(f"grid_size {self.grid_size} has {len(self.grid_size)} axes but the feature map has "
                             f"{nd} spatial axes.")
        return self.grid_size
