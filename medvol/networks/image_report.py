"""An image encoder and a report encoder in one embedding space, global and local (LoVT, ConVIRT, CLIP).

:class:`ImageReportModel` holds

- ``image``: a medvol :class:`~medvol.networks.Backbone` (2D radiographs or 3D volumes, ``spatial_dims``); its
  last encoder map is the grid of image *regions* (B, C, *grid) -> (B, N, C), N = prod(grid);
- ``text``: a :class:`~medvol.networks.text.TextEncoder` giving one feature per report *sentence* (B, S, H);
- per modality an aggregator (attention pooling with the mean as query, LoVT; or the plain mean, ConVIRT) whose
  weights over regions / sentences also weight the local losses, and global and local projection MLPs
  (Linear-BatchNorm-ReLU-Linear; BatchNorm only over the valid, unpadded elements);
- :class:`CrossModalAttention`: each region attends over the report's sentences and each sentence over the
  image's regions (one shared key projection for both modalities, softmax over the other modality, LoVT's
  symmetric alignment), giving the cross-modal representation that each local element is contrasted with.

User-facing encoders: :meth:`ImageReportModel.encode_text` (``list[str] -> (B, D)`` L2-normalised report
embeddings, the text query of a similar-case search), :meth:`~ImageReportModel.encode_image_embeddings` and
:meth:`~ImageReportModel.sentence_attention` (per-sentence attention maps over the image). ``forward(x)``
returns the normalised global image embedding, so the model is a valid bundle ``network_def``. Its image
backbone's weights are under ``image.``: ``load_pretrained(net, "model.pt", source_prefix="image.")`` transfers
them to a segmentation network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvol.io.reports import SENTENCE_SEPARATOR, report_sentences

__all__ = ["ImageReportModel", "CrossModalAttention", "AttentionPool", "SequenceProjection", "Embeddings",
           "POOLINGS", "split_reports"]

POOLINGS = ("attention", "mean")


def split_reports(reports: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Batch reports as lists of sentences: a string is split at :data:`SENTENCE_SEPARATOR` (how
    :func:`medvol.io.reports.join_sentences` packed it), a list is kept; empty sentences are dropped."""
    out = []
    for r in reports:
        sentences = r.split(SENTENCE_SEPARATOR) if isinstance(r, str) else list(r)
        out.append([s.strip() for s in sentences if s and s.strip()])
    return out


@dataclass
class Embeddings:
    """One modality's output: ``global_`` (B, D), ``local`` (B, N, D), ``mask`` (B, N) bool (valid elements),
    ``weights`` (B, N) aggregation weights (sum 1 over valid elements), ``grid`` (image regions' grid shape,
    None for sentences)."""

    global_: torch.Tensor
    local: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    grid: tuple[int, ...] | None = None


class AttentionPool(nn.Module):
    """Multi-head attention pooling with the (masked) mean as the query; ``"mean"`` is the plain masked mean.

    ``forward(x (B, N, C), mask (B, N)) -> (pooled (B, C), weights (B, N))``; the weights (averaged over heads)
    sum to 1 over the valid elements.
    """

    def __init__(self, dim: int, num_heads: int = 4, mode: str = "attention"):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling {mode!r} must be one of {POOLINGS}")
        self.mode = mode
        heads = max(h for h in range(1, num_heads + 1) if dim % h == 0)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True) if mode == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(x.dtype)
        mean_weights = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = torch.einsum("bn,bnc->bc", mean_weights, x)
        if self.attention is None:
            return mean, mean_weights
        out, weights = self.attention(mean[:, None], x, x, key_padding_mask=~mask, need_weights=True)
        return out[:, 0], weights[:, 0]


