"""Image-report alignment losses: LoVT's global and local terms; ConVIRT and CLIP use the global one.

- :class:`GlobalAlignmentLoss`: InfoNCE between image and report embeddings of a batch, in both directions,
  ``lambda_a2b * L(image -> reports) + lambda_b2a * L(report -> images)`` with
  ``L(a -> b) = mean_i -log( exp(s_ii) / sum_j exp(s_ij) )``, ``s = cos / temperature`` (LoVT and ConVIRT: 0.75 /
  0.25, tau 0.1; CLIP: 0.5 / 0.5 with a learned temperature starting at 0.07). Items of one group (the same
  report text, e.g. several images of one patient with one note) are not negatives of each other.
- :class:`LocalIntraSampleLoss`: LoVT's local contrastive loss inside one sample, between each local element
  ``a_i`` (an image region or a sentence) and the cross-modal representations ``b_j`` of the same sample::

      l(a -> b)_i = -sum_j w_ij s_ij + log sum_{j valid} exp(s_ij),     s_ij = cos(a_i, b_j) / tau  (tau 0.3)

  and ``l(b -> a)`` with ``s`` transposed; ``w`` is the row-normalised positive weight matrix:
  :func:`spatial_positive_weights` for image regions (cells within a normalised grid distance of 0.5, weighted
  ``exp(-d)``, 2D or 3D grids), the identity for sentences. Elements are weighted by ``weights`` (LoVT: the
  aggregation attention, detached), normalised over valid elements; padded elements count nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvol.losses.utils import check_temperature, no_autocast

__all__ = ["GlobalAlignmentLoss", "LocalIntraSampleLoss", "spatial_positive_weights"]


def spatial_positive_weights(grid: Sequence[int], threshold: float = 0.5, smooth_lambda: float | None = 1.0,
                             spacing: Sequence[float] | None = None) -> torch.Tensor:
    """(N, N) positive weights between the cells of a 2D or 3D grid (N = prod(grid), row-major like ``flatten``).

    Distances are between cell indices (times ``spacing``, e.g. a thick-slice axis), divided by the grid's
    diagonal (LoVT's "relative" threshold), so they lie in [0, 1]; cells within ``threshold`` are positives,
    weighted ``exp(-smooth_lambda * d)`` (``None``: weight 1). The diagonal (d = 0) is always positive.

    Example:
        >>> w = spatial_positive_weights((3, 3), threshold=0.3)
        >>> w.shape, bool(w[0, 0] == 1), bool(w[0, 8] == 0)
        (torch.Size([9, 9]), True, True)
    """
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1:
        raise ValueError(f"grid {grid} must list positive sizes")
    scale = torch.tensor([1.0] * len(grid) if spacing is None else [float(s) for s in spacing])
    if scale.numel() != len(grid):
        raise ValueError(f"spacing needs {len(grid)} entries, got {list(spacing)}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"),
                         dim=-1).reshape(-1, len(grid)) * scale
    diagonal = float(torch.sqrt(((torch.tensor(grid, dtype=torch.float32) * scale) ** 2).sum()))
    d = torch.cdist(coords, coords) / diagonal
    positive = d <= threshold
    weights = torch.exp(-float(smooth_lambda) * d) if smooth_lambda is not None else torch.ones_like(d)
    return weights * positive


class GlobalAlignmentLoss(nn.Module):
    """Weighted bidirectional InfoNCE between paired embeddings (ConVIRT / CLIP / LoVT global term).

    Args:
        temperature: softmax temperature (0.1 LoVT/ConVIRT; CLIP's starting value 0.07).
        lambda_a2b: weight of image -> report (anchor image, candidates the batch's reports).
        lambda_b2a: weight of report -> image.
        learn_temperature: learn the temperature (CLIP), as ``log(1/tau)`` clamped to ``tau >= 0.01``.

    ``forward(input, target, groups=None)``: ``input`` (B, D) image and ``target`` (B, D) report embeddings
    (normalised here); ``groups`` (B,) integer labels, equal for items that must not be each other's negatives.
    :meth:`directional` returns both terms unweighted.

    Example:
        >>> loss = GlobalAlignmentLoss()
        >>> float(loss(torch.eye(4), torch.eye(4))) < float(loss(torch.eye(4), torch.eye(4).roll(1, 0)))
        True
    """

    def __init__(self, temperature: float = 0.1, lambda_a2b: float = 0.75, lambda_b2a: float = 0.25,
                 learn_temperature: bool = False):
        super().__init__()
        check_temperature(temperature)
        self.lambda_a2b, self.lambda_b2a = float(lambda_a2b), float(lambda_b2a)
        self.learn_temperature = bool(learn_temperature)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.log_scale.detach().clamp(max=math.log(100.0)).exp())

    def directional(self, input: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None):
        """``(L(image -> report), L(report -> image))`` (see the module docstring)."""
        if input.ndim != 2 or input.shape != target.shape or input.shape[0] < 1:
            raise ValueError(f"input and target must be (B, D) of one shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}")
        with no_autocast(input):
            a, b = F.normalize(input.float(), dim=1), F.normalize(target.float(), dim=1)
            scale = self.log_scale.clamp(max=math.log(100.0)).exp()
            logits = a @ b.t() * scale  # (B, B): image i vs report j
            if groups is not None:
                groups = groups.to(logits.device)
                same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool,
                                                                        device=logits.device)
                logits = logits.masked_fill(same, float("-inf"))
            labels = torch.arange(a.shape[0], device=a.device)
            return F.cross_entropy(logits, labels), F.cross_entropy(logits.t(), labels)

    def forward(self, input: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        a2b, b2a = self.directional(input, target, groups)
        return self.lambda_a2b * a2b + self.lambda_b2a * b2a


class LocalIntraSampleLoss(nn.Module):
    """LoVT's local intra-sample contrastive loss (see the module docstring), both directions.

    Args:
        temperature: tau of the scaled cosine similarities (0.3).
        lambda_ab, lambda_ba: weights of ``l(a -> b)`` and ``l(b -> a)`` in ``forward`` (LoVT: 0.375 each, for the
            image and for the report side).

    ``forward(input, target, positive_weights=None, mask=None, weights=None)``:

    - ``input`` (B, N, D): the local embeddings ``a``; ``target`` (B, N, D): their cross-modal representations ``b``;
    - ``positive_weights``: (N, N) or (B, N, N), non-negative; None = identity (each element's own
      representation is its only positive, the sentence case);
    - ``mask`` (B, N) bool: valid elements (padded sentences False); ``weights`` (B, N): element weights
      (default uniform), normalised over valid elements.

    Example:
        >>> x = torch.randn(2, 5, 8)
        >>> LocalIntraSampleLoss()(x, x).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.3, lambda_ab: float = 1.0, lambda_ba: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.lambda_ab, self.lambda_ba = float(lambda_ab), float(lambda_ba)

    def directional(self, input: torch.Tensor, target: torch.Tensor, positive_weights: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        """``(l(a -> b), l(b -> a))``, each a scalar: element losses weighted, summed per sample, batch mean."""
        if input.ndim != 3 or input.shape != target.shape:
            raise ValueError(f"input and target must be (B, N, D) of one shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}")
        b, n, _ = input.shape
        device = input.device
        with no_autocast(input):
            mask = torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
            valid = mask.float()
            w = valid if weights is None else weights.float().to(device) * valid
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
            pos = torch.eye(n, device=device) if positive_weights is None else positive_weights.float().to(device)
            if pos.shape[-2:] != (n, n):
                raise ValueError(f"positive_weights must be ({n}, {n}) or (B, {n}, {n}), got {tuple(pos.shape)}")
            pos = pos.expand(b, n, n) * valid[:, None, :]
            pos = pos / pos.sum(dim=2, keepdim=True).clamp_min(1e-12)
            za, zb = F.normalize(input.float(), dim=-1), F.normalize(target.float(), dim=-1)
            scores = torch.einsum("bid,bjd->bij", za, zb) / self.temperature  # (B, N, N): a_i vs b_j
            pad = ~mask[:, None, :]
            losses = []
            for s in (scores, scores.transpose(1, 2)):
                lse = torch.logsumexp(s.masked_fill(pad, float("-inf")), dim=2)  # (B, N)
                lse = torch.where(mask, lse, torch.zeros_like(lse))
                per_element = -(pos * s.masked_fill(pad, 0.0)).sum(dim=2) + lse
                losses.append((w * per_element).sum(dim=1).mean())
        return losses[0], losses[1]

    def forward(self, input: torch.Tensor, target: torch.Tensor, positive_weights: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        ab, ba = self.directional(input, target, positive_weights, mask, weights)
        return self.lambda_ab * ab + self.lambda_ba * ba
