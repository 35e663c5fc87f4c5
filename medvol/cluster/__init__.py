"""medvol.cluster: FAISS k-means (fitted once, saved with metadata), Sinkhorn-Knopp, feature sampling."""

from __future__ import annotations

from medvol.cluster.kmeans import KMeans, faiss_has_gpu
from medvol.cluster.sampling import FeatureSampler
from medvol.cluster.sinkhorn import sinkhorn

__all__ = ["KMeans", "FeatureSampler", "sinkhorn", "faiss_has_gpu"]
