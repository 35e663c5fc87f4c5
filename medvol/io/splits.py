"""Splits of a datalist: deterministic train/validation split, few-shot labeled subsets, JSON split files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from monai.data import partition_dataset

from medvol.errors import ConfigError

__all__ = ["split_datalist", "select_labeled", "load_split", "AUTO_VAL_FRACTION", "AUTO_MIN_ITEMS"]

logger = logging.getLogger(__name__)


#: ``val_fraction="auto"``: hold out this fraction (at least one item) of a datalist with at least
#: :data:`AUTO_MIN_ITEMS` items; smaller datalists are not split (see :func:`split_datalist`).
AUTO_VAL_FRACTION = 0.2
AUTO_MIN_ITEMS = 3


def split_datalist(datalist: list[dict], val_fraction: float | str = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/validation split by ``seed`` (validation gets at least one item if possible).

    MONAI's ``partition_dataset`` (shuffled with ``seed``) draws the split; both parts keep the datalist's order.
    medvol only chooses the sizes, so that any ``val_fraction > 0`` holds out at least one item (MONAI rounds
    0.1 x 4 items to none).

    ``val_fraction="auto"`` (the ``fewshot_segmentation`` default) holds out :data:`AUTO_VAL_FRACTION` (at
    least one item) when the datalist has at least :data:`AUTO_MIN_ITEMS` items, and nothing below that: with
    1-2 labeled volumes one cannot be spared for validation, so training uses all of them for its fixed budget
    of iterations and the last epoch is the model. The choice is logged.

    Raises:
        ConfigError: for ``val_fraction`` outside [0, 1) (or a string other than ``"auto"``) or an empty datalist.
    """
    if not datalist:
        raise ConfigError("the datalist is empty")
    n = len(datalist)
    auto = isinstance(val_fraction, str) and val_fraction.strip().lower() == "auto"
    if auto:
        val_fraction = AUTO_VAL_FRACTION if n >= AUTO_MIN_ITEMS else 0.0
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"val_fraction must be a number in [0, 1) or 'auto', got {val_fraction!r}") from None
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n > 1:
        n_val = min(max(1, n_val), n - 1)  # at least one item on each side
    elif n == 1:
        n_val = 0
    train, val = partition_dataset(list(range(n)), ratios=[n - n_val, n_val], shuffle=True, seed=seed)
    if auto:
        logger.info(f"val_fraction auto: {n - n_val} training, {n_val} validation items" + (
            "" if n_val else f" (fewer than {AUTO_MIN_ITEMS} items: none held out, the last epoch is the model)"))
    return [datalist[i] for i in sorted(train)], [datalist[i] for i in sorted(val)]


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
    # not MONAI's partition_dataset (RandomState shuffle): this draw defines the benchmark's published subsets
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
