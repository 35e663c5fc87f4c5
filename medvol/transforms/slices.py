"""2.5D slice samples from 3D volumes (LeCL / CLEAR's slice embeddings, adapted to 3D scans).

A 2.5D sample of slice ``z`` stacks the slices ``z - context .. z + context`` as channels (slices beyond the
volume replicate the border slice); with CT ``windows`` every window rendering of those slices becomes a
channel too. Channel order is window-major, then input channel, then slice offset:
``C = len(windows) * C_in * (2 * context + 1)`` (``len(windows)`` counts as 1 without windows).

Geometry: the volume is channel-first ``(C_in, X, Y, Z)`` on an already oriented grid (e.g. after
``Orientationd(axcodes="RAS")``), ``axis`` is the spatial axis sliced (2 = axial for RAS). A slice is ``(h, w)``,
the two remaining spatial axes in their order; a box ``[x0, y0, x1, y1]`` is in slice voxel coordinates, ``x``
along ``h`` and ``y`` along ``w``, half-open (``x0 <= i < x1``) and may reach outside the slice.

Resizing: a sample is resized to ``spatial_size`` with bilinear interpolation (anti-aliased when shrinking).
With ``keep_aspect=True`` (the default) the slice is first padded, centred, to the aspect ratio of
``spatial_size`` so anatomy is not stretched; the padding value is the volume minimum pushed through the same
windows (air / background), so every sample of one volume is padded alike.

Outputs are plain ``torch.Tensor``: a stack of resized 2D samples has no 3D affine (``slice_index`` and the
boxes say where each sample comes from).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from medvol.errors import ConfigError

__all__ = [
    "CT_WINDOWS",
    "check_windows",
    "render_slices",
    "slice_pad_value",
    "fit_box",
    "crop_resize",
    "VolumeToSlices",
    "VolumeToSlicesd",
]

# (low HU, high HU) = (level - width / 2, level + width / 2)
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1350.0, 150.0),  # L -600, W 1500
    "soft_tissue": (-160.0, 240.0),  # L 40, W 400
    "bone": (-450.0, 1050.0),  # L 300, W 1500
    "brain": (0.0, 80.0),  # L 40, W 80
}


def check_windows(windows) -> tuple[tuple[float, float], ...] | None:
    """Validate ``windows``: ``None``, or a sequence of ``(low, high)`` pairs or :data:`CT_WINDOWS` names.

    Raises:
        ValueError: for an unknown name, a pair that is not two numbers, or ``low >= high``.
    """
    if windows is None:
        return None
    if isinstance(windows, str) or (len(windows) == 2 and all(isinstance(v, Real) for v in windows)):
        windows = [windows]  # one window given bare
    out = []
    for win in windows:
        if isinstance(win, str):
            if win.lower() not in CT_WINDOWS:
                raise ValueError(f"unknown window {win!r}; names: {', '.join(CT_WINDOWS)}, or a (low, high) pair.")
            win = CT_WINDOWS[win.lower()]
        if isinstance(win, Real) or len(win) != 2 or not float(win[0]) < float(win[1]):
            raise ValueError(f"windows must be (low, high) pairs with low < high, got {win!r}.")
        out.append((float(win[0]), float(win[1])))
    if not out:
        raise ValueError("windows must hold at least one (low, high) pair, or be None.")
    return tuple(out)


def _check_size(spatial_size) -> tuple[int, int] | None:
    if spatial_size is None:
        return None
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"spatial_size must be two positive integers (H, W) or None, got {spatial_size!r}.")
    return size


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)


def _as_volume(img, name: str = "img") -> torch.Tensor:
    vol = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    if vol.ndim != 4:
        raise ValueError(f"{name} must be a channel-first 3D volume (C, X, Y, Z), got shape {tuple(vol.shape)}.")
    return vol


def render_slices(volume: torch.Tensor, positions, axis: int = 2, context: int = 1, windows=None) -> torch.Tensor:
    """The 2.5D samples of ``positions`` at native in-plane size, as float32 ``(n, C, h, w)``.

    Args:
        volume: ``(C_in, X, Y, Z)`` tensor.
        positions: slice indices along ``axis`` (integers in ``[0, n_slices)``).
        axis: spatial axis sliced (0, 1 or 2).
        context: neighbouring slices on each side; border slices are replicated.
        windows: ``None`` (raw intensities) or ``(low, high)`` pairs, each mapped linearly to [0, 1] and clipped.
    """
    vol = volume.movedim(axis + 1, 1)  # (C_in, S, h, w)
    n_slices = vol.shape[1]
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n_slices):
        raise ValueError(f"slice positions must lie in [0, {n_slices}), got {pos.tolist()}.")
    offsets = torch.arange(-context, context + 1)
    idx = (pos[:, None] + offsets[None]).clamp_(0, n_slices - 1)  # (n, K), K = 2 * context + 1
    x = vol[:, idx].movedim(0, 1).float()  # (C_in, n, K, h, w) -> (n, C_in, K, h, w)
    if windows:
        x = torch.stack([((x - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in windows], dim=1)  # (n, W, C_in, K, ..)
    return x.reshape(pos.numel(), -1, *vol.shape[2:])


def slice_pad_value(volume: torch.Tensor, context: int = 1, windows=None) -> torch.Tensor:
    """Per output channel padding value ``(C,)``: the per-channel volume minimum rendered like the samples."""
    mins = volume.reshape(volume.shape[0], -1).amin(dim=1).reshape(-1, 1, 1, 1)  # (C_in, 1, 1, 1)
    return render_slices(mins, [0], 2, context, windows).reshape(-1)  # windowing is monotonic


def fit_box(h: int, w: int, spatial_size: Sequence[int] | None, keep_aspect: bool = True) -> tuple[int, ...]:
    """Box of the whole ``(h, w)`` slice, padded (centred) to the aspect ratio of ``spatial_size`` if asked."""
    if spatial_size is None or not keep_aspect:
        return (0, 0, h, w)
    ratio = spatial_size[0] / spatial_size[1]  # H / W
    if h / w < ratio:
        pad = max(0, round(w * ratio) - h)
        return (-(pad // 2), 0, h + pad - pad // 2, w)
    pad = max(0, round(h / ratio) - w)
    return (0, -(pad // 2), h, w + pad - pad // 2)


def crop_resize(stack: torch.Tensor, box: Sequence[int], spatial_size: Sequence[int] | None, mode: str = "bilinear",
                pad_value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Crop ``box`` (``[x0, y0, x1, y1]``, may exceed the slice) from ``(n, C, h, w)`` and resize it.

    Args:
        stack: ``(n, C, h, w)`` float tensor.
        box: integer half-open box; parts outside the slice are filled with ``pad_value``.
        spatial_size: output ``(H, W)``; ``None`` keeps the crop size.
        mode: ``"bilinear"`` (anti-aliased when shrinking) or ``"nearest"`` (for labels).
        pad_value: a number or one value per channel ``(C,)``.

    Raises:
        ValueError: for an empty box or an unknown mode.
    """
    x0, y0, x1, y1 = (int(b) for b in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box must satisfy x0 < x1 and y0 < y1, got {list(box)}.")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
    n, c, h, w = stack.shape
    region = stack[:, :, max(x0, 0):max(min(x1, h), 0), max(y0, 0):max(min(y1, w), 0)]
    if (x0, y0, x1, y1) != (max(x0, 0), max(y0, 0), min(x1, h), min(y1, w)):
        fill = torch.as_tensor(pad_value, dtype=stack.dtype).reshape(1, -1, 1, 1)
        out = fill.expand(n, c, x1 - x0, y1 - y0).clone()
        ox, oy = max(0, -x0), max(0, -y0)
        out[:, :, ox:ox + region.shape[2], oy:oy + region.shape[3]] = region
        region = out
    if spatial_size is None or tuple(region.shape[2:]) == tuple(spatial_size):
        return region.contiguous()
    if mode == "nearest":
        return F.interpolate(region, size=tuple(spatial_size), mode="nearest-exact")
    return F.interpolate(region, size=tuple(spatial_size), mode="bilinear", align_corners=False, antialias=True)


class VolumeToSlices(Transform):
    """Turn a ``(C_in, X, Y, Z)`` volume into a stack of 2.5D samples ``(n_slices, C, H, W)`` (deterministic).

    Used to embed a whole scan slice by slice (CLEAR's per-patient feature extraction). See the module
    docstring for the channel order, geometry and padding.

    Args:
        axis: spatial axis sliced (2 = axial on a RAS grid).
        context: neighbouring slices on each side stacked as channels (0 = single slice).
        windows: ``None`` (raw intensities), or ``(low, high)`` HU pairs / :data:`CT_WINDOWS` names.
        spatial_size: output ``(H, W)``; ``None`` keeps the native in-plane size (no padding either).
        stride: keep every ``stride``-th slice, starting at 0.
        skip_empty_threshold: drop slices whose centre slice has no voxel above this raw (pre-window) value
            (e.g. -900 for CT air, 0 for zero-padded MRI); ``None`` keeps all. May leave an empty stack.
        keep_aspect: pad to the aspect ratio of ``spatial_size`` before resizing (False stretches).
        mode: ``"bilinear"`` for images, ``"nearest"`` for label volumes.
        return_index: also return the slice positions (like MONAI's ``CropForeground(return_coords=True)``).
        chunk_size: slices rendered at once (bounds memory on large scans).

    Raises:
        ValueError: for bad arguments, or an input that is not a channel-first 3D volume.

    Example:
        >>> ct = torch.full((1, 122, 101, 30), -1000.0)  # (C, X, Y, Z) in HU: air around a soft-tissue block
        >>> ct[:, 20:100, 20:80] = 40.0
        >>> stack, z = VolumeToSlices(windows=["lung", "soft_tissue", "bone"], return_index=True)(ct)
        >>> stack.shape, z[:3].tolist()  # 3 windows x (1 + 2 context slices) = 9 channels
        (torch.Size([30, 9, 224, 224]), [0, 1, 2])
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, axis: int = 2, context: int = 1, windows=None, spatial_size: Sequence[int] | None = (224, 224),
                 stride: int = 1, skip_empty_threshold: float | None = None, keep_aspect: bool = True,
                 mode: str = "bilinear", return_index: bool = False, chunk_size: int = 32) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of (C, X, Y, Z)), got {axis!r}.")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
        self.axis, self.context = axis, _check_int("context", context, 0)
        self.windows = check_windows(windows)
        self.spatial_size = _check_size(spatial_size)
        self.stride = _check_int("stride", stride, 1)
        self.skip_empty_threshold, self.keep_aspect, self.mode = skip_empty_threshold, keep_aspect, mode
        self.return_index, self.chunk_size = return_index, _check_int("chunk_size", chunk_size, 1)

    def positions(self, img) -> torch.Tensor:
        """The slice positions this transform keeps for ``img`` (stride, then the empty-slice filter)."""
        vol = _as_volume(img)
        pos = torch.arange(0, vol.shape[self.axis + 1], self.stride)
        if self.skip_empty_threshold is not None:
            peak = vol.movedim(self.axis + 1, 1).amax(dim=(0, 2, 3))  # (S,) max of each centre slice
            pos = pos[peak[pos] > self.skip_empty_threshold]
        return pos

    def __call__(self, img, positions=None):
        """Slice ``img``; ``positions`` overrides the computed slice positions (e.g. to align a label)."""
        vol = _as_volume(img)
        pos = self.positions(vol) if positions is None else torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        h, w = (s for i, s in enumerate(vol.shape[1:]) if i != self.axis)
        box = fit_box(h, w, self.spatial_size, self.keep_aspect)
        pad = slice_pad_value(vol, self.context, self.windows) if self.mode == "bilinear" else 0.0
        chunks = [crop_resize(render_slices(vol, p, self.axis, self.context, self.windows), box, self.spatial_size,
                              self.mode, pad) for p in (pos.split(self.chunk_size) if pos.numel() else [])]
        if chunks:
            stack = torch.cat(chunks)
        else:
            n_ch = len(self.windows or [None]) * vol.shape[0] * (2 * self.context + 1)
            stack = torch.zeros(0, n_ch, *(self.spatial_size or (h, w)))
        return (stack, pos) if self.return_index else stack


class VolumeToSlicesd(MapTransform):
    """Dictionary version of :class:`VolumeToSlices`: writes the stack to ``key`` and the positions to
    ``slice_index_key``. The positions come from the first key and are reused for the others, so image and
    label stacks stay aligned (give ``mode=("bilinear", "nearest")`` and use ``windows=None`` for labels).

    Args:
        keys: volumes to slice.
        mode: one mode, or one per key.
        slice_index_key: where the ``(n_slices,)`` positions go.
        other arguments: as in :class:`VolumeToSlices`.
        allow_missing_keys: skip absent keys.
    """

    backend = VolumeToSlices.backend

    def __init__(self, keys: KeysCollection, axis: int = 2, context: int = 1, windows=None,
                 spatial_size: Sequence[int] | None = (224, 224), stride: int = 1,
                 skip_empty_threshold: float | None = None, keep_aspect: bool = True,
                 mode: str | Sequence[str] = "bilinear", slice_index_key: str = "slice_index",
                 chunk_size: int = 32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"mode must be one string or one per key ({len(self.keys)}), got {mode!r}.")
        self.slicers = {k: VolumeToSlices(axis, context, windows, spatial_size, stride, skip_empty_threshold,
                                          keep_aspect, m, True, chunk_size) for k, m in zip(self.keys, modes)}
        self.slice_index_key = slice_index_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        pos = None
        for key in self.key_iterator(d):
            d[key], pos = self.slicers[key](d[key], pos)
        if pos is not None:
            d[self.slice_index_key] = pos
        return d


def slice_channels(context: int = 1, windows=None, image_channels: int = 1) -> int:
    """Channels of a 2.5D sample: ``len(windows) * image_channels * (2 * context + 1)`` (no windows counts 1).

    Raises:
        ConfigError: for a negative ``context`` or invalid ``windows`` (the message names the value).
    """
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ConfigError(f"context must be an integer >= 0 (neighbour slices on each side), got {context!r}")
    try:
        wins = check_windows(windows)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"windows: {e}") from None
    return (len(wins) if wins else 1) * int(image_channels) * (2 * int(context) + 1)
