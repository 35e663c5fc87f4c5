"""Intensity transforms that MONAI lacks: random solarization (BYOL / MoCo v3 view augmentation)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends

__all__ = ["RandSolarize", "RandSolarized"]


class RandSolarize(RandomizableTransform):
    """With probability ``prob``, invert intensities at or above ``threshold``: ``v -> max_value - v``.

    The float version of torchvision's ``RandomSolarize`` (BYOL / MoCo v3 apply it to one view), for
    intensities in ``[0, max_value]``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, prob: float = 0.2, threshold: float = 0.5, max_value: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        self.threshold, self.max_value = float(threshold), float(max_value)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        return torch.where(img >= self.threshold, self.max_value - img, img)


class RandSolarized(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandSolarize` (one draw for all keys)."""

    backend = RandSolarize.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.2, threshold: float = 0.5, max_value: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.solarize = RandSolarize(1.0, threshold, max_value)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.solarize(d[key], randomize=False)
        return d
