"""Patch-level volumetric clustering: SwAV swapped prediction between the /8 tokens two overlapping crops share.

radioSSL (Trustworthy-AI-UU-NKI/radioSSL, patch-level clustering; see ``docs/methods/patch_clustering.md``),
after SwAV (Caron et al., NeurIPS 2020). Two crops of a volume with IoU >= 0.3
(:class:`~medvol.transforms.RandCropPaird` with ``min_iou``) are intensity-augmented separately. The encoder's
map at stride 8 gives one token per 8^3 voxels; ``Linear(C -> proj_dim)`` and L2 normalisation give embeddings
``z``; the tokens of both views are sampled at the same source points over the overlap of the two boxes
(:func:`~medvol.transforms.roi_align_pair`), renormalised, and scored against K L2-normalised prototypes. Targets
are the Sinkhorn-Knopp equipartition of the *other* view's detached scores::

    loss = 1/2 [ CE(s_1 / T, sinkhorn(s_2)) + CE(s_2 / T, sinkhorn(s_1)) ]     (softmax over the K prototypes)

Pairs whose crops do not overlap are left out. Batch keys: ``image_v1``, ``image_v2``, ``box_v1``, ``box_v2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvol.losses import SwappedPredictionLoss
from medvol.methods.base import SSLMethod
from medvol.transforms.geometry import roi_align_pair

__all__ = ["PatchClustering", "encoder_strides"]


@torch.no_grad()
def encoder_strides(backbone: nn.Module) -> list[tuple[int, ...]]:
    """Downsampling factor of every encoder level, measured with one small forward pass (eval mode)."""
    size = tuple(2 * d for d in backbone.spatial_divisor)  # smallest input whose bottleneck is not 1 voxel
    was_training = backbone.training
    backbone.eval()
    param = next(backbone.parameters())
    x = torch.zeros(1, backbone.in_channels, *size, device=param.device, dtype=param.dtype)
    maps = backbone.encode(x)
    backbone.train(was_training)
    return [tuple(s // m for s, m in zip(size, f.shape[2:])) for f in maps]


class PatchClustering(SSLMethod):
    """Patch-level clustering pretext task (tokens -> prototypes, Sinkhorn targets, swapped prediction).

    Args:
        backbone: :class:`~medvol.networks.Backbone`; only its encoder is trained (the saved state dict keeps
            the untouched decoder so fine-tuning bundles load it key for key).
        proj_dim: embedding size of the tokens (radioSSL: 64).
        num_prototypes: K (radioSSL: 50).
        temperature: student softmax temperature T (0.1).
        sinkhorn_iters: Sinkhorn-Knopp iterations (3).
        epsilon: Sinkhorn regularisation (0.05).
        token_level: encoder level of the tokens; ``None`` picks the level with stride 8 (radioSSL's /8 grid)
            or the bottleneck when no level has stride 8.
        points_per_axis: sample points over the overlap per axis; ``None`` uses the token grid size.
        sinkhorn_distributed: equipartition over all DDP ranks (SwAV) instead of each rank's own tokens. Off by
            default: every rank's batch already holds hundreds of tokens, and a rank whose pairs happen not to
            overlap must not block the others.

    Raises:
        ValueError: for a bad ``token_level`` or non-positive sizes.

    Example:
        >>> from medvol.networks import UNet3D
        >>> method = PatchClustering(UNet3D(channels=(4, 8, 16, 32)), proj_dim=16, num_prototypes=10)
        >>> batch = {"image_v1": torch.rand(2, 1, 32, 32, 32), "image_v2": torch.rand(2, 1, 32, 32, 32),
        ...          "box_v1": torch.tensor([[[0., 0, 0], [32, 32, 32]]] * 2),
        ...          "box_v2": torch.tensor([[[8., 8, 8], [40, 40, 40]]] * 2)}
        >>> method(batch)["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image_v1", "image_v2", "box_v1", "box_v2")

    def __init__(self, backbone, proj_dim: int = 64, num_prototypes: int = 50, temperature: float = 0.1,
                 sinkhorn_iters: int = 3, epsilon: float = 0.05, token_level: int | None = None,
                 points_per_axis: int | None = None, sinkhorn_distributed: bool = False):
        super().__init__(backbone)
        if proj_dim < 1 or num_prototypes < 2:
            raise ValueError(f"proj_dim must be >= 1 and num_prototypes >= 2, got {proj_dim}, {num_prototypes}")
        if points_per_axis is not None and points_per_axis < 1:
            raise ValueError(f"points_per_axis must be >= 1 or None, got {points_per_axis}")
        strides = encoder_strides(backbone)
        n_levels = len(strides)
        if token_level is None:
            token_level = next((i for i, s in enumerate(strides) if max(s) == 8), n_levels - 1)
        if not -n_levels <= token_level < n_levels:
            raise ValueError(f"token_level must index one of the {n_levels} encoder levels, got {token_level}")
        self.token_level = token_level % n_levels
        self.token_stride = strides[self.token_level]
        self.projection = nn.Linear(backbone.encoder_channels[self.token_level], proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.loss_fn = SwappedPredictionLoss(temperature)
        self.sinkhorn_iters, self.epsilon = sinkhorn_iters, epsilon
        self.points_per_axis, self.sinkhorn_distributed = points_per_axis, sinkhorn_distributed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_dim, *token_grid) L2-normalised token embeddings of a batch of crops."""
        tokens = self.backbone.encode(x)[self.token_level]  # (B, C, *g)
        z = self.projection(tokens.movedim(1, -1))  # (B, *g, proj_dim): Linear over channels
        return F.normalize(z, dim=-1).movedim(-1, 1)

    def _prototype_weight(self) -> torch.Tensor:
        if self.training:  # SwAV: project the prototypes back onto the sphere before every step
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
            return self.prototypes.weight
        return F.normalize(self.prototypes.weight, dim=1)

    def forward(self, batch: dict) -> dict:
        from medvol.cluster.sinkhorn import sinkhorn  # lazy: `import medvol.methods` need not load faiss

        x1, x2 = batch["image_v1"], batch["image_v2"]
        z = self.embed(torch.cat([x1, x2]))  # (2B, D, *g)
        z1, z2 = z.chunk(2)
        size = None if self.points_per_axis is None else (self.points_per_axis,) * (z.ndim - 2)
        a1, a2, valid = roi_align_pair(z1, z2, batch["box_v1"], batch["box_v2"], size=size)  # (B, D, P) each
        # (B, D, P) -> (N, D) tokens of the overlapping pairs only, renormalised after interpolation
        a1 = F.normalize(a1[valid].transpose(1, 2).reshape(-1, a1.shape[1]), dim=1)
        a2 = F.normalize(a2[valid].transpose(1, 2).reshape(-1, a2.shape[1]), dim=1)
        weight = self._prototype_weight()
        if a1.shape[0] == 0:  # no pair overlaps: a zero loss that still reaches every parameter
            zero = z.sum() * 0.0 + weight.sum() * 0.0
            return {"loss": zero, "loss_swap": zero.detach(), "overlap_pairs": valid.sum().detach()}
        s1, s2 = a1 @ weight.t(), a2 @ weight.t()  # (N, K) cosine scores
        q1 = sinkhorn(s1.detach(), self.sinkhorn_iters, self.epsilon, distributed=self.sinkhorn_distributed)
        q2 = sinkhorn(s2.detach(), self.sinkhorn_iters, self.epsilon, distributed=self.sinkhorn_distributed)
        loss = 0.5 * (self.loss_fn(s1, q2) + self.loss_fn(s2, q1))
        with torch.no_grad():
            used = torch.cat([q1, q2]).argmax(dim=1).unique().numel()
        return {"loss": loss, "loss_swap": loss.detach(), "overlap_pairs": valid.sum().detach(),
                "prototypes_used": torch.tensor(float(used))}
