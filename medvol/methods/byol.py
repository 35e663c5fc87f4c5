"""BYOL in 3D: an online encoder predicts a slowly moving target encoder's projection of the other view.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020. Online
branch: encoder -> projector (global average pool of the bottleneck -> MLP with BatchNorm, ``proj_dim``) ->
predictor (MLP, ``proj_dim``). Target branch: an EMA copy of encoder + projector, ``xi <- tau xi + (1 - tau)
theta`` after every step, tau rising from ``momentum`` (0.996) to 1 along a cosine over training. Loss, for the
online predictions q1, q2 and the target projections z1', z2' of the two views::

    loss = ||q1/|q1| - z2'/|z2'| ||^2 + ||q2/|q2| - z1'/|z1'| ||^2      (:class:`~medvol.losses.NormalizedMSELoss`)

Batch keys: ``image_v1``, ``image_v2``. Only the encoder, projector and predictor are trained; the decoder of
the backbone stays as initialised. No negatives: a batch needs >= 2 volumes only for the heads' BatchNorm.
"""

from __future__ import annotations

import torch

from medvol.engines.handlers import MomentumUpdateHandler
from medvol.losses import NormalizedMSELoss
from medvol.methods.base import SSLMethod
from medvol.networks import GlobalPoolHead, PredictionHead, copy_momentum_encoder

__all__ = ["BYOL"]


class BYOL(SSLMethod):
    """BYOL pretext task.

    Args:
        backbone: a :class:`~medvol.networks.Backbone` (its encoder is trained).
        proj_dim: size of the projection and prediction (256 in BYOL).
        hidden_dim: hidden size of projector and predictor (4096 in BYOL; smaller for small 3D encoders).
        momentum: base EMA rate tau of the target network (0.996).
        momentum_schedule: ``"cosine"`` (tau -> 1 over training, BYOL) or ``"constant"``.

    Example:
        >>> from medvol.networks import build_backbone
        >>> method = BYOL(build_backbone("unet", channels=(4, 8)), proj_dim=8, hidden_dim=16)
        >>> views = {"image_v1": torch.rand(2, 1, 8, 8, 8), "image_v2": torch.rand(2, 1, 8, 8, 8)}
        >>> float(method(views)["loss"].detach()) <= 8.0  # two terms of 2 - 2 cos, each at most 4
        True
    """

    batch_keys = ("image_v1", "image_v2")

    def __init__(self, backbone, proj_dim: int = 256, hidden_dim: int = 512, momentum: float = 0.996,
                 momentum_schedule: str = "cosine"):
        super().__init__(backbone)
        self.projector = GlobalPoolHead(backbone.encoder_channels[-1], hidden_dim, proj_dim, num_layers=2,
                                        norm="batch")
        self.predictor = PredictionHead(proj_dim, hidden_dim, proj_dim)
        self.target_backbone = copy_momentum_encoder(backbone)
        self.target_projector = copy_momentum_encoder(self.projector)
        self.regression = NormalizedMSELoss()
        self.momentum, self.momentum_schedule = momentum, momentum_schedule

    def train_handlers(self) -> list:
        return [MomentumUpdateHandler(self.momentum, self.momentum_schedule)]

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Online prediction ``q = predictor(projector(encoder(x)))``, (B, proj_dim)."""
        return self.predictor(self.projector(self.backbone.encode(x)[-1]))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Target projection ``z' = projector_xi(encoder_xi(x))``, (B, proj_dim), without gradient."""
        return self.target_projector(self.target_backbone.encode(x)[-1])

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["image_v1"], batch["image_v2"]
        # each view through each branch on its own, as in BYOL (BatchNorm statistics per view)
        q1, q2 = self.predict(x1), self.predict(x2)
        z1, z2 = self.target(x1), self.target(x2)
        loss = self.regression(q1, z2) + self.regression(q2, z1)
        return {"loss": loss}
