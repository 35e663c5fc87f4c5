"""Multiple-instance pooling networks: one prediction per bag (volume) from its instances (slice embeddings).

- :class:`ABMIL`: gated attention MIL (Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance
  Learning", ICML 2018, https://arxiv.org/abs/1802.04712), with the CLEAR head (KatherLab/CLEAR).
- :class:`PMA`: pooling by multihead attention with learned seed vectors (Lee et al., "Set Transformer",
  ICML 2019, https://arxiv.org/abs/1810.00825).

Both take zero-padded bags ``x`` (B, N, D) (or (B, 1, N, D), MONAI's one-channel layout, which a bundle's
``verify_net_in_out`` feeds) with a boolean ``mask`` (B, N), True for real instances. Padded
instances are zeroed after the instance embedding and get exactly zero attention, so a bag gives the same
output alone or padded inside a batch (CLEAR padded without a mask, letting padding take attention).

Instances can be standardised inside the network (``set_input_stats``: per-feature mean/std fitted on the
training cases, kept as buffers so ``model.pt`` is self-contained); by default the buffers are the identity.

Return contract (the same for both classes): ``forward(x, mask)`` always returns logits (B, n_outputs), so the
network can be a MONAI bundle ``network_def``; ``forward_with_attention(x, mask)`` returns
:class:`MILOutput` ``(logits, attention)`` with attention (B, N) summing to 1 over each bag's real instances.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MILOutput", "ABMIL", "PMA", "MIL_POOLINGS", "build_mil_network", "masked_softmax"]


class MILOutput(NamedTuple):
    """What ``forward_with_attention`` returns: logits (B, n_outputs) and attention weights (B, N)."""

    logits: torch.Tensor
    attention: torch.Tensor


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` is True; masked entries are exactly 0.

    Raises:
        ValueError: if a row has no True entry (an empty bag).
    """
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("every bag needs at least one instance: mask has a row without any True entry")
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class _MILBase(nn.Module):
    """Shared parts: argument checks, instance embedding Linear(D, hidden)+ReLU, CLEAR's head."""

    def __init__(self, in_dim: int, hidden_dim: int, n_outputs: int, dropout: float, pooled_dim: int) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("n_outputs", n_outputs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1).")
        self.in_dim, self.hidden_dim, self.n_outputs = in_dim, hidden_dim, n_outputs
        # input standardisation, identity until set_input_stats(); saved in the state dict with the weights
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        # CLEAR head: LayerNorm -> Linear -> Dropout -> SiLU -> Linear(n_outputs)
        self.head = nn.Sequential(
            nn.LayerNorm(pooled_dim),
            nn.Linear(pooled_dim, hidden_dim),
            nn.Dropout(dropout),
            nn.SiLU(),
            nn.Linear(hidden_dim, n_outputs),
        )

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise instances as ``(x - mean) / std`` before the embedding (fit them on training data only).

        Raises:
            ValueError: if the shapes are not (in_dim,) or ``std`` has non-positive entries.
        """
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.in_dim,) or std.shape != (self.in_dim,) or not bool((std > 0).all()):
            raise ValueError(f"mean and std must be ({self.in_dim},) with std > 0, got {tuple(mean.shape)}, "
                             f"{tuple(std.shape)}")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4 and x.shape[1] == 1:  # MONAI's (B, C, *spatial) layout: one channel of N x D
            x = x.squeeze(1)
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            if torch.jit.is_scripting():  # TorchScript has no f-strings of shapes
                raise ValueError("x must be (B, N, in_dim) padded bags")
            else:
                raise ValueError(f"x must be (B, N, {self.in_dim}) padded bags, got shape {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2]:
            if torch.jit.is_scripting():
                raise ValueError("mask must be (B, N)")
            else:
                raise ValueError(f"mask must be (B, N) = {tuple(x.shape[:2])}, got shape {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        if not bool(mask.any(dim=-1).all()):
            raise ValueError("every bag needs at least one instance: mask has a row without any True entry")
        # zero padded instances after embedding: whatever the padding holds (even NaN) cannot leak into sums
        h = self.embed((x - self.input_mean) / self.input_std).masked_fill(~mask[..., None], 0.0)  # (B, N, hidden)
        return h, mask

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, hidden) embeddings -> pooled (B, pooled_dim) and attention (B, N)."""
        raise NotImplementedError

    def forward_with_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Logits and attention.

        Args:
            x: (B, N, in_dim) zero-padded bags.
            mask: (B, N) bool, True for real instances; ``None`` means every instance is real.

        Returns:
            :class:`MILOutput` with logits (B, n_outputs) and attention (B, N), 0 on padding.

        Raises:
            ValueError: for a wrong shape of ``x`` or ``mask``, or a bag without instances.
        """
        h, mask = self._prepare(x, mask)
        pooled, attention = self.pool(h, mask)
        return MILOutput(self.head(pooled), attention)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_outputs); see :meth:`forward_with_attention` for the arguments."""
        return self.forward_with_attention(x, mask).logits


