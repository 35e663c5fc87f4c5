"""medvol.cluster.KMeans (FAISS) and FeatureSampler: against scikit-learn, a numpy Lloyd reference, real MRI."""

from __future__ import annotations

import json
import re

import faiss
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import chi2
from sklearn.cluster import KMeans as SkKMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from medvol.cluster import FeatureSampler, KMeans, kmeans_plusplus
from medvol.errors import DataError

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _voxel_features(path) -> np.ndarray:
    """Multi-scale local statistics per voxel (7-d) of one volume normalised on its own."""
    v = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    lo, hi = np.percentile(v, [1, 99])
    v = np.clip(v, lo, hi)
    v = (v - v.mean()) / v.std()
    feats = [v] + [ndimage.uniform_filter(v, s) for s in (3, 5, 9)]
    feats += [ndimage.gaussian_gradient_magnitude(v, s) for s in (1.0, 2.0)]
    feats.append(np.sqrt(np.maximum(ndimage.uniform_filter(v * v, 5) - feats[2] ** 2, 0)))
    return np.stack(feats, -1).reshape(-1, len(feats))


@pytest.fixture(scope="module")
def hippo_features(demo_dir) -> np.ndarray:
    """20,000 voxel features sampled uniformly from 4 real hippocampus MRI volumes."""
    files = sorted((demo_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:4]
    assert len(files) == 4
    sampler = FeatureSampler(20_000, seed=0)
    for f in files:
        sampler.add(_voxel_features(f))
    return sampler.sample()


def _mixture(n_per: int = 400, k: int = 5, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    y = np.repeat(np.arange(k), n_per)
    return (centers[y] + rng.normal(0, 1, (len(y), d))).astype(np.float32), y


def _lloyd_reference(x: np.ndarray, init: np.ndarray, n_iter: int) -> np.ndarray:
    """Plain Lloyd iterations in float64 (assign, then mean of each cluster)."""
    x, c = x.astype(np.float64), init.astype(np.float64).copy()
    for _ in range(n_iter):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(c)):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
    return c


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_recovers_well_separated_clusters(init):
    x, y = _mixture()
    km = min((KMeans(5, init=init, seed=s).fit(x) for s in range(5)), key=lambda m: m.inertia_)  # best of 5
    assert adjusted_rand_score(y, km.labels_) == pytest.approx(1.0)
    assert km.cluster_centers_.shape == (5, 16) and km.cluster_centers_.dtype == np.float32
    assert km.predict(x).dtype == np.int64 and km.device_ == "cpu" and 1 <= km.n_iter_ <= 20


def test_all_samples_matches_lloyd_reference(hippo_features):
    x = hippo_features[:5000]
    init = x[[10, 500, 1000, 2000, 3000, 4000]]
    km = KMeans(6, init=init, n_iter=8, max_points_per_centroid=None).fit(x)  # FAISS's Lloyd on every row
    np.testing.assert_allclose(km.cluster_centers_, _lloyd_reference(x, init, 8), atol=2e-4)
    assert km.n_train_ == 5000
    sub = KMeans(6, init=init, n_iter=8, max_points_per_centroid=40).fit(x)  # 240 of 5000 points: different
    assert sub.n_train_ == 240 and np.abs(sub.cluster_centers_ - km.cluster_centers_).max() > 1e-3
    assert sub.inertia_ >= km.inertia_ * 0.999  # inertia is still measured on all 5000 samples


def test_default_trains_on_a_sample_sized_to_k_and_assigns_every_row():
    x, y = _mixture(n_per=5000, k=4, d=8, seed=1)  # 20,000 rows
    km = KMeans(4, seed=0).fit(x)
    assert km.n_train_ == 4 * 1024 and km.n_samples_seen_ == 20_000 and km.labels_.shape == (20_000,)
    d2 = ((x[:, None, :].astype(np.float64) - km.cluster_centers_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(km.labels_, d2.argmin(1))  # every row assigned to its nearest final centroid
    assert km.inertia_ == pytest.approx(d2.min(1).sum(), rel=1e-5)
    assert adjusted_rand_score(y, km.labels_) == pytest.approx(1.0)
    assert KMeans(4, max_points_per_centroid=10_000).fit(x).n_train_ == 20_000  # small data: every row


def test_default_seeding_finds_every_cluster_where_random_init_fails():
    """The issue's failure: random init leaves well-separated clusters merged; the defaults do not."""
    x, y = _mixture(n_per=500, k=24, d=16, seed=3)
    oracle = sum(((x[y == j] - x[y == j].mean(0)) ** 2).sum() for j in range(24))  # true partition's inertia
    for seed in range(4):
        km = KMeans(24, seed=seed).fit(x)
        assert adjusted_rand_score(y, km.labels_) > 0.999 and km.inertia_ <= oracle * 1.01
    random = [KMeans(24, seed=s, init="random", n_init=1, max_points_per_centroid=None).fit(x) for s in range(4)]
    assert max(adjusted_rand_score(y, r.labels_) for r in random) < 0.99  # what the old default gave
    assert min(r.inertia_ for r in random) > oracle * 1.2


def test_kmeans_plusplus_is_greedy_d2_sampling():
    x, y = _mixture(n_per=200, k=10, d=8, seed=4)
    rng = np.random.default_rng(0)
    centers = kmeans_plusplus(x, 10, rng)
    assert centers.shape == (10, 8) and centers.dtype == np.float32
    assert {tuple(c) for c in centers} <= {tuple(r) for r in x}  # centres are data points
    hit = {int(y[np.flatnonzero((x == c).all(1))[0]]) for c in centers}
    assert len(hit) == 10  # one centre per well-separated cluster
    np.testing.assert_array_equal(centers, kmeans_plusplus(x, 10, np.random.default_rng(0)))
    far = x + np.float32(3e4)  # distances are computed centred: float32 cancellation does not blind the draws
    hit = {int(y[np.flatnonzero((far == c).all(1))[0]]) for c in kmeans_plusplus(far, 10, np.random.default_rng(1))}
    assert len(hit) == 10
    dup = np.repeat(x[:3], 5, axis=0)  # 3 distinct points, 5 centres: still 5 rows, no error
    assert kmeans_plusplus(dup, 5, rng).shape == (5, 8)


def test_inertia_is_exact_after_last_iteration(hippo_features):
    x = hippo_features
    km = KMeans(8, seed=0).fit(x)
    d2 = ((x[:, None, :].astype(np.float64) - km.cluster_centers_[None]) ** 2).sum(-1)
    assert km.inertia_ == pytest.approx(d2.min(1).sum(), rel=1e-5)
    assert -km.score(x) == pytest.approx(km.inertia_, rel=1e-6)
    np.testing.assert_array_equal(km.labels_, km.predict(x))
    np.testing.assert_allclose(km.transform(x[:200]), np.sqrt(d2[:200]), rtol=1e-3, atol=1e-3)


def test_inertia_within_one_percent_of_sklearn_on_real_mri(hippo_features):
    x, k = hippo_features, 8
    init = x[np.sort(np.random.default_rng(0).choice(len(x), k, replace=False))]
    with threadpool_limits(1):
        sk = SkKMeans(k, init=init, n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(x)
        sk_default = [SkKMeans(k, n_init=1, max_iter=20, random_state=s).fit(x).inertia_ for s in range(3)]
    same_init = KMeans(k, init=init, max_points_per_centroid=None).fit(x)
    assert same_init.inertia_ == pytest.approx(sk.inertia_, rel=0.01)
    for seed in range(3):  # the defaults (a sample of 8 x 1024 of the 20,000 rows), every seed
        assert KMeans(k, seed=seed).fit(x).inertia_ <= min(sk_default) * 1.01


def test_seeded_and_deterministic(hippo_features):
    x = hippo_features[:8000]
    a, b = KMeans(6, seed=3).fit(x), KMeans(6, seed=3).fit(torch.from_numpy(x))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_
    c = KMeans(6, seed=4, n_iter=1).fit(x)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_restarts_keep_the_lowest_training_inertia():
    x = np.random.default_rng(5).random((3000, 2), dtype=np.float32)  # uniform: many local minima
    one = [KMeans(15, seed=s, n_init=1, max_points_per_centroid=None).fit(x).inertia_ for s in range(6)]
    best = [KMeans(15, seed=s, n_init=6, max_points_per_centroid=None).fit(x).inertia_ for s in range(6)]
    assert all(b <= o for b, o in zip(best, one))  # the first restart is the n_init=1 run: never worse
    assert any(b < o * 0.999 for b, o in zip(best, one))  # and the restarts do find better minima


def test_spherical_unit_norm_centroids_and_scale_invariance():
    x, y = _mixture(k=4, d=8, seed=2)
    km = KMeans(4, spherical=True, init="k-means++").fit(x)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, atol=1e-5)
    scale = np.random.default_rng(0).uniform(0.1, 100, (len(x), 1)).astype(np.float32)
    np.testing.assert_array_equal(km.predict(x * scale), km.labels_)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert km.inertia_ == pytest.approx(((xn - km.cluster_centers_[km.labels_]) ** 2).sum(), rel=1e-4)
    assert adjusted_rand_score(y, km.labels_) > 0.9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_accepts_torch_tensors_of_any_real_dtype(dtype):
    x, _ = _mixture(k=3, d=4)
    km = KMeans(3, init="k-means++").fit(x)
    t = torch.from_numpy(x).round().to(dtype)
    np.testing.assert_array_equal(km.predict(t), km.predict(t.float().numpy()))
    assert KMeans(3).fit(t.double().numpy()).cluster_centers_.dtype == np.float32


def test_save_load_round_trip(tmp_path, hippo_features):
    x = hippo_features[:6000]
    km = KMeans(7, seed=5, spherical=True).fit(x)
    path = km.save(tmp_path / "centroids.npz", feature_source="local stats 7-d")
    km.save(path, feature_source="local stats 7-d")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["centroids.npz"]  # no temp file left
    loaded = KMeans.load(path)
    np.testing.assert_array_equal(loaded.predict(hippo_features), km.predict(hippo_features))
    np.testing.assert_array_equal(loaded.cluster_centers_, km.cluster_centers_)
    meta = KMeans.read_metadata(path)
    assert {k: meta[k] for k in ("dim", "k", "spherical", "feature_source", "n_iter", "seed")} == {
        "dim": 7, "k": 7, "spherical": True, "feature_source": "local stats 7-d", "n_iter": 20, "seed": 5
    }  # fmt: skip
    assert meta["inertia"] == km.inertia_ and meta["medvol_version"] and meta["n_iter_run"] == km.n_iter_
    assert loaded.spherical and loaded.inertia_ == km.inertia_ and loaded.feature_source == "local stats 7-d"
    with np.load(path, allow_pickle=False) as f:  # plain arrays, loadable without pickle
        assert json.loads(str(f["metadata"]))["k"] == 7


def test_load_rejects_other_files(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    other = tmp_path / "other.npz"
    np.savez(other, centroids=np.zeros((2, 3), np.float32))
    wrong_format = tmp_path / "wrong.npz"
    np.savez(wrong_format, centroids=np.zeros((2, 3), np.float32), metadata=np.array(json.dumps({"format": "x"})))
    pt = tmp_path / "model.pt"
    torch.save({"centroids": torch.zeros(2, 3)}, pt)
    for path in (text, other, wrong_format, pt):
        with pytest.raises(ValueError, match=re.escape(str(path))) as err:
            KMeans.load(path)
        assert isinstance(err.value, DataError) and "not a medvol k-means file" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        KMeans.load(tmp_path / "missing.npz")


def test_clear_errors():
    x, _ = _mixture(k=3, d=4)
    with pytest.raises(ValueError, match="needs at least 10 samples, got 5"):
        KMeans(10).fit(x[:5])
    bad = x.copy()
    bad[[3, 7], 1], bad[9, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=f"3 of {len(x)} rows with NaN or inf"):
        KMeans(3).fit(bad)
    with pytest.raises(ValueError, match=r"must be 2D .* got shape \(2, 3, 4\)"):
        KMeans(2).fit(np.zeros((2, 3, 4), np.float32))
    km = KMeans(3).fit(x)
    with pytest.raises(ValueError, match="x has 5 features but the centroids have 4"):
        km.predict(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="1 of 2 rows with NaN"):
        km.predict(np.array([[0, 0, 0, 0], [np.nan, 0, 0, 0]], np.float32))
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(3).predict(x)
    with pytest.raises(TypeError, match="real numbers"):
        KMeans(3).fit(x.astype(np.complex64))
    with pytest.raises(ValueError, match="init has shape"):
        KMeans(3, init=np.zeros((2, 4))).fit(x)
    for kwargs, name in [({"n_clusters": 0}, "n_clusters"), ({"n_clusters": 2, "device": "tpu"}, "device"),
                         ({"n_clusters": 2, "init": "kmeans"}, "init"), ({"n_clusters": 2, "n_iter": 0}, "n_iter"),
                         ({"n_clusters": 2, "n_threads": 0}, "n_threads")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            KMeans(**kwargs)


def test_n_threads_is_restored():
    x, _ = _mixture(k=3, d=4)
    before = faiss.omp_get_max_threads()
    KMeans(3, n_threads=2).fit(x).predict(x)
    assert faiss.omp_get_max_threads() == before


# ---------------------------------------------------------------------------------------------- FeatureSampler
def _volumes(sizes, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, d)).astype(np.float32) for n in sizes]


def test_sampler_bounded_and_traceable():
    vols = _volumes([50] * 10)
    s = FeatureSampler(100, seed=0)
    for v in vols:
        s.add(torch.from_numpy(v))
    feats, origin = s.sample(return_origin=True)
    assert feats.shape == (100, 3) and s._feats.shape == (100, 3) and len(s) == 100
    assert s.n_seen == 500 and s.n_volumes == 10
    np.testing.assert_array_equal(feats, np.stack([vols[v][r] for v, r in origin]))
    assert len({(v, r) for v, r in origin}) == 100  # without replacement


def test_sampler_is_uniform_over_the_dataset():
    sizes = np.arange(1, 11) * 100  # 5,500 rows; volume i is i times larger than volume 1
    s = FeatureSampler(1100, seed=0)
    for v in _volumes(sizes):
        s.add(v)
    counts = np.bincount(s.sample(return_origin=True)[1][:, 0], minlength=10)
    expected = sizes * 1100 / sizes.sum()
    assert chi2.sf(((counts - expected) ** 2 / expected).sum(), df=9) > 1e-3
    # every row has the same inclusion probability m/N, wherever it comes in the stream
    hits = np.zeros(60)
    for seed in range(400):
        s = FeatureSampler(15, seed=seed)
        for v in _volumes([10, 30, 20]):
            s.add(v)
        origin = s.sample(return_origin=True)[1]
        hits[np.array([0, 10, 40])[origin[:, 0]] + origin[:, 1]] += 1
    p = 15 / 60
    assert np.abs(hits / 400 - p).max() < 4.5 * np.sqrt(p * (1 - p) / 400)
    assert chi2.sf(((hits - 400 * p) ** 2 / (400 * p * (1 - p))).sum(), df=59) > 1e-3


def test_sampler_quota_and_determinism():
    vols = _volumes([10, 100, 1000])
    runs = []
    for seed in (1, 1, 2):
        s = FeatureSampler(1000, per_volume_quota=30, seed=seed)
        kept = [s.add(v) for v in vols]
        runs.append(s.sample(return_origin=True))
    assert kept == [10, 30, 30] and s.n_seen == 1110 and len(s) == 70
    assert np.bincount(runs[0][1][:, 0]).tolist() == [10, 30, 30]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_sampler_errors():
    s = FeatureSampler(10)
    with pytest.raises(RuntimeError, match="empty"):
        s.sample()
    s.add(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="features have 5 columns but earlier volumes had 3"):
        s.add(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="max_samples"):
        FeatureSampler(0)
    with pytest.raises(ValueError, match="per_volume_quota"):
        FeatureSampler(5, per_volume_quota=0)
