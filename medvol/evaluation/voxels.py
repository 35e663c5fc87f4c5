"""The no-learning baseline of a probe: each volume downsampled to a small grid of voxels, one row per volume.

:func:`voxel_features` reads every volume of a folder (any format :class:`~medvol.io.LoadVolume` reads, RAS
orientation), resizes it to ``size``^3 (trilinear, the whole field of view) and standardises its intensities
(zero mean, unit variance per volume), so a linear probe on PCA of these rows is what an encoder has to beat.
A volume that cannot be read is reported and skipped; the others are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medvol.errors import DataError

__all__ = ["voxel_features", "case_id_of"]


def case_id_of(path: str | os.PathLike) -> str:
    """A volume's case id: its file name without the volume suffix (a DICOM series: the folder name)."""
    from medvol.io.readers import volume_suffix

    p = Path(str(path).split("#")[0])
    suffix = volume_suffix(p)
    return p.name[: -len(suffix)] if suffix else p.name


def voxel_features(folder: str | os.PathLike, size: int = 16, progress: bool = False
                   ) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """``(case_ids, features (n, size**3) float32, failures {path: reason})`` for the volumes under ``folder``.

    Raises:
        DataError: if ``folder`` holds no volume, or none could be read.
    """
    import torch

    from medvol.io.datalist import find_volumes
    from medvol.io.readers import LoadVolume

    paths = find_volumes(folder)
    if not paths:
        raise DataError(folder, "no volume found (NIfTI, MetaImage, NRRD or DICOM series)")
    load = LoadVolume()
    ids, rows, failures = [], [], {}
    iterator = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="voxels", unit="volume")
    for path in iterator:
        try:
            vol = torch.as_tensor(np.asarray(load(path)), dtype=torch.float32)[:1]
        except DataError as e:
            failures[str(path)] = str(e)
            continue
        small = torch.nn.functional.interpolate(vol[None], size=(size,) * 3, mode="trilinear", align_corners=False)
        row = small.flatten().numpy()
        row = (row - row.mean()) / max(float(row.std()), 1e-6)
        ids.append(case_id_of(path))
        rows.append(row.astype(np.float32))
    if not rows:
        example = next(iter(failures.values()))
        raise DataError(folder, f"none of the {len(paths)} volumes could be read (e.g. {example})")
    return ids, np.stack(rows), failures