class SequenceProjection(nn.Module):
    """Linear - BatchNorm - ReLU - Linear on the last dimension of (B, C) or (B, N, C) inputs; with a mask the
    BatchNorm statistics come from the valid elements only (padding never shifts them) and padding stays 0."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), \
            nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 2:
            return self.fc2(F.relu(self.norm(self.fc1(x))))
        flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        out = self.fc2(F.relu(self.norm(self.fc1(flat))))
        if mask is None:
            return out.reshape(*x.shape[:-1], -1)
        full = out.new_zeros(*x.shape[:-1], out.shape[-1])
        full[mask] = out
        return full


class CrossModalAttention(nn.Module):
    """Symmetric single-head cross-attention between two sets of local embeddings.

    ``a' = out(softmax_b(k(a) k(b)^T / sqrt(d)) v(b))`` for every element of ``a`` (and the same with roles
    swapped); ``k``, ``v`` and ``out`` are shared by both directions. Padded elements of the attended set get no
    weight.

    Returns ``(a_from_b (B, Na, D), b_from_a (B, Nb, D), attn_ab (B, Na, Nb), attn_ba (B, Nb, Na))``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.key, self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor):
        ka, kb = self.key(a), self.key(b)
        scores = torch.einsum("bid,bjd->bij", ka, kb) * self.scale  # (B, Na, Nb)
        attn_ab = scores.masked_fill(~mask_b[:, None, :], float("-inf")).softmax(dim=2)
        attn_ba = scores.transpose(1, 2).masked_fill(~mask_a[:, None, :], float("-inf")).softmax(dim=2)
        a_from_b = self.out(torch.einsum("bij,bjd->bid", attn_ab, self.value(b)))
        b_from_a = self.out(torch.einsum("bji,bid->bjd", attn_ba, self.value(a)))
        return a_from_b, b_from_a, attn_ab, attn_ba


