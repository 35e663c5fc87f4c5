"""VoCo: predict where a random crop lies from its similarity to a grid of base crops.

Wu, Zhuang, Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical Image
Analysis", CVPR 2024. :class:`medvol.transforms.VoCoCropsd` cuts a volume into a grid of K base crops and draws
random crops of the same size with their overlap fractions with every base crop. Every crop goes through the
backbone's encoder; the average-pooled encoder maps, concatenated, go through a projector. The prediction for a
random crop and base crop k is ``relu(cos(crop, base_k))`` and is trained towards the overlap fraction
(:class:`medvol.losses.VoCoLoss`), while the base crops of a volume are pushed apart
(:class:`medvol.losses.VoCoRegularizationLoss`): ``loss = L_pred + lambda_reg * L_reg`` (1 and 1).

Batch keys: ``image_bases`` (B, K, C, *spatial), ``image_crops`` (B, N, C, *spatial), ``overlap`` (B, N, K).
"""

from __future__ import annotations

import torch

from medvol.losses import VoCoLoss, VoCoRegularizationLoss, voco_logits
from medvol.methods.base import SSLMethod
from medvol.networks import MLPHead

__all__ = ["VoCo"]


class VoCo(SSLMethod):
    """VoCo pretext task.

    Args:
        backbone: any :class:`~medvol.networks.Backbone` (VoCo: SwinUNETR); its encoder maps are pooled.
        hidden_dim: hidden size of the 3-layer projector (2048 in VoCo).
        proj_dim: output size of the projector (2048 in VoCo).
        lambda_reg: weight of the base-crop regularisation (1).
    """

    batch_keys = ("image_bases", "image_crops", "overlap")

    def __init__(self, backbone, hidden_dim: int = 2048, proj_dim: int = 2048, lambda_reg: float = 1.0):
        super().__init__(backbone)
        self.projector = MLPHead(sum(backbone.encoder_channels), hidden_dim, proj_dim, num_layers=3, norm="batch")
        self.prediction = VoCoLoss()
        self.regularization = VoCoRegularizationLoss()
        self.lambda_reg = lambda_reg

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projected, concatenated global average pools of every encoder map: (B, C, *s) -> (B, proj_dim)."""
        pooled = [f.flatten(2).mean(dim=2) for f in self.backbone.encode(x)]
        return self.projector(torch.cat(pooled, dim=1))

    def forward(self, batch: dict) -> dict:
        bases, crops, overlap = batch["image_bases"], batch["image_crops"], batch["overlap"]
        b, k, n = bases.shape[0], bases.shape[1], crops.shape[1]
        if tuple(overlap.shape) != (b, n, k):
            raise ValueError(f"overlap must be (B, N, K) = {(b, n, k)}, got {tuple(overlap.shape)}")
        z = self.embed(torch.cat([crops.flatten(0, 1), bases.flatten(0, 1)]))  # one pass: one set of BN stats
        z_crops, z_bases = z[: b * n].view(b, n, -1), z[b * n:].view(b, k, -1)
        logits = torch.stack([voco_logits(z_crops[i], z_bases[i]) for i in range(b)])  # (B, N, K)
        loss_pred = self.prediction(logits, overlap)
        loss_reg = self.regularization(z_bases)
        loss = loss_pred + self.lambda_reg * loss_reg
        return {"loss": loss, "loss_pred": loss_pred.detach(), "loss_reg": loss_reg.detach()}
