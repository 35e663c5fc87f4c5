"""Shared fixtures: the demo data shipped in the repository and the larger datasets under $MEDVOL_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "demo_data"
BUNDLES_DIR = REPO_ROOT / "bundles"


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
