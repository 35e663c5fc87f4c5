"""medvol.transforms: MONAI-style array + dictionary transforms (validation, N4, presets, SSL views and
distortions, 2.5D slices)."""

from medvol.transforms.augment import flip_augmentation, intensity_augmentation, lecl_view_augmentation
from medvol.transforms.distortion import (
    RandBezierIntensity,
    RandBezierIntensityd,
    RandLocalPixelShuffle,
    RandLocalPixelShuffled,
    RandPainting,
    RandPaintingd,
    caid_distortion,
    models_genesis_distortion,
)
from medvol.transforms.geometry import (
    box_intersection,
    box_iou,
    cell_centres,
    overlap_points,
    roi_align_pair,
    sample_at,
    warp_to_view,
)
from medvol.transforms.intensity import RandSolarize, RandSolarized
from medvol.transforms.lesion import RandLesionSliceViewsd
from medvol.transforms.lesion_boxes import LesionBoxesd, as_lesion_boxes, lesion_boxes_from_mask
from medvol.transforms.masking import RandPatchMask, RandPatchMaskd
from medvol.transforms.n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond
from medvol.transforms.presets import PRESETS, ForegroundThreshold, ct_preset, get_preset, mri_preset, slice_preset
from medvol.transforms.pretext import (
    RandLocalCropsd,
    RandRotate90Class,
    RandRotate90Classd,
    VoCoCrops,
    VoCoCropsd,
    grid_overlap,
    swin_inpainting_cutout,
)
from medvol.transforms.radiograph import (
    LoadRadiograph,
    LoadRadiographd,
    radiograph_augmentation,
    radiograph_preprocessing,
)
from medvol.transforms.save import RecordSourceGridd, SaveBagd, SaveEmbeddingd
from medvol.transforms.slices import CT_WINDOWS, VolumeToSlices, VolumeToSlicesd, slice_channels
from medvol.transforms.spacing import KeySafeSpacingd
from medvol.transforms.validation import (
    CheckAlignedd,
    EnsureFinite,
    EnsureFinited,
    RejectConstant,
    RejectConstantd,
    source_of,
)
from medvol.transforms.views import RandCropPair, RandCropPaird, RandPartitionCropd
