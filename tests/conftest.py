"""Shared fixtures: the demo data shipped in the repository and the larger datasets under $MEDVOL_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "demo_data"
BUNDLES_DIR = REPO_ROOT / "bundles"


HIPPO_IMAGE = "hippocampus/imagesTr/hippocampus_004.nii.gz"

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
