"""UNETR (MONAI) behind the medvol backbone interface: a plain ViT encoder, so MAE can pretrain it.

MONAI's ``UNETR`` is built once and its sub-modules re-parented, without copying weights, under the three medvol
prefixes (names after the prefix are UNETR's own)::

    encoder.vit.*          ViT: patch embedding (16^3 patches, learnable positions), 12 blocks, final norm
    encoder.encoder1.*     conv block on the image                  -> skip at 1/1
    encoder.encoder2..4.*  blocks on the tokens of ViT blocks 3, 6, 9 -> skips at 1/2, 1/4, 1/8
    decoder.decoder5..2.*  up blocks, 1/16 -> 1/1
    head.*                 UNETR's ``out`` (1x1x1 conv)

``encode`` returns the four skips and the final ViT tokens reshaped to the 1/16 grid, exactly the tensors
``UNETR.forward`` uses. The ViT's position embeddings are learned for one ``img_size``: inputs must have exactly
that spatial size (use a sliding-window inferer with ``roi_size = img_size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import UNETR
from monai.utils import ensure_tuple_rep
from torch import nn

from medvol.networks.factory import Backbone, register_backbone, resolve_norm

__all__ = ["UNETRBackbone"]

_ENCODER = ("vit", "encoder1", "encoder2", "encoder3", "encoder4")
_DECODER = ("decoder5", "decoder4", "decoder3", "decoder2")


class _UNETREncoder(nn.Module):
    def __init__(self, net: UNETR) -> None:
        super().__init__()
        for name in _ENCODER:
            self.add_module(name, getattr(net, name))
        self.grid = [int(g) for g in net.feat_size]
        self.img_size = [int(g) * 16 for g in net.feat_size]

    def tokens_to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens, grid row-major -> (B, D, *grid)."""
        return x.transpose(1, 2).reshape([x.shape[0], x.shape[2]] + self.grid)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if list(x.shape[2:]) != self.img_size:
            raise ValueError(f"UNETRBackbone: input spatial size {list(x.shape[2:])} must equal img_size "
                             f"{self.img_size} (the ViT's position embeddings are learned for it).")
        last, hidden = self.vit(x)
        return [
            self.encoder1(x),
            self.encoder2(self.tokens_to_map(hidden[3])),
            self.encoder3(self.tokens_to_map(hidden[6])),
            self.encoder4(self.tokens_to_map(hidden[9])),
            self.tokens_to_map(last),
        ]


class _UNETRDecoder(nn.Module):
    def __init__(self, net: UNETR) -> None:
        super().__init__()
        for name in _DECODER:
            self.add_module(name, getattr(net, name))

    def forward(self, features: list[torch.Tensor], num_levels: int) -> list[torch.Tensor]:
        # written out (not a loop over the blocks) so that TorchScript compiles it
        out: list[torch.Tensor] = []
        x = self.decoder5(features[-1], features[-2])
        out.append(x)
        if num_levels > 1:
            x = self.decoder4(x, features[-3])
            out.append(x)
        if num_levels > 2:
            x = self.decoder3(x, features[-4])
            out.append(x)
        if num_levels > 3:
            x = self.decoder2(x, features[-5])
            out.append(x)
        return out


@register_backbone("unetr")
class UNETRBackbone(Backbone):
    """UNETR (Hatamizadeh et al. 2022, https://arxiv.org/abs/2103.10504) with feature taps.

    With ``feature_size=F``, ``hidden_size=D`` and an input of size ``img_size`` (S, divisible by 16), ``encode``
    gives ``encoder_channels = (F, 2F, 4F, 8F, D)`` at S, S/2, S/4, S/8, S/16 and ``decode`` gives
    ``decoder_channels = (8F, 4F, 2F, F)`` at S/8 ... S. ``forward`` equals ``UNETR.forward``.

    Args:
        in_channels: input channels.
        out_channels: channels of the logits returned by ``forward``.
        img_size: the one input size (16^3 patches: each size a multiple of 16).
        feature_size: F above.
        hidden_size: ViT width D (MONAI's UNETR always has 12 blocks, 16^3 patches).
        mlp_dim: ViT MLP width.
        num_heads: attention heads (must divide ``hidden_size``).
        norm: norm of the convolutional blocks: ``"instance"`` (UNETR's default), ``"group"`` or ``"batch"``.
        unetr_kwargs: further ``monai.networks.nets.UNETR`` arguments (``dropout_rate``, ``qkv_bias``, ...).

    Raises:
        ValueError: for an ``img_size`` not divisible by 16 (and from MONAI for bad widths); ``encode`` /
            ``forward`` raise it for an input whose size is not ``img_size``.

    Example:
        >>> net = UNETRBackbone(img_size=(32, 32, 16), hidden_size=32, mlp_dim=64, num_heads=2, feature_size=4)
        >>> [tuple(f.shape[1:]) for f in net.encode(torch.zeros(1, 1, 32, 32, 16))][-1]
        (32, 2, 2, 1)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: int | Sequence[int] = (32, 48, 32),
        feature_size: int = 16,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_heads: int = 6,
        norm: str | tuple = "instance",
        **unetr_kwargs: Any,
    ) -> None:
        super().__init__()
        spatial_dims = int(unetr_kwargs.get("spatial_dims", 3))
        size = tuple(int(s) for s in ensure_tuple_rep(img_size, spatial_dims))
        if any(s % 16 or s < 16 for s in size):
            raise ValueError(f"img_size={size} must be multiples of 16 (UNETR's 16^3 patches).")
        net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=size, feature_size=feature_size,
                    hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                    norm_name=resolve_norm(norm, feature_size), **unetr_kwargs)
        f = feature_size
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.img_size, self.patch_size, self.hidden_size = size, (16,) * spatial_dims, hidden_size
        self.encoder_channels = (f, 2 * f, 4 * f, 8 * f, hidden_size)
        self.decoder_channels = (8 * f, 4 * f, 2 * f, f)
        self.spatial_divisor = (16,) * spatial_dims
        self.encoder = _UNETREncoder(net)
        self.decoder = _UNETRDecoder(net)
        self.head = net.out
