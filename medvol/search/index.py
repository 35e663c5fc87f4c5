"""A FAISS index over volume-level embeddings: exact below a size, IVF / IVF-PQ above it, with an id map.

``INDEX_DIR`` (written by :func:`build_index`, read by :class:`SimilarityIndex`):

- ``chunks/chunk-NNNNNN.npz``: the pooled (and, for the cosine metric, L2-normalised) vectors of one batch of
  embedding files, ``vectors`` (m, D) float32, with ``items`` (JSON: one id-map entry per row: embedding file,
  case id, source volume, spacing, axis, slice count, checkpoint SHA-256, file SHA-256). Each chunk is written
  atomically and never changed; row ids are positions in the chunks taken in name order, so they stay valid
  when the index grows;
- ``index-G.faiss``: the FAISS index of every row (generation G), ``index.json``: what it holds (chunks,
  rows, kind, nlist, nprobe and its calibrated recall, metric, pooling, checkpoint, the embedder to use for
  scan queries, a ``text_encoder`` entry for text queries). ``index.json`` is written last (atomically): it is
  the commit, so a killed run leaves the previous index usable and its finished chunks on disk;
- ``ids.csv``: the id map for people (id, case, file, source), ``manifest.csv``: one row per embedding file
  (``ok`` added now, ``skipped`` already in the index, ``failed`` with a one-line reason naming the file).

Resume and append are the same operation: run again (with new files in the folder, or another folder) and only
files not yet in a chunk are read; new rows are added to the existing FAISS index when its kind still fits the
size, otherwise (or with ``rebuild=True``) the index is trained again on all stored vectors.

Index kinds (``kind="auto"``, :func:`choose_kind`): ``flat`` (exact) up to ``exact_max`` vectors; ``ivf``
(IVF-Flat: nlist ~ sqrt(n) lists, the quantizer trained with :class:`medvol.cluster.KMeans`) while the raw
vectors take at most ``ivf_bytes_max`` (512 MiB); ``ivfsq`` (IVF with 8-bit scalar-quantised vectors, a quarter
of the memory) up to ``sq_bytes_max`` (16 GiB of raw vectors); ``ivfpq`` (IVF with product-quantised residuals,
``pq_m`` bytes per vector) above. docs/benchmarks.md has the recall and memory of each at 1M x 256. For IVF kinds
``nprobe`` is chosen at build time as the smallest power of two whose recall at 10 against exact search reaches
``target_recall`` on up to 256 stored vectors used as queries (each query's own row left out).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medvol import __version__
from medvol.cluster.faiss_support import faiss, repair_faiss_vectors
from medvol.cluster.kmeans import KMeans
from medvol.errors import ConfigError, DataError, one_line
from medvol.io.atomic import atomic_path, atomic_write_text, remove_stale_temps
from medvol.io.bags import file_sha256
from medvol.io.manifest import MANIFEST_COLUMNS, Manifest, read_manifest
from medvol.search.vectors import (
    METRICS,
    POOLINGS,
    EmbeddingRecord,
    find_embedding_files,
    prepare_vectors,
    read_embedding,
)

__all__ = ["FORMAT", "KINDS", "IndexOptions", "IndexResult", "choose_kind", "default_nlist", "default_pq_m",
           "train_index", "add_vectors", "exact_search", "recall_at_k", "calibrate_nprobe", "set_nprobe",
           "build_index", "SimilarityIndex", "faiss_threads"]

FORMAT = "medvol.search.Index/1"
KINDS = ("auto", "flat", "ivf", "ivfsq", "ivfpq")
_CHUNK = re.compile(r"^chunk-(\d{6})\.npz$")
_CALIBRATION_QUERIES = 256


@dataclass
class IndexOptions:
    """How :func:`build_index` builds (defaults chosen so that nobody needs to set them).

    Args:
        metric: ``"cosine"`` (vectors L2-normalised, distances reported as 1 - cosine similarity) or ``"l2"``
            (squared Euclidean distances).
        pooling: slice embeddings -> volume vector: ``"mean"`` or ``"max"``.
        kind: ``"auto"`` (:func:`choose_kind`), ``"flat"`` (exact), ``"ivf"``, ``"ivfsq"`` or ``"ivfpq"``.
        exact_max: ``auto`` uses exact search up to this many vectors.
        ivf_bytes_max: ``auto`` uses IVF-Flat while n * D * 4 bytes stay at most this, then IVF-SQ8.
        sq_bytes_max: ``auto`` uses IVF-SQ8 while n * D * 4 bytes stay at most this, IVF-PQ above.
        nlist: IVF lists (``None``: :func:`default_nlist`).
        points_per_list: k-means training rows per IVF list (sample of ``nlist * points_per_list`` rows).
        pq_m: IVF-PQ sub-quantizers (``None``: :func:`default_pq_m`); D must be a multiple of it.
        target_recall: recall at 10 the calibrated ``nprobe`` must reach (IVF kinds).
        seed: training sample, k-means seeding and calibration queries.
        n_threads: faiss OpenMP threads while building (``None``: faiss's setting).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``: where k-means trains the IVF quantizer (as in KMeans).
        chunk_size: embedding files per chunk (the unit of resume).
    """

    metric: str = "cosine"
    pooling: str = "mean"
    kind: str = "auto"
    exact_max: int = 50_000
    ivf_bytes_max: int = 512 * 1024**2
    sq_bytes_max: int = 16 * 1024**3
    nlist: int | None = None
    points_per_list: int = 64
    pq_m: int | None = None
    target_recall: float = 0.95
    seed: int = 0
    n_threads: int | None = None
    device: str = "auto"
    chunk_size: int = 1024

    def check(self) -> None:
        """Raise ``ValueError`` naming the first option out of range."""
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("exact_max", "ivf_bytes_max", "sq_bytes_max", "points_per_list", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "pq_m", "n_threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if not 0.0 < float(self.target_recall) <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class IndexResult:
    """What :func:`build_index` did: manifest counts, rows in the index, whether it was (re)trained."""

    manifest: Path
    counts: dict[str, int]
    meta: dict
    retrained: bool

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("failed", 0) else 0


# ---------------------------------------------------------------------------------------------- faiss parts
@contextlib.contextmanager
def faiss_threads(n_threads: int | None):
    """Run faiss with ``n_threads`` OpenMP threads (``None``: unchanged), then restore the previous setting."""
    if n_threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def choose_kind(n: int, dim: int, exact_max: int = 50_000, ivf_bytes_max: int = 512 * 1024**2,
                sq_bytes_max: int = 16 * 1024**3) -> str:
    """``"flat"`` up to ``exact_max`` vectors, then by the raw size n * dim * 4 bytes: ``"ivf"`` up to
    ``ivf_bytes_max``, ``"ivfsq"`` up to ``sq_bytes_max``, else ``"ivfpq"``.

    Example:
        >>> [choose_kind(n, 256) for n in (1_000, 100_000, 1_000_000, 100_000_000)]
        ['flat', 'ivf', 'ivfsq', 'ivfpq']
    """
    if n <= exact_max:
        return "flat"
    size = n * dim * 4
    return "ivf" if size <= ivf_bytes_max else "ivfsq" if size <= sq_bytes_max else "ivfpq"


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about sqrt(n) (1,000 for a million), at most n / 8, at least 1."""
    return int(max(1, min(round(math.sqrt(n)), n // 8, 65_536)))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers of IVF-PQ: the largest of 64, 32, ..., 1 that divides ``dim`` and leaves >= 2 dims each."""
    for m in (64, 32, 16, 8, 4, 2):
        if dim % m == 0 and dim // m >= 2:
            return m
    return 1


def _kmeans_device(device: str) -> str:
    return KMeans(1, device=device).device_  # the same GPU detection (and its errors) as medvol's k-means


def train_index(sample: np.ndarray, kind: str, nlist: int | None = None, pq_m: int | None = None, seed: int = 0,
                device: str = "auto", n_threads: int | None = None):
    """An empty, trained CPU faiss index (squared L2) of ``kind`` for vectors like the rows of ``sample``.

    IVF kinds: the coarse quantizer holds the centroids of :class:`medvol.cluster.KMeans` (k-means++ seeding,
    one restart; on the GPU when ``device`` allows) fitted on ``sample``; IVF-SQ8 then trains its ranges
    and IVF-PQ its product quantizer on (the residuals of) ``sample`` (faiss does not retrain a quantizer that
    already holds nlist centroids). ``sample``: a uniform sample of the vectors (``nlist * points_per_list`` rows).
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = sample.shape
    if kind == "flat":
        return faiss.IndexFlatL2(d)
    if kind not in ("ivf", "ivfsq", "ivfpq"):
        raise ValueError(f"kind must be 'flat', 'ivf', 'ivfsq' or 'ivfpq', got {kind!r}")
    nlist = int(nlist or default_nlist(n))
    if nlist > n:
        raise ValueError(f"an IVF index with nlist={nlist} needs at least {nlist} training vectors, got {n}")
    km = KMeans(nlist, device=device, n_iter=20, seed=seed, max_points_per_centroid=None, n_init=1,
                n_threads=n_threads).fit(sample)
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(km.cluster_centers_)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    elif kind == "ivfsq":  # 8 bits per dimension, ranges trained per dimension on the sample
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
    else:
        m = int(pq_m or default_pq_m(d))
        if d % m:
            raise ValueError(f"pq_m={m} must divide the dimension {d}")
        nbits = int(min(8, max(1, math.floor(math.log2(n)))))  # 2**nbits codewords need that many rows
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
    repair_faiss_vectors()
    with faiss_threads(n_threads):
        index.train(sample)
    return index


def add_vectors(index, vectors: np.ndarray, n_threads: int | None = None) -> None:
    """Append rows to ``index`` (their ids are the next positions)."""
    with faiss_threads(n_threads):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))


def set_nprobe(index, nprobe: int) -> None:
    """Lists searched per query of an IVF index (CPU or GPU); no-op for a flat index."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(max(1, nprobe), ivf.nlist))
    elif hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__ and "IVF" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def _ivf(index):
    with contextlib.suppress(Exception):
        return faiss.extract_index_ivf(index)
    return None


def exact_search(queries: np.ndarray, chunks, k: int, n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows (squared L2) of ``queries`` over matrices ``chunks`` taken in order as rows 0, 1, ...

    ``chunks`` is any iterable of (m_i, D) arrays, so the database never has to be in memory at once.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    with faiss_threads(n_threads):
        for chunk in chunks:
            flat = faiss.IndexFlatL2(queries.shape[1])
            flat.add(np.ascontiguousarray(chunk, dtype=np.float32))
            dist, ids = flat.search(queries, min(k, len(chunk)))
            ids = np.where(ids >= 0, ids + offset, -1)
            offset += len(chunk)
            cat_d, cat_i = np.concatenate([best_d, dist], 1), np.concatenate([best_i, ids], 1)
            order = np.argsort(cat_d, axis=1, kind="stable")[:, :k]
            best_d, best_i = np.take_along_axis(cat_d, order, 1), np.take_along_axis(cat_i, order, 1)
    return best_d, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true k nearest (``truth`` rows) among the first k of ``found`` (ids, -1 = none).

    Example:
        >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), k=3)
        0.6666666666666666
    """
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if hits else 1.0


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for i, (row, own) in enumerate(zip(ids, self_ids)):
        kept = row[row != own][:k]
        out[i, :len(kept)] = kept
    return out


def calibrate_nprobe(index, queries: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None = None, k: int = 10,
                     target: float = 0.95, n_threads: int | None = None) -> tuple[int, float, list]:
    """The smallest power-of-two ``nprobe`` whose recall at ``k`` against ``truth`` reaches ``target``.

    ``self_ids``: the row of each query when the queries are stored vectors (left out of the results, as it is
    of ``truth``). If no nprobe reaches the target (IVF-PQ's compressed distances), the one with the best
    recall is returned. Returns ``(nprobe, recall, [(nprobe, recall), ...])``.
    """
    ivf = _ivf(index)
    if ivf is None:
        return 1, 1.0, []
    extra = 0 if self_ids is None else 1
    curve: list[list] = []
    nprobe = 1
    with faiss_threads(n_threads):
        while True:
            ivf.nprobe = min(nprobe, ivf.nlist)
            _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + extra)
            found = ids[:, :k] if self_ids is None else _drop_self(ids, self_ids, k)
            curve.append([int(ivf.nprobe), recall_at_k(found, truth, k)])
            if curve[-1][1] >= target or ivf.nprobe >= ivf.nlist:
                break
            nprobe *= 2
    reached = [c for c in curve if c[1] >= target]
    chosen = reached[0] if reached else max(curve, key=lambda c: (c[1], -c[0]))
    ivf.nprobe = chosen[0]
    return chosen[0], chosen[1], curve


# ---------------------------------------------------------------------------------------------- the folder
class _Store:
    """The files of one INDEX_DIR."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta_path = self.root / "index.json"
        self.chunk_dir = self.root / "chunks"
        self.manifest_path = self.root / "manifest.csv"

    def read_meta(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(self.meta_path, f"not a readable index description ({one_line(e)})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise DataError(self.meta_path, f"not a medvol search index (format {found!r}, expected {FORMAT!r})")
        return meta

    def chunk_names(self) -> list[str]:
        if not self.chunk_dir.is_dir():
            return []
        return sorted(p.name for p in self.chunk_dir.iterdir() if _CHUNK.match(p.name))

    def next_chunk_name(self) -> str:
        names = self.chunk_names()
        number = int(_CHUNK.match(names[-1]).group(1)) + 1 if names else 0
        return f"chunk-{number:06d}.npz"

    def write_chunk(self, name: str, vectors: np.ndarray, items: list[dict]) -> Path:
        path = self.chunk_dir / name
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, vectors=np.ascontiguousarray(vectors, np.float32), items=np.array(json.dumps(items)))
            f.flush()
            os.fsync(f.fileno())
        return path

    def read_items(self, name: str) -> list[dict]:
        path = self.chunk_dir / name
        try:
            with np.load(path, allow_pickle=False) as f:
                return json.loads(str(f["items"]))
        except Exception as e:  # noqa: BLE001 - zip, key or JSON errors: a damaged chunk
            raise DataError(path, f"not a readable index chunk ({type(e).__name__}: {one_line(e)})") from None

    def read_vectors(self, name: str) -> np.ndarray:
        path = self.chunk_dir / name
        try:
            with np.load(path, allow_pickle=False) as f:
                return np.ascontiguousarray(f["vectors"], dtype=np.float32)
        except Exception as e:  # noqa: BLE001
            raise DataError(path, f"not a readable index chunk ({type(e).__name__}: {one_line(e)})") from None

    def faiss_path(self, meta: Mapping) -> Path:
        return self.root / str(meta["faiss_file"])


def _write_faiss(index, path: Path) -> str:
    repair_faiss_vectors()
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return file_sha256(path)


def _read_faiss(path: Path):
    if not path.is_file():
        raise DataError(path, "the index file is missing (index.json names it)")
    repair_faiss_vectors()
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(path, f"not a readable faiss index ({one_line(e)[:200]})") from None


def _items_csv(items: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "case_id", "file", "source", "n_rows", "dim", "checkpoint_sha256"])
    for i, item in enumerate(items):
        writer.writerow([i, item.get("case_id", ""), item.get("file", ""), item.get("source", ""),
                         item.get("n_rows", ""), item.get("dim", ""), item.get("checkpoint_sha256", "")])
    return buf.getvalue()


def _key(path: str | os.PathLike) -> str:
    return os.path.abspath(path)


class _Reference:
    """The dimension and checkpoint every vector of the index must share (set by the index or the first files)."""

    def __init__(self, dim: int | None, sha: str):
        self.dim, self.sha = dim, sha

    def settle(self, records: list[EmbeddingRecord]) -> None:
        if self.dim is None and records:
            self.dim = Counter(r.dim for r in records).most_common(1)[0][0]
        shas = [r.checkpoint_sha256 for r in records if r.checkpoint_sha256 and r.dim == self.dim]
        if not self.sha and shas:
            self.sha = Counter(shas).most_common(1)[0][0]

    def problem(self, r: EmbeddingRecord) -> str | None:
        if r.dim != self.dim:
            return f"embedding dimension {r.dim} does not match the index's {self.dim}"
        if r.checkpoint_sha256 and self.sha and r.checkpoint_sha256 != self.sha:
            return (f"embedded with checkpoint sha256 {r.checkpoint_sha256[:12]}..., the index with "
                    f"{self.sha[:12]}...: embeddings of different encoders are not comparable")
        return None


def build_index(embeddings_dir: str | os.PathLike, index_dir: str | os.PathLike, options: IndexOptions | None = None,
                embedder: Mapping | None = None, rebuild: bool = False, id_regex: str | None = None,
                log=print) -> IndexResult:
    """Index every embedding file in ``embeddings_dir`` into ``index_dir`` (created, resumed or appended to).

    Args:
        embeddings_dir: folder of bags (``.h5``) and/or volume embeddings (``.npy``), read flat.
        index_dir: the index folder (layout in the module docstring).
        options: build options; ``metric`` and ``pooling`` of an existing index must not change.
        embedder: ``{"bundle", "checkpoint", "checkpoint_sha256", "overrides"}`` recorded for scan queries; its
            checkpoint is the one every bag must have been embedded with.
        rebuild: train the faiss index again on all stored vectors even if new rows could be appended.
        id_regex: case ids from file names (as in :func:`medvol.io.bags.bag_case_id`).
        log: where progress lines go (``None``: nowhere).

    Returns:
        IndexResult (manifest path, counts ok/skipped/failed, the new ``index.json`` content).

    Raises:
        DataError: ``embeddings_dir`` missing or without embedding files, a damaged index folder.
        ConfigError: options that contradict the existing index (metric, pooling, embedder checkpoint).
    """
    options = options or IndexOptions()
    options.check()
    log = log or (lambda *a, **k: None)
    store = _Store(index_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    for path in (store.meta_path, store.manifest_path, store.root / "ids.csv"):
        remove_stale_temps(path)
    if store.chunk_dir.is_dir():
        for tmp in store.chunk_dir.glob(".chunk-*.tmp"):
            tmp.unlink(missing_ok=True)
    meta = store.read_meta()
    if meta is not None:
        for name in ("metric", "pooling"):
            if getattr(options, name) != meta[name]:
                raise ConfigError(f"index {store.root} was built with {name} {meta[name]!r}, not "
                                  f"{getattr(options, name)!r}: use a new INDEX_DIR for another {name}")
    embedder = dict(embedder) if embedder else (meta or {}).get("embedder")
    old_sha = ((meta or {}).get("embedder") or {}).get("checkpoint_sha256", "")
    if meta is not None and embedder and old_sha and embedder.get("checkpoint_sha256") != old_sha:
        raise ConfigError(f"index {store.root} holds embeddings of checkpoint sha256 {old_sha[:12]}..., "
                          f"--checkpoint has {str(embedder.get('checkpoint_sha256'))[:12]}...")

    # what the chunks on disk already hold (committed, or finished by a run that was killed before the commit)
    names = store.chunk_names()
    items: list[dict] = []
    rows_per_chunk: dict[str, int] = {}
    for name in names:
        chunk_items = store.read_items(name)
        rows_per_chunk[name] = len(chunk_items)
        items += chunk_items
    indexed = {_key(it["file"]): (i, it) for i, it in enumerate(items)}
    sha = (embedder or {}).get("checkpoint_sha256") or (meta or {}).get("checkpoint_sha256") or next(
        (it["checkpoint_sha256"] for it in items if it.get("checkpoint_sha256")), "")
    ref = _Reference(int(meta["dim"]) if meta else (items[0]["dim"] if items else None), sha)

    files = find_embedding_files(embeddings_dir)
    previous = read_manifest(store.manifest_path)
    manifest = Manifest(store.manifest_path, columns=(*MANIFEST_COLUMNS, "id", "case_id", "n_rows", "dim"),
                        order=[*previous, *(str(f) for f in files)])
    for row in previous.values():  # files of earlier runs (e.g. another folder appended before) stay listed
        if _key(row["source"]) in indexed and row.get("status") in ("ok", "skipped"):
            manifest.add({**row, "status": "skipped", "seconds": 0.0})
    todo: list[Path] = []
    for path in files:
        hit = indexed.get(_key(path))
        if hit is None:
            todo.append(path)
            continue
        row_id, item = hit
        base = {"source": str(path), "id": row_id, "case_id": item["case_id"], "n_rows": item["n_rows"],
                "dim": item["dim"], "seconds": 0.0}
        if item.get("file_sha256") and file_sha256(path) != item["file_sha256"]:
            manifest.add({**base, "status": "failed", "id": "", "error": f"{path}: changed since it was indexed "
                          f"as row {row_id} (sha256 differs); index the new version into a new INDEX_DIR"})
        else:
            manifest.add({**base, "status": "skipped"})
    manifest.write()

    new_names: list[str] = []
    for start in range(0, len(todo), options.chunk_size):
        batch = todo[start:start + options.chunk_size]
        records, vectors = [], []
        good: list[EmbeddingRecord] = []
        for path in batch:
            t0 = time.perf_counter()
            try:
                rec = read_embedding(path, options.pooling, id_regex)
                rec.extra["seconds"] = time.perf_counter() - t0
                good.append(rec)
            except DataError as e:
                manifest.add({"source": str(path), "status": "failed", "error": str(e),
                              "seconds": time.perf_counter() - t0})
        ref.settle(good)
        for rec in good:
            seconds = rec.extra.pop("seconds")
            reason = ref.problem(rec)
            if reason is None:
                try:
                    vectors.append(prepare_vectors(rec.vector, options.metric)[0])
                except ValueError as e:
                    reason = str(e)
            if reason is not None:
                manifest.add({"source": rec.file, "status": "failed", "error": f"{rec.file}: {reason}",
                              "case_id": rec.case_id, "dim": rec.dim, "seconds": seconds})
                continue
            records.append((rec, seconds))
        if records:
            name = store.next_chunk_name()
            store.write_chunk(name, np.stack(vectors), [r.item() for r, _ in records])
            new_names.append(name)
            rows_per_chunk[name] = len(records)
            for rec, seconds in records:
                manifest.add({"source": rec.file, "status": "ok", "id": len(items), "case_id": rec.case_id,
                              "n_rows": rec.n_rows, "dim": rec.dim, "seconds": seconds})
                items.append(rec.item())
        manifest.write()
        log(f"index: read {min(start + options.chunk_size, len(todo))}/{len(todo)} new embedding files")

    names = store.chunk_names()
    n = sum(rows_per_chunk[c] for c in names)
    if n == 0:
        raise DataError(Path(embeddings_dir), "no usable embedding file (every one failed: see "
                        f"{store.manifest_path})")
    dim = int(ref.dim)
    kind = options.kind if options.kind != "auto" else choose_kind(n, dim, options.exact_max, options.ivf_bytes_max,
                                                                    options.sq_bytes_max)
    committed = list((meta or {}).get("chunks", {}).keys()) if meta else []
    incremental = (meta is not None and not rebuild and meta["kind"] == kind and names[:len(committed)] == committed
                   and store.faiss_path(meta).is_file())
    if incremental and len(committed) == len(names) and (embedder or None) == (meta.get("embedder") or None):
        log(f"index: nothing new; {n} vectors in {store.root}")
        return IndexResult(store.manifest_path, manifest.counts(), meta, retrained=False)

    t0 = time.perf_counter()
    if incremental:
        index = _read_faiss(store.faiss_path(meta))
        for name in names[len(committed):]:
            add_vectors(index, store.read_vectors(name), options.n_threads)
        nlist = meta.get("nlist")
    else:
        nlist = None if kind == "flat" else int(options.nlist or default_nlist(n))
        sample = _sample_rows(store, names, rows_per_chunk, (nlist or 1) * options.points_per_list, options.seed)
        log(f"index: training a {kind} index on {len(sample)} of {n} vectors" if kind != "flat" else
            f"index: exact (flat) index of {n} vectors")
        index = train_index(sample, kind, nlist, options.pq_m, options.seed, options.device, options.n_threads)
        del sample
        for name in names:
            add_vectors(index, store.read_vectors(name), options.n_threads)
    build_seconds = time.perf_counter() - t0
    pq_m = None
    if kind == "ivfpq":
        pq_m = meta.get("pq_m") if incremental else int(options.pq_m or default_pq_m(dim))
    calibration = None
    nprobe = 1
    if kind != "flat":
        calibration = _calibrate(index, store, names, rows_per_chunk, options)
        nprobe = calibration["nprobe"]
        log(f"index: nprobe {nprobe} of {nlist} lists gives recall@10 {calibration['recall_at_10']:.3f} against "
            f"exact search ({calibration['queries']} stored vectors as queries)")

    generation = int((meta or {}).get("generation", -1)) + 1
    faiss_file = f"index-{generation}.faiss"
    faiss_sha = _write_faiss(index, store.root / faiss_file)
    new_meta = {
        "format": FORMAT, "generation": generation, "faiss_file": faiss_file, "faiss_sha256": faiss_sha,
        "n": n, "dim": dim, "kind": kind, "metric": options.metric, "pooling": options.pooling,
        "nlist": nlist, "nprobe": nprobe, "pq_m": pq_m,
        "calibration": calibration, "checkpoint_sha256": ref.sha, "embedder": embedder or None,
        "text_encoder": (meta or {}).get("text_encoder"),
        "chunks": {c: rows_per_chunk[c] for c in names},
        "embeddings_dirs": sorted({*(meta or {}).get("embeddings_dirs", []), _key(embeddings_dir)}),
        "options": {k: v for k, v in asdict(options).items() if k not in ("n_threads", "device")},
        "build_seconds": round(build_seconds, 3), "retrained": not incremental,
        "medvol_version": __version__, "faiss_version": faiss.__version__,
    }
    atomic_write_text(store.root / "ids.csv", _items_csv(items))
    atomic_write_text(store.meta_path, json.dumps(new_meta, indent=1))  # the commit
    for old in store.root.glob("index-*.faiss"):
        if old.name != faiss_file:
            old.unlink(missing_ok=True)
    log(f"index: {n} vectors ({kind}, {options.metric}) in {store.root}")
    return IndexResult(store.manifest_path, manifest.counts(), new_meta, retrained=not incremental)


def _chunk_vectors(store: _Store, names: list[str]) -> Iterator[np.ndarray]:
    for name in names:
        yield store.read_vectors(name)


def _sample_rows(store: _Store, names: list[str], rows: Mapping[str, int], size: int, seed: int) -> np.ndarray:
    n = sum(rows[c] for c in names)
    take = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    parts, offset = [], 0
    for name in names:
        here = take[(take >= offset) & (take < offset + rows[name])] - offset
        if len(here):
            parts.append(store.read_vectors(name)[here])
        offset += rows[name]
    return np.concatenate(parts)


def _calibrate(index, store: _Store, names: list[str], rows: Mapping[str, int], options: IndexOptions) -> dict:
    n = sum(rows[c] for c in names)
    rng = np.random.default_rng(options.seed + 1)
    self_ids = np.sort(rng.choice(n, size=min(_CALIBRATION_QUERIES, n), replace=False))
    queries, offset = [], 0
    for name in names:
        here = self_ids[(self_ids >= offset) & (self_ids < offset + rows[name])] - offset
        if len(here):
            queries.append(store.read_vectors(name)[here])
        offset += rows[name]
    queries = np.concatenate(queries)
    k = min(10, n - 1) or 1
    _, truth = exact_search(queries, _chunk_vectors(store, names), k + 1, options.n_threads)
    truth = _drop_self(truth, self_ids, k)
    nprobe, recall, curve = calibrate_nprobe(index, queries, truth, self_ids, k, options.target_recall,
                                             options.n_threads)
    return {"nprobe": nprobe, "recall_at_10": recall, "queries": len(queries), "target": options.target_recall,
            "curve": curve}


# ---------------------------------------------------------------------------------------------- searching
class SimilarityIndex:
    """A built index opened for search: ``search(vectors, k)`` -> distances, ids; ``items[id]`` -> id-map entry.

    Args (of :meth:`open`):
        index_dir: folder written by :func:`build_index`.
        device: ``"auto"`` (a faiss GPU copy when faiss has GPU support and sees a device), ``"cpu"``, ``"cuda"``.
        n_threads: faiss OpenMP threads while searching (``None``: faiss's setting).
    """

    def __init__(self, index, meta: dict, items: list[dict], root: Path, device: str = "cpu",
                 n_threads: int | None = None):
        self.index, self.meta, self.items, self.root = index, meta, items, root
        self.device, self.n_threads = device, n_threads

    @classmethod
    def open(cls, index_dir: str | os.PathLike, device: str = "auto", n_threads: int | None = None,
             load_items: bool = True) -> SimilarityIndex:
        """Raises DataError when ``index_dir`` holds no (or a damaged) index."""
        store = _Store(index_dir)
        meta = store.read_meta()
        if meta is None:
            raise DataError(store.root, "no search index here (no index.json): build one with `medvol index`")
        index = _read_faiss(store.faiss_path(meta))
        if int(index.ntotal) != int(meta["n"]):
            raise DataError(store.faiss_path(meta), f"holds {index.ntotal} vectors, index.json says {meta['n']}")
        items: list[dict] = []
        if load_items:
            for name in meta["chunks"]:
                items += store.read_items(name)
            if len(items) != int(meta["n"]):
                raise DataError(store.root, f"the chunks hold {len(items)} id-map entries, index.json says {meta['n']}")
        set_nprobe(index, int(meta.get("nprobe") or 1))
        device_ = _kmeans_device(device)
        if device_ == "cuda":
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            index.referenced_objects = [resources]
            set_nprobe(index, int(meta.get("nprobe") or 1))
        return cls(index, meta, items, store.root, device_, n_threads)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.meta["n"])

    def search(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored volumes of each query row (raw pooled vectors, prepared like the stored ones).

        Returns:
            ``(distances, ids)``, each (q, k'); k' = min(k, len(index)). Cosine metric: 1 - cosine similarity;
            l2: squared Euclidean distance. Ids index :attr:`items`.

        Raises:
            ValueError: wrong dimension, non-finite or (cosine) all-zero query.
        """
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if x.shape[1] != self.dim:
            raise ValueError(f"query has dimension {x.shape[1]}, the index {self.dim}")
        x = prepare_vectors(x, self.meta["metric"])
        if nprobe is not None:
            set_nprobe(self.index, nprobe)
        k = max(1, min(int(k), len(self)))
        with faiss_threads(self.n_threads if self.device == "cpu" else None):
            dist, ids = self.index.search(x, k)
        if self.meta["metric"] == "cosine":
            dist = dist / 2.0  # |a - b|^2 = 2 - 2 cos for unit vectors
        return dist, ids
