"""Volume embeddings from a pretrained backbone: global average pooling of encoder feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["EmbeddingNet"]


class EmbeddingNet(nn.Module):
    """``(B, C, *spatial) -> (B, D)``: pooled encoder features of a :class:`~medvol.networks.Backbone`.

    Args:
        backbone: the pretrained backbone.
        levels: encoder levels to pool and concatenate (negative indices count from the bottleneck);
            default: the bottleneck only (``D = encoder_channels[-1]``).

    Example:
        >>> from medvol.networks import UNet3D
        >>> EmbeddingNet(UNet3D(channels=(8, 16, 32)))(torch.zeros(2, 1, 16, 16, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(self, backbone: nn.Module, levels: Sequence[int] = (-1,)):
        super().__init__()
        self.backbone = backbone
        self.levels = tuple(levels)
        self.out_dim = sum(backbone.encoder_channels[i] for i in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.encode(x)
        return torch.cat([features[i].flatten(2).mean(dim=2) for i in self.levels], dim=1)
