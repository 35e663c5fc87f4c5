"""Similar-case search benchmark (docs/benchmarks.md, "Similar-case search"): retrieval quality and scale.

Quality (``--parts quality``): precision at 10 of same-label neighbours, the fraction of the 10 nearest indexed
volumes that share the query's label, with the cosine metric and mean pooling of ``medvol index`` (defaults, not
tuned):

- AdrenalMNIST3D (28^3 shape masks, official splits): the 298 **test** volumes query an index of the 1,188
  **train** volumes; label normal / hyperplasia;
- IXI T1 (145 volumes, 142 with sex): leave-one-out, every subject queries an index of all indexed subjects
  (its own entry left out); label sex.

Embeddings compared: a short LeCL pretraining of the ``lecl_slice_embedding`` bundle (``benchmarks/mil_benchmark.py``'s
pretraining and ``medvol embed`` stages with smaller, CPU-sized settings), the same encoder randomly initialised,
and PCA of downsampled voxels (fitted on the indexed volumes only). Every stage is cached in ``--out``.

Scale (``--parts scale``): 1,000,000 x 256 float32 synthetic clustered vectors (1,000 clusters in a 32-d latent
space projected to 256-d plus noise, L2-normalised as the cosine metric stores them), IVF-Flat, IVF-SQ8 and IVF-PQ
built by :func:`medvol.search.train_index` (medvol k-means quantizer, nlist 1,000) with the nprobe that
:func:`medvol.search.calibrate_nprobe` picks for recall@10 >= 0.95 (the same calibration as ``medvol index``);
each kind runs in its own process so its peak resident memory is its own. 1,000 fresh query vectors (not in the
database) are timed one at a time (p50 / p95 latency) and as one batch, and scored by recall@10 against exact
search (faiss ``IndexFlatL2`` over the whole database).

Command (from the repository root):

    MEDVOL_DATA=../shared/data OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/search_benchmark.py \
        --out /tmp/searchbench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIM, N_CLUSTERS, LATENT = 256, 1_000, 32
N_DB = int(os.environ.get("MEDVOL_SEARCHBENCH_N", "1000000"))  # smaller only for a smoke test of this script
CHUNK = 50_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage(out: Path, name: str, fn):
    """Run ``fn()`` once; its JSON result is cached in ``out/<name>.json`` (a re-run resumes)."""
    marker = out / f"{name}.json"
    if marker.is_file():
        log(f"stage {name}: cached")
        return json.loads(marker.read_text(encoding="utf-8"))
    log(f"stage {name}: running")
    t0 = time.perf_counter()
    result = fn()
    result = {**result, "stage_seconds": round(time.perf_counter() - t0, 1), "loadavg_after": os.getloadavg()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    tmp.replace(marker)
    log(f"stage {name}: done in {result['stage_seconds']} s")
    return result


# ------------------------------------------------------------------------------------------------------- scale
def _generator(seed: int):
    rng = np.random.default_rng(12345)  # the clusters and the projection are shared by database and queries
    proj = rng.normal(size=(LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    centres = rng.normal(size=(N_CLUSTERS, LATENT)).astype(np.float32)
    draw = np.random.default_rng(seed)

    def sample(m: int) -> np.ndarray:
        labels = draw.integers(N_CLUSTERS, size=m)
        z = centres[labels] + 0.35 * draw.normal(size=(m, LATENT)).astype(np.float32)
        x = z @ proj + 0.05 * draw.normal(size=(m, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return sample


def generate(out: Path) -> dict:
    """Database (N_DB x DIM float32, raw file) and 1,000 queries, written chunk by chunk."""
    out.mkdir(parents=True, exist_ok=True)
    sample = _generator(seed=1)
    with open(out / "db.f32", "wb") as f:
        for _ in range(max(1, N_DB // CHUNK)):
            sample(min(CHUNK, N_DB)).astype(np.float32).tofile(f)
    np.save(out / "queries.npy", _generator(seed=2)(1000).astype(np.float32))
    return {"db": str(out / "db.f32"), "n": N_DB, "dim": DIM, "clusters": N_CLUSTERS, "latent": LATENT}


def _db_chunks(path: Path):
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, dtype=np.float32, count=CHUNK * DIM)
            if block.size == 0:
                return
            yield block.reshape(-1, DIM)


def _take_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted ids) of the raw database file, read chunk by chunk (no memory map: its pages would count as
    resident memory of the build)."""
    parts, offset = [], 0
    for block in _db_chunks(path):
        here = rows[(rows >= offset) & (rows < offset + len(block))] - offset
        if len(here):
            parts.append(block[here].copy())
        offset += len(block)
    return np.ascontiguousarray(np.concatenate(parts))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_truth(out: Path, threads: int) -> dict:
    from medvol.search import exact_search

    queries = np.load(out / "queries.npy")
    t0 = time.perf_counter()
    dist, ids = exact_search(queries, _db_chunks(out / "db.f32"), 10, threads)
    np.save(out / "truth.npy", ids)
    return {"exact_search_s": round(time.perf_counter() - t0, 2), "queries": len(queries)}


