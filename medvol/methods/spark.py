"""SparK in 3D: sparse masked modelling for a U-Net (BERT-style pretraining of a CNN).

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023.
A random 60% of the patches of a crop (patch = the encoder's total downsampling, one bottleneck voxel each) are
removed; the encoder runs *sparsely* on the rest (:func:`medvol.networks.sparse_encode`: masked positions zeroed
after every layer, norm statistics over visible positions only), so the masked content cannot reach the
features. At every encoder scale the masked positions are then filled with a learned mask token
(densification) and the U-Net's decoder reconstructs the volume; the loss is the MSE on the masked patches
against per-patch normalized targets (:class:`~medvol.losses.MaskedReconstructionLoss`).

Deviation from SparK's code: the decoder is the backbone's own U-Net decoder (skip concatenation), not a
separate light decoder thrown away after pretraining, so ``models/model.pt`` carries a pretrained encoder *and*
decoder for ``fewshot_segmentation``; and there is no per-scale projection after densification (encoder and
decoder widths already match; the decoder sees the encoder's maps exactly as in fine-tuning).

Batch keys: ``image`` (B, C, *roi) and ``mask`` (B, 1, *grid) bool, True = masked, from
:class:`~medvol.transforms.RandPatchMaskd` with ``patch_size = method.patch_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from medvol.losses import MaskedReconstructionLoss
from medvol.methods.base import SSLMethod
from medvol.networks import UNet3D
from medvol.networks.sparse import mask_at, sparse_encode

__all__ = ["SparK"]


class SparK(SSLMethod):
    """SparK pretext task on a :class:`~medvol.networks.UNet3D`.

    Args:
        backbone: ``UNet3D`` with ``out_channels == in_channels`` (its head predicts the voxels).
        norm_target: per-patch normalized targets (SparK; ``False``: raw intensities).

    Raises:
        TypeError: when the backbone is not a ``UNet3D`` (the sparse pass follows its layer layout).
        ValueError: when the backbone cannot reconstruct its input (out_channels != in_channels).

    Example:
        >>> from medvol.networks import UNet3D
        >>> method = SparK(UNet3D(channels=(4, 8, 16)))
        >>> batch = {"image": torch.rand(2, 1, 16, 16, 16), "mask": torch.rand(2, 1, 4, 4, 4) < 0.6}
        >>> method(batch)["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image", "mask")
    find_unused_parameters = False

    def __init__(self, backbone, norm_target: bool = True):
        super().__init__(backbone)
        if not isinstance(backbone, UNet3D):
            raise TypeError(f"SparK needs a UNet3D backbone (backbone='unet'), got {type(backbone).__name__}.")
        if backbone.out_channels != backbone.in_channels:
            raise ValueError(f"SparK reconstructs its input: the backbone needs out_channels == in_channels "
                             f"({backbone.in_channels}), got {backbone.out_channels}")
        #: the masking patch: one bottleneck voxel (RandPatchMaskd's patch_size in the bundle)
        self.patch_size = tuple(backbone.spatial_divisor)
        # one learned token per encoder scale (SparK: trunc-normal, std 0.02)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros((1, c) + (1,) * backbone.spatial_dims)) for c in backbone.encoder_channels
        )
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.04, b=0.04)
        self.loss_fn = MaskedReconstructionLoss(self.patch_size, norm_target=norm_target)

    def reconstruct(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reconstructed volume (B, C, *roi) from the visible patches (``mask`` True = masked)."""
        visible = (~mask.bool()).float()
        features = sparse_encode(self.backbone, image, visible)
        dense = []
        for f, token in zip(features, self.mask_tokens):
            vis = mask_at(visible, f.shape[2:])
            dense.append(f * vis + token.to(f.dtype) * (1 - vis))  # densify: mask token at masked positions
        return self.backbone.head(self.backbone.decode(dense)[-1])

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"]
        loss = self.loss_fn(self.reconstruct(image, mask), image, mask)
        return {"loss": loss, "mask_ratio": mask.float().mean()}
