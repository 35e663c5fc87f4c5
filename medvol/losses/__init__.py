"""medvol.losses: self-supervised losses in ``monai.losses`` style, ``forward(input, target, ...)``.

- :class:`InfoNCELoss`: NT-Xent with labels or a positive/negative/ignore mask (SimCLR, Chaitanya G^R/G^D-/G^D).
- :class:`MoCoLoss`: MoCo v2 with a queue of negatives (CAiD's instance discrimination), or in-batch negatives.
- :class:`LocalContrastiveLoss`: Chaitanya et al.'s region-level loss on 2D/3D decoder maps.
- :class:`RestorationLoss`: masked MSE / L1 (context restoration).
- :class:`MaskedReconstructionLoss`: MSE on masked patches with per-patch normalized targets (MAE, SparK).
- :class:`LeCLLoss`: MoCo v3 (a :class:`MoCoLoss` with in-batch negatives, times 2T) with CLEAR's lesion-weighted
  denominator.
- :class:`SwappedPredictionLoss` / :class:`PixelSwappedCELoss`: volumetric clustering's swapped prediction
  (patch level, SwAV style; pixel level on the ROI-aligned overlap of two views, aligned by
  :mod:`medvol.transforms.geometry`).

Every loss computes its logits in float32, also under autocast; the argument checks and helpers they share
live in :mod:`medvol.losses.utils`.
"""

from __future__ import annotations

from medvol.losses.infonce import InfoNCELoss
from medvol.losses.lecl import LeCLLoss
from medvol.losses.local_contrastive import LocalContrastiveLoss
from medvol.losses.masked_reconstruction import MaskedReconstructionLoss
from medvol.losses.moco import MoCoLoss
from medvol.losses.restoration import RestorationLoss
from medvol.losses.swapped_prediction import PixelSwappedCELoss, SwappedPredictionLoss

__all__ = ["InfoNCELoss", "LeCLLoss", "LocalContrastiveLoss", "MaskedReconstructionLoss", "MoCoLoss",
           "RestorationLoss", "PixelSwappedCELoss",
           "SwappedPredictionLoss"]
