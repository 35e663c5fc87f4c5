"""Quality-control pictures: a PNG montage of orthogonal mid-slices, with labels overlaid when present."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvol.io.atomic import atomic_write_bytes

__all__ = ["qc_montage"]


def _views(volume: np.ndarray, centre: Sequence[int] | None = None) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of an RAS (X, Y, Z) volume in radiological display convention.

    Axial: anterior up, patient's right on the viewer's left; coronal: superior up, right on the left;
    sagittal: superior up, anterior on the left.
    """
    cx, cy, cz = centre if centre is not None else [s // 2 for s in volume.shape]
    return [volume[::-1, :, cz].T[::-1], volume[::-1, cy, :].T[::-1], volume[cx, ::-1, :].T[::-1]]


def _label_centre(label: np.ndarray | None) -> list[int] | None:
    if label is None or not np.any(label > 0):
        return None
    return [int(round(c)) for c in np.argwhere(label > 0).mean(axis=0)]


def qc_montage(cases: Sequence[tuple[str, np.ndarray, np.ndarray | None]], path: str | os.PathLike,
               title: str | None = None, spacing: Sequence[Sequence[float]] | None = None) -> Path:
    """Write a PNG with one row per case: axial, coronal and sagittal slices (through the label centre if any).

    Args:
        cases: ``(name, volume (X, Y, Z) in RAS, label or None)`` per row.
        path: PNG destination (written atomically).
        title: figure title.
        spacing: voxel sizes per case, so slices are drawn with the right aspect ratio (default isotropic).

    Raises:
        ValueError: when ``cases`` is empty or a volume is not 3D.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not cases:
        raise ValueError("qc_montage needs at least one case")
    colours = ListedColormap(["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#ffff33", "#a65628"])
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, (name, volume, label) in enumerate(cases):
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 3:
            raise ValueError(f"{name}: expected a 3D volume, got shape {volume.shape}")
        sx, sy, sz = spacing[row] if spacing is not None else (1.0, 1.0, 1.0)
        aspects = [sy / sx, sz / sx, sz / sy]
        centre = _label_centre(label)
        lo, hi = np.percentile(volume, [0.5, 99.5])
        label_views = _views(np.asarray(label), centre) if label is not None else [None] * 3
        for col, (img, lab, plane) in enumerate(zip(_views(volume, centre), label_views, ("axial", "coronal",
                                                                                            "sagittal"))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspects[col],
                      interpolation="nearest")
            if lab is not None and np.any(lab > 0):
                overlay = np.ma.masked_where(lab <= 0, (lab - 1) % colours.N)
                ax.imshow(overlay, cmap=colours, vmin=0, vmax=colours.N - 1, alpha=0.45, aspect=aspects[col],
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(plane, fontsize=10)
        axes[row, 0].set_ylabel(f"{name}\n{tuple(volume.shape)}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