def scale_child(out: Path, kind: str, threads: int, nlist: int, pq_m: int) -> dict:
    """Build one index kind and measure it (runs in its own process: peak RSS is this build's)."""
    import faiss

    from medvol.search import calibrate_nprobe, exact_search, recall_at_k, train_index
    from medvol.search.index import _drop_self, set_nprobe

    faiss.omp_set_num_threads(threads)
    rss_start = _rss_mib()
    db = out / "db.f32"
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(N_DB, size=min(N_DB, nlist * 64), replace=False))
    sample = _take_rows(db, rows)
    t0 = time.perf_counter()
    index = train_index(sample, kind, nlist=nlist, pq_m=pq_m, seed=0, device="cpu", n_threads=threads)
    train_s = time.perf_counter() - t0
    del sample
    t1 = time.perf_counter()
    for block in _db_chunks(db):
        index.add(block)
    add_s = time.perf_counter() - t1
    rss_built = _rss_mib()
    # nprobe calibration as medvol index does it: 256 stored vectors as queries, their own row left out
    t2 = time.perf_counter()
    self_ids = np.sort(np.random.default_rng(1).choice(N_DB, size=256, replace=False))
    cal_q = _take_rows(db, self_ids)
    _, cal_truth = exact_search(cal_q, _db_chunks(db), 11, threads)
    nprobe, cal_recall, curve = calibrate_nprobe(index, cal_q, _drop_self(cal_truth, self_ids, 10), self_ids, 10,
                                                 0.95, threads)
    calib_s = time.perf_counter() - t2
    queries, truth = np.load(out / "queries.npy"), np.load(out / "truth.npy")
    set_nprobe(index, nprobe)
    # single queries, one at a time
    lat, found = [], []
    for q in queries:
        ts = time.perf_counter()
        _, ids = index.search(q[None], 10)
        lat.append(time.perf_counter() - ts)
        found.append(ids[0])
    lat_ms = np.array(lat) * 1e3
    single_recall = recall_at_k(np.array(found), truth, 10)
    # batches
    batch = {}
    for size in (100, 1000):
        ts = time.perf_counter()
        for s in range(0, len(queries), size):
            index.search(queries[s:s + size], 10)
        wall = time.perf_counter() - ts
        batch[str(size)] = {"queries_per_s": round(len(queries) / wall, 1),
                            "ms_per_query": round(wall * 1e3 / len(queries), 4)}
    # recall / latency trade-off over nprobe (batch of 1,000)
    tradeoff = []
    for p in (1, 2, 4, 8, 16, 32, 64):
        set_nprobe(index, p)
        ts = time.perf_counter()
        _, ids = index.search(queries, 10)
        tradeoff.append({"nprobe": p, "recall_at_10": round(recall_at_k(ids, truth, 10), 4),
                         "batch_ms_per_query": round((time.perf_counter() - ts) * 1e3 / len(queries), 4)})
    path = out / f"index_{kind}.faiss"
    faiss.write_index(index, str(path))
    return {
        "kind": kind, "nlist": nlist, "pq_m": pq_m if kind == "ivfpq" else None, "threads": threads,
        "train_s": round(train_s, 2), "add_s": round(add_s, 2), "build_s": round(train_s + add_s, 2),
        "calibration_s": round(calib_s, 2), "nprobe": nprobe, "calibration_recall_at_10": round(cal_recall, 4),
        "calibration_curve": curve,
        "single_query_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 3),
                            "p95": round(float(np.percentile(lat_ms, 95)), 3),
                            "p99": round(float(np.percentile(lat_ms, 99)), 3), "mean": round(float(lat_ms.mean()), 3)},
        "single_recall_at_10": round(single_recall, 4), "batch": batch, "tradeoff": tradeoff,
        "peak_rss_mib": round(_rss_mib(), 1), "rss_at_start_mib": round(rss_start, 1),
        "peak_rss_after_build_mib": round(rss_built, 1),
        "index_file_mib": round(path.stat().st_size / 2**20, 1),
    }


