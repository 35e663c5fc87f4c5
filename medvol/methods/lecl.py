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

The ``lecl_slice_embedding`` bundle's data side lives where its kind does: :func:`medvol.io.lesion_datalist`
(images with masks or CSV boxes), :func:`medvol.transforms.slice_preset` (volume preprocessing before slicing)
and :func:`medvol.transforms.slice_channels` (channels of a 2.5D sample).
"""

from __future__ import annotations

import torch
from torch import nn

from medvol.engines.handlers import MomentumUpdateHandler
from medvol.losses import LeCLLoss
from medvol.methods.base import SSLMethod
from medvol.networks import PredictionHead, ProjectionHead, copy_momentum_encoder

__all__ = ["LeCL"]


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
        momentum, momentum_schedule: EMA momentum of the momentum branch after every step, ``"constant"`` or
            ``"cosine"`` (rising to 1 over training, MoCo v3 / BYOL); default 0.99, cosine.

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

    batch_keys = ("image_v1", "image_v2", "is_lesion")
    find_unused_parameters = False  # every online parameter gets a gradient at every step

    def __init__(self, encoder: nn.Module, proj_dim: int = 256, hidden_dim: int = 1024, pred_hidden_dim: int = 1024,
                 temperature: float = 1.0, lesion_weight: float = 1.0, momentum: float = 0.99,
                 momentum_schedule: str = "cosine"):
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
        self.momentum, self.momentum_schedule = momentum, momentum_schedule

    def train_handlers(self) -> list:
        return [MomentumUpdateHandler(self.momentum, self.momentum_schedule)]

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
