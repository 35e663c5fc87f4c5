"""medvol.cluster: FAISS k-means (fitted once, saved with metadata), Sinkhorn-Knopp, feature sampling."""

from __future__ import annotations

from medvol.cluster.faiss_support import faiss_gpu_count, faiss_has_gpu, repair_faiss_vectors
from medvol.cluster.kmeans import KMeans, kmeans_plusplus
from medvol.cluster.sampling import FeatureSampler
from medvol.cluster.sinkhorn import sinkhorn

__all__ = ["KMeans", "FeatureSampler", "sinkhorn", "faiss_has_gpu", "faiss_gpu_count", "repair_faiss_vectors",
           "kmeans_plusplus"]
from medvol.cluster.montage import cluster_montage, cluster_palette, log_montage, montage_rgb
from medvol.cluster.pseudolabels import (
    PSEUDOLABEL_KEY,
    PseudoLabelWriter,
    assign_clusters,
    build_pseudolabels,
    cluster_command,
    load_pseudolabels,
    pseudolabel_datalist,
)
from medvol.cluster.teacher import EncoderTeacher, HandcraftedTeacher, VoxelFeatures, build_teacher

__all__ += [
    "cluster_montage", "cluster_palette", "log_montage", "montage_rgb", "PSEUDOLABEL_KEY", "PseudoLabelWriter",
    "assign_clusters", "build_pseudolabels", "cluster_command", "load_pseudolabels", "pseudolabel_datalist",
    "EncoderTeacher", "HandcraftedTeacher", "VoxelFeatures", "build_teacher",
]
