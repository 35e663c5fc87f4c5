"""PCRLv2: multi-scale pixel restoration and siamese feature comparison on a skip-free U-Net.

Zhou, Lu, Chen, Yu, "A Unified Visual Information Preservation Framework for Self-supervised Pre-training in
Medical Image Analysis" (PCRLv2), TPAMI 2023. Two overlapping global crops (IoU > 0.3) and a few small local
crops of a volume are intensity-augmented (the global ones also locally shuffled). The network is a U-Net
*without skip connections* (``UNet3D(skip=False)``), so the encoder alone must carry what the decoder restores.
At every decoder scale s the pooled feature gives a projection ``z_s = BN(GAP(d_s))`` and a prediction
``p_s = MLP(z_s)``, and a 3x3x3 conv restores the image at that scale (up-sampled to full size). Per step, with
one random scale s per comparison::

    L = MSE(sigmoid(head(d_full(x1))), t1)                                 pixel restoration
      + (C(p_s(x1), z_s(x2)) + C(p_s(x2), z_s(x1))) / 2                    global siamese, C = -cos(., sg(.))
      + beta * MSE(restored_s(x1), t1)                                     restoration at scale s
      + mean over local views l and global views g of (C(p(g), z(l)) + C(p(l), z(g))) / 2

with ``beta = (1 + cos(pi * epoch / beta_epochs)) / 2`` (beta_epochs = 240 in the paper's code). ``t1`` is view
1 after the spatial crop, before the intensity augmentation. Only the encoder transfers to a U-Net with skips
(the few-shot bundle with ``pretrained_prefixes: ["encoder."]``).

Batch keys: ``image_v1``, ``image_v2``, ``target_v1`` and ``image_local0`` .. ``image_local{num_local-1}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medvol.engines.handlers import EpochHookHandler
from medvol.losses import RestorationLoss, SiameseCosineLoss
from medvol.methods.base import SSLMethod
from medvol.networks import MLPHead

__all__ = ["PCRLv2"]


class PCRLv2(SSLMethod):
    """PCRLv2 pretext task.

    Args:
        backbone: a :class:`~medvol.networks.UNet3D` built with ``skip=False`` and ``out_channels ==
            in_channels`` (its head restores the image).
        num_local: local views per volume (6 in PCRLv2).
        beta_epochs: epochs over which the weight of the scale-s restoration decays from 1 to 0 (240).

    Raises:
        ValueError: for a backbone with skip connections or one that cannot restore its input.
    """

    def __init__(self, backbone, num_local: int = 6, beta_epochs: int = 240):
        super().__init__(backbone)
        if getattr(backbone, "skip", True):
            raise ValueError("PCRLv2 pretrains a U-Net without skip connections: build the backbone with "
                             "skip=False (backbone_options {'unet': {'skip': false}})")
        if backbone.out_channels != backbone.in_channels:
            raise ValueError(f"PCRLv2 restores its input: the backbone needs out_channels == in_channels "
                             f"({backbone.in_channels}), got {backbone.out_channels}")
        if num_local < 0 or beta_epochs < 1:
            raise ValueError(f"num_local must be >= 0 and beta_epochs >= 1, got {num_local}, {beta_epochs}")
        self.num_local, self.beta_epochs = int(num_local), int(beta_epochs)
        self.batch_keys = ("image_v1", "image_v2", "target_v1", *(f"image_local{i}" for i in range(num_local)))
        chans = backbone.decoder_channels
        self.projections = nn.ModuleList(nn.BatchNorm1d(c) for c in chans)
        self.predictors = nn.ModuleList(MLPHead(c, 2 * c, c, num_layers=2, norm="batch") for c in chans)
        self.restorers = nn.ModuleList(nn.Conv3d(c, backbone.in_channels, 3, padding=1) for c in chans)
        self.siamese = SiameseCosineLoss()
        self.restoration = RestorationLoss("mse")
        self.epoch = 1

    def train_handlers(self) -> list:
        return [EpochHookHandler()]

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def beta(self) -> float:
        """Weight of the restoration at the sampled scale this epoch (1 at the first epoch, 0 at beta_epochs)."""
        return 0.5 * (1.0 + math.cos(math.pi * min(self.epoch - 1, self.beta_epochs) / self.beta_epochs))

    def _scales(self, x: torch.Tensor):
        """Decoder maps and their (projection, prediction) per scale, coarse -> fine."""
        decoded = self.backbone.decode(self.backbone.encode(x))
        heads = []
        for d, proj, pred in zip(decoded, self.projections, self.predictors):
            z = proj(d.flatten(2).mean(dim=2))
            heads.append((z, pred(z)))
        return decoded, heads

    def _compare(self, a, b) -> torch.Tensor:
        """Symmetric siamese loss at a random scale between two lists of (projection, prediction)."""
        s = int(torch.randint(len(a), (1,)))
        (za, pa), (zb, pb) = a[s], b[s]
        return 0.5 * (self.siamese(pa, zb) + self.siamese(pb, za))

    def forward(self, batch: dict) -> dict:
        x1, x2, target = batch["image_v1"], batch["image_v2"], batch["target_v1"]
        n = x1.shape[0]
        decoded, heads = self._scales(torch.cat([x1, x2]))
        g1 = [(z[:n], p[:n]) for z, p in heads]
        g2 = [(z[n:], p[n:]) for z, p in heads]
        restored = torch.sigmoid(self.backbone.head(decoded[-1][:n]))
        loss_restore = self.restoration(restored, target)
        s = int(torch.randint(len(heads), (1,)))
        (z1, p1), (z2, p2) = g1[s], g2[s]
        loss_global = 0.5 * (self.siamese(p1, z2) + self.siamese(p2, z1))
        scale = torch.sigmoid(F.interpolate(self.restorers[s](decoded[s][:n]), size=target.shape[2:],
                                            mode="trilinear", align_corners=False))
        loss_scale = self.restoration(scale, target)
        loss_local = loss_restore.new_zeros(())
        if self.num_local:
            local = torch.cat([batch[f"image_local{i}"] for i in range(self.num_local)])
            _, local_heads = self._scales(local)
            for i in range(self.num_local):
                view = [(z[i * n:(i + 1) * n], p[i * n:(i + 1) * n]) for z, p in local_heads]
                loss_local = loss_local + self._compare(g1, view) + self._compare(g2, view)
            loss_local = loss_local / (2 * self.num_local)
        loss = loss_restore + loss_global + self.beta * loss_scale + loss_local
        return {"loss": loss, "loss_restore": loss_restore.detach(), "loss_global": loss_global.detach(),
                "loss_scale": loss_scale.detach(), "loss_local": loss_local.detach()}
