"""Writing per-volume network outputs that are not images (embeddings, slice-embedding bags) as transforms.

:class:`RecordSourceGridd` keeps where a volume came from before slicing drops its metadata; :class:`SaveBagd`
then writes the ``(n_slices, D)`` embeddings of that volume as an HDF5 bag (:mod:`medvol.io.bags`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medvol.io.atomic import atomic_write_bytes
from medvol.io.bags import bag_filename, file_sha256, write_slice_bag
from medvol.io.datalist import case_name

__all__ = ["SaveEmbeddingd", "RecordSourceGridd", "SaveBagd"]


class SaveEmbeddingd(MapTransform):
    """Save each item's embedding as ``{output_dir}/{case}.npy`` (float32 vector, written atomically).

    Use as the ``postprocessing`` of a MONAI evaluator whose network returns one vector per volume. The case
    name is the input file name without its suffix (``case_name``), so re-running overwrites, never duplicates.

    Args:
        keys: the embedding key (``"pred"``).
        output_dir: destination folder.
        source_key: key whose MetaTensor names the input file (``"image"``).
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str | os.PathLike = "embeddings",
                 source_key: str = "image"):
        super().__init__(keys)
        self.output_dir, self.source_key = Path(output_dir), source_key

    def _source(self, d) -> str:
        img = d.get(self.source_key)
        if isinstance(img, MetaTensor):
            return str(img.meta.get("filename_or_obj", ""))
        meta = d.get(f"{self.source_key}_meta_dict", {})
        return str(meta.get("filename_or_obj", ""))

    def __call__(self, data):
        d = dict(data)
        source = self._source(d)
        case = case_name(source) if source else "volume"
        for key in self.key_iterator(d):
            vec = d[key].detach().cpu().float().numpy() if isinstance(d[key], torch.Tensor) else np.asarray(d[key])
            vec = vec.reshape(-1)
            buf = io.BytesIO()
            np.save(buf, vec.astype(np.float32))
            suffix = "" if key == "pred" else f"_{key}"
            atomic_write_bytes(self.output_dir / f"{case}{suffix}.npy", buf.getvalue())
        return d


class RecordSourceGridd(MapTransform):
    """Keep, as plain tensors, where the (preprocessed) volume of ``keys`` comes from, before slicing drops it.

    Writes ``source`` (file name), ``source_affine`` (affine as loaded), ``grid_affine`` (current affine) and
    ``source_shape`` (spatial shape as loaded), which :func:`write_slice_bag` uses to map slices back.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise ValueError(f"RecordSourceGridd: {key!r} must be a MetaTensor (run it right after loading)")
            meta = img.meta
            d["source"] = str(meta.get("filename_or_obj", ""))
            d["grid_affine"] = img.affine.detach().cpu().double().clone()
            d["source_affine"] = torch.as_tensor(np.asarray(meta.get("original_affine", d["grid_affine"])),
                                                 dtype=torch.float64)
            d["source_shape"] = torch.as_tensor(np.asarray(meta.get("spatial_shape", img.shape[1:])),
                                                dtype=torch.long).reshape(-1)[:3]
        return d


class SaveBagd(MapTransform):
    """Postprocessing transform: write ``keys`` (the ``(n, D)`` embeddings) as ``{output_dir}/<case>.h5``.

    Args:
        keys: the embedding key (``"pred"``).
        output_dir: destination folder.
        checkpoint: the checkpoint file whose SHA-256 is recorded (hashed once, on first use).
        checkpoint_sha256: the hash itself (instead of ``checkpoint``).
        axis: the axis the slicing transform sliced (of the preprocessed grid).
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str | os.PathLike = "embeddings",
                 checkpoint: str | os.PathLike | None = None, checkpoint_sha256: str | None = None,
                 axis: int = 2) -> None:
        super().__init__(keys)
        self.output_dir, self.checkpoint, self.sha256, self.axis = Path(output_dir), checkpoint, checkpoint_sha256, axis

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.sha256 is None:
            self.sha256 = file_sha256(self.checkpoint) if self.checkpoint else ""
        for key in self.key_iterator(d):
            write_slice_bag(self.output_dir / bag_filename(str(d["source"])), d[key], d, self.axis, self.sha256)
        return d
