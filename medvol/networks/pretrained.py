"""Load pretrained weights by key prefix (encoder only, encoder + decoder, ...), with a report of what happened.

Backbones keep their weights under ``encoder.``, ``decoder.`` and ``head.``, so fine-tuning from a pretext
checkpoint is ``load_pretrained(net, "model.pt", prefixes=("encoder.",))``: the pretext head (different
``out_channels``) is never touched. Nothing is downloaded; weights come from a path or an in-memory state dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from medvol.errors import DataError
from medvol.io.checkpoint import read_checkpoint
from medvol.networks.momentum import unwrap_module

__all__ = ["load_pretrained"]

logger = logging.getLogger(__name__)

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _read_state_dict(source, name: str) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: checkpoint file not found")
        try:
            source = read_checkpoint(source, mapping=False)
        except DataError as e:  # pickle, zip and weights-only errors all mean "not a usable checkpoint"
            raise DataError(name, e.problem) from e
    if isinstance(source, Mapping):
        for key in ("model", "state_dict"):  # model-zoo / lightning conventions
            if isinstance(source.get(key), Mapping):
                source = source[key]
                break
    if not isinstance(source, Mapping):
        raise DataError(name, f"expected a state dict, got {type(source).__name__}")
    state = {str(k): v for k, v in source.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped network
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_pretrained(
    network: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    prefixes: Sequence[str] | None = ("encoder.", "decoder."),
    strict_shapes: bool = False,
    source_prefix: str | None = None,
) -> dict[str, list[str]]:
    """Copy the checkpoint tensors whose names start with one of ``prefixes`` and whose shapes match.

    Args:
        network: the network to fill (a ``DistributedDataParallel`` wrapper is unwrapped).
        path_or_state_dict: a file written by ``torch.save(network.state_dict())``, or by a checkpoint handler
            as ``{"model": state_dict}`` / ``{"state_dict": state_dict}``, or such a dict itself. Keys saved from
            a DDP-wrapped network (all starting with ``module.``) are accepted.
        prefixes: key prefixes to load, e.g. ``("encoder.",)`` for encoder-only transfer; ``None`` loads all keys.
        strict_shapes: raise instead of skipping when a selected key exists in both with different shapes.
        source_prefix: keep only checkpoint keys starting with this and strip it first, e.g. ``"backbone."`` when
            the checkpoint is a whole pretext model holding the backbone as ``self.backbone``; ``None``: no change.

    Returns:
        ``{"loaded", "skipped_shape", "missing", "unexpected"}``: selected keys copied; selected keys present in
        both with different shapes (not copied); selected network keys absent from the checkpoint; selected
        checkpoint keys absent from the network. Keys outside ``prefixes`` are ignored and listed nowhere.

    Raises:
        FileNotFoundError: when the path does not exist.
        DataError: (a ``ValueError``) naming the file when it is not a weights-only state dict, or when no tensor
            could be loaded (e.g. a checkpoint of another backbone).
        ValueError: with ``strict_shapes=True``, when some shapes differ.

    Example:
        >>> from medvol.networks import UNet3D
        >>> pretext = UNet3D(channels=(4, 8))                       # e.g. the backbone a pretext task trained
        >>> finetune_net = UNet3D(channels=(4, 8), out_channels=3)  # new head: transfer the encoder only
        >>> report = load_pretrained(finetune_net, pretext.state_dict(), prefixes=("encoder.",))  # or a .pt path
        >>> len(report["loaded"]) > 0, report["skipped_shape"], report["missing"]
        (True, [], [])
    """
    name = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "<state dict>"
    state = _read_state_dict(path_or_state_dict, name)
    if source_prefix:
        state = {k[len(source_prefix) :]: v for k, v in state.items() if k.startswith(source_prefix)}
    net = unwrap_module(network)
    target = net.state_dict()

    def selected(key: str) -> bool:
        return prefixes is None or any(key.startswith(p) for p in prefixes)

    report: dict[str, list[str]] = {"loaded": [], "skipped_shape": [], "missing": [], "unexpected": []}
    to_load = {}
    for key, value in target.items():
        if not selected(key):
            continue
        if key not in state:
            report["missing"].append(key)
        elif state[key].shape != value.shape:
            report["skipped_shape"].append(key)
        else:
            report["loaded"].append(key)
            to_load[key] = state[key]
    report["unexpected"] = [k for k in state if selected(k) and k not in target]

    if strict_shapes and report["skipped_shape"]:
        bad = report["skipped_shape"]
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in bad[:3])
        raise ValueError(f"{name}: {len(bad)} tensor(s) differ in shape: {shown}")
    if not to_load:
        raise DataError(
            name,
            f"no tensor matches the network under prefixes {tuple(prefixes) if prefixes else 'all'} "
            f"(checkpoint keys look like {list(state)[:3]}, network keys like {list(target)[:3]}); "
            "is it a checkpoint of another backbone or configuration?",
        )
    net.load_state_dict(to_load, strict=False)

    stats_mismatch = [k for k in report["unexpected"] + report["missing"] if k.endswith(_BN_STATS)]
    if stats_mismatch:
        logger.warning(
            "%s: BatchNorm statistics present on one side only (%s...): the checkpoint and the network "
            "probably use different norm layers; build both with the same `norm`.",
            name,
            stats_mismatch[0],
        )
    logger.info(
        "%s: loaded %d tensors (prefixes %s), %d shape-mismatched skipped, %d missing, %d unexpected",
        name,
        len(report["loaded"]),
        prefixes,
        len(report["skipped_shape"]),
        len(report["missing"]),
        len(report["unexpected"]),
    )
    return report
