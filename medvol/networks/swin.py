"""SwinUNETR (MONAI) behind the medvol backbone interface.

MONAI's ``SwinUNETR`` is built once and its sub-modules are re-parented, without copying weights, under the
three medvol prefixes (names after the prefix are SwinUNETR's own)::

    encoder.swinViT.*      Swin transformer (patch embedding + 4 stages)
    encoder.encoder1.*     conv block on the image            -> skip at 1/1
    encoder.encoder2.*     conv block on stage-0 tokens       -> skip at 1/2
    encoder.encoder3.*     conv block on stage-1 tokens       -> skip at 1/4
    encoder.encoder4.*     conv block on stage-2 tokens       -> skip at 1/8
    encoder.encoder10.*    conv block on stage-4 tokens       -> bottleneck at 1/32
    decoder.decoder5..1.*  up blocks, 1/16 -> 1/1
    head.*                 SwinUNETR's ``out`` (1x1x1 conv)

The stage-3 tokens (1/16) are a skip without a conv block, exactly as in ``SwinUNETR.forward``. Weights move
between the two layouts with :meth:`SwinBackbone.from_swinunetr_state_dict` and
:meth:`SwinBackbone.to_swinunetr_state_dict` (e.g. for a model-zoo ``swin_unetr`` checkpoint); the published
self-supervised Swin weights (``model_swinvit.pt``) map with :meth:`SwinBackbone.from_swinvit_ssl_state_dict`.
:func:`medvol.networks.load_pretrained` recognises both layouts by their keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from medvol.networks.factory import Backbone, register_backbone, resolve_norm

__all__ = ["SwinBackbone"]

_ENCODER = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
_DECODER = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")
# pretext heads of the published self-supervised Swin checkpoint (Tang et al.) and of research-contributions' SSLHead
_SSL_HEADS = ("rotation_head.", "contrastive_head.", "convTrans3d.", "rotation_pre.", "contrastive_pre.", "conv.")


class _SwinEncoder(nn.Module):
    def __init__(self, net: SwinUNETR) -> None:
        super().__init__()
        for name in _ENCODER:
            self.add_module(name, getattr(net, name))
        self.normalize = net.normalize

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.swinViT(x, self.normalize)  # tokens at 1/2, 1/4, 1/8, 1/16, 1/32
        return [
            self.encoder1(x),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            hidden[3],
            self.encoder10(hidden[4]),
        ]


class _SwinDecoder(nn.Module):
    def __init__(self, net: SwinUNETR) -> None:
        super().__init__()
        for name in _DECODER:
            self.add_module(name, getattr(net, name))

    def forward(self, features: list[torch.Tensor], num_levels: int) -> list[torch.Tensor]:
        x, out = features[-1], []
        for j, name in enumerate(_DECODER[:num_levels]):
            x = getattr(self, name)(x, features[-2 - j])
            out.append(x)
        return out


@register_backbone("swinunetr")
class SwinBackbone(Backbone):
    """SwinUNETR (Hatamizadeh et al. 2022, https://arxiv.org/abs/2201.01266) with feature taps.

    With ``feature_size=F`` and an input of size S (divisible by 32), ``encode`` gives 6 maps with
    ``encoder_channels = (F, F, 2F, 4F, 8F, 16F)`` at S, S/2, S/4, S/8, S/16, S/32, and ``decode`` gives 5 maps with
    ``decoder_channels = (8F, 4F, 2F, F, F)`` at S/16, S/8, S/4, S/2, S. ``forward`` equals ``SwinUNETR.forward``.

    Args:
        in_channels: input channels.
        out_channels: channels of the logits returned by ``forward``.
        feature_size: F above; divisible by 12 (MONAI's requirement).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window size.
        norm: norm of the convolutional blocks: ``"instance"`` (SwinUNETR's default), ``"group"`` or ``"batch"``.
        use_checkpoint: gradient checkpointing in the transformer (less memory, slower).
        swin_kwargs: further ``monai.networks.nets.SwinUNETR`` arguments (``dropout_path_rate``, ``use_v2``, ...).

    Raises:
        ValueError: from MONAI for an invalid ``feature_size``; ``encode``/``forward`` raise it when an input size
            is not divisible by 32.

    Example:
        >>> net = SwinBackbone(feature_size=12, depths=(1, 1, 1, 1))
        >>> [f.shape[1] for f in net.encode(torch.zeros(1, 1, 32, 32, 64))]
        [12, 12, 24, 48, 96, 192]
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        norm: str | tuple = "instance",
        use_checkpoint: bool = False,
        **swin_kwargs: Any,
    ) -> None:
        super().__init__()
        spatial_dims = int(swin_kwargs.get("spatial_dims", 3))
        patch_size = int(swin_kwargs.get("patch_size", 2))
        net = SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            norm_name=resolve_norm(norm, feature_size),  # every conv block has a multiple of F channels
            use_checkpoint=use_checkpoint,
            **swin_kwargs,
        )
        f = feature_size
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder_channels = (f, f, 2 * f, 4 * f, 8 * f, 16 * f)
        self.decoder_channels = (8 * f, 4 * f, 2 * f, f, f)
        self.spatial_divisor = (patch_size**5,) * spatial_dims
        self.encoder = _SwinEncoder(net)
        self.decoder = _SwinDecoder(net)
        self.head = net.out  # the SwinUNETR instance itself is not kept: each weight has exactly one name

    @staticmethod
    def from_swinunetr_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a ``monai.networks.nets.SwinUNETR`` state dict to this layout (other keys are dropped)."""
        out = {}
        for key, value in state_dict.items():
            top, _, rest = key.partition(".")
            if top in _ENCODER:
                out[f"encoder.{key}"] = value
            elif top in _DECODER:
                out[f"decoder.{key}"] = value
            elif top == "out":
                out[f"head.{rest}"] = value
        return out

    @staticmethod
    def from_swinvit_ssl_state_dict(
        state_dict: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Rename the self-supervised Swin checkpoint of Tang et al. 2022 (MONAI's ``model_swinvit.pt``) to this layout.

        The published file is ``{"state_dict": ...}`` with keys ``module.patch_embed.proj.*``,
        ``module.layers{1-4}.0.blocks.{b}.{norm1,attn.*,norm2,mlp.fc1,mlp.fc2}.*``,
        ``module.layers{1-4}.0.downsample.{reduction,norm}.*`` (what ``SwinUNETR.load_from`` reads) and the pretext
        heads ``module.rotation_head.*``, ``module.contrastive_head.*``, ``module.convTrans3d.*``. Pass the keys
        without ``module.``; a ``swinViT.``/``swin_vit.`` prefix (research-contributions' ``SSLHead``) is accepted.

        Returns:
            ``(state, dropped)``: the transformer's weights as ``encoder.swinViT.*`` (``mlp.fc1``/``fc2`` become MONAI's
            ``mlp.linear1``/``linear2``), and the pretext-head keys, which have no place in this backbone. Any other
            key is passed through unchanged (``load_pretrained`` reports it as unexpected).
        """
        out, dropped = {}, []
        for key, value in state_dict.items():
            name = key
            for prefix in ("swinViT.", "swin_vit."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name.startswith(_SSL_HEADS):
                dropped.append(key)
            elif name.startswith(("patch_embed.", "layers")):
                name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
                out["encoder.swinViT." + name] = value
            else:
                out[key] = value
        return out, dropped

    def to_swinunetr_state_dict(self) -> dict[str, torch.Tensor]:
        """This network's weights with ``monai.networks.nets.SwinUNETR`` key names."""
        out = {}
        for key, value in self.state_dict().items():
            prefix, _, rest = key.partition(".")
            out["out." + rest if prefix == "head" else rest] = value
        return out
