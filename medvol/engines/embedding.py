"""Embedding inference of ``medvol embed``: a bundle's encoder over the 2.5D slices of each volume.

The bundle's ``configs/inference.json`` defines everything: ``preprocessing`` (load, orient, normalise),
``slicing`` (:class:`~medvol.transforms.RecordSourceGridd` then :class:`~medvol.transforms.VolumeToSlicesd`:
2.5D samples ``(n_slices, C, H, W)``), ``network_def`` (the encoder ``(B, C, H, W) -> (B, D)``) and ``axis``.
The bundle's own evaluator (:class:`SliceStackInferer` + :class:`~medvol.transforms.SaveBagd`) and the batch
processor here (:class:`EmbedProcessor`, run by :func:`medvol.engines.batch.run_batch`) share these ids,
:func:`embed_stack` and :func:`medvol.io.bags.write_slice_bag`, so both write the same bags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.inferers import Inferer

from medvol.engines.batch import Job, is_inside
from medvol.errors import ConfigError, DataError, MedvolError, find_error, one_line
from medvol.io.bags import bag_filename, file_sha256, read_bag, write_slice_bag
from medvol.io.checkpoint import read_checkpoint
from medvol.io.dicom import is_series_uid, split_series_ref

__all__ = [
    "SliceStackInferer",
    "embed_stack",
    "build_embed_jobs",
    "default_checkpoint",
    "EmbeddingModel",
    "load_embedding_model",
    "EmbedProcessor",
]


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


def _bag_path(source: str, output_dir: Path) -> Path:
    _, uid = split_series_ref(source)
    if uid is not None and not is_series_uid(uid):
        raise DataError(source, f"'{uid}' after '#' is not a DICOM Series Instance UID (digits and dots)")
    path = Path(output_dir) / bag_filename(source)
    if not is_inside(path, output_dir) or path.parent != Path(output_dir):
        raise DataError(source, f"its bag {path} would not lie directly in {output_dir}")
    return path


def build_embed_jobs(datalist: list[dict], output_dir: Path) -> list[Job]:
    """One job per image; images whose bag names collide are failed up front (both files named), and so are
    images whose bag name cannot be formed or would leave ``output_dir`` (e.g. a CSV row ``folder#../../x``)."""
    jobs, owners = [], {}
    for item in datalist:
        try:
            path = _bag_path(item["image"], Path(output_dir))
        except Exception as e:  # noqa: BLE001 - one odd entry fails alone; the run goes on
            error = str(e) if isinstance(e, DataError) else f"{item['image']}: {type(e).__name__}: {one_line(e)}"
            jobs.append(Job(source=item["image"], item={"image": item["image"]}, error=error))
            continue
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
        state = read_checkpoint(checkpoint, mapping=False)
    except DataError as e:
        raise ConfigError(f"checkpoint {e}") from None
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

    def verify(self, job: Job) -> None:
        """Read the existing bag back completely (features included); raises DataError if it is damaged."""
        read_bag(job.outputs["output"], load_features=True)

    def describe(self, job: Job) -> dict:
        bag = read_bag(job.outputs["output"], load_features=False)
        row = {"spacing": bag.spacing, "n_slices": bag.n_slices, "dim": bag.dim}
        shape = (self.previous.get(job.source) or {}).get("shape")
        return {**row, "shape": shape} if shape else row
