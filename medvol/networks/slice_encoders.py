"""2D slice encoders for 2.5D samples (LeCL / CLEAR), without torchvision or timm.

Each encoder maps ``(B, C, H, W)`` to embeddings ``(B, out_dim)`` and has the attribute ``out_dim``; a MoCo v3
projector / predictor (:class:`~medvol.networks.ProjectionHead`, ...) goes on top.

- :class:`ResNetSliceEncoder`: MONAI's ``ResNet`` (2D, ImageNet-style stem), global-average-pooled features.
- :class:`ViTSliceEncoder`: MONAI's ``ViT`` (2D), class token or mean of the patch tokens; optional
  convolutional stem (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021; used by
  MoCo v3, Chen, Xie and He, ICCV 2021).
- :class:`GatedCNNSliceEncoder`: MambaOut (Yu and Wang, "MambaOut: Do We Really Need Mamba for Vision?",
  arXiv:2405.07992, 2024): stages of Gated CNN blocks, written from the paper's description.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers import DropPath
from monai.networks.nets import ViT
from monai.networks.nets.resnet import ResNet
from torch import nn
from torch.nn import functional as F

from medvol.errors import ConfigError

__all__ = [
    "ResNetSliceEncoder",
    "ViTSliceEncoder",
    "GatedCNNBlock",
    "GatedCNNSliceEncoder",
    "SLICE_ENCODERS",
    "build_slice_encoder",
]

_RESNETS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


@torch.jit.unused
def _check_input(module: nn.Module, x: torch.Tensor, in_channels: int) -> None:
    """Eager-mode input check (the encoders call it only when not scripted: TorchScript has no ``type()``)."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{type(module).__name__}: expected (B, {in_channels}, H, W), got {tuple(x.shape)}.")


class ResNetSliceEncoder(nn.Module):
    """2D ResNet-18/34/50 from ``monai.networks.nets.resnet.ResNet`` without its classifier.

    Args:
        in_channels: input channels (2.5D context x windows).
        depth: 18, 34 or 50.
        out_dim: add a linear layer to this size; ``None`` returns the pooled features (512, or 2048 for 50).
        conv1_stride: stride of the 7x7 stem convolution (2 = torchvision's ImageNet layout).
        no_max_pool: drop the stem max-pool (keeps more resolution for small slices).
        widen_factor: channel multiplier of every stage (MONAI's argument; < 1 for small tests).
        norm: MONAI norm name of the blocks (``"batch"``; ``"group"``/``"instance"`` for tiny batches).

    Raises:
        ValueError: for an unsupported ``depth``.
    """

    def __init__(self, in_channels: int, depth: int = 18, out_dim: int | None = None, conv1_stride: int = 2,
                 no_max_pool: bool = False, widen_factor: float = 1.0, norm: str | tuple = "batch") -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {depth!r}.")
        block, layers = _RESNETS[depth]
        self.in_channels = int(in_channels)
        self.resnet = ResNet(block, layers, [64, 128, 256, 512], spatial_dims=2, n_input_channels=in_channels,
                             conv1_t_size=7, conv1_t_stride=conv1_stride, no_max_pool=no_max_pool,
                             shortcut_type="B", widen_factor=widen_factor, feed_forward=False,
                             bias_downsample=False, norm=norm)
        features = int(512 * widen_factor) * (4 if block == "bottleneck" else 1)
        self.proj = nn.Identity() if out_dim is None else nn.Linear(features, out_dim)
        self.out_dim = features if out_dim is None else int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_input(self, x, self.in_channels)
        return self.proj(self.resnet(x))  # MONAI's ResNet pools and flattens when it has no fc: (B, features)


def _conv_stem(in_channels: int, hidden_size: int, patch_size: int) -> nn.Sequential:
    """3x3 stride-2 conv + BN + ReLU, log2(patch_size) times (channels doubling up to ``hidden_size``), then 1x1."""
    n = int(round(math.log2(patch_size)))
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"conv_stem needs a power-of-two patch_size >= 2, got {patch_size!r}.")
    layers, ch = [], in_channels
    for i in range(n):
        out = max(1, hidden_size >> (n - 1 - i))  # e.g. 384: 48, 96, 192, 384 for patch 16
        layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        ch = out
    layers.append(nn.Conv2d(ch, hidden_size, 1))
    return nn.Sequential(*layers)


