"""medvol.losses: self-supervised losses in ``monai.losses`` style, ``forward(input, target, ...)``.

- :class:`InfoNCELoss`: NT-Xent with labels or a positive/negative/ignore mask (SimCLR, Chaitanya G^R/G^D-/G^D).
- :class:`MoCoLoss`: MoCo v2 with a queue of negatives (CAiD's instance discrimination), or in-batch negatives.
- :class:`LocalContrastiveLoss`: Chaitanya et al.'s region-level loss on 2D/3D decoder maps.
- :class:`GlobalAlignmentLoss` / :class:`LocalIntraSampleLoss`: image-report alignment (LoVT global and local terms;
  ConVIRT and CLIP use the global one).
- :class:`RestorationLoss`: masked MSE / L1 (context restoration: CAiD, Models Genesis).
- :class:`NormalizedMSELoss`: BYOL's ``2 - 2 cos`` between a prediction and a detached target.
- :class:`MaskedReconstructionLoss`: MSE on masked patches with per-patch normalized targets (MAE, SparK).
- :class:`LeCLLoss`: MoCo v3 (a :class:`MoCoLoss` with in-batch negatives, times 2T) with CLEAR's lesion-weighted
  denominator.
- :class:`SiameseCosineLoss`: PCRLv2's (SimSiam-style) predictor vs stop-gradient projection comparison.
- :class:`VoCoLoss` / :class:`VoCoRegularizationLoss`: VoCo's overlap-proportion prediction and base-crop
  decorrelation.
- :class:`SwappedPredictionLoss` / :class:`PixelSwappedCELoss`: volumetric clustering's swapped prediction
  (patch level, SwAV style; pixel level on the ROI-aligned overlap of two views, aligned by
  :mod:`medvol.transforms.geometry`).

Every loss computes its logits in float32, also under autocast; the argument checks and helpers they share
live in :mod:`medvol.losses.utils`.
"""

from __future__ import annotations

from medvol.losses.image_report import GlobalAlignmentLoss, LocalIntraSampleLoss, spatial_positive_weights
from medvol.losses.infonce import InfoNCELoss
from medvol.losses.lecl import LeCLLoss
from medvol.losses.local_contrastive import LocalContrastiveLoss
from medvol.losses.masked_reconstruction import MaskedReconstructionLoss
from medvol.losses.moco import MoCoLoss
from medvol.losses.normalized_mse import NormalizedMSELoss
from medvol.losses.pcrlv2 import SiameseCosineLoss
from medvol.losses.restoration import RestorationLoss
from medvol.losses.swapped_prediction import PixelSwappedCELoss, SwappedPredictionLoss
from medvol.losses.voco import VoCoLoss, VoCoRegularizationLoss, voco_logits

__all__ = ["GlobalAlignmentLoss", "InfoNCELoss", "LeCLLoss", "LocalContrastiveLoss", "LocalIntraSampleLoss",
           "MaskedReconstructionLoss", "MoCoLoss", "NormalizedMSELoss", "RestorationLoss", "PixelSwappedCELoss",
           "SwappedPredictionLoss", "SiameseCosineLoss", "VoCoLoss", "VoCoRegularizationLoss",
           "spatial_positive_weights", "voco_logits"]