class ABMIL(_MILBase):
    """Attention-based MIL pooling with CLEAR's prediction head.

    ``h_k = ReLU(W_e x_k)``; score ``s_k = w^T (tanh(V h_k) * sigmoid(U h_k))`` (gated) or ``w^T tanh(V h_k)``;
    ``a = softmax_masked(s)``; ``z = sum_k a_k h_k``; logits = head(z).

    Args:
        in_dim: instance feature size D.
        hidden_dim: instance embedding size (and head hidden size).
        attention_dim: size of the attention branches V, U.
        n_outputs: logits per bag (1 for binary, labels for multilabel, classes for multiclass).
        dropout: dropout in the head (CLEAR: 0.5).
        gated: gated attention (Ilse et al. eq. 9) instead of plain tanh attention (eq. 8).

    Example:
        >>> net = ABMIL(16, hidden_dim=32, attention_dim=32)
        >>> out = net.forward_with_attention(torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())
        >>> out.logits.shape, out.attention[0, 3:].tolist()
        (torch.Size([2, 1]), [0.0, 0.0])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        attention_dim: int = 256,
        n_outputs: int = 1,
        dropout: float = 0.5,
        gated: bool = True,
    ) -> None:
        super().__init__(in_dim, hidden_dim, n_outputs, dropout, pooled_dim=hidden_dim)
        if not isinstance(attention_dim, int) or attention_dim < 1:
            raise ValueError(f"attention_dim={attention_dim!r} must be a positive integer.")
        self.gated = bool(gated)
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid()) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.attention_v(h)
        if self.attention_u is not None:
            gate = gate * self.attention_u(h)
        attention = masked_softmax(self.attention_w(gate).squeeze(-1), mask)  # (B, N)
        pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)  # (B, 1, N) @ (B, N, H) -> (B, H)
        return pooled, attention


class PMA(_MILBase):
    """Set-transformer pooling by multihead attention (PMA) with CLEAR's prediction head.

    ``Z = rFF(h)``; ``H = LayerNorm(S + MultiHead(S, Z, Z))``; ``O = LayerNorm(H + rFF(H))`` for k learned
    seeds S (Lee et al. 2019, eq. 6-11); the k seed outputs are flattened into the head. Padded instances are
    excluded with ``key_padding_mask``. The reported attention is averaged over heads and seeds.

    Args:
        in_dim: instance feature size D.
        hidden_dim: embedding size (divisible by ``num_heads``).
        num_heads: attention heads.
        num_seeds: seed vectors k (outputs per bag before the head).
        n_outputs: logits per bag.
        dropout: dropout in the head.
        attention_dropout: dropout on the attention weights while training (0 keeps reported weights exact).

    Example:
        >>> PMA(16, hidden_dim=32, num_heads=4, num_seeds=2)(torch.randn(3, 7, 16)).shape
        torch.Size([3, 1])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        num_heads: int = 4,
        num_seeds: int = 1,
        n_outputs: int = 1,
        dropout: float = 0.5,
        attention_dropout: float = 0.0,
    ) -> None:
        if not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"num_seeds={num_seeds!r} must be a positive integer.")
        if not isinstance(num_heads, int) or num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(f"num_heads={num_heads!r} must be a positive divisor of hidden_dim={hidden_dim}.")
        super().__init__(in_dim, hidden_dim, n_outputs, dropout, pooled_dim=hidden_dim * num_seeds)
        self.num_heads, self.num_seeds = num_heads, num_seeds
        self.seeds = nn.Parameter(torch.empty(1, num_seeds, hidden_dim))
        nn.init.xavier_uniform_(self.seeds)
        self.rff_in = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.norm0 = nn.LayerNorm(hidden_dim)
        self.rff_out = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.norm1 = nn.LayerNorm(hidden_dim)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.rff_in(h).masked_fill(~mask[..., None], 0.0)  # (B, N, H)
        seeds = self.seeds.expand(h.shape[0], -1, -1)  # (B, k, H)
        attended, weights = self.attention(
            seeds, z, z, key_padding_mask=~mask, need_weights=True, average_attn_weights=True
        )  # attended (B, k, H); weights (B, k, N), averaged over heads
        out = self.norm0(seeds + attended)
        out = self.norm1(out + self.rff_out(out))  # (B, k, H)
        assert weights is not None  # need_weights=True (the assert types it for TorchScript)
        return out.flatten(1), weights.mean(dim=1)  # (B, k*H), (B, N)


MIL_POOLINGS = {"abmil": ABMIL, "pma": PMA}


def build_mil_network(
    pooling: str = "abmil",
    in_dim: int = 512,
    n_outputs: int = 1,
    hidden_dim: int = 256,
    dropout: float = 0.5,
    attention_dim: int = 256,
    gated: bool = True,
    num_heads: int = 4,
    num_seeds: int = 1,
) -> ABMIL | PMA:
    """Build a MIL network by pooling name (what bundle configs use: ``"mil_pooling": "abmil" | "pma"``).

    Arguments that do not apply to the chosen pooling (``attention_dim``/``gated`` for PMA,
    ``num_heads``/``num_seeds`` for ABMIL) are ignored. The network keeps its arguments other than ``in_dim``
    and ``n_outputs`` as ``build_kwargs``, so :func:`medvol.mil.network_factory` can build fresh networks of
    the same architecture per fold (a bundle's ``network_def`` is such a network: MONAI's checks need one).

    Raises:
        ValueError: for an unknown ``pooling``.
    """
    key = str(pooling).lower()
    if key == "abmil":
        net: ABMIL | PMA = ABMIL(in_dim, hidden_dim, attention_dim, n_outputs, dropout, gated)
    elif key == "pma":
        net = PMA(in_dim, hidden_dim, num_heads, num_seeds, n_outputs, dropout)
    else:
        raise ValueError(f"pooling={pooling!r} must be one of {sorted(MIL_POOLINGS)}.")
    net.build_kwargs = {"pooling": key, "hidden_dim": hidden_dim, "dropout": dropout, "attention_dim": attention_dim,
                        "gated": gated, "num_heads": num_heads, "num_seeds": num_seeds}
    return net
