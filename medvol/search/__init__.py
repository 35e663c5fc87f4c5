"""medvol.search: similar-case search, a FAISS index over volume-level embeddings with an id map and a manifest."""

from __future__ import annotations

from medvol.search.index import (
    KINDS,
    IndexOptions,
    IndexResult,
    SimilarityIndex,
    build_index,
    calibrate_nprobe,
    choose_kind,
    exact_search,
    recall_at_k,
    train_index,
)
from medvol.search.vectors import EMBEDDING_SUFFIXES, METRICS, POOLINGS, pool_rows, prepare_vectors, read_embedding

__all__ = ["KINDS", "IndexOptions", "IndexResult", "SimilarityIndex", "build_index", "calibrate_nprobe",
           "choose_kind", "exact_search", "recall_at_k", "train_index", "EMBEDDING_SUFFIXES", "METRICS", "POOLINGS",
           "pool_rows", "prepare_vectors", "read_embedding"]
