"""The backbone interface shared by every encoder-decoder, its registry and ``build_backbone``.

Every backbone (``UNet3D``, ``SwinBackbone``) subclasses :class:`Backbone`, so a method can tap features without
knowing which network it trains:

- ``encode(x)`` returns the encoder feature maps, fine -> coarse (the last one is the bottleneck);
- ``decode(features, num_levels)`` returns the decoder feature maps, coarse -> fine (the last one is full size);
- ``forward(x)`` returns plain logits ``(B, out_channels, *spatial)``, so the network is a valid MONAI bundle
  ``network_def`` (``verify_net_in_out`` and ``ckpt_export`` need a tensor output).

Parameters live under three prefixes, ``encoder.``, ``decoder.`` and ``head.``, so that encoder-only (or
encoder + decoder) transfer is a prefix filter: see :func:`medvol.networks.load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medvol.errors import ConfigError

__all__ = ["Backbone", "BACKBONES", "DEFAULT_OPTIONS", "register_backbone", "build_backbone", "resolve_norm"]

NORMS = ("instance", "group", "batch")


def resolve_norm(norm: str | tuple, channels: int) -> str | tuple:
    """Turn a medvol norm name into a MONAI ``Norm`` spec for a layer with ``channels`` channels.

    ``"group"`` uses the largest number of groups <= 8 that divides ``channels`` (8 for 16/32/64..., 6 for 12).
    ``"instance"`` is MONAI's default (no affine parameters), so SwinUNETR checkpoints keep their key layout.

    Args:
        norm: ``"instance"``, ``"group"``, ``"batch"`` (case-insensitive), or a MONAI spec tuple such as
            ``("instance", {"affine": True})``, which is returned unchanged.
        channels: number of channels the norm layer normalises.

    Raises:
        ValueError: when ``norm`` is not one of the names above.
    """
    if isinstance(norm, tuple):
        return norm
    name = str(norm).lower()
    if name not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS} or a MONAI norm tuple.")
    if name == "group":
        return ("group", {"num_groups": max(g for g in range(1, 9) if channels % g == 0)})
    return name


class Backbone(nn.Module):
    """Base class of the encoder-decoder backbones (see the module docstring for the contract).

    Subclasses set ``in_channels``, ``out_channels``, ``spatial_dims`` (ints), ``encoder_channels`` (fine ->
    coarse), ``decoder_channels`` (coarse -> fine), ``spatial_divisor`` (per spatial dimension; tuples of ints)
    and the sub-modules ``encoder`` (``forward(x) -> list``), ``decoder`` (``forward(features, num_levels) ->
    list``) and ``head``.

    ``forward`` and ``encode`` compile with ``torch.jit.script`` (MONAI's ``ckpt_export``; ``encode`` is not
    exported, so that a backbone MONAI cannot script, e.g. SwinUNETR, can still be traced). The attributes are
    deliberately not declared as class annotations: TorchScript would read ``encoder: nn.Module`` as the
    attribute's type and fail. The input check with its readable message runs in eager mode only; a scripted
    module fails inside the convolutions.
    """

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` when ``x`` is not ``(B, in_channels, *spatial)`` with divisible spatial sizes."""
        name = type(self).__name__
        if x.ndim != self.spatial_dims + 2:
            ndim = self.spatial_dims + 2
            raise ValueError(f"{name}: expected a {ndim}D input (B, C, *spatial), got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channel(s), got {x.shape[1]}.")
        size = tuple(x.shape[2:])
        for dim, (s, d) in enumerate(zip(size, self.spatial_divisor)):
            if s % d:
                raise ValueError(
                    f"{name}: input spatial size {size} is not divisible by {d} along spatial dimension {dim} "
                    f"(size {s}); pad or crop every spatial size to a multiple of {self.spatial_divisor}."
                )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps, fine -> coarse; the last one is the bottleneck (``len(encoder_channels)`` maps)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.encoder(x)

    def decode(self, features: Sequence[torch.Tensor], num_levels: int | None = None) -> list[torch.Tensor]:
        """Decoder feature maps, coarse -> fine, using the skips from ``features`` (the output of ``encode``).

        Args:
            features: the encoder maps returned by :meth:`encode`.
            num_levels: run only the first ``num_levels`` decoder blocks (Chaitanya et al.'s local stage);
                ``None`` runs all ``len(decoder_channels)`` blocks.

        Raises:
            ValueError: when ``features`` has the wrong length or ``num_levels`` is out of range.
        """
        n_enc, n_dec = len(self.encoder_channels), len(self.decoder_channels)
        if len(features) != n_enc:
            raise ValueError(f"{type(self).__name__}.decode: expected {n_enc} encoder maps, got {len(features)}.")
        levels = n_dec if num_levels is None else int(num_levels)
        if not 1 <= levels <= n_dec:
            raise ValueError(f"num_levels={num_levels!r} must be between 1 and {n_dec} (or None for all).")
        return self.decoder(list(features), levels)

    def forward_features(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"encoder": encode(x), "decoder": decode(encode(x))}``."""
        enc = self.encode(x)
        return {"encoder": enc, "decoder": self.decode(enc)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, *spatial)``: the 1x1 ``head`` applied to the last (full-size) decoder map."""
        return self.head(self.decoder(self.encode(x), len(self.decoder_channels))[-1])

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``encoder.*`` entries of ``state_dict()`` (prefix kept, so ``load_pretrained`` accepts it)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("encoder.")}


BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator adding a backbone to :data:`BACKBONES` under the lower-case ``name``."""

    def add(cls: type[Backbone]) -> type[Backbone]:
        BACKBONES[name.lower()] = cls
        return cls

    return add


#: medvol's default settings per backbone (what every bundle trains), under ``options`` and keyword arguments:
#: a 4-level U-Net with instance norm, and a small SwinUNETR (feature size 12) for volumes of a few cm.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "unet": {"channels": (16, 32, 64, 128), "norm": "instance"},
    "swinunetr": {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "unetr": {"feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 6},
}


def build_backbone(name: str = "unet", options: Mapping[str, Mapping[str, Any]] | None = None,
                   **kwargs: Any) -> Backbone:
    """Build a registered backbone by name.

    The constructor gets :data:`DEFAULT_OPTIONS` for ``name``, updated by ``options[name]`` (a bundle's
    ``backbone_options``: settings per backbone name, so switching ``backbone`` needs no other change), updated
    by ``kwargs``.

    Args:
        name: ``"unet"`` (:class:`~medvol.networks.UNet3D`), ``"swinunetr"``
            (:class:`~medvol.networks.SwinBackbone`) or ``"unetr"`` (:class:`~medvol.networks.UNETRBackbone`),
            case-insensitive.
        options: settings keyed by lower-case backbone name; entries of other backbones are ignored.
        kwargs: passed to the backbone's constructor (e.g. ``in_channels``, ``out_channels``).

    Raises:
        ConfigError: when ``name`` is not registered (the message lists the valid names).

    Example:
        >>> net = build_backbone("unet", channels=(8, 16), out_channels=2)
        >>> net.encoder_channels
        (8, 16)
    """
    key = str(name).lower()
    if key not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}.")
    chosen = dict((options or {}).get(key) or {})
    return BACKBONES[key](**{**DEFAULT_OPTIONS.get(key, {}), **chosen, **kwargs})
