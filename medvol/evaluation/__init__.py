"""medvol.evaluation: what frozen embeddings are worth (k-NN and linear probes, voxel baselines)."""

from medvol.evaluation.probe import ALPHA_GRID, C_GRID, KNN_GRID, PROBES, probe
from medvol.evaluation.voxels import voxel_features

__all__ = ["ALPHA_GRID", "C_GRID", "KNN_GRID", "PROBES", "probe", "voxel_features"]
