"""Random patch masks for masked volume modelling (MAE, SparK).

The mask lives on the patch grid (``spatial / patch_size``) as a (1, *grid) bool tensor, True = masked: the
method hides those patches from its encoder and reconstructs them. Exactly ``round(ratio * N)`` of the N patches
are masked (at least one masked and one visible), drawn uniformly without replacement (MAE's random masking,
SparK's). Drawn from the transform's own seeded RNG, so a :class:`~medvol.engines.SeededDataset` gives every
sample of every epoch a reproducible mask and validation sees the same masks each epoch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, ensure_tuple_rep

__all__ = ["RandPatchMask", "RandPatchMaskd"]


class RandPatchMask(RandomizableTransform):
    """A random patch mask for an image (C, *spatial): (1, *grid) bool, True = masked.

    Args:
        patch_size: the patch (an int or one size per spatial dimension); the image's spatial sizes must be
            multiples of it.
        ratio: fraction of patches masked, in (0, 1) (MAE 0.75, SparK 0.6).

    Raises:
        ValueError: for a ratio outside (0, 1) or a patch size that does not divide the image.

    Example:
        >>> mask = RandPatchMask(patch_size=4, ratio=0.75)(torch.zeros(1, 8, 8, 16))
        >>> tuple(mask.shape), int(mask.sum())
        ((1, 2, 2, 4), 12)
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, patch_size: int | Sequence[int], ratio: float) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio!r}.")
        self.patch_size, self.ratio = patch_size, float(ratio)
        self._order: np.ndarray | None = None

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        patch = ensure_tuple_rep(self.patch_size, len(spatial))
        if any(int(s) % int(p) for s, p in zip(spatial, patch)):
            raise ValueError(f"image spatial size {tuple(spatial)} is not divisible by patch_size {patch}.")
        return tuple(int(s) // int(p) for s, p in zip(spatial, patch))

    def randomize(self, num_patches: int) -> None:
        self._order = self.R.permutation(num_patches)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        grid = self.grid(img.shape[1:])
        n = int(np.prod(grid))
        if randomize:
            self.randomize(n)
        if self._order is None or len(self._order) != n:
            raise ValueError("RandPatchMask: call randomize() for this grid first (randomize=False).")
        num_masked = min(max(int(round(self.ratio * n)), 1), n - 1)
        mask = np.zeros(n, dtype=bool)
        mask[self._order[:num_masked]] = True
        return torch.from_numpy(mask.reshape((1, *grid)))


class RandPatchMaskd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandPatchMask`: adds ``mask_key`` sized by the image under ``keys``.

    Args:
        keys: the one image key the mask is drawn for.
        patch_size: as in :class:`RandPatchMask`.
        ratio: as in :class:`RandPatchMask`.
        mask_key: where the mask goes.
        allow_missing_keys: don't raise when the key is missing.

    Raises:
        ValueError: when ``keys`` names more than one key.
    """

    backend = RandPatchMask.backend

    def __init__(self, keys: KeysCollection, patch_size: int | Sequence[int], ratio: float, mask_key: str = "mask",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 1:
            raise ValueError(f"RandPatchMaskd draws one mask for one image key, got keys={self.keys}.")
        self.mask_key = mask_key
        self.masker = RandPatchMask(patch_size, ratio)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.masker.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.masker(d[key])
        return d
