"""Cluster montage: axial slices of a few volumes with their cluster map overlaid in K distinct colours.

One row per volume; for each of ``slices`` axial slices, the grey image beside the same slice with the
cluster map blended over it. A legend lists the clusters present (solid swatches in the exact palette colours).
:func:`montage_rgb` builds the picture as an array (for TensorBoard's ``add_image``); :func:`cluster_montage`
writes the PNG atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["cluster_palette", "montage_rgb", "cluster_montage", "log_montage"]

# saturated, mutually distinct colours, none of them grey (a grey could be mistaken for the image)
_BASE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
         "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075"]


def cluster_palette(k: int) -> np.ndarray:
    """(k, 3) uint8 RGB colours, all distinct and not grey (18 fixed colours, then evenly spaced hues)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k <= len(_BASE):
        return np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in _BASE[:k]], dtype=np.uint8)
    import colorsys

    rgb = [colorsys.hsv_to_rgb(i / k, 0.85 if i % 2 else 0.65, 0.95 if i % 3 else 0.75) for i in range(k)]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice of an RAS (X, Y, Z) volume in radiological display (anterior up, right on the left)."""
    return volume[::-1, :, z].T[::-1]


def _slice_indices(label: np.ndarray, n: int) -> list[int]:
    """``n`` axial slices evenly spread over the central 30-70 % of the volume's height."""
    z = label.shape[2]
    return [int(round(f * (z - 1))) for f in np.linspace(0.3, 0.7, n)] if n > 1 else [z // 2]


def montage_rgb(cases: Sequence[tuple[str, np.ndarray, np.ndarray]], num_clusters: int, slices: int = 3,
                alpha: float = 0.5, scale: int = 3) -> tuple[np.ndarray, list[int]]:
    """The montage as a uint8 (H, W, 3) array and the sorted cluster ids visible in it.

    Args:
        cases: ``(name, image (X, Y, Z), cluster map (X, Y, Z) ints in [0, num_clusters))`` per row.
        num_clusters: K (fixes the palette, so colours mean the same cluster in every montage of a run).
        slices: axial slices per volume.
        alpha: opacity of the cluster colours over the image.
        scale: pixel repetition factor (nearest upscaling, no new colours).

    Raises:
        ValueError: no cases, shapes differ, or a label outside [0, num_clusters).
    """
    if not cases:
        raise ValueError("montage_rgb needs at least one case")
    palette = cluster_palette(num_clusters).astype(np.float32)
    tiles_per_row, present = [], set()
    for name, image, label in cases:
        image, label = np.asarray(image, np.float32), np.asarray(label).astype(np.int64)
        if image.shape != label.shape or image.ndim != 3:
            raise ValueError(f"{name}: image {image.shape} and cluster map {label.shape} must be the same 3D shape")
        if label.min() < 0 or label.max() >= num_clusters:
            raise ValueError(f"{name}: cluster ids must be in [0, {num_clusters}), got [{label.min()}, {label.max()}]")
        lo, hi = np.percentile(image, [0.5, 99.5])
        grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        row = []
        for z in _slice_indices(label, slices):
            g, lab = _axial(grey, z), _axial(label, z)
            present.update(np.unique(lab).tolist())
            grey_rgb = np.repeat(g[..., None], 3, axis=2)
            blend = (1 - alpha) * grey_rgb + alpha * palette[lab]
            gap = np.zeros((g.shape[0], 2, 3), np.float32)
            row += [grey_rgb, gap, blend, gap, gap]
        tiles_per_row.append(np.concatenate(row[:-2], axis=1))
    width = max(t.shape[1] for t in tiles_per_row)
    rows = []
    for t in tiles_per_row:
        pad = np.zeros((t.shape[0], width - t.shape[1], 3), np.float32)
        rows += [np.concatenate([t, pad], axis=1), np.zeros((3, width, 3), np.float32)]
    rgb = np.round(np.concatenate(rows[:-1], axis=0)).astype(np.uint8)
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1), sorted(present)


def cluster_montage(cases: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike, num_clusters: int,
                    title: str | None = None, slices: int = 3, alpha: float = 0.5) -> Path:
    """Write the montage PNG (atomically) with row names and a legend of the clusters present.

    Args:
        cases, num_clusters, slices, alpha: as in :func:`montage_rgb`.
        path: PNG destination.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from medvol.io.atomic import atomic_write_bytes  # here, not at import: see medvol.cluster.pseudolabels

    rgb, present = montage_rgb(cases, num_clusters, slices, alpha, scale=1)
    palette = cluster_palette(num_clusters) / 255.0
    h, w = rgb.shape[:2]
    fig_w = min(12.0, max(5.0, w / 40))
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * h / w + 0.9))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    row_h = (h + 3) / len(cases)
    ax.set_yticks([row_h * (i + 0.5) - 1.5 for i in range(len(cases))])
    ax.set_yticklabels([name for name, _, _ in cases], fontsize=7)
    handles = [Patch(facecolor=palette[c], edgecolor=palette[c], antialiased=False, label=str(c)) for c in present]
    ax.legend(handles=handles, title="cluster", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              title_fontsize=7, frameon=False, ncol=1 + (len(handles) - 1) // 16)
    if title:
        ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def log_montage(rgb: np.ndarray, log_dir: str | os.PathLike, tag: str = "clusters/montage", step: int = 0) -> bool:
    """Add the montage array to TensorBoard in ``log_dir``; returns False when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return False
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_image(tag, rgb, global_step=step, dataformats="HWC")
    return True
