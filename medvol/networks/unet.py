"""A plain 3D U-Net with feature taps at every encoder and decoder level.

Parameter layout (``state_dict`` keys)::

    encoder.levels.{i}.pool               max pooling (downsample="pool", levels i >= 1 only)
    encoder.levels.{i}.convs.{k}          conv-norm-act blocks (MONAI ``Convolution``), k < num_convs
    decoder.levels.{j}.up                 transposed conv or 1x1 conv + linear interpolation (MONAI ``UpSample``)
    decoder.levels.{j}.convs.{k}          conv-norm-act blocks after the skip concatenation
    head                                  1x1x1 conv to ``out_channels``

so the same encoder is shared, key for key, by every pretext task and by fine-tuning when built with the same
``channels``, ``strides``, ``num_convs`` and ``norm`` (radioSSL pretrained with BatchNorm and fine-tuned with
GroupNorm; here ``norm`` is one argument used for both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Pool
from monai.utils import ensure_tuple_rep
from torch import nn

from medvol.networks.factory import Backbone, register_backbone, resolve_norm

__all__ = ["UNet3D", "UNetEncoder", "UNetDecoder"]


def _conv_stack(
    spatial_dims: int, in_ch: int, out_ch: int, num_convs: int, stride, norm, act, dropout: float
) -> nn.Sequential:
    """``num_convs`` x (3x3x3 conv, norm, dropout, act); only the first conv is strided."""
    return nn.Sequential(
        *(
            Convolution(
                spatial_dims,
                in_ch if k == 0 else out_ch,
                out_ch,
                strides=stride if k == 0 else 1,
                kernel_size=3,
                act=act,
                norm=resolve_norm(norm, out_ch),
                dropout=dropout or None,
            )
            for k in range(num_convs)
        )
    )


class UNetEncoder(nn.Module):
    """The contracting path; ``forward(x)`` returns one map per level, fine -> coarse."""

    def __init__(self, spatial_dims, in_channels, channels, strides, num_convs, norm, act, dropout, downsample):
        super().__init__()
        self.levels = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(channels):
            stride = (1,) * spatial_dims if i == 0 else strides[i - 1]
            level = nn.Module()
            if i > 0 and downsample == "pool":
                level.pool = Pool[Pool.MAX, spatial_dims](kernel_size=stride, stride=stride)
                stride = 1
            level.convs = _conv_stack(spatial_dims, prev, ch, num_convs, stride, norm, act, dropout)
            self.levels.append(level)
            prev = ch

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for level in self.levels:
            if hasattr(level, "pool"):
                x = level.pool(x)
            x = level.convs(x)
            out.append(x)
        return out


class UNetDecoder(nn.Module):
    """The expanding path; ``forward(features, num_levels)`` returns ``num_levels`` maps, coarse -> fine."""

    def __init__(self, spatial_dims, channels, strides, num_convs, norm, act, dropout, upsample, skip):
        super().__init__()
        self.skip = skip
        self.levels = nn.ModuleList()
        for j in range(len(channels) - 1):
            src, dst, stride = channels[-1 - j], channels[-2 - j], strides[-1 - j]
            level = nn.Module()
            if upsample == "deconv":
                level.up = UpSample(spatial_dims, src, dst, scale_factor=stride, mode="deconv")
            else:  # 1x1 conv to dst channels, then (tri)linear interpolation
                level.up = UpSample(
                    spatial_dims,
                    src,
                    dst,
                    scale_factor=stride,
                    mode="nontrainable",
                    interp_mode="linear",
                    align_corners=False,
                )
            in_ch = 2 * dst if skip else dst
            level.convs = _conv_stack(spatial_dims, in_ch, dst, num_convs, 1, norm, act, dropout)
            self.levels.append(level)

    def forward(self, features: list[torch.Tensor], num_levels: int) -> list[torch.Tensor]:
        x, out = features[-1], []
        for j, level in enumerate(self.levels):  # TorchScript unrolls a ModuleList loop but cannot index it
            if j < num_levels:
                x = level.up(x)
                if self.skip:
                    x = torch.cat([x, features[-2 - j]], dim=1)
                x = level.convs(x)
                out.append(x)
        return out


@register_backbone("unet")
class UNet3D(Backbone):
    """Plain U-Net: ``num_convs`` x (conv-norm-act) per level, strided-conv or max-pool downsampling,
    transposed-conv or linear upsampling, skip concatenation, and a 1x1x1 conv head (Ronneberger et al. 2015,
    Cicek et al. 2016).

    With ``channels=(16, 32, 64, 128)`` and a 32^3 input, ``encode`` gives (B,16,32^3), (B,32,16^3), (B,64,8^3),
    (B,128,4^3) and ``decode`` gives (B,64,8^3), (B,32,16^3), (B,16,32^3).

    Args:
        in_channels: input channels.
        out_channels: channels of the logits returned by ``forward``.
        channels: feature channels per level, fine -> coarse; ``len(channels) >= 2`` levels.
        strides: downsampling factor between consecutive levels (``len(channels) - 1`` entries, each an int or
            one int per spatial dimension, e.g. ``(2, 2, 1)`` for thick slices); ``None`` means 2 everywhere.
            Inputs must be divisible by the product of the strides (``2 ** (levels - 1)`` by default).
        num_convs: conv-norm-act blocks per level.
        norm: ``"instance"``, ``"group"`` or ``"batch"`` (or a MONAI norm tuple); use the same one for
            pretraining and fine-tuning.
        act: MONAI activation name or tuple, e.g. ``"leakyrelu"``, ``"relu"``, ``("prelu", {})``.
        dropout: dropout probability after each norm (0 disables it).
        skip: concatenate encoder skips in the decoder; ``False`` gives radioSSL's skip-free pixel pretext net
            (``decode`` still takes the full ``encode`` list but only reads its bottleneck).
        downsample: ``"conv"`` (the first conv of a level is strided) or ``"pool"`` (max pooling first).
        upsample: ``"deconv"`` (transposed conv) or ``"interpolate"`` (1x1 conv, then trilinear interpolation).
        spatial_dims: 3 (default) or 2.

    Raises:
        ValueError: for an unknown ``downsample``/``upsample``/``norm``, fewer than two levels, or a ``strides``
            of the wrong length; ``encode``/``forward`` raise it for an input size that is not divisible.

    Example:
        >>> net = UNet3D(channels=(8, 16, 32), out_channels=2)
        >>> net(torch.zeros(1, 1, 32, 48, 32)).shape
        torch.Size([1, 2, 32, 48, 32])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int | Sequence[int]] | None = None,
        num_convs: int = 2,
        norm: str | tuple = "instance",
        act: str | tuple = "leakyrelu",
        dropout: float = 0.0,
        skip: bool = True,
        downsample: str = "conv",
        upsample: str = "deconv",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels={channels} must list at least two levels.")
        if strides is None:
            strides = (2,) * (len(channels) - 1)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides={tuple(strides)} needs len(channels) - 1 = {len(channels) - 1} entries.")
        if downsample not in ("conv", "pool"):
            raise ValueError(f"downsample={downsample!r} must be 'conv' or 'pool'.")
        if upsample not in ("deconv", "interpolate"):
            raise ValueError(f"upsample={upsample!r} must be 'deconv' or 'interpolate'.")
        if num_convs < 1:
            raise ValueError(f"num_convs={num_convs} must be >= 1.")
        resolve_norm(norm, channels[0])  # validate the name before building anything
        strides_ = [tuple(int(s) for s in ensure_tuple_rep(s, spatial_dims)) for s in strides]

        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder_channels = channels
        self.decoder_channels = tuple(reversed(channels[:-1]))
        self.spatial_divisor = tuple(math.prod(s[d] for s in strides_) for d in range(spatial_dims))
        self.skip = skip

        self.encoder = UNetEncoder(
            spatial_dims, in_channels, channels, strides_, num_convs, norm, act, dropout, downsample
        )
        self.decoder = UNetDecoder(spatial_dims, channels, strides_, num_convs, norm, act, dropout, upsample, skip)
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)