def run_child(args, *child_args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else ""),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--threads", str(args.threads),
           "--nlist", str(args.nlist), "--pq-m", str(args.pq_m), *child_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scale(args) -> dict:
    out = args.out / "scale"
    res = {"data": stage(out, "generate", lambda: generate(out))}
    res["truth"] = stage(out, "truth", lambda: scale_truth(out, args.threads))
    for kind in ("ivfsq", "ivfpq", "ivf"):
        res[kind] = stage(out, f"build_{kind}", lambda k=kind: run_child(args, "--scale-child", k))
    return res


# ----------------------------------------------------------------------------------------------------- quality
def _mil():
    import mil_benchmark

    return mil_benchmark


def _index_cli(embeddings: Path, index: Path, log_path: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "medvol", "index", str(embeddings), str(index), "--threads", str(threads)]
    wall = _mil().run_cmd(cmd, log_path, threads)
    return {"index": str(index), "wall_s": round(wall, 1), "meta": json.loads((index / "index.json").read_text())}


def _precision(index_dir: Path, query_files: list[Path], labels: dict, leave_self_out: bool) -> dict:
    from medvol.search import SimilarityIndex, read_embedding

    index = SimilarityIndex.open(index_dir, device="cpu")
    vectors, qlabels, own = [], [], []
    for f in query_files:
        rec = read_embedding(f, index.meta["pooling"])
        vectors.append(rec.vector)
        qlabels.append(labels[rec.case_id])
        own.append(os.path.abspath(f))
    _, ids = index.search(np.stack(vectors), 11 if leave_self_out else 10)
    precisions = []
    for row, lab, me in zip(ids, qlabels, own):
        items = [index.items[i] for i in row if i >= 0 and os.path.abspath(index.items[i]["file"]) != me][:10]
        same = [labels.get(it["case_id"]) == lab for it in items if it["case_id"] in labels]
        precisions.append(float(np.mean(same)))
    return {"precision_at_10": round(float(np.mean(precisions)), 4), "queries": len(precisions),
            "std_over_queries": round(float(np.std(precisions)), 4)}


def _chance(query_labels: list, db_labels: list) -> float:
    """Expected precision of 10 random neighbours: sum over classes of P(query class) * P(db class)."""
    q, d = Counter(query_labels), Counter(db_labels)
    return round(sum(q[c] / len(query_labels) * d.get(c, 0) / len(db_labels) for c in q), 4)


