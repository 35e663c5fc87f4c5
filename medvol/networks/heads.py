"""Projection and prediction heads: one configurable MLP plus thin variants with the papers' defaults.

- :class:`MLPHead`: ``num_layers`` x Linear, with norm + ReLU between layers and an optional norm at the end.
- :class:`ProjectionHead` / :class:`PredictionHead`: MoCo v3 projector (3 layers, BN, last BN without affine
  parameters) and predictor (2 layers) (Chen et al. 2021, https://arxiv.org/abs/2104.02057).
- :class:`GlobalPoolHead`: global average pooling of a feature map, then an MLP (CAiD / MoCo v2 global branch,
  GAP(bottleneck) -> 2048 -> 128; Taher et al. 2022, https://arxiv.org/abs/2204.07344).
- :class:`ConvProjectionHead`: 1x1x1 conv + norm + ReLU + 1x1x1 conv on a decoder map (Chaitanya et al. 2020,
  https://arxiv.org/abs/2006.10511, local contrastive head).

BatchNorm1d needs more than one sample per batch in training mode; the heads raise a clear ``ValueError`` for a
batch of one while training, and accept any batch size in eval mode (running statistics).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medvol.networks.factory import resolve_norm

__all__ = ["MLPHead", "ProjectionHead", "PredictionHead", "GlobalPoolHead", "ConvProjectionHead"]


def _norm1d(norm: str, dim: int, affine: bool = True) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(dim, affine=affine)
    if norm == "layer":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    raise ValueError(f"norm={norm!r} must be 'batch', 'layer' or None.")


class MLPHead(nn.Module):
    """Multi-layer perceptron head (lightly-style): Linear -> [norm] -> ReLU, ..., Linear -> [last norm].

    A Linear followed by a norm has no bias (the norm's shift replaces it).

    Args:
        in_dim: input features.
        hidden_dim: features of every hidden layer.
        out_dim: output features.
        num_layers: number of Linear layers (>= 1).
        norm: ``"batch"``, ``"layer"`` or ``None`` (no norm) after every hidden Linear.
        last_norm: add a norm of the same kind after the last Linear (needs ``norm`` not ``None``).
        last_norm_affine: whether that last norm has learnable scale/shift (MoCo v3 projector: ``False``).

    Raises:
        ValueError: for ``num_layers < 1``, an unknown ``norm``, or ``last_norm`` without ``norm``.

    Example:
        >>> MLPHead(64, 128, 32, num_layers=3)(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        norm: str | None = "batch",
        last_norm: bool = False,
        last_norm_affine: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1.")
        if norm is not None and norm not in ("batch", "layer"):
            raise ValueError(f"norm={norm!r} must be 'batch', 'layer' or None.")
        if last_norm and norm is None:
            raise ValueError("last_norm=True needs norm='batch' or 'layer' (the kind of the last norm).")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            with_norm = last_norm if last else norm is not None
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not with_norm))
            if with_norm:
                layers.append(_norm1d(norm, dims[i + 1], affine=last_norm_affine if last else True))  # type: ignore[arg-type]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self._has_bn = any(isinstance(m, nn.BatchNorm1d) for m in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        if self.training and self._has_bn and x.shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} uses BatchNorm1d, which needs a batch of at least 2 in training mode "
                f"(got {x.shape[0]}); use a larger batch, norm='layer', or eval mode."
            )
        return self.layers(x)


class ProjectionHead(MLPHead):
    """MoCo v3 projector: 3 layers, BatchNorm, last BatchNorm without affine parameters (defaults 4096 -> 256)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 3,
        norm: str | None = "batch",
        last_norm: bool = True,
        last_norm_affine: bool = False,
    ) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, norm, last_norm, last_norm_affine)


class PredictionHead(MLPHead):
    """MoCo v3 predictor: 2 layers, BatchNorm on the hidden layer, no last norm (defaults 256 -> 4096 -> 256)."""

    def __init__(
        self,
        in_dim: int = 256,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 2,
        norm: str | None = "batch",
        last_norm: bool = False,
        last_norm_affine: bool = True,
    ) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, norm, last_norm, last_norm_affine)


class GlobalPoolHead(nn.Module):
    """Global average pooling over the spatial dimensions, then an MLP (CAiD global branch, MoCo v2 style).

    Args:
        in_channels: channels of the feature map (e.g. the bottleneck's ``encoder_channels[-1]``).
        hidden_dim: hidden features of the MLP.
        out_dim: output features (CAiD: 128).
        num_layers: Linear layers of the MLP.
        norm: norm between MLP layers: ``None`` (MoCo v2, default), ``"batch"`` or ``"layer"``.

    Example:
        >>> GlobalPoolHead(64, 128, 32)(torch.randn(2, 64, 4, 4, 4)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self, in_channels: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str | None = None
    ) -> None:
        super().__init__()
        self.mlp = MLPHead(in_channels, hidden_dim, out_dim, num_layers=num_layers, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, out_dim)``; a ``(B, C)`` input is taken as already pooled."""
        if x.ndim > 2:
            x = x.flatten(2).mean(dim=2)  # (B, C, N) -> (B, C)
        return self.mlp(x)


class ConvProjectionHead(nn.Sequential):
    """1x1x1 conv + norm + ReLU + 1x1x1 conv on a dense feature map (Chaitanya et al.'s local head).

    Args:
        in_channels: channels of the decoder map.
        hidden_channels: channels after the first conv.
        out_channels: channels of the projected map.
        norm: ``"batch"`` (the paper), ``"instance"`` or ``"group"``.
        spatial_dims: 3 (default) or 2.

    Example:
        >>> ConvProjectionHead(16, 32, 8)(torch.randn(2, 16, 8, 8, 8)).shape
        torch.Size([2, 8, 8, 8, 8])
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, out_channels: int, norm: str = "batch", spatial_dims: int = 3
    ) -> None:
        super().__init__(
            Convolution(
                spatial_dims,
                in_channels,
                hidden_channels,
                kernel_size=1,
                norm=resolve_norm(norm, hidden_channels),
                act="relu",
            ),
            Convolution(spatial_dims, hidden_channels, out_channels, kernel_size=1, conv_only=True),
        )
