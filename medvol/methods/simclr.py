"""SimCLR in 3D: NT-Xent between two augmented crops of every volume, on the pooled bottleneck of a backbone.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020. Both views of the N volumes of a batch go through the encoder and a projection MLP ``g`` (global
average pool of the bottleneck -> hidden -> ReLU -> ``proj_dim``); for the 2N embeddings ``z``, each view's
positive is the other view of its volume and its 2N - 2 negatives are the views of the other volumes::

    l(i, j) = -log( exp(cos(z_i, z_j) / T) / sum_{k != i} exp(cos(z_i, z_k) / T) ),   loss = mean over the 2N anchors

(:class:`~medvol.losses.InfoNCELoss` with labels ``[0..N-1, 0..N-1]``). Batch keys: ``image_v1``, ``image_v2``.
Only the encoder and the head are trained; the decoder stays as initialised.
"""

from __future__ import annotations

import torch

from medvol.losses import InfoNCELoss
from medvol.methods.base import SSLMethod
from medvol.networks import GlobalPoolHead

__all__ = ["SimCLR"]


class SimCLR(SSLMethod):
    """SimCLR pretext task.

    Args:
        backbone: a :class:`~medvol.networks.Backbone` (its encoder is trained).
        proj_dim: size of the projection ``z`` (128 in SimCLR).
        hidden_dim: hidden size of the projection MLP (2048 for ResNet-50; smaller for small 3D encoders).
        temperature: NT-Xent temperature T (0.1).
        head_norm: norm between the MLP layers: ``None`` (the paper's ``W2 ReLU(W1 h)``), ``"batch"`` or
            ``"layer"``.

    Example:
        >>> from medvol.networks import build_backbone
        >>> method = SimCLR(build_backbone("unet", channels=(4, 8)), proj_dim=8, hidden_dim=16)
        >>> views = {"image_v1": torch.rand(2, 1, 8, 8, 8), "image_v2": torch.rand(2, 1, 8, 8, 8)}
        >>> method(views)["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image_v1", "image_v2")

    def __init__(self, backbone, proj_dim: int = 128, hidden_dim: int = 512, temperature: float = 0.1,
                 head_norm: str | None = None):
        super().__init__(backbone)
        self.head = GlobalPoolHead(backbone.encoder_channels[-1], hidden_dim, proj_dim, num_layers=2, norm=head_norm)
        self.contrastive = InfoNCELoss(temperature)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``z = g(GAP(encoder(x)[-1]))``, (B, proj_dim), not normalised."""
        return self.head(self.backbone.encode(x)[-1])

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["image_v1"], batch["image_v2"]
        n = x1.shape[0]
        z = self.project(torch.cat([x1, x2]))  # (2N, D): rows i and N + i are the two views of volume i
        labels = torch.arange(n, device=z.device).repeat(2)
        return {"loss": self.contrastive(z, labels)}
