"""The MONAI bundles and the demo scans shipped with medvol: find them by name, export a bundle as a folder.

The repository's ``bundles/`` and ``demo_data/`` folders are the source of truth. A wheel carries copies of both
inside the package (``medvol/_bundles`` and ``medvol/_demo_data``, mapped by ``setup.py``); in a source checkout
(also an editable install) they are found beside the ``medvol`` package. Either way::

    >>> from medvol.bundles import list_bundles, bundle_path
    >>> "fewshot_segmentation" in list_bundles()
    True
    >>> (bundle_path("fewshot_segmentation") / "configs" / "train.json").is_file()
    True

:func:`export_bundle` copies one bundle into a self-contained folder with the model-zoo layout (``configs/``,
``docs/``, ``LICENSE`` and whatever static zoo files the bundle has, plus ``models/model.pt`` when a checkpoint
is given), which ``python -m monai.bundle run --bundle_root FOLDER`` runs wherever medvol is installed.

Only the standard library is imported here (``medvol bundle list`` answers at once); a checkpoint passed to
:func:`export_bundle` is read with :func:`medvol.io.read_checkpoint` (torch) to refuse a file that is not one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from medvol.errors import ConfigError

__all__ = ["bundles_root", "demo_data_dir", "list_bundles", "bundle_path", "export_bundle",
           "REQUIRED_FILES", "SKIPPED"]

PACKAGE_DIR = Path(__file__).resolve().parent
# (inside an installed package, in a source checkout)
_LOCATIONS = {"bundles": ("_bundles", "bundles"), "demo_data": ("_demo_data", "demo_data")}
# every bundle has these (the MONAI bundle specification's required files, plus its README and licence)
REQUIRED_FILES = ("configs/metadata.json", "configs/train.json", "configs/logging.conf", "docs/README.md", "LICENSE")
# what a run leaves in a bundle folder of a checkout (`--bundle_root bundles/X` without `--output_dir` writes
# runs/; MONAI Label's training writes models/model.pt): never exported, never packaged (setup.py skips them too)
SKIPPED = ("runs", "models", "eval", "__pycache__", "*.pyc", "*.tmp", ".*")


def _shipped(kind: str) -> Path:
    installed, checkout = _LOCATIONS[kind]
    candidates = (PACKAGE_DIR / installed, PACKAGE_DIR.parent / checkout)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ConfigError(f"medvol's {kind} folder is missing (looked in {candidates[0]} and {candidates[1]}): "
                      "reinstall medvol (pip install medvol-ssl) or run from a complete source checkout")


def bundles_root() -> Path:
    """The folder that holds the shipped bundles (``medvol/_bundles`` when installed, else ``<repo>/bundles``)."""
    return _shipped("bundles")


def demo_data_dir() -> Path:
    """The demo scans (``medvol/_demo_data`` when installed, else ``<repo>/demo_data``); licences included."""
    return _shipped("demo_data")


def list_bundles() -> list[str]:
    """Names of the shipped bundles (folders with a ``configs/metadata.json``), sorted."""
    root = bundles_root()
    return sorted(p.name for p in root.iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_path(name: str) -> Path:
    """The folder of the shipped bundle ``name``.

    Raises:
        ConfigError: ``name`` is not a shipped bundle (the message lists the known ones).
    """
    names = list_bundles()
    if name not in names:
        raise ConfigError(f"unknown bundle {name!r}; the bundles shipped with medvol are: {', '.join(names)}")
    return bundles_root() / name


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _standalone_inference(configs: Path) -> None:
    """Rewrite an overlay ``inference.json`` as a standalone config: ``train.json`` with the overlay's top-level
    entries replacing or adding to it, which is what ``--config_file "['train.json','inference.json']"`` gives.

    model-zoo's checks and tools (and MONAI Label) read ``configs/inference.json`` alone. In the repository it stays
    an overlay (one definition per entry); an exported bundle carries the merged file. A standalone inference config
    (it has its own ``imports``) is left as it is; an overlay with ``a#b`` keys (nested updates) is not merged here.
    """
    inference, train = configs / "inference.json", configs / "train.json"
    if not inference.is_file():
        return
    overlay = json.loads(inference.read_text(encoding="utf-8"))
    if "imports" in overlay or any("#" in key for key in overlay):
        return
    merged = {**json.loads(train.read_text(encoding="utf-8")), **overlay}
    inference.write_text(json.dumps(merged, indent=4) + "\n", encoding="utf-8")  # model-zoo's JSON format


def export_bundle(name: str, dest: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                  force: bool = False) -> Path:
    """Copy bundle ``name`` into ``dest``, a self-contained bundle folder; returns ``dest``.

    Every static file of the bundle is copied (``configs/``, ``docs/``, ``LICENSE`` and the zoo files such as
    ``large_files.yml`` and ``docs/data_license.txt`` when the bundle has them), nothing a run left behind
    (:data:`SKIPPED`). With ``checkpoint`` (a state dict written by the bundle's training) it becomes
    ``models/model.pt``. An ``inference.json`` that overlays ``train.json`` is written merged, standalone, as
    model-zoo's tools read it (:func:`_standalone_inference`).
    The copy is written into a temporary folder beside ``dest`` and renamed into place: an
    interrupted export leaves no half-written bundle.

    Args:
        name: a shipped bundle (:func:`list_bundles`).
        dest: the folder to create; it may exist if empty.
        checkpoint: optional trained weights (read with ``weights_only=True`` first; a file that is not a torch
            checkpoint is refused).
        force: replace a non-empty ``dest`` (its old content is deleted once the new one is in place).

    Raises:
        ConfigError: unknown bundle, ``dest`` is a file, not empty (without ``force``) or overlaps the shipped
            bundle, the bundle lacks a required file, or the checkpoint is missing or unreadable.
    """
    source = bundle_path(name)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest} exists and is not a folder")
    if dest.is_dir() and not force and not _is_empty_dir(dest):
        raise ConfigError(f"{dest} is not empty: choose a new folder or pass --force (force=True) to replace it")
    target, src = dest.resolve(), source.resolve()
    if target == src or src in target.parents or target in src.parents:
        raise ConfigError(f"{dest} overlaps the shipped bundle {source}: export to a folder outside it")
    if checkpoint is not None:
        from medvol.errors import DataError
        from medvol.io.checkpoint import read_checkpoint

        try:
            read_checkpoint(checkpoint)
        except DataError as e:
            raise ConfigError(str(e)) from None
    missing = [f for f in REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        raise ConfigError(f"bundle {source} is incomplete (missing {', '.join(missing)})")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = None
    try:
        staged = tmp / "bundle"
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns(*SKIPPED))
        _standalone_inference(staged / "configs")
        if checkpoint is not None:
            (staged / "models").mkdir()
            shutil.copyfile(checkpoint, staged / "models" / "model.pt")
        if dest.is_dir():
            if _is_empty_dir(dest):
                dest.rmdir()
            else:  # force: move the old folder aside, put the new one in place, then delete the old one
                old = tmp / "old"
                os.replace(dest, old)
        os.replace(staged, dest)
    except BaseException:
        if old is not None and old.is_dir() and not dest.exists():
            os.replace(old, dest)  # put the previous content back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
