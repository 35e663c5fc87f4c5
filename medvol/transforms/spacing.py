"""Resampling that touches only its own keys.

MONAI 1.6's ``Spacingd`` treats every entry of the data dictionary whose name starts with ``<key>_`` as a
metadata dictionary of ``<key>`` and calls ``.update()`` on it after resampling a NIfTI-loaded ``<key>``.
MONAI Label puts the string ``image_path`` next to ``image``, so the zoo pattern "``Spacingd`` on ``image``"
fails inside MONAI Label with ``AttributeError: 'str' object has no attribute 'update'``.
:class:`KeySafeSpacingd` is ``Spacingd`` with those unrelated entries (anything under ``<key>_*`` that is not
a mapping: strings, numbers, arrays) moved aside during the call and put back unchanged afterwards. Metadata
dictionaries (``image_meta_dict``) are still updated as ``Spacingd`` does, and the inverse (``Invertd``) is
``Spacingd``'s own.

Example:
    >>> import torch
    >>> from monai.data import MetaTensor
    >>> from medvol.transforms import KeySafeSpacingd
    >>> t = KeySafeSpacingd("image", pixdim=(2.0, 2.0, 2.0))
    >>> out = t({"image": MetaTensor(torch.rand(1, 8, 8, 8)), "image_path": "/data/case_001.nii.gz"})  # 1 mm
    >>> out["image"].shape, out["image_path"]
    (torch.Size([1, 4, 4, 4]), '/data/case_001.nii.gz')
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.transforms import Spacingd

__all__ = ["KeySafeSpacingd"]


class KeySafeSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` that leaves non-mapping ``<key>_*`` entries (e.g. ``image_path``) alone.

    Same arguments, outputs and inverse as ``Spacingd``.
    """

    def _unrelated(self, d: Mapping) -> list[Hashable]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        return [k for k, v in d.items() if isinstance(k, str) and k.startswith(prefixes) and not isinstance(v, Mapping)]

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        aside = {k: d.pop(k) for k in self._unrelated(d)}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out
