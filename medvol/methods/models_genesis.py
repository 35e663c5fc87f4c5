"""Models Genesis: a U-Net restores a sub-volume from a distorted copy of it.

Zhou, Sodha, Pang, Gotway, Liang, "Models Genesis", Medical Image Analysis 2021 (MICCAI 2019). Every crop is
distorted by local pixel shuffling, a non-linear (Bezier) intensity transform and in- or out-painting
(:func:`medvol.transforms.models_genesis_distortion`, the same building blocks as CAiD's context distortion);
the full U-Net, with a sigmoid on its output, restores the undistorted crop:
``loss = MSE(sigmoid(UNet(distorted)), crop)`` (:class:`~medvol.losses.RestorationLoss`). Encoder and decoder
are both trained and transferred.

Batch keys: ``image`` (the distorted crop) and ``target`` (the crop after the spatial steps only).
"""

from __future__ import annotations

import torch

from medvol.losses import RestorationLoss
from medvol.methods.base import SSLMethod

__all__ = ["ModelsGenesis"]


class ModelsGenesis(SSLMethod):
    """Models Genesis pretext task (image restoration).

    Args:
        backbone: U-Net-style :class:`~medvol.networks.Backbone` with ``out_channels == in_channels``.
        restoration: ``"mse"`` (Models Genesis) or ``"l1"``.

    Raises:
        ValueError: when the backbone cannot restore its input (out_channels != in_channels).

    Example:
        >>> from medvol.networks import build_backbone
        >>> method = ModelsGenesis(build_backbone("unet", channels=(4, 8)))
        >>> batch = {"image": torch.rand(2, 1, 8, 8, 8), "target": torch.rand(2, 1, 8, 8, 8)}
        >>> method(batch)["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image", "target")
    find_unused_parameters = False  # encoder, decoder and head all get a gradient at every step

    def __init__(self, backbone, restoration: str = "mse"):
        super().__init__(backbone)
        if backbone.out_channels != backbone.in_channels:
            raise ValueError(f"Models Genesis restores its input: the backbone needs out_channels == in_channels "
                             f"({backbone.in_channels}), got {backbone.out_channels}")
        self.restoration = RestorationLoss(restoration)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The restored image ``sigmoid(UNet(x))``, in [0, 1]."""
        return torch.sigmoid(self.backbone(x))

    def forward(self, batch: dict) -> dict:
        return {"loss": self.restoration(self.restore(batch["image"]), batch["target"])}
