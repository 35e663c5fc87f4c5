"""Splits of a datalist: deterministic train/validation split, few-shot labeled subsets, JSON split files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError

__all__ = ["split_datalist", "select_labeled", "load_split"]


def split_datalist(datalist: list[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/validation split by ``seed`` (validation gets at least one item if possible).

    Raises:
        ConfigError: for ``val_fraction`` outside [0, 1) or an empty datalist.
    """
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

    Different seeds give different subsets; the draw depends only on (pool size, n, seed), so results for
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

    Raises:
        ConfigError: unreadable file, or no list named ``part``.
    """
    if path is None or str(path) in ("", "None"):
        return None
    try:
        split = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"split_file '{path}' cannot be read ({e})") from e
    if part not in split:
        raise ConfigError(f"split_file '{path}' has no '{part}' list (parts: {', '.join(split)})")
    return [str(c) for c in split[part]]
