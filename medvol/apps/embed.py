"""``medvol embed``: one HDF5 bag of per-slice embeddings per volume, with a trained 2D slice encoder.

The bundle's ``configs/inference.json`` defines everything: ``preprocessing`` (load, orient, normalise),
``slicing`` (:class:`RecordSourceGridd` then :class:`~medvol.transforms.VolumeToSlicesd`: 2.5D samples
``(n_slices, C, H, W)``), ``network_def`` (the encoder ``(B, C, H, W) -> (B, D)``) and ``axis``. The bundle's own
evaluator and this command share these ids, :func:`embed_stack` and :func:`write_slice_bag`, so both write the
same bags (:func:`medvol.mil.write_bag` format: ``feats``, ``slice_index``, source, spacing, checkpoint sha256,
axis).

``slice_index`` and ``axis`` refer to the volume as :class:`medvol.io.LoadVolume` returns it (what the MIL
attention figure reads back), not to the reoriented grid the encoder saw: axis 2 of the RAS grid is mapped back
through the affines (for an IXI T1 stored sagittally, RAS axial slices are source axis 1). With ``spacing`` set
(resampling), each slice maps to the nearest source slice.

Output names: ``OUTPUT/<case>.h5`` (case = file name without suffix, ``_<uid>`` added for one series of a
multi-series DICOM folder), flat so the ``slice_mil`` bundle reads the folder as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from medvol.apps.batch import Job
from medvol.errors import ConfigError, DataError, MedvolError, find_error
from medvol.io.datalist import case_name
from medvol.io.dicom import split_series_ref

__all__ = [
    "RecordSourceGridd",
    "source_slice_index",
    "SliceStackInferer",
    "embed_stack",
    "write_slice_bag",
    "SaveBagd",
    "file_sha256",
    "bag_filename",
    "build_embed_jobs",
    "default_checkpoint",
    "EmbeddingModel",
    "load_embedding_model",
    "EmbedProcessor",
]


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


def source_slice_index(positions, axis: int, grid_affine, source_affine, source_shape) -> tuple[int, np.ndarray]:
    """Map slice positions along ``axis`` of the preprocessed grid to (source axis, source slice positions).

    The centre voxel of each grid slice is taken through ``inv(source_affine) @ grid_affine``; the source axis is
    the one the grid's slice axis runs along most. Exact for reorientation (signed axis permutations), nearest
    slice after resampling.
    """
    grid_affine = np.asarray(grid_affine, dtype=np.float64).reshape(4, 4)
    to_source = np.linalg.inv(np.asarray(source_affine, dtype=np.float64).reshape(4, 4)) @ grid_affine
    src_axis = int(np.argmax(np.abs(to_source[:3, axis])))
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    shape = np.asarray(source_shape).reshape(-1)
    # voxel (x, y, z) of the grid with the slice axis at pos; the other axes at 0 (any value: no effect for
    # permutations, and after resampling the slice axis barely depends on them)
    points = np.zeros((len(pos), 4))
    points[:, axis], points[:, 3] = pos, 1.0
    coords = points @ to_source.T  # (n, 4) source voxel coordinates
    index = np.clip(np.rint(coords[:, src_axis]), 0, int(shape[src_axis]) - 1).astype(np.int64)
    return src_axis, index


def embed_stack(network: torch.nn.Module, stack: torch.Tensor, chunk_size: int = 64,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Embed a stack ``(n, C, H, W)`` in chunks of ``chunk_size`` slices, without gradients: ``(n, D)`` float32.

    ``device`` moves each chunk there (``None``: the stack's device); the result stays on that device.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.no_grad():
        outs = [network(chunk if device is None else chunk.to(device)).float()
                for chunk in torch.as_tensor(stack).split(int(chunk_size))]
    return torch.cat(outs) if outs else torch.zeros(0, 0)


class SliceStackInferer(Inferer):
    """MONAI inferer for a 2D encoder over a batch of slice stacks: ``(B, n, C, H, W) -> (B, n, D)``.

    Args:
        chunk_size: slices per network call (bounds memory on long scans).
    """

    def __init__(self, chunk_size: int = 64) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim == 4:
            return embed_stack(network, inputs, self.chunk_size)
        if inputs.ndim != 5:
            raise ValueError(f"SliceStackInferer expects (B, n, C, H, W) or (n, C, H, W), got {tuple(inputs.shape)}")
        return torch.stack([embed_stack(network, stack, self.chunk_size) for stack in inputs])


def _spacing(affine) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64).reshape(4, 4)[:3, :3], axis=0))


def write_slice_bag(path: str | os.PathLike, feats, data: Mapping, axis: int, checkpoint_sha256: str,
                    source: str | None = None) -> dict:
    """Write one bag from the embeddings and the keys :class:`RecordSourceGridd` / ``VolumeToSlicesd`` left.

    Returns:
        manifest fields: ``shape`` and ``spacing`` of the source volume, ``n_slices``, ``dim``.

    Raises:
        DataError: when the volume left no slice to embed (e.g. every slice below ``skip_empty_threshold``).
    """
    from medvol.mil import write_bag

    source = str(data.get("source", "")) if source is None else str(source)
    feats = feats.detach().cpu().float().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(source, f"no slice to embed (embeddings of shape {feats.shape}); check skip_empty_threshold")
    shape = [int(s) for s in np.asarray(data["source_shape"]).reshape(-1)[:3]]
    src_axis, index = source_slice_index(np.asarray(data["slice_index"]), axis, data["grid_affine"],
                                         data["source_affine"], shape)
    spacing = _spacing(data["source_affine"])
    write_bag(path, feats, index, source, spacing, checkpoint_sha256, src_axis)
    return {"shape": tuple(shape), "spacing": spacing, "n_slices": int(feats.shape[0]), "dim": int(feats.shape[1])}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bag_filename(source: str) -> str:
    """``<case>.h5`` for a volume path (``<case>_<uid>.h5`` for one series of a multi-series DICOM folder)."""
    folder, uid = split_series_ref(source)
    stem = case_name(folder)
    return f"{stem}_{uid}.h5" if uid else f"{stem}.h5"


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


def build_embed_jobs(datalist: list[dict], output_dir: Path) -> list[Job]:
    """One job per image; images whose bag names collide are failed up front (both files named)."""
    jobs, owners = [], {}
    for item in datalist:
        path = Path(output_dir) / bag_filename(item["image"])
        job = Job(source=item["image"], item={"image": item["image"]}, outputs={"output": path})
        if path in owners:
            job.error = f"{item['image']}: output {path} would overwrite the output of {owners[path]}; rename one"
        owners.setdefault(path, item["image"])
        jobs.append(job)
    return jobs


def _parser(bundle: Path, overrides: Mapping | None):
    from monai.bundle import ConfigParser

    config = Path(bundle) / "configs" / "inference.json"
    if not config.is_file():
        raise ConfigError(f"bundle {bundle} has no configs/inference.json")
    parser = ConfigParser()
    parser.read_config([str(f) for f in (config.with_name("train.json"), config) if f.is_file()])  # an overlay
    parser.update({"bundle_root": str(bundle), **dict(overrides or {})})
    return parser


def _resolve(parser, key: str):
    try:
        return parser.get_parsed_content(key)
    except Exception as e:  # MONAI wraps errors raised while instantiating in RuntimeError
        err = find_error(e, MedvolError)
        if err is not None:
            raise ConfigError(str(err)) from None
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise ConfigError(f"inference.json '{key}' cannot be resolved: {type(root).__name__}: "
                          f"{' '.join(str(root).split())}") from None


def default_checkpoint(bundle: str | os.PathLike, overrides: Mapping | None = None) -> Path:
    """The bundle's ``models/model.pt`` (MONAI zoo layout) if present, else inference.json's ``ckpt_path``."""
    zoo = Path(bundle) / "models" / "model.pt"
    if zoo.is_file():
        return zoo
    try:
        return Path(_resolve(_parser(Path(bundle), overrides), "ckpt_path"))
    except ConfigError:
        return zoo


class EmbeddingModel:
    """What a worker needs: the per-volume transform, the encoder on its device, the axis and checkpoint hash."""

    def __init__(self, transform, network: torch.nn.Module, axis: int, sha256: str, device: torch.device):
        self.transform, self.network, self.axis, self.sha256, self.device = transform, network, axis, sha256, device

    def embed(self, stack: torch.Tensor, chunk_size: int) -> torch.Tensor:
        return embed_stack(self.network, stack, chunk_size, self.device).cpu()


def load_embedding_model(bundle: str | os.PathLike, checkpoint: str | os.PathLike, overrides: Mapping | None = None,
                         device: str | torch.device = "cpu") -> EmbeddingModel:
    """Build ``preprocessing`` + ``slicing`` + ``network_def`` from the bundle and load ``checkpoint`` into it.

    Raises:
        ConfigError: missing inference.json, an id that does not resolve, or a checkpoint that does not fit
            the network (missing/unexpected keys or shapes: usually different ``encoder``/``encoder_options``).
    """
    from monai.transforms import Compose

    parser = _parser(Path(bundle), overrides)
    transform = Compose([_resolve(parser, "preprocessing"), _resolve(parser, "slicing")])
    network = _resolve(parser, "network_def")
    axis = int(_resolve(parser, "axis"))
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {checkpoint} cannot be read ({' '.join(str(e).split())[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError(f"checkpoint {checkpoint} does not fit the bundle's network_def (same encoder and "
                          f"encoder_options as in training?): {' '.join(str(e).split())[:300]}") from None
    device = torch.device(device)
    return EmbeddingModel(transform, network.to(device).eval(), axis, file_sha256(checkpoint), device)


_LOADED: dict[str, EmbeddingModel] = {}  # per process: the checkpoint is loaded once per worker


class EmbedProcessor:
    """Batch processor of ``medvol embed`` (picklable; the model is loaded once per process and cached).

    Args:
        bundle: bundle folder (with ``configs/inference.json``).
        checkpoint: encoder state dict.
        overrides: config ids -> values applied to inference.json (e.g. ``{"spatial_size": 64}``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: slices per network call.
        previous: rows of an earlier manifest (source -> row), to describe skipped volumes.
    """

    def __init__(self, bundle, checkpoint, overrides: Mapping | None = None, device: str = "cpu",
                 batch_size: int = 64, previous: Mapping | None = None):
        self.bundle, self.checkpoint = str(Path(bundle).resolve()), str(Path(checkpoint).resolve())
        self.overrides, self.device, self.batch_size = dict(overrides or {}), str(device), int(batch_size)
        self.previous = dict(previous or {})

    def _key(self) -> str:
        return json.dumps([self.bundle, self.checkpoint, self.overrides, self.device], sort_keys=True, default=str)

    def load(self) -> EmbeddingModel:
        """The model of this process (built on first use)."""
        key = self._key()
        if key not in _LOADED:
            _LOADED[key] = load_embedding_model(self.bundle, self.checkpoint, self.overrides, self.device)
        return _LOADED[key]

    def release(self) -> None:
        """Drop this process's cached model (the main process does not need it when workers do the work)."""
        _LOADED.pop(self._key(), None)

    def __call__(self, job: Job) -> dict:
        model = self.load()
        data = model.transform({"image": job.item["image"]})
        feats = model.embed(data["image"], self.batch_size)
        return write_slice_bag(job.outputs["output"], feats, data, model.axis, model.sha256, source=job.source)

    def describe(self, job: Job) -> dict:
        from medvol.mil import read_bag

        bag = read_bag(job.outputs["output"], load_features=False)
        row = {"spacing": bag.spacing, "n_slices": bag.n_slices, "dim": bag.dim}
        shape = (self.previous.get(job.source) or {}).get("shape")
        return {**row, "shape": shape} if shape else row
