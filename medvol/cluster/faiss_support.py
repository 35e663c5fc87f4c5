"""The one place medvol imports faiss: GPU detection and the repair of faiss's SWIG vector classes.

Why the repair exists (the ``AssertionError`` in ``faiss.Kmeans.train`` when SimpleITK is imported after faiss):
SWIG-generated extension modules share one run-time type table per SWIG ABI version (a capsule named
``swig_runtime_data4``). faiss and SimpleITK both wrap ``std::vector<float>`` (and other vectors of numbers), so
both register the same C++ type name, and each module, when it is imported, attaches its *own* Python proxy
class to that shared entry. The module imported last wins: after ``import faiss, SimpleITK`` a
``std::vector<float>*`` returned by faiss (``Clustering.centroids``) comes back as ``SimpleITK.VectorFloat``
instead of ``faiss.Float32Vector``. faiss's ``vector_to_array`` / ``copy_array_to_vector`` pick the numpy
dtype from the proxy's class name (``Float32Vector`` -> float32) and assert that it ends in ``Vector``, which
``VectorFloat`` does not. Importing SimpleITK first hides the problem because faiss then wins.

:func:`repair_faiss_vectors` calls faiss's own ``<Name>_swigregister`` functions again, which re-attaches
faiss's classes to the shared entries (the state that ``import SimpleITK, faiss`` leaves, so SimpleITK keeps
working: its wrappers convert by the shared C++ type, not by the Python class). medvol calls it before every
faiss training; code that calls ``faiss.Kmeans`` directly can call it too.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types

import faiss

__all__ = ["faiss", "faiss_gpu_count", "faiss_has_gpu", "faiss_gpu_shadowed", "repair_faiss_vectors"]


def faiss_gpu_count() -> int:
    """Number of CUDA devices the installed faiss can use: 0 for a CPU-only faiss or a machine without a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one CUDA device."""
    return faiss_gpu_count() > 0


def faiss_gpu_shadowed() -> str:
    """How to repair an install where the faiss-gpu wheel is present but ``import faiss`` is the CPU build.

    faiss-cpu and faiss-gpu of one version ship the same files under ``faiss/``; whichever pip wrote last is
    what ``import faiss`` loads. Reinstalling or upgrading faiss-cpu after faiss-gpu therefore silently brings
    the CPU build back (and uninstalling faiss-cpu deletes the shared files: ``import faiss`` breaks).

    Returns:
        A one-line fix (a pip command) when that happened, else ``""``.
    """
    if hasattr(faiss, "StandardGpuResources"):
        return ""
    try:
        version = importlib.metadata.version("faiss-gpu")
    except importlib.metadata.PackageNotFoundError:
        return ""
    return (f"faiss-gpu {version} is installed but `import faiss` loads faiss-cpu's files (written after it): "
            f"run `pip install --force-reinstall --no-deps faiss-gpu=={version}`")


def _vector_classes() -> list[tuple[type, object]]:
    """faiss's std::vector proxy classes with their SWIG register functions."""
    module = sys.modules[faiss.Float32Vector.__module__]  # swigfaiss, or swigfaiss_avx2 / _avx512 per CPU
    ext = next(v for k, v in vars(module).items() if k.startswith("_swigfaiss") and isinstance(v, types.ModuleType))
    return [(getattr(module, name), getattr(ext, f"{name}_swigregister"))
            for name in dir(module)
            if name.endswith("Vector") and hasattr(ext, f"{name}_swigregister")]


def repair_faiss_vectors() -> bool:
    """Give faiss's std::vector types back their faiss proxy classes if another SWIG module took them.

    Cheap when nothing is wrong (one probe object); the probe is ``Clustering.centroids``, the vector that
    ``faiss.Kmeans`` and medvol exchange centroids through.

    Returns:
        True when a repair was needed (another SWIG module, e.g. SimpleITK, was imported after faiss).
    """
    if type(faiss.Clustering(1, 1).centroids) is faiss.Float32Vector:
        return False
    for cls, register in _vector_classes():
        register(cls)
    return True
