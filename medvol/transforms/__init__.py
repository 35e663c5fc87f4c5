"""medvol.transforms: MONAI-style array + dictionary transforms (validation, N4, presets, SSL views)."""

from medvol.transforms.presets import PRESETS, ForegroundThreshold, ct_preset, get_preset, mri_preset
from medvol.transforms.validation import CheckAlignedd, EnsureFinite, EnsureFinited, source_of