class ImageReportModel(nn.Module):
    """Image backbone + report encoder with global and local projections (see the module docstring).

    Args:
        image_backbone: a :class:`~medvol.networks.Backbone` (``encode(x)[-1]`` is the region grid).
        text_encoder: a :class:`~medvol.networks.text.TextEncoder`.
        proj_dim: embedding size of the shared space (LoVT: 512).
        hidden_dim: hidden size of the projection MLPs.
        image_pool, text_pool: ``"attention"`` (LoVT, CLIP's attention pooling) or ``"mean"`` (ConVIRT).
        num_heads: heads of the attention pooling.
        local: build the local projections and the cross-modal attention (LoVT); False for global-only methods.

    Example:
        >>> from medvol.networks import UNet3D
        >>> from medvol.networks.text import ScratchTextEncoder
        >>> model = ImageReportModel(UNet3D(channels=(4, 8), spatial_dims=2),
        ...                          ScratchTextEncoder(hidden_size=16, num_layers=1, num_heads=2), proj_dim=8)
        >>> _ = model.eval()
        >>> model.encode_text(["FINDINGS: Clear lungs. IMPRESSION: Normal."]).shape
        torch.Size([1, 8])
    """

    def __init__(self, image_backbone: nn.Module, text_encoder: nn.Module, proj_dim: int = 128,
                 hidden_dim: int = 512, image_pool: str = "attention", text_pool: str = "attention",
                 num_heads: int = 4, local: bool = True):
        super().__init__()
        self.image, self.text = image_backbone, text_encoder
        c, h = int(image_backbone.encoder_channels[-1]), int(text_encoder.hidden_size)
        self.proj_dim, self.has_local = int(proj_dim), bool(local)
        self.image_pool, self.text_pool = AttentionPool(c, num_heads, image_pool), AttentionPool(h, num_heads,
                                                                                                  text_pool)
        self.image_global_proj = SequenceProjection(c, hidden_dim, proj_dim)
        self.text_global_proj = SequenceProjection(h, hidden_dim, proj_dim)
        if local:
            self.image_local_proj = SequenceProjection(c, hidden_dim, proj_dim)
            self.text_local_proj = SequenceProjection(h, hidden_dim, proj_dim)
            self.cross_attention = CrossModalAttention(proj_dim)

    @property
    def spatial_dims(self) -> int:
        return int(self.image.spatial_dims)

    # ---- image ----------------------------------------------------------------------------------------------

    def encode_image(self, x: torch.Tensor) -> Embeddings:
        """Regions of the last encoder map, pooled and projected (local projections only when ``local``)."""
        fmap = self.image.encode(x)[-1]
        grid = tuple(int(s) for s in fmap.shape[2:])
        regions = fmap.flatten(2).transpose(1, 2)  # (B, N, C)
        mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        pooled, weights = self.image_pool(regions, mask)
        local = self.image_local_proj(regions) if self.has_local else regions.new_zeros(0)
        return Embeddings(self.image_global_proj(pooled), local, mask, weights, grid)

    # ---- text -----------------------------------------------------------------------------------------------

    def encode_report(self, reports: Sequence[str] | Sequence[Sequence[str]]) -> Embeddings:
        """Sentences of each report (strings are split at newlines, see :func:`split_reports`), pooled and
        projected."""
        sentences, mask = self.text(split_reports(reports))
        pooled, weights = self.text_pool(sentences, mask)
        local = self.text_local_proj(sentences, mask) if self.has_local else sentences.new_zeros(0)
        return Embeddings(self.text_global_proj(pooled), local, mask, weights)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Raw report texts -> (B, proj_dim) L2-normalised global report embeddings (eval mode needed).

        Each text is preprocessed with :func:`medvol.io.reports.report_sentences` (sections, sentence split,
        cleaning); a text without usable sentences is used whole as one sentence. This is the text side of
        image-report retrieval (cosine similarity with :meth:`encode_image_embeddings`).
        """
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [report_sentences(t) or [str(t).strip() or "."] for t in texts[start: start + batch_size]]
            out.append(F.normalize(self.encode_report(chunk).global_, dim=1))
        if not out:
            raise ValueError("encode_text: no texts given")
        return torch.cat(out)

    @torch.no_grad()
    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """(S, proj_dim) L2-normalised local embeddings of single sentences (each encoded alone)."""
        if not self.has_local:
            raise ValueError("encode_sentences needs a model with local projections (local=True)")
        emb = self.encode_report([[s] for s in sentences])
        return F.normalize(emb.local[:, 0], dim=1)

    # ---- both -----------------------------------------------------------------------------------------------

    def align(self, image: Embeddings, report: Embeddings):
        """Cross-modal representations: ``(image_from_report (B, N, D), report_from_image (B, S, D), attn_ab,
        attn_ba)`` (see :class:`CrossModalAttention`)."""
        if not self.has_local:
            raise ValueError("align needs a model with local projections (local=True)")
        return self.cross_attention(image.local, report.local, image.mask, report.mask)

    @torch.no_grad()
    def sentence_attention(self, x: torch.Tensor, reports) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sentence attention over the image regions, upsampled to the image size.

        Returns ``(maps (B, S, *spatial) in [0, 1] per map, mask (B, S))``: for sentence s, how much each region
        contributes to its image-side representation (the softmax over regions of :class:`CrossModalAttention`),
        scaled so each map's maximum is 1.
        """
        image, report = self.encode_image(x), self.encode_report(reports)
        _, _, _, attn_ba = self.align(image, report)  # (B, S, N)
        b, s, _ = attn_ba.shape
        maps = attn_ba.reshape(b * s, 1, *image.grid)
        mode = "bilinear" if len(image.grid) == 2 else "trilinear"
        maps = F.interpolate(maps, size=tuple(x.shape[2:]), mode=mode, align_corners=False).reshape(
            b, s, *x.shape[2:])
        peak = maps.flatten(2).amax(dim=2).clamp_min(1e-12)
        return maps / peak.reshape(b, s, *([1] * len(image.grid))), report.mask

    def encode_image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_dim) L2-normalised global image embeddings."""
        return F.normalize(self.encode_image(x).global_, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised global image embedding (so the model is a tensor-in, tensor-out ``network_def``)."""
        return self.encode_image_embeddings(x)
