"""CAiD in 3D: instance discrimination (MoCo v2) + restoration of distorted local context on a U-Net.

Taher et al., "CAiD: Context-Aware Instance Discrimination for Self-supervised Learning in Medical Imaging",
MIDL 2022. Two random crops of a volume are intensity-augmented and each is distorted (cut-out, out-painting or
local voxel shuffle, :func:`medvol.transforms.caid_distortion`). The query branch (backbone encoder + global
head) must match the momentum branch's key of the other view against a queue of negatives, while the full
U-Net restores view 1 to its undistorted, pre-intensity-augmentation appearance:
``loss = lambda_id * MoCo(q, k, queue) + lambda_restore * MSE(sigmoid(UNet(x1)), target1)``.

Validation loss uses the other keys of the batch as negatives instead of the queue (see ``forward``), and
never changes the queue or the momentum branch (the original code updated both during validation).

Batch keys: ``image_v1``, ``image_v2`` (distorted views) and ``target_v1`` (view 1 after the spatial crop
only). The restoration target is taken after the crop, not before the flip as in the original code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvol.engines.handlers import MomentumUpdateHandler, QueueUpdateHandler
from medvol.losses import MoCoLoss, RestorationLoss
from medvol.methods.base import SSLMethod
from medvol.networks import GlobalPoolHead, MoCoQueue, copy_momentum_encoder

__all__ = ["CAiD"]


class CAiD(SSLMethod):
    """CAiD pretext task.

    Args:
        backbone: U-Net-style :class:`~medvol.networks.Backbone` with ``out_channels == in_channels``
            (its head restores the image).
        proj_dim: embedding size of the global branch (128 in CAiD/MoCo v2).
        hidden_dim: hidden size of the global MLP (2048 in CAiD; smaller for small 3D encoders).
        queue_size: negatives in the MoCo queue (65536 in CAiD, for 1.2M images). Keep it well below the number
            of training volumes: a queue holding several stale keys of every volume is full of false negatives
            (the bundle uses half the training set, at most 4096).
        temperature: MoCo softmax temperature (0.2).
        lambda_id: weight of the instance-discrimination loss (1).
        lambda_restore: weight of the restoration loss (10).
        restoration: ``"mse"`` (CAiD) or ``"l1"``.
        momentum: EMA momentum of the key branch, updated after every step (0.999).

    Raises:
        ValueError: when the backbone cannot restore its input (out_channels != in_channels).
    """

    batch_keys = ("image_v1", "image_v2", "target_v1")

    def __init__(self, backbone, proj_dim: int = 128, hidden_dim: int = 512, queue_size: int = 4096,
                 temperature: float = 0.2, lambda_id: float = 1.0, lambda_restore: float = 10.0,
                 restoration: str = "mse", momentum: float = 0.999):
        super().__init__(backbone)
        if backbone.out_channels != backbone.in_channels:
            raise ValueError(f"CAiD restores its input: the backbone needs out_channels == in_channels "
                             f"({backbone.in_channels}), got {backbone.out_channels}")
        self.head = GlobalPoolHead(backbone.encoder_channels[-1], hidden_dim, proj_dim)
        self.key_backbone = copy_momentum_encoder(backbone)
        self.key_head = copy_momentum_encoder(self.head)
        self.queue = MoCoQueue(proj_dim, queue_size)
        self.contrastive = MoCoLoss(temperature)
        self.restoration = RestorationLoss(restoration)
        self.lambda_id, self.lambda_restore = lambda_id, lambda_restore
        self.momentum = momentum

    def train_handlers(self) -> list:
        return [MomentumUpdateHandler(self.momentum), QueueUpdateHandler()]

    def momentum_pairs(self):
        return [(self.backbone, self.key_backbone), (self.head, self.key_head)]

    def forward(self, batch: dict) -> dict:
        x1, x2, target = batch["image_v1"], batch["image_v2"], batch["target_v1"]
        features = self.backbone.encode(x1)
        restored = torch.sigmoid(self.backbone.head(self.backbone.decode(features)[-1]))
        q = F.normalize(self.head(features[-1]), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_head(self.key_backbone.encode(x2)[-1]), dim=1)
        # validation (eval mode) uses in-batch negatives: a loss against the queue is not comparable across
        # epochs while the queue fills, so "lowest validation loss" would always pick the first epoch
        loss_id = self.contrastive(q, k, self.queue.negatives if self.training else None)
        loss_restore = self.restoration(restored, target)
        loss = self.lambda_id * loss_id + self.lambda_restore * loss_restore
        return {"loss": loss, "loss_id": loss_id.detach(), "loss_restore": loss_restore.detach(), "keys": k}

    def update_queue(self, output: dict) -> None:
        self.queue.enqueue(output["keys"])
