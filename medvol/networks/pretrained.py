"""Load pretrained weights by key prefix (encoder only, encoder + decoder, ...), with a report of what happened.

Backbones keep their weights under ``encoder.``, ``decoder.`` and ``head.``, so fine-tuning from a pretext
checkpoint is ``load_pretrained(net, "model.pt", prefixes=("encoder.",))``: the pretext head (different
``out_channels``) is never touched. Nothing is downloaded; weights come from a path or an in-memory state dict.

Published checkpoints of other code load without renaming by hand; their layout is recognised by the keys
(``layout="auto"``) and mapped onto the medvol network that holds them:

=================  ==========================================================  ======================================
layout             published keys (``module.`` stripped)                       medvol network
=================  ==========================================================  ======================================
``swinvit_ssl``    ``patch_embed.*``, ``layers{1-4}.0.blocks.*`` (``mlp.fc1``),  ``SwinBackbone`` (``"swinunetr"``,
                   ``layers{1-4}.0.downsample.*``; heads ``rotation_head``,     ``feature_size=48``): the Swin
                   ``contrastive_head``, ``convTrans3d`` (Tang et al. 2022,      transformer ``encoder.swinViT.*``;
                   MONAI's ``model_swinvit.pt``)                                 the heads are dropped (reported)
``swinunetr``      MONAI ``SwinUNETR`` (``swinViT.*``, ``encoder1.*``, ``out.*``)  ``SwinBackbone``, every weight
``models_genesis`` ``down_tr64.ops.0.conv1.*`` ... ``out_tr.final_conv.*``       ``ModelsGenesisUNet3D``
                   (Zhou et al., ``Genesis_Chest_CT.pt``)                        (``"models_genesis"``), every weight
``medvol``         ``encoder.*``, ``decoder.*``, ``head.*``                      any medvol backbone
=================  ==========================================================  ======================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.utils import copy_model_state
from torch import nn

from medvol.errors import DataError
from medvol.io.checkpoint import read_checkpoint
from medvol.networks.genesis import ModelsGenesisUNet3D, genesis_to_medvol
from medvol.networks.momentum import unwrap_module
from medvol.networks.swin import SwinBackbone

__all__ = ["load_pretrained", "detect_layout", "LAYOUTS"]

#: checkpoint layouts :func:`load_pretrained` maps (see the module docstring); ``"auto"`` detects them.
LAYOUTS = ("auto", "medvol", "swinunetr", "swinvit_ssl", "models_genesis")
_HOLDER = {"swinunetr": SwinBackbone, "swinvit_ssl": SwinBackbone, "models_genesis": ModelsGenesisUNet3D}

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


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """The layout of a state dict (``module.`` stripped): one of :data:`LAYOUTS` except ``"auto"``."""
    keys = list(state_dict)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("down_tr", "up_tr", "out_tr."):
        return "models_genesis"
    if has("patch_embed.", "layers1.", "swin_vit.", "rotation_head.", "contrastive_head.", "convTrans3d."):
        return "swinvit_ssl"
    if has("swinViT.", "encoder1.", "encoder10.", "decoder5.", "out."):
        return "swinunetr"
    return "medvol"


def _to_medvol(state: dict, layout: str, net: nn.Module, name: str) -> tuple[dict, list[str]]:
    holder = _HOLDER.get(layout)
    if holder is not None and not isinstance(net, holder):
        raise DataError(name, f"is a {layout} checkpoint (keys like {list(state)[:2]}): it fits medvol's "
                              f"{holder.__name__}, not {type(net).__name__}; build that backbone to load it")
    if layout == "swinvit_ssl":
        return SwinBackbone.from_swinvit_ssl_state_dict(state)
    if layout == "swinunetr":
        return SwinBackbone.from_swinunetr_state_dict(state), []
    if layout == "models_genesis":
        return genesis_to_medvol(state), []
    return state, []


def _listed(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_pretrained(
    network: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    prefixes: Sequence[str] | None = ("encoder.", "decoder."),
    strict_shapes: bool = False,
    source_prefix: str | None = None,
    layout: str = "auto",
    strict: bool = False,
) -> dict[str, Any]:
    """Copy the checkpoint tensors whose names start with one of ``prefixes`` and whose shapes match.

    The checkpoint is first renamed to medvol's layout when it is a published one (``layout``, see the module
    docstring), then MONAI's ``copy_model_state`` copies the selected tensors; medvol's own part is the report
    (``copy_model_state`` only says which network keys changed, not what was missing, unexpected or misshapen).

    Args:
        network: the network to fill (a ``DistributedDataParallel`` wrapper is unwrapped).
        path_or_state_dict: a file written by ``torch.save(network.state_dict())``, or by a checkpoint handler
            as ``{"model": state_dict}`` / ``{"state_dict": state_dict}``, or such a dict itself. Keys saved from
            a DDP-wrapped network (all starting with ``module.``) are accepted.
        prefixes: key prefixes (medvol names) to load, e.g. ``("encoder.",)`` for encoder-only transfer, or
            ``("encoder.swinViT.",)`` for the published Swin transformer alone; ``None`` loads all keys.
        strict_shapes: raise instead of skipping when a selected key exists in both with different shapes.
        source_prefix: keep only checkpoint keys starting with this and strip it first, e.g. ``"backbone."`` when
            the checkpoint is a whole pretext model holding the backbone as ``self.backbone``; ``None``: no change.
        layout: one of :data:`LAYOUTS`; ``"auto"`` recognises it by the keys (:func:`detect_layout`).
        strict: raise unless every selected checkpoint tensor is loaded and every selected network tensor is
            filled (BatchNorm's ``num_batches_tracked`` counters excepted); the error lists the missing,
            unexpected and misshapen keys.

    Returns:
        ``{"loaded", "skipped_shape", "missing", "unexpected", "dropped", "layout"}``: selected keys copied;
        selected keys present in both with different shapes (not copied); selected network keys absent from the
        checkpoint; selected checkpoint keys absent from the network; published pretext-head keys with no place in
        the network (checkpoint names); the layout read. Keys outside ``prefixes`` are ignored and listed nowhere.

    Raises:
        FileNotFoundError: when the path does not exist.
        DataError: (a ``ValueError``) naming the file when it is not a weights-only state dict, when no tensor
            could be loaded (e.g. a checkpoint of another backbone), when a published layout needs another
            network, or, with ``strict``, when keys do not match (all of them listed, shortened).
        ValueError: with ``strict_shapes=True``, when some shapes differ; for an unknown ``layout``.

    Example:
        >>> from medvol.networks import UNet3D
        >>> pretext = UNet3D(channels=(4, 8))                       # e.g. the backbone a pretext task trained
        >>> finetune_net = UNet3D(channels=(4, 8), out_channels=3)  # new head: transfer the encoder only
        >>> report = load_pretrained(finetune_net, pretext.state_dict(), prefixes=("encoder.",))  # or a .pt path
        >>> len(report["loaded"]) > 0, report["skipped_shape"], report["missing"], report["layout"]
        (True, [], [], 'medvol')
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    name = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "<state dict>"
    state = _read_state_dict(path_or_state_dict, name)
    if source_prefix:
        state = {k[len(source_prefix) :]: v for k, v in state.items() if k.startswith(source_prefix)}
    net = unwrap_module(network)
    layout = detect_layout(state) if layout == "auto" else layout
    state, dropped = _to_medvol(state, layout, net, name)
    target = net.state_dict()

    def selected(key: str) -> bool:
        return prefixes is None or any(key.startswith(p) for p in prefixes)

    report: dict[str, Any] = {"loaded": [], "skipped_shape": [], "missing": [], "unexpected": [],
                              "dropped": dropped, "layout": layout}
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

    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in report["skipped_shape"]]
    if strict_shapes and shapes:
        raise ValueError(f"{name}: {len(shapes)} tensor(s) differ in shape: {', '.join(shapes[:3])}")
    if strict:
        missing = [k for k in report["missing"] if not k.endswith("num_batches_tracked")]
        problems = [f"{len(v)} {what} ({_listed(v)})" for what, v in (
            ("missing from the checkpoint", missing), ("unexpected", report["unexpected"]),
            ("with other shapes (checkpoint vs network)", shapes)) if v]
        if problems:
            raise DataError(name, f"does not fit {type(net).__name__} ({layout} layout, prefixes "
                                  f"{tuple(prefixes) if prefixes else 'all'}): " + "; ".join(problems))
    if not to_load:
        raise DataError(
            name,
            f"no tensor matches the network under prefixes {tuple(prefixes) if prefixes else 'all'} "
            f"(checkpoint keys look like {list(state)[:3]}, network keys like {list(target)[:3]}); "
            "is it a checkpoint of another backbone or configuration?",
        )
    copy_model_state(net, to_load, inplace=True)

    stats_mismatch = [k for k in report["unexpected"] + report["missing"] if k.endswith(_BN_STATS)]
    if stats_mismatch:
        logger.warning(
            "%s: BatchNorm statistics present on one side only (%s...): the checkpoint and the network "
            "probably use different norm layers; build both with the same `norm`.",
            name,
            stats_mismatch[0],
        )
    logger.info(
        "%s: loaded %d tensors (%s layout, prefixes %s), %d shape-mismatched skipped, %d missing, %d unexpected%s",
        name,
        len(report["loaded"]),
        layout,
        prefixes,
        len(report["skipped_shape"]),
        len(report["missing"]),
        len(report["unexpected"]),
        f", {len(dropped)} pretext-head tensors dropped" if dropped else "",
    )
    return report
