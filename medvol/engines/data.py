"""Deterministic, resumable data loading for training.

Every random draw of a training sample is a function of ``(seed, epoch, index)`` only:
:class:`SeededSampler` shuffles with ``(seed, epoch)`` and yields ``(index, sample_seed)`` pairs, and
:class:`SeededDataset` seeds the random transforms with ``sample_seed`` before applying them. So epoch ``e`` of a
run resumed from a checkpoint sees exactly the crops and augmentations of epoch ``e`` of an uninterrupted run,
whatever the number of DataLoader workers, and torchrun ranks get disjoint shards (like DistributedSampler,
which MONAI's workflows already call ``set_epoch`` on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureTyped, Randomizable, SelectItemsd, apply_transform
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["SeededSampler", "SeededDataset", "sample_seed", "make_loader"]

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index) (hash mixing, no global RNG)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF]).generate_state(1)[0])


class SeededSampler(DistributedSampler):
    """Shuffles with ``(seed, epoch)``, shards by rank, and yields ``(index, sample_seed)``.

    It subclasses ``DistributedSampler`` only so that MONAI's ``Workflow`` calls ``set_epoch`` at every epoch
    start; it does not need ``torch.distributed`` to be initialised (pass ``num_replicas``/``rank``, which
    default to the torchrun environment).

    Args:
        dataset: the dataset (only its length is used).
        seed: base seed of the run.
        shuffle: reshuffle every epoch.
        num_replicas, rank: shard count and this process's shard (default: torchrun's WORLD_SIZE and RANK).
        drop_last: drop the tail instead of padding shards to equal length.
        num_samples: draws per epoch over all ranks (default: the dataset length). Larger values cycle through
            fresh permutations, each draw with its own seed, so a 2-volume few-shot set still gets a new
            augmentation at every iteration.
    """

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False, num_samples: int | None = None):
        import os

        num_replicas = int(os.environ.get("WORLD_SIZE", 1)) if num_replicas is None else num_replicas
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        # an empty dataset gives an empty sampler (e.g. the validation split of --val_fraction 0)
        self.draws = 0 if len(dataset) == 0 else (len(dataset) if num_samples is None else int(num_samples))
        if self.draws < 0 or (num_samples is not None and num_samples < 1):
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.drop_last:
            self.num_samples = self.draws // self.num_replicas
        else:
            self.num_samples = math.ceil(self.draws / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        n = len(self.dataset)
        order: list[int] = []
        cycle = 0
        while n and len(order) < self.total_size:  # fresh permutation per pass over the data
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 7919 + cycle)
                order += torch.randperm(n, generator=g).tolist()
            else:
                order += list(range(n))
            cycle += 1
        for position in range(self.rank, self.total_size, self.num_replicas):
            yield order[position], sample_seed(self.seed, self.epoch, position)


class SeededDataset(Dataset):
    """Deterministic part cached (``CacheDataset``), random part re-seeded per sample.

    Args:
        data: datalist.
        deterministic: transforms applied once and cached (loading, preprocessing).
        random: transforms applied per access, seeded by the sampler's ``sample_seed``.
        cache_rate, num_workers: as in ``monai.data.CacheDataset`` (``num_workers`` = caching threads).
        keys: the items a sample keeps after the random transforms, as plain tensors (``SelectItemsd`` then
            ``EnsureTyped(track_meta=False)``), e.g. a method's ``batch_keys``; None keeps every item as it is.

    ``deterministic`` and ``random`` may be one transform or a list. Items are addressed by ``(index, seed)``
    (from :class:`SeededSampler`) or by a plain index (seed 0).
    """

    def __init__(self, data, deterministic, random=None, cache_rate: float = 1.0, num_workers: int | None = 0,
                 progress: bool = False, keys: Sequence[str] | None = None):
        # flatten: a nested Compose counts as random for CacheDataset, which would then cache nothing
        self.base = CacheDataset(data, transform=Compose(deterministic).flatten(), cache_rate=cache_rate,
                                 num_workers=num_workers, progress=progress, copy_cache=True)
        random = [] if random is None else list(random) if isinstance(random, (list, tuple)) else [random]
        if keys is not None:  # not Randomizable: the seeds drawn for the random transforms stay the same
            keys = list(keys)
            random += [SelectItemsd(keys), EnsureTyped(keys, track_meta=False)]
        self.random = Compose(random)
        self.cache_rate, self.num_workers, self.progress = cache_rate, num_workers, progress

    def like(self, data) -> SeededDataset:
        """A dataset over other ``data`` with the same transforms and caching (e.g. the validation split)."""
        return SeededDataset(data, self.base.transform, list(self.random.transforms), cache_rate=self.cache_rate,
                             num_workers=self.num_workers, progress=self.progress)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (int(key), 0)
        item = self.base[index]
        if isinstance(self.random, Randomizable):
            self.random.set_random_state(seed=seed)
        return apply_transform(self.random, item)


def make_loader(dataset: SeededDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_workers: int = 0, drop_last: bool = False, num_samples: int | None = None,
                **kwargs) -> DataLoader:
    """A MONAI DataLoader over ``dataset`` with a :class:`SeededSampler` (so MONAI workflows set its epoch).

    ``num_samples`` sets the draws per epoch (default: one pass over the dataset).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = SeededSampler(dataset, seed=seed, shuffle=shuffle, drop_last=drop_last, num_samples=num_samples)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, **kwargs)
