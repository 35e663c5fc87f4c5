"""What every benchmark records about the machine it ran on (imported by the scripts in this folder)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): float results of the same code
    differ between CPUs (other vector kernels), so every result records it."""
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    return platform.processor() or "unknown"


def machine_info(**extra) -> dict:
    """CPU model, usable cores, RAM, GPU, Python / torch / MONAI versions and the load average, plus ``extra``."""
    import monai
    import torch

    cpu = cpu_model()
    mem_kib = Path("/proc/meminfo").read_text(encoding="utf-8").split()[1] if Path("/proc/meminfo").exists() else "0"
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(int(mem_kib) / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "loadavg": os.getloadavg(),  # other developers may share the CPU
        **extra,
    }
