"""Helpers that bundle configs call: datalists, splits, labeled subsets, and one-line configuration errors.

``python -m monai.bundle run`` prints a long chained traceback for any error raised while a config resolves
(MONAI wraps it in "Failed to instantiate ..." and ignite adds its own frames). A bundle's ``initialize`` list
starts with :func:`install_error_hook`, after which a :class:`~medvol.errors.MedvolError` anywhere in the chain
(missing dataset folder, empty folder, label without image, unknown backbone, bad split file) is reported as
one ``medvol: ...`` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError, MedvolError, find_error
from medvol.io.datalist import case_name, load_datalist

__all__ = [
    "install_error_hook",
    "require_dir",
    "require_file",
    "image_datalist",
    "labeled_datalist",
    "split_datalist",
    "select_labeled",
    "load_split",
    "with_case_index",
]


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


def require_dir(path, name: str = "dataset_dir") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when it is missing or not a folder."""
    if path is None or str(path).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} FOLDER")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{name} '{path}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{name} '{path}' is not a folder")
    return p


def _load(source, name: str, **kwargs) -> list[dict]:
    path = Path(str(source)) if source is not None else None
    if path is None or not path.exists():
        raise ConfigError(f"{name} '{source}' does not exist" if source else f"{name} is not set")
    try:
        return load_datalist(path, **kwargs)
    except MedvolError as e:
        raise ConfigError(f"{name}: {e}") from e


def image_datalist(source, name: str = "dataset_dir", cases=None) -> list[dict]:
    """Images of a folder / MSD json / CSV for self-supervised training (labels dropped).

    Args:
        source: the dataset folder or datalist file.
        name: config key reported in errors.
        cases: optional list of case names to keep (e.g. the pretraining part of a fixed split).
    """
    kwargs = {"allow_unlabeled": True} if Path(str(source)).is_dir() else {}
    datalist = [{"image": d["image"]} for d in _load(source, name, **kwargs)]
    if cases is not None:
        datalist = _filter_cases(datalist, cases, name)
    return with_case_index(datalist)


def labeled_datalist(source, name: str = "dataset_dir", cases=None) -> list[dict]:
    """Image/label pairs (every image must have a label) for supervised training or evaluation."""
    datalist = _load(source, name)
    unlabeled = [d["image"] for d in datalist if "label" not in d]
    if unlabeled:
        raise ConfigError(f"{name}: {len(unlabeled)} images have no label, e.g. {unlabeled[0]}")
    if cases is not None:
        datalist = _filter_cases(datalist, cases, name)
    return datalist


def _filter_cases(datalist: list[dict], cases, name: str) -> list[dict]:
    by_case = {case_name(d["image"]): d for d in datalist}
    missing = [c for c in cases if c not in by_case]
    if missing:
        raise ConfigError(f"{name}: {len(missing)} cases of the split are not in the dataset, e.g. {missing[0]}")
    return [by_case[c] for c in cases]


def with_case_index(datalist: list[dict]) -> list[dict]:
    """Add ``case_index`` (position in the datalist) so crops of one volume can be told apart in a batch."""
    return [{**d, "case_index": i} for i, d in enumerate(datalist)]


def split_datalist(datalist: list[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/validation split by ``seed`` (validation gets at least one item if possible)."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not datalist:
        raise ConfigError("the datalist is empty")
    order = np.random.default_rng(seed).permutation(len(datalist))
    n_val = int(round(val_fraction * len(datalist)))
    if val_fraction > 0 and len(datalist) > 1:
        n_val = max(1, n_val)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [datalist[i] for i in train], [datalist[i] for i in val]


def select_labeled(datalist: list[dict], num_labeled: int | str = "all", seed: int = 0) -> list[dict]:
    """The labeled subset for few-shot fine-tuning: ``num_labeled`` items drawn with ``seed``, or all.

    Different seeds give different subsets; a subset of size n for a seed is a prefix-free draw, so results for
    (n, seed) are reproducible on any machine.

    Raises:
        ConfigError: for a count that is not a positive integer or ``"all"``, or larger than the pool.
    """
    if isinstance(num_labeled, str):
        if num_labeled.strip().lower() == "all":
            return list(datalist)
        try:
            num_labeled = int(num_labeled)
        except ValueError:
            raise ConfigError(f"num_labeled must be a positive integer or 'all', got {num_labeled!r}") from None
    if num_labeled < 1:
        raise ConfigError(f"num_labeled must be >= 1, got {num_labeled}")
    if num_labeled > len(datalist):
        raise ConfigError(f"num_labeled={num_labeled} but the labeled pool has only {len(datalist)} volumes")
    order = np.random.default_rng(seed).permutation(len(datalist))[:num_labeled]
    return [datalist[i] for i in sorted(order.tolist())]


def load_split(path, part: str) -> list[str] | None:
    """Case names of ``part`` (e.g. ``"pool"``, ``"test"``) in a JSON split file, or None when path is None.

    The file maps part names to lists of case names (file names without suffix), e.g.
    ``{"pool": ["hippocampus_004", ...], "test": [...]}``.
    """
    if path is None or str(path) in ("", "None"):
        return None
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"split_file '{path}' cannot be read ({e})") from e
    if part not in split:
        raise ConfigError(f"split_file '{path}' has no '{part}' list (parts: {', '.join(split)})")
    return [str(c) for c in split[part]]


def require_file(path, name: str = "ckpt_path") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when the file is missing."""
    if path is None or str(path).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} FILE")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{name} '{path}' does not exist (train first, or pass --{name})")
    return p
