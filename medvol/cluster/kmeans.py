"""k-means on FAISS (CPU, or GPU when the installed faiss has GPU support), fitted once and saved with metadata.

The clustering step of volumetric pseudo-labelling (radioSSL, ``docs/methods/pixel_clustering.md``): fit the
centroids once on a sample of the whole dataset (:class:`medvol.cluster.FeatureSampler`), save them, then
``predict`` hard labels per voxel. Unlike the reference code, the model is never refitted per batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from medvol import __version__
from medvol.errors import DataError

__all__ = ["KMeans", "faiss_has_gpu", "as_float32_matrix"]

_FORMAT = "medvol.cluster.KMeans/1"


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def as_float32_matrix(x: Any, name: str = "x") -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor, shape (n, d)) as a C-contiguous float32 numpy array.

    Raises:
        TypeError: when ``x`` is not numeric (bool, complex, object, ...).
        ValueError: when ``x`` is not 2D, or has non-finite rows (the message gives how many).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2D (n_samples, n_features), got shape {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1))) if x.size else 0
    if bad:
        raise ValueError(f"{name} has {bad} of {x.shape[0]} rows with NaN or inf features")
    return x


def _segment_sums(labels: np.ndarray, x: np.ndarray, k: int, chunk: int = 1 << 16) -> np.ndarray:
    """(k, d) sums of the rows of ``x`` per label, float64.

    Each chunk of rows is summed in float32 with torch ``index_add_`` (no float64 copy of ``x``: that copy was
    80 % of a Lloyd iteration), and the chunk sums are accumulated in float64, so the rounding error stays that
    of at most ``chunk`` float32 additions.
    """
    out = np.zeros((k, x.shape[1]), np.float64)
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    for start in range(0, len(x), chunk):
        part = torch.zeros((k, x.shape[1]), dtype=torch.float32)
        part.index_add_(0, lt[start:start + chunk], xt[start:start + chunk])
        out += part.numpy()
    return out


def _split_empty(centers: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-seed empty clusters by splitting large ones (as FAISS does): copy a centroid drawn with probability
    proportional to its size and push the two copies apart by a tiny symmetric perturbation."""
    counts = counts.astype(np.float64).copy()
    for ci in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        if p.sum() <= 0:
            break
        cj = int(rng.choice(len(counts), p=p / p.sum()))
        eps = np.float32(1.0 / 1024) * np.where(np.arange(centers.shape[1]) % 2 == 0, 1, -1).astype(np.float32)
        centers[ci] = centers[cj] * (1 + eps)
        centers[cj] = centers[cj] * (1 - eps)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return centers


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))  # zero rows stay zero


