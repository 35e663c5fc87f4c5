"""Helpers that bundle configs call: required folders and files, and one-line configuration errors.

Datalists, splits and labeled subsets live in :mod:`medvol.io` (``medvol.io.image_datalist``, ...).

``python -m monai.bundle run`` prints a long chained traceback for any error raised while a config resolves
(MONAI wraps it in "Failed to instantiate ..." and ignite adds its own frames). A bundle's ``initialize`` list
starts with :func:`install_error_hook`, after which a :class:`~medvol.errors.MedvolError` anywhere in the chain
(missing dataset folder, empty folder, label without image, unknown backbone, bad split file) is reported as
one ``medvol: ...`` line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medvol.errors import ConfigError, MedvolError, find_error

__all__ = ["install_error_hook", "require_dir", "require_file"]


def install_error_hook() -> bool:
    """Report medvol errors as one line (exit code 2) instead of a traceback; other errors are untouched.

    Returns True so it can sit in a config's ``initialize`` list.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        err = find_error(exc, MedvolError)
        if err is None:
            return previous(exc_type, exc, tb)
        print(f"medvol: error: {err}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # skip interpreter teardown messages from half-built ignite/torch objects

    sys.excepthook = hook
    return True


def _given(path, name: str, kind: str) -> Path:
    if path is None or str(path).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} {kind}")
    return Path(path)


def require_dir(path, name: str = "dataset_dir") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when it is missing or not a folder."""
    p = _given(path, name, "FOLDER")
    if not p.exists():
        raise ConfigError(f"{name} '{path}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{name} '{path}' is not a folder")
    return p


def require_file(path, name: str = "ckpt_path") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when the file is missing."""
    p = _given(path, name, "FILE")
    if not p.is_file():
        raise ConfigError(f"{name} '{path}' does not exist (train first, or pass --{name})")
    return p
