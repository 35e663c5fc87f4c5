"""medvol: MONAI-native self-supervised learning for 3D CT and MRI.

Sub-packages (one concept per module):

- :mod:`medvol.bundles`: the shipped MONAI bundles and demo data by name; exporting a bundle folder.
- :mod:`medvol.io`: datalists, volume readers (NIfTI, MetaImage, NRRD, DICOM series), atomic writers, manifests.
- :mod:`medvol.transforms`: MONAI-style array/dictionary transforms (N4, presets, SSL views).
- :mod:`medvol.networks`: encoders with feature taps, heads, momentum encoders, MIL pooling.
- :mod:`medvol.losses`: self-supervised losses with ``forward(input, target)``.
- :mod:`medvol.cluster`: FAISS k-means and Sinkhorn-Knopp.
- :mod:`medvol.methods`: the pretext tasks, each assembled from the parts above.
- :mod:`medvol.engines`: the self-supervised trainer and its handlers (monai.engines / ignite).
- :mod:`medvol.mil`: bags of slice embeddings, patient-level targets and cross-validation.
- :mod:`medvol.search`: similar-case search (pooled vectors, the FAISS index).
- :mod:`medvol.evaluation`: frozen-embedding probes (k-NN, linear) and the voxel baseline.
- :mod:`medvol.apps`: the ``medvol`` command line.
"""

__version__ = "0.1.0"

_SUBPACKAGES = ("apps", "bundles", "cluster", "engines", "errors", "evaluation", "io", "losses", "methods", "mil",
                "networks", "search", "transforms")


def __getattr__(name: str):
    """Import sub-packages on first use, so ``import medvol`` is enough in bundle configs (``medvol.engines...``)."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"medvol.{name}")
    raise AttributeError(f"module 'medvol' has no attribute {name!r}")
