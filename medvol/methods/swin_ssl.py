"""SwinUNETR self-supervised pre-training: in-painting + rotation prediction + contrastive coding on the Swin ViT.

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022. Two
views of a crop are each rotated by a random multiple of 90 degrees (:class:`medvol.transforms.RandRotate90Classd`)
and get random noise-filled cut-outs (MONAI ``RandCoarseDropoutd`` with a random fill). Only the Swin
transformer of the SwinUNETR (``backbone.encoder.swinViT``) runs; from its 1/32 tokens three heads predict:

- the rotation class (linear head, cross entropy),
- a contrastive embedding (linear head to 512, NT-Xent with temperature 0.5 between the two views of a crop),
- the crop before the cut-outs (the original's "vae" up-sampling head, L1),

``loss = lambda_inpaint * L1 + lambda_rot * CE + lambda_contrast * NT-Xent`` with the paper's weights 1, 1, 1.

The pre-trained weights are the Swin ViT's: besides ``models/model.pt`` (the medvol backbone, for the
few-shot bundle) :class:`SwinViTExport` writes ``models/model_swinvit.pt`` in the layout of the published
``model_swinvit.pt`` (``{"state_dict": {"module.<swinViT key>": ...}}`` with ``mlp.fc1``/``mlp.fc2``), which
``monai.networks.nets.SwinUNETR.load_from`` reads.

Batch keys: ``image_v1``, ``image_v2`` (rotated, cut-out views), ``target_v1``, ``target_v2`` (rotated, before
the cut-outs), ``rot_v1``, ``rot_v2`` (rotation classes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from medvol.io.atomic import atomic_path
from medvol.io.checkpoint import read_checkpoint
from medvol.losses import InfoNCELoss, RestorationLoss
from medvol.methods.base import SSLMethod

__all__ = ["SwinSSL", "SwinViTExport", "monai_swinvit_checkpoint", "swinvit_state_dict"]

logger = logging.getLogger("medvol.methods")

_PREFIX = "encoder.swinViT."
# MONAI's SwinTransformer names its MLP layers linear1/linear2; the published checkpoint (and SwinUNETR.load_from)
# uses fc1/fc2
_RENAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))


def monai_swinvit_checkpoint(backbone_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The Swin ViT of a :class:`~medvol.networks.SwinBackbone` state dict in the published ``model_swinvit.pt``
    layout: ``{"state_dict": {"module.patch_embed.proj.weight": ..., "module.layers1.0.blocks.0.mlp.fc1.weight":
    ...}}``, loadable with ``SwinUNETR.load_from(checkpoint)``.

    Raises:
        ValueError: when the state dict has no ``encoder.swinViT.*`` entry (not a SwinUNETR backbone).
    """
    out = {}
    for key, value in backbone_state_dict.items():
        if key.startswith(_PREFIX):
            name = key[len(_PREFIX):]
            for old, new in _RENAMES:
                name = name.replace(old, new)
            out["module." + name] = value
    if not out:
        raise ValueError(f"no '{_PREFIX}*' entry in the state dict (keys like {list(backbone_state_dict)[:3]}): "
                         "not a SwinUNETR backbone")
    return {"state_dict": out}


