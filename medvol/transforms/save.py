"""Writing per-volume network outputs that are not images (embeddings) as postprocessing transforms."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medvol.io.atomic import atomic_write_bytes
from medvol.io.datalist import case_name

__all__ = ["SaveEmbeddingd"]


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
