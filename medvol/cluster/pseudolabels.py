"""Build and cache per-volume pseudo-label maps for pixel-level clustering (the bundle's ``cluster`` run id).

:func:`build_pseudolabels` runs three stages over a datalist, writing into ``pseudolabel_dir``
(default ``output_dir/pseudolabels/``):

1. **Sample** teacher features (:mod:`medvol.cluster.teacher`) of up to ``per_volume_quota`` foreground voxels
   (intensity > ``foreground_threshold``) of *every* volume, streamed volume by volume into
   :meth:`KMeans.fit`, which keeps a uniform sample of at most ``max_samples`` of them (memory stays bounded
   whatever the dataset size).
2. **Fit** :class:`KMeans` once on that stream (seeded; trained on ``k * 1024`` of the kept rows, inertia from
   the others) and save it to ``kmeans.npz`` with its ``feature_source``; a resumed run loads it instead (never
   a per-batch refit, unlike radioSSL's code).
3. **Assign** every voxel of every volume to its nearest centroid and write ``<case>.nii.gz`` (uint8, the grid
   and affine of the preprocessed image, atomic) through :func:`medvol.engines.batch.run_batch`: ``manifest.csv``
   has one row per volume (ok / failed with the file named / skipped on resume).

Then a montage of a few volumes goes to ``output_dir/cluster_montage.png`` (and TensorBoard). Training reads the
maps back with :func:`pseudolabel_datalist` and :func:`load_pseudolabels`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medvol.cluster.kmeans import KMeans
from medvol.cluster.montage import cluster_montage, log_montage, montage_rgb
from medvol.errors import ConfigError, DataError, find_error

__all__ = ["PSEUDOLABEL_KEY", "build_pseudolabels", "assign_clusters", "PseudoLabelWriter", "pseudolabel_datalist",
           "load_pseudolabels", "cluster_command"]

logger = logging.getLogger("medvol.cluster")

PSEUDOLABEL_KEY = "pseudolabel"
_CENTROIDS, _SETTINGS, _MANIFEST = "kmeans.npz", "settings.json", "manifest.csv"


def cluster_command(dataset_dir=None, output_dir=None,
                    config_file: str = "bundles/pixel_clustering/configs/train.json") -> str:
    """The command line of the ``cluster`` step, for error messages."""
    cmd = f"python -m monai.bundle run cluster --config_file {config_file}"
    if dataset_dir is not None:
        cmd += f" --dataset_dir {dataset_dir}"
    if output_dir is not None:
        cmd += f" --output_dir {output_dir}"
    return cmd


def _preprocess(preprocessing, item: dict):
    image = preprocessing({"image": item["image"]})["image"]
    if image.ndim != 4:
        raise DataError(item["image"], f"preprocessing must give a (C, X, Y, Z) volume, got {tuple(image.shape)}")
    return image


def assign_clusters(features, kmeans: KMeans, chunk_voxels: int = 1 << 18) -> np.ndarray:
    """Nearest-centroid label of every voxel: uint8/int array shaped like the volume."""
    labels = np.concatenate([kmeans.predict(f.cpu()) for f in features.chunks(chunk_voxels)])
    dtype = np.uint8 if kmeans.n_clusters <= 256 else np.int32
    return labels.astype(dtype).reshape(features.spatial_shape)


class PseudoLabelWriter:
    """``run_batch`` processor: preprocess one volume, compute teacher features, assign, save the label map.

    Args:
        preprocessing: callable on ``{"image": path}`` returning the preprocessed MetaTensor under ``"image"``.
        teacher: a teacher of :mod:`medvol.cluster.teacher`.
        kmeans: the fitted k-means.
        chunk_voxels: voxels assigned per k-means call.
    """

    def __init__(self, preprocessing, teacher, kmeans: KMeans, chunk_voxels: int = 1 << 18):
        self.preprocessing, self.teacher, self.kmeans, self.chunk_voxels = preprocessing, teacher, kmeans, chunk_voxels

    def __call__(self, job) -> dict:
        from medvol.io.atomic import save_nifti

        image = _preprocess(self.preprocessing, job.item)
        labels = assign_clusters(self.teacher(image), self.kmeans, self.chunk_voxels)
        affine = image.affine if hasattr(image, "affine") else np.eye(4)
        save_nifti(labels, affine, job.outputs["output"])
        spacing = tuple(float(s) for s in image.pixdim[:3]) if hasattr(image, "pixdim") else None
        return {"shape": labels.shape, "spacing": spacing, "clusters": int(np.unique(labels).size)}

    def describe(self, job) -> dict:
        import nibabel as nib

        img = nib.load(str(job.outputs["output"]))
        return {"shape": img.shape, "spacing": tuple(float(z) for z in img.header.get_zooms()[:3]),
                "clusters": int(np.unique(np.asarray(img.dataobj)).size)}


def _foreground_features(datalist, preprocessing, teacher, quota: int, threshold: float, seed: int, seen: dict):
    """Yield the teacher features (n_i, d) of up to ``quota`` foreground voxels per volume, one volume at a time.

    ``seen`` counts the volumes and voxels yielded (for the log and the "too few voxels" message).
    """
    for i, item in enumerate(datalist):
        try:
            image = _preprocess(preprocessing, item)
        except Exception as e:  # the assignment stage reports the file in the manifest; keep sampling the rest
            err = find_error(e, DataError) or e
            logger.warning("k-means sample: skipping %s (%s)", item["image"], " ".join(str(err).split()))
            continue
        voxels = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        fg = torch.nonzero(voxels[0].flatten() > threshold)[:, 0]
        if fg.numel() == 0:
            logger.warning("k-means sample: %s has no voxel above %s", item["image"], threshold)
            continue
        if fg.numel() > quota:  # uniform subset of this volume's foreground, seeded per volume
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            fg = fg[torch.randperm(fg.numel(), generator=g)[:quota]].sort().values
        seen["volumes"] += 1
        seen["voxels"] += int(fg.numel())
        yield teacher(image).at(fg).cpu()


def _fit_or_load(path: Path, datalist, preprocessing, teacher, num_clusters: int, max_samples: int, quota: int,
                 threshold: float, seed: int, kmeans_device: str, kmeans_iters: int, overwrite: bool
                 ) -> tuple[KMeans, bool]:
    if path.is_file() and not overwrite:
        km = KMeans.load(path, device=kmeans_device)
        if km.n_clusters != num_clusters or km.feature_source != teacher.feature_source:
            raise ConfigError(
                f"{path} was fitted with k={km.n_clusters} on '{km.feature_source}', not k={num_clusters} on "
                f"'{teacher.feature_source}': pass --overwrite true (recomputes every pseudo-label) or another "
                "--output_dir")
        logger.info("k-means: reusing %s (k=%d)", path, km.n_clusters)
        return km, False
    t0 = time.perf_counter()
    seen = {"volumes": 0, "voxels": 0}
    km = KMeans(num_clusters, device=kmeans_device, spherical=teacher.spherical, n_iter=kmeans_iters, seed=seed)
    batches = _foreground_features(datalist, preprocessing, teacher, quota, threshold, seed, seen)
    try:  # streamed: at most max_samples feature rows are held, whatever the number of volumes
        km.fit(batches, stream_sample=max(max_samples, 2 * num_clusters))
    except ValueError as e:
        if seen["voxels"] >= num_clusters:
            raise
        raise ConfigError(f"only {seen['voxels']} foreground voxels (> {threshold}) were sampled for "
                          f"k={num_clusters} clusters: check the dataset, the preset and foreground_threshold") from e
    km.save(path, feature_source=teacher.feature_source)
    logger.info("k-means: fitted k=%d once on %d of %d sampled voxels of %d volumes in %.1f s -> %s", num_clusters,
                km.n_train_, km.n_samples_seen_, seen["volumes"], time.perf_counter() - t0, path)
    return km, True


def build_pseudolabels(datalist: Sequence[dict], preprocessing, teacher, output_dir: str | os.PathLike,
                       num_clusters: int = 10, max_samples: int = 200_000, per_volume_quota: int = 5_000,
                       foreground_threshold: float = 0.05, seed: int = 0, kmeans_device: str = "auto",
                       kmeans_iters: int = 20, overwrite: bool = False, montage_volumes: int = 4,
                       chunk_voxels: int = 1 << 18, tensorboard_dir: str | os.PathLike | None = None,
                       pseudolabel_dir: str | os.PathLike | None = None) -> dict:
    """Fit k-means once on teacher features of all volumes and write one pseudo-label map per volume.

    Args:
        datalist: ``[{"image": path}, ...]`` (every volume that training or validation will read).
        preprocessing: the bundle's deterministic preprocessing (the same as training uses).
        teacher: :class:`~medvol.cluster.teacher.EncoderTeacher` or :class:`~medvol.cluster.teacher.HandcraftedTeacher`.
        output_dir: run folder; the montage goes to ``output_dir/cluster_montage.png``.
        num_clusters: k (radioSSL: 10).
        max_samples: feature rows kept in memory while the volumes stream into k-means (a uniform sample over
            all volumes; the training sample is drawn from it).
        per_volume_quota: foreground voxels sampled per volume.
        foreground_threshold: intensity (after the preset's [0, 1] scaling) above which a voxel is sampled.
        seed: seed of the sample and of k-means.
        kmeans_device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (faiss).
        kmeans_iters: Lloyd iterations.
        overwrite: refit k-means and rewrite every map; otherwise a resumed run reuses ``kmeans.npz`` and skips
            finished volumes.
        montage_volumes: volumes shown in the montage (0: none).
        chunk_voxels: voxels per assignment chunk (bounds memory for large volumes).
        tensorboard_dir: also log the montage there (``None``: no TensorBoard).
        pseudolabel_dir: folder of the maps, the manifest and the centroids (default ``output_dir/pseudolabels``).

    Returns:
        ``{"manifest", "centroids", "montage", "counts", "fitted"}`` (``fitted``: k-means was fitted in this run).

    Raises:
        ConfigError: empty datalist, too few foreground voxels, or saved centroids of another k / teacher.
    """
    from medvol.engines.batch import Job, run_batch
    from medvol.io.atomic import atomic_write_text
    from medvol.io.datalist import case_name

    if not datalist:
        raise ConfigError("the datalist is empty: nothing to cluster")
    out = Path(pseudolabel_dir) if pseudolabel_dir is not None else Path(output_dir) / "pseudolabels"
    out.mkdir(parents=True, exist_ok=True)
    km, fitted = _fit_or_load(out / _CENTROIDS, datalist, preprocessing, teacher, num_clusters, max_samples,
                              per_volume_quota, foreground_threshold, seed, kmeans_device, kmeans_iters, overwrite)
    jobs, seen = [], {}
    for item in datalist:
        case = case_name(item["image"])
        job = Job(str(item["image"]), {"image": item["image"]}, {"output": out / f"{case}.nii.gz"})
        if case in seen:
            job.outputs, job.error = {}, f"{item['image']}: case name '{case}' is also used by {seen[case]}"
        seen.setdefault(case, item["image"])
        jobs.append(job)
    writer = PseudoLabelWriter(preprocessing, teacher, km, chunk_voxels)
    threads = torch.get_num_threads()
    result = run_batch(jobs, writer, out / _MANIFEST, overwrite=overwrite or fitted, desc="pseudo-labels",
                       threads=threads)
    settings = {"num_clusters": num_clusters, "feature_source": teacher.feature_source, "seed": seed,
                "foreground_threshold": foreground_threshold, "volumes": len(jobs), "counts": result.counts}
    atomic_write_text(out / _SETTINGS, json.dumps(settings, indent=2))
    montage = None
    if montage_volumes > 0:
        montage = _montage(jobs, result.manifest, preprocessing, num_clusters, montage_volumes, Path(output_dir),
                           tensorboard_dir)
    if result.counts.get("failed"):
        logger.warning("pseudo-labels: %d volumes failed, see %s", result.counts["failed"], result.manifest)
    return {"manifest": result.manifest, "centroids": out / _CENTROIDS, "montage": montage, "counts": result.counts,
            "fitted": fitted}


def _montage(jobs, manifest: Path, preprocessing, k: int, n: int, output_dir: Path, tensorboard_dir) -> Path | None:
    import nibabel as nib

    from medvol.io.datalist import case_name
    from medvol.io.manifest import read_manifest

    rows = read_manifest(manifest)
    cases = []
    for job in jobs:
        if len(cases) == n:
            break
        if rows.get(job.source, {}).get("status") not in ("ok", "skipped"):
            continue
        image = np.asarray(_preprocess(preprocessing, job.item)[0])
        labels = np.asarray(nib.load(str(job.outputs["output"])).dataobj)
        cases.append((case_name(job.source), image, labels))
    if not cases:
        return None
    path = cluster_montage(cases, output_dir / "cluster_montage.png", k, title=f"pseudo-labels, k={k}")
    if tensorboard_dir is not None:
        log_montage(montage_rgb(cases, k)[0], tensorboard_dir)
    return path


def pseudolabel_datalist(datalist: Sequence[dict], pseudolabel_dir: str | os.PathLike, num_clusters: int | None = None,
                         dataset_dir=None, output_dir=None) -> list[dict]:
    """``datalist`` with each item's cached pseudo-label path under :data:`PSEUDOLABEL_KEY`.

    Raises:
        ConfigError: (one line, naming the ``cluster`` command to run) when the cache is missing, was built with
            another ``num_clusters``, or lacks (or failed) a volume of ``datalist``.
    """
    from medvol.io.manifest import read_manifest

    folder = Path(pseudolabel_dir)
    hint = cluster_command(dataset_dir, output_dir)
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"no pseudo-labels in {folder}: run `{hint}` first")
    settings_file = folder / _SETTINGS
    if num_clusters is not None and settings_file.is_file():
        k = json.loads(settings_file.read_text(encoding="utf-8")).get("num_clusters")
        if k != num_clusters:
            raise ConfigError(f"pseudo-labels in {folder} have k={k} clusters but num_clusters={num_clusters}: "
                              f"run `{hint} --num_clusters {num_clusters} --overwrite true` first")
    rows = read_manifest(manifest)
    out, missing = [], []
    for item in datalist:
        row = rows.get(str(item["image"]), {})
        path = folder / Path(row["output"]).name if row.get("output") else None  # the folder may have moved
        if row.get("status") not in ("ok", "skipped") or path is None or not path.is_file():
            missing.append((item["image"], row.get("error") or "not clustered"))
            continue
        out.append({**item, PSEUDOLABEL_KEY: str(path)})
    if missing:
        first, why = missing[0]
        raise ConfigError(f"{len(missing)} volumes have no pseudo-label in {folder}, e.g. {first} ({why}): "
                          f"run `{hint}` first")
    return out


def load_pseudolabels(key: str = PSEUDOLABEL_KEY, reference_key: str = "image"):
    """Transforms that load the cached map of ``key`` (uint8) and check it lies on the preprocessed image's grid.

    Put them after the image preprocessing; a map from another preprocessing (``pad_size``, ``spacing``) raises a
    :class:`~medvol.errors.DataError` naming the file.
    """
    from monai.transforms import Compose

    from medvol.io.readers import LoadVolumed
    from medvol.transforms.validation import CheckAlignedd

    return Compose([LoadVolumed(key, dtype=None), CheckAlignedd(key, reference_key=reference_key)])
