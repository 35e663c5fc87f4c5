"""Shared fixtures: the demo data shipped in the repository and the larger datasets under $MEDVOL_DATA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "demo_data"
BUNDLES_DIR = REPO_ROOT / "bundles"


def bundle_workflow(bundle: str, config: str | list[str] = "train.json", run_id: str = "run", **overrides):
    """An initialised ``ConfigWorkflow`` of ``bundles/<bundle>/configs/<config>``, as ``monai.bundle run`` builds it.

    ``config`` may be a list of files merged in order, e.g. ``["train.json", "inference.json"]`` for an overlay.
    """
    from monai.bundle import ConfigWorkflow

    root = BUNDLES_DIR / bundle
    files = [str(root / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    wf = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                        logging_file=str(root / "configs" / "logging.conf"), workflow_type=None,
                        bundle_root=str(root), run_id=run_id, **overrides)
    wf.initialize()
    return wf


def run_bundle(bundle: str, config: str | list[str] = "train.json", run_id: str = "run", **overrides):
    """Run ``run_id`` of a bundle config to the end (run + finalize) and return the workflow."""
    wf = bundle_workflow(bundle, config, run_id, **overrides)
    wf.run()
    wf.finalize()
    return wf


def overlay(bundle: str, *configs: str) -> str:
    """``--config_file`` value merging ``bundles/<bundle>/configs/train.json`` with the overlays ``configs``."""
    files = ",".join(f"'bundles/{bundle}/configs/{c}'" for c in ("train.json", *configs))
    return f"[{files}]"


def bundle_parser(bundle: str, *configs: str, **overrides):
    """A ``ConfigParser`` of ``train.json`` merged with the overlays ``configs`` (``bundle_root`` set)."""
    from monai.bundle import ConfigParser

    root = BUNDLES_DIR / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(root / c) for c in ("train.json", *configs)])
    parser.update({"bundle_root": str(BUNDLES_DIR / bundle), **overrides})
    return parser


def bundle_cli(args: list[str], timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS`` from the repository root, as a user runs it (output captured)."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True,
                          encoding="utf-8", errors="replace",
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def bundle_ddp(bundle: str, overrides: dict, nproc: int = 2, timeout: int = 600,
               overlays: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m monai.bundle run`` of train.json (+ ``overlays``) + multi_gpu_train.json
    (gloo on CPU), with ``--key value`` overrides (JSON for non-strings), 1 OpenMP thread per process."""
    configs = f"bundles/{bundle}/configs"
    args = ["--config_file", overlay(bundle, *overlays, "multi_gpu_train.json"),
            "--bundle_root", f"bundles/{bundle}", "--logging_file", f"{configs}/logging.conf"]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "monai.bundle", "run", *args]
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


HIPPO_IMAGE = "hippocampus/imagesTr/hippocampus_004.nii.gz"


def copy_labeled_hippo(demo_dir: Path, root: Path, n: int) -> Path:
    """The first ``n`` demo hippocampus image/label pairs in an MSD layout (``root/imagesTr``, ``root/labelsTr``)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((demo_dir / "hippocampus" / sub).iterdir())[:n]:
            shutil.copy(f, root / sub / f.name)
    return root


def copy_hippo(demo_dir: Path, dst: Path, n: int) -> list[Path]:
    """Copy the first ``n`` demo hippocampus MRI volumes into ``dst``; returns the copies."""
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in sorted((demo_dir / "hippocampus" / "imagesTr").iterdir())[:n]]


def make_mixed_input(demo_dir: Path, root: Path, n_mri: int):
    """A batch-CLI input folder: ``n_mri`` NIfTI MRIs, an NRRD and a DICOM series next to every bad input.

    Returns ``(root, good paths, make_bad_inputs(...))``.
    """
    good = copy_hippo(demo_dir, root / "mri", n_mri)
    good.append(Path(shutil.copy(demo_dir / "nrrd" / "breast1_image.nrrd", root / "breast1.nrrd")))
    good.append(Path(shutil.copytree(demo_dir / "dicom" / "hippocampus_study1", root / "dicom" / "study1")))
    return root, good, make_bad_inputs(demo_dir, root / "bad")

# name -> regular expression the DataError message must match
BAD_INPUTS = {
    "zero_byte": "empty file",
    "truncated": "truncated or corrupt|not a valid NIfTI",
    "corrupt": "truncated or corrupt|not a valid NIfTI",
    "text": "not a valid NIfTI",
    "bad_header": "not a valid NIfTI",
    "4d": "is a 4D volume",
    "nan": "non-finite voxels",
    "unreadable_dicom": "no readable DICOM series",
}


def make_bad_inputs(demo_dir: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Write one broken input per BAD_INPUTS case into ``folder``, derived from a real hippocampus MRI."""
    import gzip

    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    good = (demo_dir / HIPPO_IMAGE).read_bytes()
    img = nib.load(demo_dir / HIPPO_IMAGE)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    paths = {name: folder / f"{name}.nii.gz" for name in BAD_INPUTS}
    paths["zero_byte"].write_bytes(b"")
    paths["truncated"].write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 64] = bytes(64)  # gzip CRC no longer matches
    paths["corrupt"].write_bytes(bytes(corrupt))
    paths["text"].write_text("patient notes, not an image\n")
    paths["bad_header"] = folder / "bad_header.nii"
    paths["bad_header"].write_bytes(b"\x00" * 400 + gzip.decompress(good)[400:1000])
    nib.save(nib.Nifti1Image(np.stack([vol, vol], -1), img.affine), paths["4d"])
    vol[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(vol, img.affine), paths["nan"])
    junk = folder / "unreadable_dicom"
    junk.mkdir()
    for i in range(3):
        (junk / f"IM{i}.dcm").write_text("not dicom")
    paths["unreadable_dicom"] = junk
    return {name: (paths[name], pattern) for name, pattern in BAD_INPUTS.items()}


@pytest.fixture
def count_fits(monkeypatch) -> list[int]:
    """Records the rows seen by every ``medvol.cluster.KMeans.fit`` call (the fit still runs; a matrix or a stream)."""
    from medvol.cluster import KMeans

    calls: list[int] = []
    original = KMeans.fit

    def counting(self, x, *args, **kwargs):
        out = original(self, x, *args, **kwargs)
        calls.append(self.n_samples_seen_)
        return out

    monkeypatch.setattr(KMeans, "fit", counting)
    return calls


def _shared_data() -> Path | None:
    value = os.environ.get("MEDVOL_DATA")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The vendored demo subset (always present)."""
    return DEMO_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the larger public datasets; the test is skipped, with the reason, when MEDVOL_DATA is unset."""
    root = _shared_data()
    if root is None:
        pytest.skip("MEDVOL_DATA is not set: point it at the shared datasets (.ci/run sets ../shared/data)")
    if not root.is_dir():
        pytest.skip(f"MEDVOL_DATA={root} is not a folder")
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep tests single-threaded in torch so two pytest-xdist workers do not oversubscribe 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def faiss_one_thread():
    """One faiss thread: fast on a shared 2-core machine and deterministic (k-means tests use it)."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo the logging set-up of in-process bundle runs (``logging.conf`` points the root logger at the
    sys.stdout of that test, which pytest closes afterwards: later log records would hit a closed stream)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
