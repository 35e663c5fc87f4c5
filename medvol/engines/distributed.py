"""Device choice and DistributedDataParallel for bundles: ``cuda:LOCAL_RANK`` under torchrun, DDP when asked."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["default_device", "prepare_network", "destroy_process_group"]


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def prepare_network(module: nn.Module, device: torch.device | str, multi_gpu: bool = False,
                    channels_last: bool = False) -> nn.Module:
    """``module`` on ``device``; with ``multi_gpu`` wrapped in ``DistributedDataParallel``.

    With ``multi_gpu`` the process group is initialised first when needed (NCCL on CUDA, gloo on CPU; torchrun's
    environment gives rank and world size) and the CUDA device is made current. ``find_unused_parameters`` is
    the module's attribute of that name (``SSLMethod`` sets it per method), ``False`` when absent.

    Args:
        module: the method or network.
        device: where it runs (see :func:`default_device`).
        multi_gpu: wrap in DDP (the ``multi_gpu_train.json`` overlay sets it).
        channels_last: use the ``channels_last_3d`` memory format (a plain network under MONAI's
            ``SupervisedTrainer``; :class:`SSLTrainer` converts the method itself).
    """
    device = torch.device(device)
    if multi_gpu:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last_3d)
    if not multi_gpu:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(module, "find_unused_parameters", False)))


def destroy_process_group() -> None:
    """Tear down the process group if one is initialised (``finalize`` of ``multi_gpu_train.json``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


