"""Packaging beyond pyproject.toml (which holds the metadata): the bundles and demo scans ship inside the package.

``bundles/`` and ``demo_data/`` stay at the repository root, the source of truth (``--bundle_root bundles/NAME``
and the tests use them there). The wheel and the sdist also carry them as the data-only packages
``medvol._bundles`` and ``medvol._demo_data``; :mod:`medvol.bundles` finds either layout, so an editable install
reads the root folders directly. What a run leaves in a bundle folder (``runs/``, ``models/``, ...) is not shipped.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SHIPPED = {"medvol._bundles": "bundles", "medvol._demo_data": "demo_data"}
# as medvol.bundles.SKIPPED (tests/test_packaging.py checks that they agree)
SKIPPED_DIRS = {"runs", "models", "eval", "__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".tmp"}


def shipped_files(folder: str) -> list[str]:
    """Every file under ``folder`` (relative, POSIX), minus run outputs and hidden files."""
    base = ROOT / folder
    files = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if not path.is_file() or path.suffix in SKIPPED_SUFFIXES:
            continue
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts):
            continue
        files.append(rel.as_posix())
    return files


setup(
    packages=find_packages(include=["medvol", "medvol.*"]) + list(SHIPPED),
    package_dir={"": ".", **SHIPPED},
    package_data={"medvol": ["py.typed", "data/*"], **{pkg: shipped_files(src) for pkg, src in SHIPPED.items()}},
)
