"""medvol.networks: backbones with feature taps, heads, momentum encoders, the MoCo queue, pretrained loading.

Backbones (:class:`UNet3D`, :class:`SwinBackbone`, :class:`UNETRBackbone`, :class:`ModelsGenesisUNet3D`, built by
name with :func:`build_backbone`) share the :class:`Backbone` interface: ``encode`` (fine -> coarse maps), ``decode``
(coarse -> fine maps), ``forward_features`` and ``forward`` (plain logits, usable as a MONAI bundle
``network_def``), with weights under ``encoder.``, ``decoder.`` and ``head.`` so :func:`load_pretrained` can
transfer the encoder alone, and maps published checkpoints (Swin SSL, Models Genesis) onto them.
:func:`sparse_encode` runs a U-Net encoder on visible patches only (SparK).
"""

from __future__ import annotations

from .embedding import EmbeddingNet
from .factory import BACKBONES, Backbone, build_backbone, register_backbone, resolve_norm
from .genesis import ModelsGenesisUNet3D, genesis_to_medvol
from .heads import ConvProjectionHead, GlobalPoolHead, MLPHead, PredictionHead, ProjectionHead
from .image_report import ImageReportModel
from .mil import ABMIL, MIL_POOLINGS, PMA, MILOutput, build_mil_network, masked_softmax
from .momentum import copy_momentum_encoder, cosine_momentum, unwrap_module, update_momentum
from .pretrained import LAYOUTS, detect_layout, load_pretrained
from .queue import MoCoQueue
from .slice_encoders import (
    SLICE_ENCODERS,
    GatedCNNBlock,
    GatedCNNSliceEncoder,
    ResNetSliceEncoder,
    ViTSliceEncoder,
    build_slice_encoder,
)
from .sparse import mask_at, masked_norm, sparse_encode
from .swin import SwinBackbone
from .text import PretrainedTextEncoder, ScratchTextEncoder, build_text_encoder
from .unet import UNet3D, UNetDecoder, UNetEncoder
from .unetr import UNETRBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "build_backbone",
    "register_backbone",
    "resolve_norm",
    "UNet3D",
    "UNetEncoder",
    "UNetDecoder",
    "SwinBackbone",
    "UNETRBackbone",
    "sparse_encode",
    "masked_norm",
    "mask_at",
    "MLPHead",
    "ProjectionHead",
    "PredictionHead",
    "GlobalPoolHead",
    "ConvProjectionHead",
    "copy_momentum_encoder",
    "update_momentum",
    "cosine_momentum",
    "unwrap_module",
    "MoCoQueue",
    "load_pretrained",
    "detect_layout",
    "LAYOUTS",
    "ModelsGenesisUNet3D",
    "genesis_to_medvol",
    "EmbeddingNet",
    "ImageReportModel",
    "build_text_encoder",
    "ScratchTextEncoder",
    "PretrainedTextEncoder",
    "ABMIL",
    "PMA",
    "MILOutput",
    "MIL_POOLINGS",
    "build_mil_network",
    "masked_softmax",
    "SLICE_ENCODERS",
    "GatedCNNBlock",
    "GatedCNNSliceEncoder",
    "ResNetSliceEncoder",
    "ViTSliceEncoder",
    "build_slice_encoder",
]