def swinvit_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The inverse of :func:`monai_swinvit_checkpoint`: a ``swinViT.load_state_dict`` state dict (MONAI names)."""
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for new, old in _RENAMES:
            name = name.replace(old, new)
        out[name] = value
    return out


class SwinViTExport:
    """When training completes, convert the saved backbone (``trainer.model_saver.path``, ``models/model.pt``) to
    ``model_swinvit.pt`` beside it (:func:`monai_swinvit_checkpoint`), atomically, on rank 0."""

    def __init__(self, filename: str = "model_swinvit.pt"):
        self.filename = filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        saver = getattr(engine, "model_saver", None)
        source = Path(saver.path) if saver is not None else None
        if source is None or not source.is_file():
            logger.warning("no saved backbone to export as %s", self.filename)
            return
        target = source.with_name(self.filename)
        with atomic_path(target) as tmp:
            torch.save(monai_swinvit_checkpoint(read_checkpoint(source)), tmp)
        logger.info("wrote %s (SwinUNETR.load_from layout)", target)


def _reconstruction_head(dim: int, out_channels: int, stages: int = 5) -> nn.Sequential:
    """The original's "vae" head: ``stages`` x (3x3x3 conv, x2 up-sampling, instance norm, LeakyReLU), 1x1x1 conv.

    Channels halve from ``dim`` down to ``dim // 16`` (then stay). The norm follows the up-sampling (the original
    normalises before it), so that a 32^3 crop, whose 1/32 token map is a single voxel, can be normalised.
    """
    layers: list[nn.Module] = []
    ch = dim
    for i in range(stages):
        nxt = max(dim // 2 ** (i + 1), dim // 16)
        layers += [nn.Conv3d(ch, nxt, kernel_size=3, padding=1),
                   nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                   nn.InstanceNorm3d(nxt), nn.LeakyReLU()]
        ch = nxt
    layers.append(nn.Conv3d(ch, out_channels, kernel_size=1))
    return nn.Sequential(*layers)


class SwinSSL(SSLMethod):
    """SwinUNETR self-supervised pre-training (Tang et al. 2022).

    Args:
        backbone: a :class:`~medvol.networks.SwinBackbone` (``encoder.swinViT`` is what this task trains).
        num_rotations: rotation classes (4: 0/90/180/270 degrees in one plane; ``RandRotate90Classd.num_classes``).
        contrast_dim: size of the contrastive embedding (512).
        temperature: NT-Xent temperature (0.5).
        lambda_inpaint, lambda_rot, lambda_contrast: loss weights (1, 1, 1).

    Raises:
        ValueError: when the backbone has no Swin transformer (``encoder.swinViT``).
    """

    batch_keys = ("image_v1", "image_v2", "target_v1", "target_v2", "rot_v1", "rot_v2")

    def __init__(self, backbone, num_rotations: int = 4, contrast_dim: int = 512, temperature: float = 0.5,
                 lambda_inpaint: float = 1.0, lambda_rot: float = 1.0, lambda_contrast: float = 1.0):
        super().__init__(backbone)
        swin = getattr(getattr(backbone, "encoder", None), "swinViT", None)
        if swin is None:
            raise ValueError(f"SwinSSL trains a SwinUNETR's Swin transformer: {type(backbone).__name__} has no "
                             "encoder.swinViT (use backbone 'swinunetr')")
        dim = backbone.encoder_channels[-1]  # the 1/32 tokens have 16 * feature_size channels
        self.rotation_head = nn.Linear(dim, num_rotations)
        self.contrastive_head = nn.Linear(dim, contrast_dim)
        self.reconstruction_head = _reconstruction_head(dim, backbone.in_channels)
        self.contrastive = InfoNCELoss(temperature)
        self.inpainting = RestorationLoss("l1")
        self.lambda_inpaint, self.lambda_rot, self.lambda_contrast = lambda_inpaint, lambda_rot, lambda_contrast

    def forward(self, batch: dict) -> dict:
        x = torch.cat([batch["image_v1"], batch["image_v2"]])
        target = torch.cat([batch["target_v1"], batch["target_v2"]])
        rotation = torch.cat([batch["rot_v1"], batch["rot_v2"]]).long().view(-1)
        self.backbone.check_input(x)
        encoder = self.backbone.encoder
        tokens = encoder.swinViT(x.contiguous(), encoder.normalize)[4]  # (2B, 16F, *spatial / 32)
        pooled = tokens.flatten(2).mean(dim=2)
        loss_rot = F.cross_entropy(self.rotation_head(pooled).float(), rotation)
        n = batch["image_v1"].shape[0]
        labels = torch.arange(n, device=x.device).repeat(2)  # view 1 of crop i <-> view 2 of crop i
        loss_contrast = self.contrastive(self.contrastive_head(pooled), labels)
        loss_inpaint = self.inpainting(self.reconstruction_head(tokens), target)
        loss = self.lambda_inpaint * loss_inpaint + self.lambda_rot * loss_rot + self.lambda_contrast * loss_contrast
        return {"loss": loss, "loss_inpaint": loss_inpaint.detach(), "loss_rot": loss_rot.detach(),
                "loss_contrast": loss_contrast.detach()}

    def train_handlers(self) -> list:
        return [SwinViTExport()]
