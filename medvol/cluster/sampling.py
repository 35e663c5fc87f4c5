"""Bounded-memory uniform sampling of per-voxel features streamed volume by volume.

k-means is fitted once on a sample of the whole dataset (not per batch): :class:`FeatureSampler` keeps that
sample while the features of each volume are computed and thrown away.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medvol.cluster.rows import as_float32_matrix

__all__ = ["FeatureSampler"]


class FeatureSampler:
    """Uniform sample without replacement of at most ``max_samples`` feature rows over a stream of volumes.

    Reservoir sampling in its "bottom-k" form: every row offered gets an independent uniform random key and the
    sampler keeps the ``max_samples`` rows with the smallest keys, which is a uniform random subset of all rows
    seen (Efraimidis & Spirakis 2006, with equal weights). Each :meth:`add` is vectorised in numpy; memory stays
    at ``max_samples x d`` float32 plus ``O(max_samples)`` keys.

    Args:
        max_samples: size of the sample kept.
        per_volume_quota: if set, each volume is first subsampled uniformly to at most this many rows, so large
            volumes do not dominate; the sample is then uniform over the rows that passed the quota.
            ``None``: no quota (uniform over all rows).
        seed: seed of the sampler's own generator; the same seed and the same sequence of volumes give the same
            sample.

    Attributes:
        n_seen: rows offered to :meth:`add` so far (before the quota).
        n_volumes: number of :meth:`add` calls.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> sampler = FeatureSampler(1_000, per_volume_quota=400, seed=0)
        >>> for n_voxels in (5_000, 300, 2_000):              # one (n_voxels, d) feature array per volume
        ...     _ = sampler.add(rng.random((n_voxels, 8), dtype=np.float32))
        >>> sampler.sample().shape, sampler.n_seen           # 400 + 300 + 400 rows passed the quota
        ((1000, 8), 7300)
    """

    def __init__(self, max_samples: int, per_volume_quota: int | None = None, seed: int = 0):
        if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
        if per_volume_quota is not None and (
            isinstance(per_volume_quota, bool)
            or not isinstance(per_volume_quota, (int, np.integer))
            or per_volume_quota < 1
        ):
            raise ValueError(f"per_volume_quota must be a positive integer or None, got {per_volume_quota!r}")
        self.max_samples = int(max_samples)
        self.per_volume_quota = None if per_volume_quota is None else int(per_volume_quota)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self.n_seen = 0
        self.n_volumes = 0
        self._count = 0
        self._feats: np.ndarray | None = None  # (max_samples, d), first _count rows valid
        self._keys = np.empty(self.max_samples, np.float64)
        self._origin = np.empty((self.max_samples, 2), np.int64)  # (volume index, row in volume)
        self._arrival = np.empty(self.max_samples, np.int64)  # global row number, to return rows in stream order

    def add(self, features: Any) -> int:
        """Offer the feature rows (n, d) of one volume (numpy or torch); returns how many of them are kept now.

        Raises:
            ValueError: ``features`` not 2D, with NaN/inf rows, or with a dimension different from earlier volumes.
        """
        x = as_float32_matrix(features, "features")
        n, d = x.shape
        if self._feats is None:
            self._feats = np.empty((self.max_samples, d), np.float32)
        elif d != self._feats.shape[1]:
            raise ValueError(f"features have {d} columns but earlier volumes had {self._feats.shape[1]}")
        volume, first = self.n_volumes, self.n_seen
        self.n_volumes += 1
        self.n_seen += n
        rows = np.arange(n, dtype=np.int64)
        if self.per_volume_quota is not None and n > self.per_volume_quota:
            rows = np.sort(self._rng.choice(n, size=self.per_volume_quota, replace=False))
        keys = self._rng.random(rows.size)
        m, count = self.max_samples, self._count
        if count == m:  # only keys below the current largest kept key can enter
            below = keys < self._keys.max()
            rows, keys = rows[below], keys[below]
        if rows.size == 0:
            return 0
        if count + rows.size <= m:
            slots, accepted = np.arange(count, count + rows.size), np.arange(rows.size)
        else:
            all_keys = np.concatenate([self._keys[:count], keys])  # (count + c,)
            kept = np.zeros(all_keys.size, bool)
            kept[np.argpartition(all_keys, m - 1)[:m]] = True
            evicted = np.flatnonzero(~kept[:count])
            accepted = np.flatnonzero(kept[count:])
            slots = np.concatenate([evicted, np.arange(count, m)])  # len(slots) == len(accepted)
        src = rows[accepted]
        self._feats[slots] = x[src]
        self._keys[slots] = keys[accepted]
        self._origin[slots, 0] = volume
        self._origin[slots, 1] = src
        self._arrival[slots] = first + src
        self._count = min(m, count + rows.size)
        return int(src.size)

    def __len__(self) -> int:
        return self._count

    def sample(self, return_origin: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The current sample (m, d) float32 in stream order, m = min(max_samples, rows offered after quota).

        Args:
            return_origin: also return an int64 array (m, 2) of (volume index, row index within that volume).

        Raises:
            RuntimeError: nothing was added yet.
        """
        if self._feats is None:
            raise RuntimeError("FeatureSampler is empty: call add(features) first")
        order = np.argsort(self._arrival[: self._count], kind="stable")
        feats = self._feats[order]
        return (feats, self._origin[order]) if return_origin else feats
