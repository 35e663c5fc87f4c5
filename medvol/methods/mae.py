"""MAE in 3D: masked autoencoding of 16^3 patches with the ViT of a UNETR backbone.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022. The crop is cut into the ViT's 16^3
patches; a random 75% of them are dropped (``mask`` from :class:`~medvol.transforms.RandPatchMaskd`) and the
encoder (the backbone's ``encoder.vit``: patch embedding with its position embeddings, 12 transformer blocks,
final norm) runs on the visible tokens only. A light decoder (linear embedding, a learned mask token at every
masked position, fixed sin-cos positions, a few transformer blocks, a linear voxel predictor) reconstructs every
patch; the loss is the MSE on the masked patches against per-patch normalized voxels (``norm_pix_loss``,
:class:`~medvol.losses.MaskedReconstructionLoss`). Only ``encoder.vit.*`` of ``models/model.pt`` is trained: the
UNETR's convolutional skips, decoder and head stay at their initialization (fine-tune with
``pretrained_prefixes ['encoder.vit.']``).

Why a plain ViT and not SwinUNETR: MAE's speed-up and its design (the encoder never sees mask tokens) need a
token set that can lose 75% of its members; Swin's shifted windows need the whole grid (masking a Swin means
mask tokens in the encoder, i.e. SimMIM, not MAE).

Batch keys: ``image`` (B, C, *img_size) and ``mask`` (B, 1, *grid) bool, True = masked, on the 16^3 patch grid.
"""

from __future__ import annotations

import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.blocks.transformerblock import TransformerBlock
from torch import nn

from medvol.losses import MaskedReconstructionLoss
from medvol.losses.masked_reconstruction import unpatchify
from medvol.methods.base import SSLMethod
from medvol.networks import UNETRBackbone

__all__ = ["MAE"]


class MAE(SSLMethod):
    """MAE pretext task on a :class:`~medvol.networks.UNETRBackbone` (``backbone="unetr"``).

    Args:
        backbone: the UNETR whose ``encoder.vit`` is pretrained.
        decoder_dim: width of the light decoder (MAE: 512 for ViT-L; here half the small 3D ViT's width); a
            multiple of 6 (3D sin-cos positions).
        decoder_depth: decoder transformer blocks (MAE: 8; 1-2 suffice for linear-probe-free fine-tuning).
        decoder_heads: decoder attention heads (must divide ``decoder_dim``).
        norm_target: per-patch normalized targets (MAE's ``norm_pix_loss=True``).

    Raises:
        TypeError: when the backbone is not a ``UNETRBackbone``.
        ValueError: when ``decoder_dim`` is not divisible by ``decoder_heads`` or by ``2 * spatial_dims``.

    Example:
        >>> from medvol.networks import UNETRBackbone
        >>> net = UNETRBackbone(img_size=32, hidden_size=32, mlp_dim=64, num_heads=2, feature_size=4)
        >>> method = MAE(net, decoder_dim=12, decoder_depth=1, decoder_heads=2)
        >>> mask = torch.tensor([True, False] * 4).reshape(1, 1, 2, 2, 2).repeat(2, 1, 1, 1, 1)
        >>> method({"image": torch.rand(2, 1, 32, 32, 32), "mask": mask})["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image", "mask")

    def __init__(self, backbone, decoder_dim: int = 96, decoder_depth: int = 2, decoder_heads: int = 3,
                 norm_target: bool = True):
        super().__init__(backbone)
        if not isinstance(backbone, UNETRBackbone):
            raise TypeError(f"MAE needs a UNETRBackbone (backbone='unetr'), got {type(backbone).__name__}.")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim={decoder_dim} must be divisible by decoder_heads={decoder_heads}.")
        if decoder_dim % (2 * backbone.spatial_dims):
            raise ValueError(f"decoder_dim={decoder_dim} must be divisible by {2 * backbone.spatial_dims} "
                             f"(sin-cos positions in {backbone.spatial_dims}D).")
        self.patch_size = backbone.patch_size  #: RandPatchMaskd's patch_size in the bundle
        self.grid = tuple(s // p for s, p in zip(backbone.img_size, self.patch_size))
        voxels = backbone.in_channels
        for p in self.patch_size:
            voxels *= p
        self.decoder_embed = nn.Linear(backbone.hidden_size, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        # fixed 3D sin-cos positions of the decoder (MAE); a non-trainable parameter of this module
        self.decoder_pos = build_sincos_position_embedding(list(self.grid), decoder_dim, backbone.spatial_dims)
        self.decoder_blocks = nn.Sequential(*(TransformerBlock(decoder_dim, 4 * decoder_dim, decoder_heads,
                                                               qkv_bias=True) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, voxels)
        self.loss_fn = MaskedReconstructionLoss(self.patch_size, norm_target=norm_target)

    def encode_visible(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT tokens of the visible patches: ``(latent (B, V, D), index (B, V))``, index into the grid.

        Raises:
            ValueError: when ``mask`` is not on the patch grid or its samples hide different numbers of patches.
        """
        self.backbone.check_input(image)
        vit = self.backbone.encoder.vit
        flat = mask.reshape(mask.shape[0], -1).bool()  # (B, N), True = masked
        if mask.ndim != image.ndim or mask.shape[0] != image.shape[0] or tuple(mask.shape[2:]) != self.grid:
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not on the patch grid {self.grid}.")
        visible_count = (~flat).sum(1)
        if bool((visible_count != visible_count[0]).any()) or int(visible_count[0]) == 0:
            raise ValueError(f"every sample must keep the same number (> 0) of visible patches, got "
                             f"{visible_count.tolist()} (use RandPatchMaskd).")
        index = (~flat).nonzero()[:, 1].reshape(flat.shape[0], -1)  # (B, V), ascending
        tokens = vit.patch_embedding(image)  # (B, N, D), position embeddings added
        x = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[2]))  # (B, V, D)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x), index

    def reconstruct(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reconstructed volume (B, C, *img_size) from the visible patches (``mask`` True = masked)."""
        latent, index = self.encode_visible(image, mask)
        y = self.decoder_embed(latent)  # (B, V, d)
        b, n, d = y.shape[0], mask[0].numel(), y.shape[2]
        full = torch.zeros(b, n, d, dtype=y.dtype, device=y.device).scatter(1, index[..., None].expand(-1, -1, d), y)
        masked = mask.reshape(b, n, 1).bool()
        full = torch.where(masked, self.mask_token.to(y.dtype).expand(b, n, d), full)  # (B, N, d)
        full = full + self.decoder_pos.to(full)
        rows = self.decoder_pred(self.decoder_norm(self.decoder_blocks(full)))  # (B, N, P*C)
        return unpatchify(rows, self.patch_size, self.grid)

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"]
        loss = self.loss_fn(self.reconstruct(image, mask), image, mask)
        return {"loss": loss, "mask_ratio": mask.float().mean()}