class ViTSliceEncoder(nn.Module):
    """2D Vision Transformer from ``monai.networks.nets.ViT`` returning one embedding per image.

    Inputs must be exactly ``img_size`` (learned/fixed position embeddings). ``pool="cls"`` prepends MONAI's
    class token (no position embedding on it) and returns its final normalised state (MoCo v3); ``"mean"``
    averages the normalised patch tokens. ``conv_stem=True`` replaces the ``patch_size`` patchify convolution by
    ``log2(patch_size)`` 3x3 stride-2 conv-BN-ReLU layers and a 1x1 conv (MoCo v3's ViT "conv stem"; they
    removed one transformer block to keep the compute: pass ``num_layers - 1`` yourself).

    Args:
        in_channels: input channels.
        img_size: input size (int or (H, W)).
        patch_size: patch side.
        hidden_size, num_layers, num_heads: transformer width, depth, heads (default: a 6-layer ViT-S width).
        mlp_dim: MLP width; ``None`` = 4 x hidden_size.
        pool: ``"cls"`` or ``"mean"``.
        pos_embed_type: ``"sincos"`` (fixed 2D sin-cos, as MoCo v3) or ``"learnable"``.
        conv_stem: use the convolutional stem described above.
        qkv_bias: bias of the attention projections (True as in MoCo v3's ViTs).
        dropout_rate: dropout in the transformer.
        fused_attention: use ``torch.nn.functional.scaled_dot_product_attention`` (same result, less memory and
            faster, flash kernels on GPU). Only taken when ``dropout_rate == 0``: MONAI's fused path applies
            attention dropout in eval mode too.

    Note:
        MONAI's transformer blocks always create a ``norm_cross_attn`` LayerNorm, unused without cross
        attention; it is replaced by ``nn.Identity`` here so every parameter gets a gradient (DDP without
        ``find_unused_parameters``). State dicts therefore lack those keys compared with a plain MONAI ``ViT``.

    Raises:
        ValueError: for an unknown ``pool``, or ``conv_stem`` with a patch size that is not a power of two.
    """

    def __init__(self, in_channels: int, img_size: int | Sequence[int] = 224, patch_size: int = 16,
                 hidden_size: int = 384, num_layers: int = 6, num_heads: int = 6, mlp_dim: int | None = None,
                 pool: str = "cls", pos_embed_type: str = "sincos", conv_stem: bool = False, qkv_bias: bool = True,
                 dropout_rate: float = 0.0, fused_attention: bool = True) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}.")
        self.in_channels, self.pool, self.out_dim = int(in_channels), pool, int(hidden_size)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.vit = ViT(in_channels, self.img_size, patch_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim or 4 * hidden_size, num_layers=num_layers, num_heads=num_heads,
                       pos_embed_type=pos_embed_type, classification=pool == "cls", dropout_rate=dropout_rate,
                       spatial_dims=2, post_activation=None, qkv_bias=qkv_bias)
        if pool == "cls":
            del self.vit.classification_head  # keep the class token, drop the classifier
            nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        if conv_stem:
            self.vit.patch_embedding.patch_embeddings = _conv_stem(in_channels, hidden_size, patch_size)
        for block in self.vit.blocks:
            block.norm_cross_attn = nn.Identity()  # unused (no cross attention)
            block.attn.use_flash_attention = bool(fused_attention and dropout_rate == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_input(self, x, self.in_channels)
            if tuple(x.shape[2:]) != self.img_size:
                raise ValueError(f"ViTSliceEncoder: expected images of size {self.img_size}, got {tuple(x.shape[2:])}.")
        tokens = self.vit.patch_embedding(x)  # (B, N, D)
        if self.pool == "cls":
            tokens = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        for block in self.vit.blocks:
            tokens = block(tokens)
        tokens = self.vit.norm(tokens)
        return tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm, not super().forward(): TorchScript cannot compile a call to the parent's forward
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class GatedCNNBlock(nn.Module):
    """MambaOut's Gated CNN block on channels-last maps ``(B, H, W, C)``; the output has the input's shape.

    ``y = x + DropPath(W2 (act(g) * [i, DWConv(c)]))`` with ``[g, i, c] = split(W1 LayerNorm(x))``: ``W1``
    expands ``C`` to ``2 * hidden`` (``hidden = expansion_ratio * C``), ``g`` (hidden) is the gate, the value
    is ``i`` (unchanged) concatenated with ``c`` (``conv_ratio * C`` channels) after a depthwise
    ``kernel_size`` convolution (the token mixer), and ``W2`` projects ``hidden`` back to ``C``.

    Args:
        dim: channels C.
        expansion_ratio: hidden width over C (8/3 in MambaOut).
        kernel_size: depthwise kernel (7).
        conv_ratio: fraction of C that goes through the depthwise convolution (1.0 in MambaOut).
        drop_path: stochastic depth probability of the residual branch.
        zero_init: zero ``W2`` so the block is the identity at initialisation.
    """

    def __init__(self, dim: int, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 drop_path: float = 0.0, zero_init: bool = False) -> None:
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(f"conv_ratio * dim must be in (0, hidden={hidden}], got {conv_channels}.")
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2,
                              groups=conv_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch (before drop path) for ``(B, H, W, C)`` input."""
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv runs channels-first
        return self.fc2(self.act(g) * torch.cat([i, c], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.branch(x))


class GatedCNNSliceEncoder(nn.Module):
    """MambaOut-style 2D encoder: stem (stride 4), stages of :class:`GatedCNNBlock`, mean pool + LayerNorm.

    Stem: 3x3 stride-2 conv to ``dims[0] / 2`` -> LayerNorm -> GELU -> 3x3 stride-2 conv to ``dims[0]`` ->
    LayerNorm. Between stages: 3x3 stride-2 conv + LayerNorm. Output: global average pool of the last stage,
    then LayerNorm: ``(B, dims[-1])``. Drop path rates grow linearly from 0 to ``drop_path_rate`` over blocks.
    MambaOut-Femto is ``dims=(48, 96, 192, 288), depths=(3, 3, 9, 3)``; the default here is smaller.

    Args:
        in_channels: input channels.
        dims: channels of each stage.
        depths: blocks per stage.
        expansion_ratio, kernel_size, conv_ratio: see :class:`GatedCNNBlock`.
        drop_path_rate: stochastic depth of the last block.
        zero_init: zero-initialise every block's output projection (blocks start as identities).

    Raises:
        ValueError: when ``dims`` and ``depths`` differ in length or are empty.
    """

    def __init__(self, in_channels: int, dims: Sequence[int] = (32, 64, 128, 256), depths: Sequence[int] = (2, 2, 4, 2),
                 expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 drop_path_rate: float = 0.0, zero_init: bool = False) -> None:
        super().__init__()
        dims, depths = [int(d) for d in dims], [int(d) for d in depths]
        if not dims or len(dims) != len(depths):
            raise ValueError(f"dims and depths must be non-empty and of equal length, got {dims}, {depths}.")
        self.in_channels, self.out_dim = int(in_channels), dims[-1]
        half = max(1, dims[0] // 2)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, half, 3, 2, 1), _LayerNorm2d(half), nn.GELU(),
                                  nn.Conv2d(half, dims[0], 3, 2, 1), _LayerNorm2d(dims[0]))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.downsamples, self.stages = nn.ModuleList(), nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.downsamples.append(nn.Identity() if i == 0 else
                                    nn.Sequential(nn.Conv2d(dims[i - 1], dim, 3, 2, 1), _LayerNorm2d(dim)))
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                GatedCNNBlock(dim, expansion_ratio, kernel_size, conv_ratio, rates[first + j], zero_init)
                for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.apply(self._init_weights)
        if zero_init:  # _init_weights overwrote them
            for m in self.modules():
                if isinstance(m, GatedCNNBlock):
                    nn.init.zeros_(m.fc2.weight)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_input(self, x, self.in_channels)
        x = self.stem(x)  # (B, dims[0], H/4, W/4)
        for down, stage in zip(self.downsamples, self.stages):
            x = stage(down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # blocks run channels-last
        return self.norm(x.mean(dim=(2, 3)))


SLICE_ENCODERS = ("resnet18", "resnet34", "resnet50", "vit", "mambaout")


def build_slice_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a 2D slice encoder by name.

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"vit"`` or ``"mambaout"`` (case-insensitive).
        kwargs: passed to the encoder (``in_channels`` is required).

    Raises:
        ConfigError: for an unknown name (the valid names are listed), or ``depth`` given with a ResNet name.

    Example:
        >>> enc = build_slice_encoder("mambaout", in_channels=3)
        >>> enc(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 256])
    """
    key = str(name).lower()
    if key.startswith("resnet") and key in SLICE_ENCODERS:
        if "depth" in kwargs:
            raise ConfigError(f"slice encoder {name!r} fixes the depth; do not pass depth={kwargs['depth']!r}.")
        return ResNetSliceEncoder(depth=int(key[len("resnet"):]), **kwargs)
    if key == "vit":
        return ViTSliceEncoder(**kwargs)
    if key == "mambaout":
        return GatedCNNSliceEncoder(**kwargs)
    raise ConfigError(f"unknown slice encoder {name!r}; valid names: {', '.join(SLICE_ENCODERS)}.")
