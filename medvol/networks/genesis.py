"""The 3D U-Net of Models Genesis (Zhou et al. 2019/2021) behind the medvol backbone interface.

The published PyTorch weights (``Genesis_Chest_CT.pt``, a ``{"state_dict": ...}`` of the ``UNet3D`` in
``pytorch/unet3d.py`` of MrGiovanni/ModelsGenesis) fit no other medvol network: each encoder level has two
3x3x3 convs whose first one has half the level's channels (1 -> 32 -> 64, 64 -> 64 -> 128, ...), the decoder's
transposed convs keep their channels (512 -> 512) and the skips are concatenated before two convs. This module
builds that architecture with medvol's prefixes and the published sub-module names after them::

    encoder.down_tr{64,128,256,512}.ops.{0,1}.{conv1,bn1}.*     (levels at 1/1, 1/2, 1/4, 1/8; max pooling between)
    decoder.up_tr{256,128,64}.up_conv.*                          transposed conv, stride 2
    decoder.up_tr{256,128,64}.ops.{0,1}.{conv1,bn1}.*           after the skip concatenation
    head.*                                                       the published ``out_tr.final_conv`` (1x1x1)

so the published names map by a prefix (:func:`genesis_to_medvol`; :func:`medvol.networks.load_pretrained`
detects the layout). The names say the channels of the published size (``base_channels=32``); another base
gives other numbers (``base_channels=4``: ``down_tr8`` ...).

Deliberate differences from the published module: ``forward`` returns logits (Models Genesis applies a sigmoid in
``out_tr``; apply it, or a softmax, in the loss), and the norm is an ordinary ``BatchNorm3d`` (running statistics at
evaluation) where the original ``ContBatchNorm3d`` always normalises with the batch's own statistics, also in
evaluation; ``norm="instance"``/``"group"`` keep the affine weights and drop the running statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from medvol.networks.factory import Backbone, register_backbone

__all__ = ["ModelsGenesisUNet3D", "genesis_to_medvol"]

_ACTS = {"relu": lambda c: nn.ReLU(), "prelu": nn.PReLU, "elu": lambda c: nn.ELU(inplace=True)}


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(max(g for g in range(1, 9) if channels % g == 0), channels)
    raise ValueError(f"norm={norm!r} is not supported by ModelsGenesisUNet3D; use 'batch', 'instance' or 'group'.")


class _ConvNormAct(nn.Module):
    """3x3x3 conv (padding 1), norm, activation: parameters ``conv1.*``, ``bn1.*`` (and ``activation.*`` for PReLU)."""

    def __init__(self, in_ch: int, out_ch: int, act: str, norm: str):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = _norm(norm, out_ch)
        self.activation = _ACTS[act](out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    def __init__(self, in_ch: int, mid: int, out_ch: int, act: str, norm: str):
        super().__init__()
        self.ops = nn.Sequential(_ConvNormAct(in_ch, mid, act, norm), _ConvNormAct(mid, out_ch, act, norm))


class _Up(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, act: str, norm: str):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        self.ops = nn.Sequential(_ConvNormAct(in_ch + skip_ch, out_ch, act, norm),
                                 _ConvNormAct(out_ch, out_ch, act, norm))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class _GenesisEncoder(nn.Module):
    def __init__(self, in_channels: int, base: int, act: str, norm: str):
        super().__init__()
        prev, self.names = in_channels, []
        for depth in range(4):
            out = base * 2 ** (depth + 1)
            name = f"down_tr{out}"
            self.add_module(name, _Down(prev, out // 2, out, act, norm))
            self.names.append(name)
            prev = out
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, name in enumerate(self.names):
            if i:
                x = self.pool(x)
            x = getattr(self, name).ops(x)
            out.append(x)
        return out


class _GenesisDecoder(nn.Module):
    def __init__(self, base: int, act: str, norm: str):
        super().__init__()
        self.names = []
        for depth in (2, 1, 0):
            out = base * 2 ** (depth + 1)
            name = f"up_tr{out}"
            self.add_module(name, _Up(2 * out, out, out, act, norm))
            self.names.append(name)

    def forward(self, features: list[torch.Tensor], num_levels: int) -> list[torch.Tensor]:
        x, out = features[-1], []
        for j, name in enumerate(self.names[:num_levels]):
            x = getattr(self, name)(x, features[-2 - j])
            out.append(x)
        return out


@register_backbone("models_genesis")
class ModelsGenesisUNet3D(Backbone):
    """The Models Genesis 3D U-Net (https://arxiv.org/abs/2004.07882), with feature taps; holds its published weights.

    With ``base_channels=b`` (32 published) and an input size S divisible by 8, ``encode`` gives 4 maps with
    ``encoder_channels = (2b, 4b, 8b, 16b)`` at S, S/2, S/4, S/8 and ``decode`` 3 maps with
    ``decoder_channels = (8b, 4b, 2b)`` at S/4, S/2, S.

    Args:
        in_channels: input channels (1 published).
        out_channels: channels of the logits of ``forward`` (1 published: the restoration output).
        base_channels: b above.
        act: ``"relu"`` (published), ``"prelu"`` or ``"elu"``.
        norm: ``"batch"`` (published keys, with running statistics), ``"instance"`` or ``"group"``.

    Example:
        >>> net = ModelsGenesisUNet3D(base_channels=4, out_channels=2)
        >>> [f.shape[1] for f in net.encode(torch.zeros(1, 1, 16, 16, 16))], net(torch.zeros(1, 1, 16, 16, 16)).shape
        ([8, 16, 32, 64], torch.Size([1, 2, 16, 16, 16]))
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, act: str = "relu",
                 norm: str = "batch") -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act={act!r} is not supported; use one of {tuple(_ACTS)}.")
        b = int(base_channels)
        self.spatial_dims = 3
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder_channels = (2 * b, 4 * b, 8 * b, 16 * b)
        self.decoder_channels = (8 * b, 4 * b, 2 * b)
        self.spatial_divisor = (8, 8, 8)
        self.encoder = _GenesisEncoder(in_channels, b, act, str(norm).lower())
        self.decoder = _GenesisDecoder(b, act, str(norm).lower())
        self.head = nn.Conv3d(2 * b, out_channels, kernel_size=1)


def genesis_to_medvol(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published Models Genesis ``UNet3D`` state dict (``module.`` already stripped) to this layout.

    ``down_tr*`` -> ``encoder.down_tr*``, ``up_tr*`` -> ``decoder.up_tr*``, ``out_tr.final_conv.*`` -> ``head.*``;
    other keys keep their names (and are reported as unexpected by ``load_pretrained``).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("down_tr"):
            out[f"encoder.{key}"] = value
        elif key.startswith("up_tr"):
            out[f"decoder.{key}"] = value
        elif key.startswith("out_tr.final_conv."):
            out["head." + key[len("out_tr.final_conv."):]] = value
        else:
            out[key] = value
    return out