class KMeans:
    """Lloyd k-means with FAISS nearest-centroid search (CPU or GPU), API close to ``sklearn.cluster.KMeans``.

    On a shared CPU, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: FAISS's OpenMP threads otherwise
    busy-wait and a search can become 10-20x slower when other processes use the cores.

    Args:
        n_clusters: number of centroids k.
        device: ``"auto"`` (faiss GPU when available, else CPU), ``"cpu"`` or ``"cuda"``.
        spherical: cosine k-means: inputs are L2-normalised, centroids renormalised after every update.
        n_iter: maximum number of Lloyd iterations (stops earlier when no assignment changes).
        seed: seed of the initialisation (and of the training subsample when that is enabled).
        max_points_per_centroid: train on at most ``k * max_points_per_centroid`` random samples, then assign
            all of them (FAISS's sampled training; its own default is 256). ``None`` trains on every sample.
        verbose: print one line per iteration.
        n_threads: OpenMP threads faiss uses in fit/predict (restored afterwards); ``None``: faiss' setting.
            Results are deterministic on CPU for a fixed thread count.
        init: ``"random"`` (k distinct samples drawn with ``seed``), ``"k-means++"`` (D² sampling,
            Arthur & Vassilvitskii 2007) or an array (k, d) of initial centroids.

    Attributes (after :meth:`fit` or :meth:`load`): ``cluster_centers_`` (k, d) float32, ``inertia_`` (sum of
    squared distances of the fitted samples to their nearest final centroid, computed after the last update
    like scikit-learn's; normalised samples in spherical mode), ``labels_`` (fit only), ``n_iter_``,
    ``device_`` (``"cpu"`` or ``"cuda"``).

    Raises:
        RuntimeError: ``device="cuda"`` when the installed faiss has no GPU support or sees no GPU.

    Example:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> features = np.concatenate([rng.normal(c, 0.1, (200, 4)) for c in (0.0, 1.0, 2.0)])  # 3 blobs, (n, d)
        >>> km = KMeans(3, seed=0, init="k-means++", device="cpu", n_threads=1).fit(features)  # numpy or torch
        >>> np.bincount(km.labels_).tolist(), km.predict(features[:2]).dtype
        ([200, 200, 200], dtype('int64'))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = km.save(Path(folder) / "centroids.npz", feature_source="3 blobs, 4-d")
        ...     same = (KMeans.load(path).predict(features) == km.labels_).all()
        >>> bool(same)
        True
    """

    def __init__(
        self,
        n_clusters: int,
        device: str = "auto",
        spherical: bool = False,
        n_iter: int = 20,
        seed: int = 0,
        max_points_per_centroid: int | None = None,
        verbose: bool = False,
        n_threads: int | None = None,
        init: str | np.ndarray = "random",
    ):
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise ValueError(f"max_points_per_centroid must be positive or None, got {max_points_per_centroid!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if isinstance(init, str) and init not in ("random", "k-means++"):
            raise ValueError(f"init must be 'random', 'k-means++' or an array (k, d), got {init!r}")
        self.n_clusters = int(n_clusters)
        self.device = device
        self.spherical = bool(spherical)
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        self.max_points_per_centroid = max_points_per_centroid
        self.verbose = bool(verbose)
        self.n_threads = n_threads
        self.init = init
        self.device_ = self._resolve_device(device)
        self.cluster_centers_: np.ndarray | None = None
        self.inertia_: float | None = None
        self.labels_: np.ndarray | None = None
        self.n_iter_: int = 0
        self.feature_source = ""

    @staticmethod
    def _resolve_device(device: str) -> str:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cpu":
            return "cpu"
        if device == "auto":
            return "cuda" if faiss_has_gpu() else "cpu"
        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError(
                f"device='cuda' needs faiss with GPU support, but the installed faiss {faiss.__version__} is "
                "CPU-only: install the `gpu` extra (pip install 'medvol[gpu]', i.e. faiss-gpu-cu12) and "
                "uninstall faiss-cpu, or use device='cpu'"
            )
        if faiss.get_num_gpus() == 0:
            raise RuntimeError("device='cuda': faiss has GPU support but sees no CUDA device; use device='cpu'")
        return "cuda"

    # ------------------------------------------------------------------ fitting
    def _prepare(self, x: Any, name: str = "x") -> np.ndarray:
        x = as_float32_matrix(x, name)
        return _normalize_rows(x) if self.spherical else x

    def _initial_centroids(self, x: np.ndarray) -> np.ndarray:
        n, k = x.shape[0], self.n_clusters
        rng = np.random.default_rng(self.seed)
        if not isinstance(self.init, str):
            c = as_float32_matrix(self.init, "init")
            if c.shape != (k, x.shape[1]):
                raise ValueError(f"init has shape {c.shape}, expected ({k}, {x.shape[1]})")
            return _normalize_rows(c) if self.spherical else c.copy()
        if self.init == "random":
            return x[np.sort(rng.choice(n, size=k, replace=False))].copy()
        # k-means++: next centre drawn with probability proportional to the squared distance to the chosen ones
        centers = np.empty((k, x.shape[1]), np.float32)
        xx = np.einsum("nd,nd->n", x, x, dtype=np.float64)  # (n,) squared norms

        def sq_dist(c: np.ndarray) -> np.ndarray:  # (n,) squared distances to one centre, no (n, d) temporary
            return np.maximum(xx - 2.0 * (x @ c) + float(c @ c), 0.0)

        centers[0] = x[rng.integers(n)]
        d2 = sq_dist(centers[0])
        for i in range(1, k):
            total = d2.sum()
            idx = rng.integers(n) if total <= 0 else int(np.searchsorted(np.cumsum(d2), rng.random() * total))
            centers[i] = x[min(idx, n - 1)]
            d2 = np.minimum(d2, sq_dist(centers[i]))
        return centers

    def fit(self, x: Any) -> KMeans:
        """Fit the centroids on ``x`` (n, d); sets ``cluster_centers_``, ``inertia_``, ``labels_``, ``n_iter_``.

        Raises:
            ValueError: ``x`` not 2D, fewer rows than ``n_clusters``, or rows with NaN/inf.
        """
        x = self._prepare(x)
        n, d = x.shape
        if n < self.n_clusters:
            raise ValueError(f"KMeans(n_clusters={self.n_clusters}) needs at least {self.n_clusters} samples, got {n}")
        train = x
        mppc = self.max_points_per_centroid
        if mppc is not None and n > self.n_clusters * mppc:  # FAISS-style sampled training (opt-in)
            keep = np.random.default_rng(self.seed + 1).choice(n, size=self.n_clusters * int(mppc), replace=False)
            train = x[np.sort(keep)]
        centers = self._initial_centroids(train)
        with self._threads():
            self.cluster_centers_, self.n_iter_ = self._lloyd(train, centers)
            dist, labels = self._assign(x)  # exact objective of all samples with the final centroids
        self.inertia_ = float(dist.sum(dtype=np.float64))
        self.labels_ = labels
        return self

    def _lloyd(self, x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, int]:
        """Lloyd iterations: FAISS nearest-centroid search, then float64 centroid means.

        The loop is ours rather than ``faiss.Kmeans.train``: that one exchanges centroids through a SWIG
        ``std::vector<float>`` whose proxy class belongs to whichever SWIG module was imported last, so it breaks
        when SimpleITK (also SWIG) is imported after faiss. Stops early once no assignment changes.
        """
        k, d = centers.shape
        rng = np.random.default_rng(self.seed + 2)
        previous = None
        iteration = 0
        for iteration in range(1, self.n_iter + 1):
            self.cluster_centers_ = centers
            _, labels = self._assign(x)
            if previous is not None and np.array_equal(labels, previous):
                break
            previous = labels
            counts = np.bincount(labels, minlength=k)
            sums = _segment_sums(labels, x, k)
            filled = counts > 0
            centers = centers.copy()
            centers[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
            centers = _split_empty(centers, counts, rng)
            if self.spherical:
                centers = _normalize_rows(centers)
            if self.verbose:
                print(f"KMeans iteration {iteration}: {int((~filled).sum())} empty clusters")
        return np.ascontiguousarray(centers, dtype=np.float32), iteration

    def fit_predict(self, x: Any) -> np.ndarray:
        """Fit on ``x`` and return its labels (int64, (n,))."""
        return self.fit(x).labels_

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> np.ndarray:
        if self.cluster_centers_ is None:
            raise RuntimeError("KMeans is not fitted: call fit() or KMeans.load() first")
        return self.cluster_centers_

    def _check_dim(self, x: np.ndarray, centers: np.ndarray) -> None:
        if x.shape[1] != centers.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but the centroids have {centers.shape[1]} (dim mismatch)")

    @contextlib.contextmanager
    def _threads(self):
        """Run faiss with ``n_threads`` OpenMP threads, then restore the previous setting."""
        if self.n_threads is None or self.device_ == "cuda":
            yield
            return
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n_threads)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(previous)

    def _assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distance to, and index of, the nearest centroid for the prepared rows ``x``."""
        centers = self._check_fitted()
        index = faiss.IndexFlatL2(centers.shape[1])
        if self.device_ == "cuda":
            index = faiss.index_cpu_to_all_gpus(index, ngpu=1)
        index.add(centers)
        with self._threads():
            dist, labels = index.search(x, 1)
        return np.maximum(dist[:, 0], 0.0), labels[:, 0].astype(np.int64)

    def predict(self, x: Any) -> np.ndarray:
        """Index of the nearest centroid for each row of ``x`` (n, d): int64 array (n,).

        Raises:
            RuntimeError: not fitted. ValueError: bad shape, dim different from the centroids', NaN/inf rows.
        """
        x = self._prepare(x)
        self._check_dim(x, self._check_fitted())
        return self._assign(x)[1]

    def transform(self, x: Any) -> np.ndarray:
        """Euclidean distances (n, k) from each row of ``x`` to every centroid (like scikit-learn's)."""
        x = self._prepare(x)
        c = self._check_fitted()
        self._check_dim(x, c)
        # (n, 1) + (1, k) - 2 (n, d) @ (d, k)
        d2 = (x * x).sum(1, keepdims=True) + (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
        return np.sqrt(np.maximum(d2, 0.0))

    def score(self, x: Any) -> float:
        """Opposite of the inertia of ``x`` under the fitted centroids (scikit-learn's convention)."""
        x = self._prepare(x)
        self._check_dim(x, self._check_fitted())
        return -float(self._assign(x)[0].sum(dtype=np.float64))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, feature_source: str = "") -> Path:
        """Write centroids and metadata to ``path`` (``.npz``, no pickle) atomically; returns the path.

        Args:
            path: destination file (its folder is created if missing).
            feature_source: free text naming the features the centroids belong to (network, layer, preprocessing);
                empty keeps the one read by :meth:`load`, if any.
        """
        from medvol.io.atomic import atomic_write_bytes  # here, not at import: see medvol.cluster.pseudolabels

        centers = self._check_fitted()
        meta = {
            "format": _FORMAT,
            "dim": int(centers.shape[1]),
            "k": self.n_clusters,
            "spherical": self.spherical,
            "feature_source": str(feature_source or self.feature_source),
            "n_iter": self.n_iter,
            "n_iter_run": self.n_iter_,
            "seed": self.seed,
            "max_points_per_centroid": self.max_points_per_centroid,
            "inertia": self.inertia_,
            "medvol_version": __version__,
            "faiss_version": faiss.__version__,
        }
        buffer = io.BytesIO()
        np.savez(buffer, centroids=centers, metadata=np.array(json.dumps(meta)))
        return atomic_write_bytes(path, buffer.getvalue())

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict:
        """The metadata dictionary stored by :meth:`save` (raises like :meth:`load`)."""
        return KMeans._read(path)[1]

    @staticmethod
    def _read(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such k-means file")
        try:
            with np.load(path, allow_pickle=False) as f:
                centers, meta = f["centroids"], json.loads(str(f["metadata"]))
        except Exception as e:  # zip, pickle, key or JSON errors: all mean "not one of our files"
            raise DataError(path, f"not a medvol k-means file ({type(e).__name__}: {e})") from e
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != _FORMAT:
            raise DataError(path, f"not a medvol k-means file (format {fmt!r}, expected {_FORMAT!r})")
        expected = (meta.get("k"), meta.get("dim"))
        if centers.dtype != np.float32 or centers.shape != expected:
            raise DataError(path, f"centroids {centers.dtype}{centers.shape} do not match (k, dim) = {expected}")
        return centers, meta

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", n_threads: int | None = None) -> KMeans:
        """Restore a model written by :meth:`save`; it predicts exactly like the saved one.

        Raises:
            FileNotFoundError: no file at ``path``. medvol.errors.DataError (a ValueError): not a k-means file.
        """
        centers, meta = cls._read(path)
        km = cls(
            meta["k"],
            device=device,
            spherical=meta["spherical"],
            n_iter=meta["n_iter"],
            seed=meta["seed"],
            max_points_per_centroid=meta["max_points_per_centroid"],
            n_threads=n_threads,
        )
        km.cluster_centers_ = np.ascontiguousarray(centers)
        km.inertia_ = meta["inertia"]
        km.n_iter_ = meta["n_iter_run"]
        km.feature_source = meta["feature_source"]
        return km

    def __repr__(self) -> str:
        return (
            f"KMeans(n_clusters={self.n_clusters}, device={self.device!r}, spherical={self.spherical}, "
            f"n_iter={self.n_iter}, seed={self.seed})"
        )
