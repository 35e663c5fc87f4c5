"""Global + local contrastive pretraining (Chaitanya et al., NeurIPS 2020), in 3D.

Chaitanya, Erdil, Karani, Konukoglu, "Contrastive learning of global and local features for medical image
segmentation with limited annotations", NeurIPS 2020.

Stage 1 (global): a batch holds ``m`` volumes x ``S`` partition crops (:class:`~medvol.transforms.RandPartitionCropd`),
each seen as two augmented views ``image_g1``/``image_g2``. Encoder + global head embeddings are trained with
NT-Xent (:class:`~medvol.losses.InfoNCELoss`) under one of three positive strategies:

- ``"GR"`` (SimCLR): positives are the two views of the same crop; everything else is a negative.
- ``"GD-"``: as GR, but crops of the same partition from other volumes are removed from the negatives.
- ``"GD"``: positives are all crops of the same partition, from any volume and view.

Stage 2 (local): the encoder is frozen; the first ``local_levels`` decoder blocks plus a 1x1x1 head are trained
with the local contrastive loss (:class:`~medvol.losses.LocalContrastiveLoss`) between two intensity-only views
``image_l1``/``image_l2`` of the same crop (voxels correspond), with explicit negatives from other regions.

Batch keys: ``image_g1``, ``image_g2``, ``image_l1``, ``image_l2``, ``partition`` (int), ``case_index`` (int).
Zero-padded batch slots never enter the loss (the original G^D code let them in): batches hold only real crops.
"""

from __future__ import annotations

import torch

from medvol.engines.handlers import EpochHookHandler
from medvol.losses import InfoNCELoss, LocalContrastiveLoss
from medvol.methods.base import SSLMethod
from medvol.networks import ConvProjectionHead, GlobalPoolHead

__all__ = ["GlobalLocalContrastive", "positive_mask"]

STRATEGIES = ("GR", "GD-", "GD")


def positive_mask(partition: torch.Tensor, case: torch.Tensor, strategy: str) -> torch.Tensor:
    """(2N, 2N) mask (1 positive, 0 negative, -1 ignored) for N crops seen in two views (view 1 rows first).

    Args:
        partition: (N,) partition index of each crop.
        case: (N,) volume index of each crop (crops of one volume share it).
        strategy: ``"GR"``, ``"GD-"`` or ``"GD"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n = partition.shape[0]
    crop = torch.arange(n, device=partition.device).repeat(2)  # (2N,) crop id of each view
    part, vol = partition.repeat(2), case.repeat(2)
    same_crop = crop[:, None] == crop[None, :]
    same_part = part[:, None] == part[None, :]
    other_vol = vol[:, None] != vol[None, :]
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.int8, device=partition.device)
    if strategy == "GD":
        mask[same_part] = 1
    else:
        mask[same_crop] = 1
        if strategy == "GD-":
            mask[same_part & other_vol] = -1
    return mask  # the diagonal is ignored by InfoNCELoss


class GlobalLocalContrastive(SSLMethod):
    """Chaitanya et al.'s two-stage pretext task on a 3D U-Net.

    Args:
        backbone: :class:`~medvol.networks.Backbone`.
        strategy: global positives: ``"GR"``, ``"GD-"`` or ``"GD"`` (the paper's best: GD).
        global_epochs: epochs of the global stage; later epochs train the local stage. ``None`` = global only.
        proj_dim, hidden_dim: global head (the paper: 1024 -> 128).
        temperature: NT-Xent temperature (0.1).
        local_levels: decoder blocks pretrained in the local stage (the paper's l = 3).
        local_proj_dim: channels of the local projection head.
        local_grid, local_region: region grid and window size of the local loss.
    """

    batch_keys = ("image_g1", "image_g2", "image_l1", "image_l2", "partition", "case_index")

    def __init__(self, backbone, strategy: str = "GD", global_epochs: int | None = None, proj_dim: int = 128,
                 hidden_dim: int = 512, temperature: float = 0.1, local_levels: int = 3, local_proj_dim: int = 32,
                 local_grid=(3, 3, 3), local_region: int = 3, local_temperature: float = 0.1):
        super().__init__(backbone)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        n_dec = len(backbone.decoder_channels)
        if not 1 <= local_levels <= n_dec:
            raise ValueError(f"local_levels must be in [1, {n_dec}] for this backbone, got {local_levels}")
        self.strategy, self.global_epochs, self.local_levels = strategy, global_epochs, local_levels
        self.head = GlobalPoolHead(backbone.encoder_channels[-1], hidden_dim, proj_dim)
        ch = backbone.decoder_channels[local_levels - 1]
        self.local_head = ConvProjectionHead(ch, ch, local_proj_dim, norm="instance")
        self.global_loss = InfoNCELoss(temperature)
        self.local_loss = LocalContrastiveLoss(local_temperature, grid_size=local_grid, region_size=local_region)
        self.stage = "global"

    def train_handlers(self) -> list:
        return [EpochHookHandler()]

    def selection_group(self) -> str:
        return self.stage

    def on_epoch_start(self, epoch: int) -> None:
        local = self.global_epochs is not None and epoch > self.global_epochs
        self.stage = "local" if local else "global"
        self.backbone.encoder.requires_grad_(not local)  # the local stage keeps the encoder frozen

    def forward(self, batch: dict) -> dict:
        if self.stage == "global":
            x = torch.cat([batch["image_g1"], batch["image_g2"]])  # (2N, C, *roi): view 1 rows first
            z = self.head(self.backbone.encode(x)[-1])
            mask = positive_mask(batch["partition"].long(), batch["case_index"].long(), self.strategy)
            loss = self.global_loss(z, mask)
            return {"loss": loss, "loss_global": loss.detach()}
        x = torch.cat([batch["image_l1"], batch["image_l2"]])
        with torch.no_grad():
            features = self.backbone.encode(x)
        p = self.local_head(self.backbone.decode(features, num_levels=self.local_levels)[-1])
        p1, p2 = p.chunk(2)
        loss = self.local_loss(p1, p2)
        return {"loss": loss, "loss_local": loss.detach()}