def _pca_npy(train_x: np.ndarray, sets: dict, out: Path, components: int) -> dict:
    """PCA fitted on ``train_x`` (standardised voxels), every set written as <case>.npy vectors."""
    from sklearn.decomposition import PCA

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    pca = PCA(components, random_state=0).fit((train_x - mean) / std)
    for name, (ids, x) in sets.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for case, vec in zip(ids, pca.transform((x - mean) / std).astype(np.float32)):
            np.save(folder / f"{case}.npy", vec)
    return {"components": components, "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4)}


def run_adrenal(args) -> dict:
    mil = _mil()
    out = args.out / "adrenal"
    npz = Path(args.data) / "adrenalmnist3d" / "adrenalmnist3d.npz"
    nifti = out / "nifti"
    pre = ("$medvol.transforms.slice_preset('ct', keys=['image'], windows=None, spacing=None, "
           "window=(0.0, 255.0))")
    enc = mil.encoder_overrides(args, args.adrenal_size, preprocessing=pre)
    res = {"data": stage(out, "nifti", lambda: mil.adrenal_nifti(npz, nifti))}
    res["pretrain"] = stage(out, "pretrain", lambda: mil.pretrain(args, out / "lecl", nifti / "train", enc,
                                                                  args.adrenal_epochs, args.adrenal_samples))
    res["random"] = stage(out, "random_ckpt", lambda: mil.random_checkpoint(out, enc))
    with open(res["data"]["targets"], newline="") as f:
        labels = {r["id"]: int(r["label"]) for r in csv.DictReader(f)}
    rows = {}
    for name, ckpt in (("lecl", res["pretrain"]["model"]), ("random", res["random"]["model"])):
        for split in ("train", "test"):
            stage(out, f"embed_{name}_{split}", lambda c=ckpt, n=name, s=split:
                  mil.embed(args, nifti / s, out / f"bags_{n}" / s, c, enc, 1))
        stage(out, f"index_{name}", lambda n=name: _index_cli(out / f"bags_{n}" / "train", out / f"index_{n}",
                                                              out / f"index_{n}.log", args.threads))
        rows[name] = _precision(out / f"index_{name}", sorted((out / f"bags_{name}" / "test").glob("*.h5")), labels,
                                leave_self_out=False)
    data = np.load(npz)

    def pca():
        ids = {s: [f"adrenal_{s}_n{i:04d}" for i in range(len(data[f"{s}_images"]))] for s in ("train", "test")}
        flat = {s: data[f"{s}_images"].reshape(len(ids[s]), -1).astype(np.float32) / 255.0 for s in ids}
        info = _pca_npy(flat["train"], {s: (ids[s], flat[s]) for s in ids}, out / "pca", args.pca_components)
        return {**info, **_index_cli(out / "pca" / "train", out / "index_pca", out / "index_pca.log", args.threads)}

    res["pca"] = stage(out, "pca", pca)
    rows["pca"] = _precision(out / "index_pca", sorted((out / "pca" / "test").glob("*.npy")), labels, False)
    train_labels = [labels[f"adrenal_train_n{i:04d}"] for i in range(len(data["train_images"]))]
    test_labels = [labels[f"adrenal_test_n{i:04d}"] for i in range(len(data["test_images"]))]
    res["precision"] = rows
    res["chance"] = _chance(test_labels, train_labels)
    return res


def run_ixi(args) -> dict:
    mil = _mil()
    out = args.out / "ixi"
    image_dir = Path(args.data) / "ixi_t1"
    images = image_dir / "t1" if (image_dir / "t1").is_dir() else image_dir
    enc = mil.encoder_overrides(args, args.ixi_size)
    res = {"pretrain": stage(out, "pretrain", lambda: mil.pretrain(args, out / "lecl", images, enc, args.ixi_epochs,
                                                                   args.ixi_samples))}
    res["random"] = stage(out, "random_ckpt", lambda: mil.random_checkpoint(out, enc))
    with open(image_dir / "participants.csv", newline="") as f:
        rows_csv = list(csv.DictReader(f))
    id_col = next(c for c in rows_csv[0] if c.lower() in ("mrid", "id", "participant_id", "subject"))
    sex = {r[id_col]: r["Sex"] for r in rows_csv if r.get("Sex") not in (None, "", "nan")}
    files = sorted(p for p in images.iterdir() if p.name.endswith((".nii.gz", ".nii")))

    def case(path: Path) -> str:
        name = path.name.split(".")[0]
        return name[:-3] if name.endswith("_T1") else name

    labels = {}
    for p in files:
        if case(p) in sex:
            labels[p.name.split(".")[0]] = sex[case(p)]
    rows = {}
    for name, ckpt in (("lecl", res["pretrain"]["model"]), ("random", res["random"]["model"])):
        stage(out, f"embed_{name}", lambda c=ckpt, n=name: mil.embed(args, images, out / f"bags_{n}", c, enc,
                                                                     args.ixi_stride))
        stage(out, f"index_{name}", lambda n=name: _index_cli(out / f"bags_{n}", out / f"index_{n}",
                                                              out / f"index_{n}.log", args.threads))
        queries = [p for p in sorted((out / f"bags_{name}").glob("*.h5")) if p.stem in labels]
        rows[name] = _precision(out / f"index_{name}", queries, labels, leave_self_out=True)

    def pca():
        ids, x = mil.ixi_voxel_features(images, args.pca_size)
        ids = [Path(i).name.split(".")[0] for i in ids]
        info = _pca_npy(x, {"all": (ids, x)}, out / "pca", args.pca_components)
        return {**info, **_index_cli(out / "pca" / "all", out / "index_pca", out / "index_pca.log", args.threads)}

    res["pca"] = stage(out, "pca", pca)
    queries = [p for p in sorted((out / "pca" / "all").glob("*.npy")) if p.stem in labels]
    rows["pca"] = _precision(out / "index_pca", queries, labels, leave_self_out=True)
    res["precision"] = rows
    res["n_labelled"] = len(labels)
    sexes = list(labels.values())
    res["chance"] = round(sum((sexes.count(s) * (sexes.count(s) - 1)) for s in set(sexes))
                          / (len(sexes) * (len(sexes) - 1)), 4)
    res["sex_counts"] = dict(Counter(sexes))
    return res


from collections import Counter  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (stages cached; a re-run resumes)")
    p.add_argument("--data", default=os.environ.get("MEDVOL_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--parts", nargs="+", default=["scale", "quality"], choices=["scale", "quality"])
    p.add_argument("--threads", type=int, default=2, help="faiss / torch threads (default 2, the machine's cores)")
    p.add_argument("--nlist", type=int, default=1000, help="IVF lists at 1M vectors (default 1000 = sqrt(n))")
    p.add_argument("--pq-m", type=int, default=64, help="IVF-PQ sub-quantizers at D = 256 (default 64)")
    # LeCL settings for the quality part (CPU-sized, fixed before any query was run; see docs/benchmarks.md)
    p.add_argument("--dims", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--depths", type=int, nargs=4, default=[1, 1, 1, 1])
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--adrenal-size", type=int, default=32)
    p.add_argument("--adrenal-epochs", type=int, default=3)
    p.add_argument("--adrenal-samples", type=int, default=4)
    p.add_argument("--ixi-size", type=int, default=64)
    p.add_argument("--ixi-stride", type=int, default=2)
    p.add_argument("--ixi-epochs", type=int, default=3)
    p.add_argument("--ixi-samples", type=int, default=8)
    p.add_argument("--pca-size", type=int, default=32)
    p.add_argument("--pca-components", type=int, default=32)
    p.add_argument("--scale-child", choices=["ivf", "ivfsq", "ivfpq"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_child:
        print(json.dumps(scale_child(args.out / "scale", args.scale_child, args.threads, args.nlist, args.pq_m)))
        return 0
    results = {"machine": machine_info(), "command": " ".join(sys.argv)}
    if "scale" in args.parts:
        results["scale"] = run_scale(args)
    if "quality" in args.parts:
        results["adrenal"] = run_adrenal(args)
        results["ixi"] = run_ixi(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
    log(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
