"""LeCL: lesion-enhanced contrastive learning of 2.5D slice embeddings (MoCo v3 with lesion keys), for 3D scans.

CLEAR (KatherLab/CLEAR) pretrains a 2D slice encoder with MoCo v3 (Chen, Xie and He, "An Empirical Study of
Training Self-Supervised Vision Transformers", ICCV 2021): the online branch (encoder -> 3-layer projector ->
2-layer predictor) must match the momentum branch (EMA copies of encoder and projector) on the other view,
``loss = l(q1, k2) + l(q2, k1)`` with ``l(q, k) = CE(q k^T / T, diag) * 2T``. Its lesion variant adds, for every
anchor, the batch's lesion keys once more to the softmax denominator (:class:`~medvol.losses.LeCLLoss`), so
views centred on lesions must be told apart from each other harder than ordinary slices.

On 3D volumes a sample is a 2.5D slice (``context`` neighbours on each side as channels, optionally several CT
windows as channels too, :mod:`medvol.transforms.slices`); a lesion pair is a crop around a lesion of the mask or
box list plus the whole slice, any other pair two random-resized crops
(:class:`~medvol.transforms.RandLesionSliceViewsd`). Batches without lesions give plain MoCo v3.

Batch keys: ``image_v1``, ``image_v2`` (``(B, C, H, W)`` in [0, 1]) and optionally ``is_lesion`` (``(B,)`` bool).

This module also holds the helpers the ``lecl_slice_embedding`` bundle calls: :func:`lecl_in_channels`,
:func:`lecl_preprocessing` and :func:`lecl_datalist`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, Orientationd, Spacingd
from torch import nn

from medvol.errors import ConfigError, MedvolError
from medvol.io.datalist import case_name, load_datalist
from medvol.io.readers import LoadVolumed
from medvol.losses import LeCLLoss
from medvol.methods.base import SSLMethod
from medvol.networks import PredictionHead, ProjectionHead, copy_momentum_encoder
from medvol.transforms.presets import get_preset
from medvol.transforms.slices import check_windows
from medvol.transforms.validation import CheckAlignedd, EnsureFinited

__all__ = ["LeCL", "lecl_in_channels", "lecl_preprocessing", "lecl_datalist"]


class LeCL(SSLMethod):
    """LeCL / MoCo v3 pretext task on a 2D slice encoder.

    Args:
        encoder: 2D slice encoder ``(B, C, H, W) -> (B, D)`` with attribute ``out_dim``
            (:func:`medvol.networks.build_slice_encoder`); it is ``self.backbone`` (saved as ``models/model.pt``).
        proj_dim: output size of projector and predictor (256 in MoCo v3 / CLEAR).
        hidden_dim: hidden size of the 3-layer projector (4096 in MoCo v3; smaller default for one GPU).
        pred_hidden_dim: hidden size of the 2-layer predictor (4096 in MoCo v3).
        temperature: softmax temperature T (1.0 in CLEAR's code; MoCo v3 uses 0.2 for ViTs).
        lesion_weight: weight w of the extra lesion terms (CLEAR's ``--sample-weight``).

    Raises:
        ValueError: when the encoder has no integer ``out_dim``.

    Example:
        >>> from medvol.networks import build_slice_encoder
        >>> method = LeCL(build_slice_encoder("mambaout", in_channels=3, dims=(8, 16), depths=(1, 1)), 16, 32, 32)
        >>> x = torch.rand(4, 3, 32, 32)
        >>> lesion = torch.tensor([True, False, False, True])
        >>> method({"image_v1": x, "image_v2": x.flip(-1), "is_lesion": lesion})["loss"].shape
        torch.Size([])
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 256, hidden_dim: int = 1024, pred_hidden_dim: int = 1024,
                 temperature: float = 1.0, lesion_weight: float = 1.0):
        super().__init__(encoder)
        out_dim = getattr(encoder, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"LeCL needs an encoder with an integer out_dim, got {out_dim!r} "
                             f"({type(encoder).__name__})")
        self.projector = ProjectionHead(out_dim, hidden_dim, proj_dim)
        self.predictor = PredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.momentum_backbone = copy_momentum_encoder(encoder)
        self.momentum_projector = copy_momentum_encoder(self.projector)
        self.criterion = LeCLLoss(temperature, lesion_weight)

    def momentum_pairs(self):
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Online branch: predictor(projector(encoder(x))), ``(B, proj_dim)`` (not normalised)."""
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum branch: momentum_projector(momentum_encoder(x)), ``(B, proj_dim)``, no gradient."""
        return self.momentum_projector(self.momentum_backbone(x))

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["image_v1"], batch["image_v2"]
        is_lesion = batch.get("is_lesion")
        if is_lesion is not None:
            is_lesion = torch.as_tensor(is_lesion, device=x1.device).reshape(-1).bool()
        # each view goes through its own forward (as MoCo v3): BatchNorm statistics are per view
        q1, q2 = self.query(x1), self.query(x2)
        k1, k2 = self.key(x1), self.key(x2)
        loss = self.criterion.symmetric(q1, k1, q2, k2, is_lesion)
        n_lesion = int(is_lesion.sum()) if is_lesion is not None else 0
        return {"loss": loss, "lesion_fraction": torch.tensor(n_lesion / x1.shape[0])}


def lecl_in_channels(context: int = 1, windows=None, image_channels: int = 1) -> int:
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


def lecl_preprocessing(preset: str = "mri", keys: Sequence[str] = ("image", "label"), windows=None,
                       spacing: Sequence[float] | None = None, orientation: str = "RAS", **preset_kwargs) -> Compose:
    """Volume preprocessing before 2.5D slicing: load, check, orient (RAS), optionally resample, normalise.

    Without ``windows`` this is the CT or MRI preset without foreground crop or padding (CT: HU window to
    [0, 1]; MRI: per-volume percentiles to [0, 1]). With ``windows`` (CT only) intensities stay in HU, because
    the slicing transforms render each window as its own [0, 1] channel.

    Args:
        preset: ``"ct"`` or ``"mri"``.
        keys: image key first, then label keys (missing labels are skipped).
        windows: CT windows rendered later by the slicing transforms (``None``: the preset normalises).
        spacing: target voxel size (mm); ``None`` keeps the native grid (slice positions stay source slices).
        orientation: axis codes; the default RAS makes axis 2 the axial axis.
        preset_kwargs: more arguments of the preset (``window``, ``percentiles``, ``n4``, ...).

    Raises:
        ConfigError: for an unknown preset, or windows with the MRI preset.
    """
    name = str(preset).lower()
    if name not in ("ct", "mri"):
        raise ConfigError(f"preset must be 'ct' or 'mri', got {preset!r}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    if windows is None:
        try:
            return get_preset(name, keys=keys, spacing=spacing, crop_foreground=False, orientation=orientation,
                              **preset_kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"preset {name}: {e}") from None
    if name != "ct":
        raise ConfigError(f"windows are CT Hounsfield windows: use preset 'ct' or windows null (got preset {preset!r})")
    lecl_in_channels(0, windows)  # validate
    image, labels = keys[0], keys[1:]
    steps = [LoadVolumed(keys, dtype=[np.float32] + [None] * len(labels), allow_missing_keys=True),
             EnsureFinited(image)]
    if labels:
        steps.append(CheckAlignedd(labels, reference_key=image))
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        steps.append(Spacingd(keys, pixdim=spacing, mode=["bilinear"] + ["nearest"] * len(labels),
                              allow_missing_keys=True))
    return Compose(steps)


def _match_boxes(image: str, boxes: dict[str, np.ndarray]):
    for key in (case_name(image), Path(image.split("#", 1)[0]).name):
        if key in boxes:
            return key
    return None


def lecl_datalist(source, lesion_boxes_csv: str | os.PathLike | None = None, lesion_boxes_options: dict | None = None,
                  cases: Sequence[str] | None = None, name: str = "dataset_dir") -> list[dict]:
    """Training datalist: images, their lesion masks (``label``) where the dataset pairs them, or CSV boxes.

    Args:
        source: folder (``imagesTr``/``labelsTr`` layouts pair masks by name; unlabeled images are kept), MSD
            ``dataset.json`` or CSV datalist (its ``label`` column is the lesion mask, empty = no lesion).
        lesion_boxes_csv: CSV of lesion boxes (:func:`medvol.transforms.load_lesion_boxes`), matched to images by
            case name or file name; when given, masks are ignored and images without rows are lesion-free. Boxes
            are in voxel coordinates of the preprocessed grid (RAS orientation, ``spacing``).
        lesion_boxes_options: arguments of ``load_lesion_boxes`` (``case_column``, ``slice_column``, ...).
        cases: keep only these case names (e.g. the pretraining part of a split file).
        name: config key named in errors.

    Returns:
        ``[{"image", ["label"] | ["boxes"], "case_index"}, ...]``.

    Raises:
        ConfigError: missing/empty dataset, unreadable box CSV, no box row matching any image, unknown cases.
    """
    from medvol.transforms import load_lesion_boxes

    if source is None or str(source).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} FOLDER")
    path = Path(str(source))
    if not path.exists():
        raise ConfigError(f"{name} '{source}' does not exist")
    try:
        items = load_datalist(path, **({"allow_unlabeled": True} if path.is_dir() else {}))
    except MedvolError as e:
        raise ConfigError(f"{name}: {e}") from e
    datalist = [{k: d[k] for k in ("image", "label") if d.get(k)} for d in items]
    if cases is not None:
        by_case = {case_name(d["image"]): d for d in datalist}
        missing = [c for c in cases if c not in by_case]
        if missing:
            raise ConfigError(f"{name}: {len(missing)} cases of the split are not in the dataset, e.g. {missing[0]}")
        datalist = [by_case[c] for c in cases]
    if lesion_boxes_csv not in (None, "", "None"):
        try:
            boxes = load_lesion_boxes(lesion_boxes_csv, **(lesion_boxes_options or {}))
        except MedvolError as e:
            raise ConfigError(f"lesion_boxes_csv: {e}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lesion_boxes_options: {e}") from e
        matched = 0
        for d in datalist:
            d.pop("label", None)
            key = _match_boxes(d["image"], boxes)
            if key is not None:
                d["boxes"] = boxes[key]
                matched += 1
        if boxes and not matched:
            raise ConfigError(f"lesion_boxes_csv '{lesion_boxes_csv}': none of its cases ({', '.join(list(boxes)[:3])}"
                              f", ...) names an image of {name} (match by case name or file name)")
    return [{**d, "case_index": i} for i, d in enumerate(datalist)]
