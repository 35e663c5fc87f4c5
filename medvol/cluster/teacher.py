"""Per-voxel teacher features for pseudo-labelling a volume (pixel-level clustering).

A *teacher* turns one preprocessed volume (C, X, Y, Z) into :class:`VoxelFeatures`: a few feature maps at
any resolution, read at arbitrary voxels (the k-means sample) or at every voxel by chunks (the assignment)
without ever materialising a (D, X, Y, Z) array of a large volume. Two teachers:

- :class:`EncoderTeacher` (default in ``bundles/pixel_clustering``): a medvol encoder checkpoint (e.g.
  ``models/model.pt`` of ``patch_clustering`` or ``caid``); every encoder level is upsampled trilinearly to the
  voxel (``align_corners=False``, like ``F.interpolate``), L2-normalised per level, concatenated and scaled by
  ``1/sqrt(levels)``, so each voxel's feature has unit norm (cluster with spherical k-means). This replaces
  radioSSL's 2D DINO ViT + FeatUp teacher, which would need downloaded weights.
- :class:`HandcraftedTeacher` (``teacher_checkpoint: null``): intensity, gradient magnitude, and local mean and
  standard deviation in 3^3 and 7^3 windows (6 features, torch convolutions), each z-scored over the volume's
  foreground so no feature dominates the Euclidean k-means.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VoxelFeatures", "EncoderTeacher", "HandcraftedTeacher", "build_teacher"]


def _plain(image) -> torch.Tensor:
    """A plain float32 tensor (MetaTensor metadata dropped: the teacher only needs voxels)."""
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    return image.float()


class VoxelFeatures:
    """Features of every voxel of one volume, computed on demand from maps that cover the volume.

    Args:
        maps: list of (C_l, *grid_l) tensors, each covering the box ``[0, extent)`` in voxels.
        spatial_shape: the volume's (X, Y, Z); voxel ``i`` has centre ``i + 1/2``.
        extent: voxels covered by the maps (>= ``spatial_shape`` when the input was padded); default the shape.
        normalize_levels: L2-normalise each map's feature per voxel, then divide the concatenation by
            sqrt(number of maps) (unit-norm output).

    Attributes:
        dim: feature dimension D (sum of the maps' channels).
    """

    def __init__(self, maps: Sequence[torch.Tensor], spatial_shape: Sequence[int],
                 extent: Sequence[int] | None = None, normalize_levels: bool = False):
        self.maps = [m.float() for m in maps]
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.extent = tuple(int(s) for s in (extent or spatial_shape))
        self.normalize_levels = normalize_levels
        self.dim = sum(m.shape[0] for m in self.maps)

    @property
    def num_voxels(self) -> int:
        return math.prod(self.spatial_shape)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """Features (n, D) float32 (on the maps' device) of the voxels with flat C-order indices ``index`` (n,)."""
        index = index.to(self.maps[0].device).long()
        coords = torch.stack(torch.unravel_index(index, self.spatial_shape), dim=1)  # (n, 3) voxel indices
        parts = []
        for m in self.maps:
            if tuple(m.shape[1:]) == self.spatial_shape:  # full resolution: read the voxels directly
                f = m.flatten(1)[:, index].t()  # (n, C)
            else:  # trilinear sample at the voxel centres, align_corners=False
                extent = torch.tensor(self.extent, dtype=torch.float64, device=index.device)
                norm = 2.0 * (coords.double() + 0.5) / extent - 1.0  # (n, 3)
                grid = norm.flip(-1).to(m.dtype).view(1, -1, 1, 1, len(self.extent))
                f = F.grid_sample(m[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
                f = f.view(m.shape[0], -1).t()  # (1, C, n, 1, 1) -> (n, C)
            parts.append(F.normalize(f, dim=1) if self.normalize_levels else f)
        out = torch.cat(parts, dim=1)
        return out / math.sqrt(len(parts)) if self.normalize_levels else out

    def chunks(self, chunk_voxels: int = 1 << 18) -> Iterator[torch.Tensor]:
        """Features of all voxels in C order, ``chunk_voxels`` rows at a time."""
        for start in range(0, self.num_voxels, chunk_voxels):
            stop = min(start + chunk_voxels, self.num_voxels)
            yield self.at(torch.arange(start, stop, device=self.maps[0].device))


class HandcraftedTeacher:
    """Hand-made voxel features (no network): the documented fallback when no teacher checkpoint is given.

    Features per voxel (after the preset's [0, 1] normalisation): intensity, gradient magnitude (central
    differences), local mean and local standard deviation in cubic windows of ``windows`` voxels; each channel
    is z-scored with its mean and standard deviation over the volume's foreground (intensity > threshold).

    Args:
        foreground_threshold: intensity above which a voxel is foreground.
        windows: odd window sizes of the local statistics (two scales by default).
        device: where the convolutions run.
    """

    spherical = False

    def __init__(self, foreground_threshold: float = 0.05, windows: Sequence[int] = (3, 7), device="cpu"):
        if any(w < 1 or w % 2 == 0 for w in windows):
            raise ValueError(f"windows must be odd positive sizes, got {tuple(windows)}")
        self.foreground_threshold, self.windows, self.device = foreground_threshold, tuple(windows), device
        names = ["intensity", "gradient magnitude"] + [f"{s} {w}^3" for w in self.windows for s in ("mean", "std")]
        self.feature_source = (f"handcrafted: {', '.join(names)}; z-scored per volume over foreground "
                               f"(intensity > {foreground_threshold})")

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> VoxelFeatures:
        x = _plain(image).to(self.device)[:1][None]  # (1, 1, X, Y, Z), first channel
        padded = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
        grads = []
        for axis in range(3):  # central difference along each axis, as a 3-tap convolution
            kernel = torch.zeros(1, 1, 3, 3, 3, device=x.device)
            idx = [1, 1, 1]
            idx[axis] = 0
            kernel[(0, 0, *idx)] = -0.5
            idx[axis] = 2
            kernel[(0, 0, *idx)] = 0.5
            grads.append(F.conv3d(padded, kernel))
        feats = [x, torch.sqrt(sum(g * g for g in grads))]
        for w in self.windows:
            mean = F.avg_pool3d(x, w, stride=1, padding=w // 2, count_include_pad=False)
            sq = F.avg_pool3d(x * x, w, stride=1, padding=w // 2, count_include_pad=False)
            feats += [mean, torch.sqrt((sq - mean * mean).clamp(min=0))]
        maps = torch.cat(feats, dim=1)[0]  # (6, X, Y, Z)
        fg = x[0, 0] > self.foreground_threshold
        ref = maps[:, fg] if int(fg.sum()) > 1 else maps.flatten(1)  # (6, n_fg)
        mu, sd = ref.mean(dim=1), ref.std(dim=1)
        maps = (maps - mu.view(-1, 1, 1, 1)) / sd.clamp(min=1e-6).view(-1, 1, 1, 1)
        return VoxelFeatures([maps], maps.shape[1:])


class EncoderTeacher:
    """Multi-scale features of a pretrained medvol encoder, upsampled to every voxel.

    Args:
        backbone: a :class:`~medvol.networks.Backbone` built like the checkpoint's network.
        checkpoint: ``models/model.pt`` of a medvol bundle (only ``encoder.*`` is loaded); ``None`` keeps the
            backbone's current weights.
        levels: encoder levels to use (indices into ``encode``'s list); ``None`` uses all of them.
        device: where the encoder runs.

    Raises:
        FileNotFoundError / medvol.errors.DataError: from :func:`medvol.networks.load_pretrained`.
    """

    spherical = True

    def __init__(self, backbone: nn.Module, checkpoint: str | os.PathLike | None = None,
                 levels: Sequence[int] | None = None, device="cpu"):
        from medvol.networks import load_pretrained

        if checkpoint is not None:
            load_pretrained(backbone, checkpoint, prefixes=("encoder.",), strict_shapes=True)
        n = len(backbone.encoder_channels)
        self.levels = tuple(range(n)) if levels is None else tuple(int(i) % n for i in levels)
        self.backbone = backbone.to(device).eval()
        self.device = device
        channels = [backbone.encoder_channels[i] for i in self.levels]
        self.feature_source = (f"encoder {type(backbone).__name__} levels {list(self.levels)} channels {channels} "
                               f"of {os.fspath(checkpoint) if checkpoint else 'untrained weights'}; trilinear to "
                               "voxels, L2 per level, concatenated")

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> VoxelFeatures:
        x = _plain(image).to(self.device)[None]  # (1, C, X, Y, Z)
        shape = tuple(x.shape[2:])
        div = self.backbone.spatial_divisor
        pad = [(-s) % d for s, d in zip(shape, div)]
        extent = tuple(s + p for s, p in zip(shape, pad))
        x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])  # zeros after the end of each axis
        maps = self.backbone.encode(x)
        return VoxelFeatures([maps[i][0] for i in self.levels], shape, extent, normalize_levels=True)


def build_teacher(checkpoint: str | os.PathLike | None, backbone: nn.Module | None = None,
                  levels: Sequence[int] | None = None, foreground_threshold: float = 0.05, device="cpu"):
    """The bundle's teacher: :class:`EncoderTeacher` of ``checkpoint``, or :class:`HandcraftedTeacher` when None.

    Raises:
        medvol.errors.ConfigError: ``checkpoint`` is given but does not exist, or no backbone is given for it.
    """
    from medvol.errors import ConfigError

    if checkpoint is None or str(checkpoint).strip() in ("", "None", "null"):
        return HandcraftedTeacher(foreground_threshold, device=device)
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"teacher_checkpoint '{checkpoint}' does not exist (train patch_clustering or caid "
                          "first, or pass --teacher_checkpoint null for hand-made features)")
    if backbone is None:
        raise ConfigError("teacher_checkpoint needs a backbone built like the checkpoint's network")
    try:
        return EncoderTeacher(backbone, checkpoint, levels, device)
    except ValueError as e:  # shape mismatch or not a state dict: one line naming the config key
        raise ConfigError(f"teacher_checkpoint '{checkpoint}': {' '.join(str(e).split())} (set "
                          "teacher_backbone_options like the checkpoint's network)") from e
