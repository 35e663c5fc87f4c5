"""Applying MIL networks to bags: per-bag outputs and attention, and the fold-model ensemble of a CV run."""

from __future__ import annotations

import functools
import json
import logging
import pydoc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medvol.errors import ConfigError
from medvol.mil.data import BagDataset, collate_bags
from medvol.mil.report import plot_top_attended, prediction_header, prediction_values, write_attention_csv, write_csv
from medvol.mil.targets import MILTaskLoss, TargetSpec
from medvol.networks.mil import build_mil_network

__all__ = ["network_factory", "predict_bags", "MILPredictor"]

logger = logging.getLogger(__name__)


def network_factory(network_def) -> Callable[..., nn.Module]:
    """A callable that builds a fresh MIL network per fold from a bundle's ``network_def`` (or ABMIL).

    ``network_def`` is a callable ``f(in_dim=, n_outputs=)``, a dict of :func:`build_mil_network` arguments,
    ``None`` (ABMIL), or a network made by :func:`build_mil_network` (the bundle's ``network_def``): its
    architecture is rebuilt, with fresh weights and the data's ``in_dim`` / ``n_outputs``, for every fold.
    """
    if isinstance(network_def, nn.Module) and isinstance(getattr(network_def, "build_kwargs", None), dict):
        return functools.partial(build_mil_network, **network_def.build_kwargs)
    if network_def is None:
        return functools.partial(build_mil_network, pooling="abmil")
    if isinstance(network_def, Mapping):
        kwargs = {k: v for k, v in network_def.items() if k != "_target_"}
        target = network_def.get("_target_", "medvol.networks.mil.build_mil_network")
        func = pydoc.locate(target)
        if func is None:
            raise ConfigError(f"network_def _target_ {target!r} cannot be imported")
        return functools.partial(func, **kwargs)
    if isinstance(network_def, nn.Module) or not callable(network_def):
        raise ConfigError("network_def must build a fresh network per fold: give a callable (in a bundle config "
                          "add \"_mode_\": \"callable\"), a dict of build_mil_network arguments or a network "
                          "made by build_mil_network, not another network")
    return network_def


@torch.no_grad()
def predict_bags(model: nn.Module, loader: DataLoader, loss_fn: MILTaskLoss, device: str | torch.device = "cpu"):
    """Outputs (probabilities / un-standardised values) and attention for every bag of ``loader``.

    Returns:
        ``(ids, outputs (n, n_outputs) array, attention list of (n_slices,) arrays, slice_index list)``;
        attention entries are ``None`` for a model without ``forward_with_attention``.
    """
    model.eval()
    ids, outputs, attention, index = [], [], [], []
    for batch in loader:
        feats, mask = batch["feats"].to(device), batch["mask"].to(device)
        if hasattr(model, "forward_with_attention"):
            logits, att = model.forward_with_attention(feats, mask)
        else:
            logits, att = model(feats, mask), None
        outputs.append(loss_fn.outputs(logits).cpu().double().numpy())
        for b, case in enumerate(batch["id"]):
            real = batch["mask"][b].numpy()
            ids.append(case)
            index.append(batch["slice_index"][b].numpy()[real])
            attention.append(None if att is None else att[b].cpu().double().numpy()[real])
    return ids, np.concatenate(outputs), attention, index


class MILPredictor:
    """Apply the fold models of a :class:`CrossValidator` run to every bag of a folder (ensemble = mean).

    Writes ``predictions.csv`` (id, n_models, then outputs as in the run's predictions without truth columns),
    ``attention/<case>.csv`` (attention averaged over the models) and ``attention_top_slices.png``.

    Args:
        model_dir: the cross-validation ``output_dir`` (with ``run.json`` and ``folds/fold_k/model.pt``).
        dataset_dir: folder of bag files to predict.
        output_dir: where the outputs go.
        folds: fold numbers to ensemble; ``None``: every fold with a ``model.pt``.
        network_def: as in :class:`CrossValidator`; ``None`` rebuilds the network recorded in ``run.json``.
        id_regex: as in :class:`CrossValidator`; ``None`` uses the run's.
        device / batch_size / plot_cases / top_k: as in :class:`CrossValidator`.

    Raises:
        ConfigError: without ``run.json`` or fold models, or when the run did not record its network and no
            ``network_def`` is given.
        DataError: for a bag whose D differs from the trained models' input size (naming the file).
    """

    def __init__(self, model_dir, dataset_dir, output_dir, folds: Sequence[int] | None = None, network_def=None,
                 id_regex: str | None = None, device: str | torch.device = "cpu", batch_size: int = 16,
                 plot_cases: int = 4, top_k: int = 3) -> None:
        self.model_dir, self.dataset_dir, self.output_dir = Path(model_dir), Path(dataset_dir), Path(output_dir)
        self.folds, self.network_def, self.id_regex = folds, network_def, id_regex
        self.device, self.batch_size, self.plot_cases, self.top_k = device, int(batch_size), plot_cases, top_k

    def run(self) -> dict:
        """Predict every bag; returns ``{"n_cases", "folds", "predictions"}`` (the CSV path)."""
        run_json = self.model_dir / "run.json"
        if not run_json.is_file():
            raise ConfigError(f"{run_json} not found: model_dir must be a cross-validation output_dir")
        run = json.loads(run_json.read_text(encoding="utf-8"))
        spec = TargetSpec.from_dict(run["target_spec"])
        network_def = self.network_def if self.network_def is not None else run.get("network")
        if network_def is None:
            raise ConfigError(f"{run_json} records no importable network: pass network_def")
        factory = network_factory(network_def)
        folds = list(self.folds) if self.folds is not None else sorted(
            int(p.parent.name.split("_")[1]) for p in self.model_dir.glob("folds/fold_*/model.pt"))
        if not folds:
            raise ConfigError(f"no fold model (folds/fold_k/model.pt) in {self.model_dir}")
        regex = self.id_regex if self.id_regex is not None else run.get("id_regex")
        dataset = BagDataset(self.dataset_dir, None, regex, in_dim=int(run["in_dim"]))
        loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_bags)
        outputs, attention = 0.0, None
        for k in folds:
            fold_dir = self.model_dir / "folds" / f"fold_{k}"
            state = json.loads((fold_dir / "fold.json").read_text(encoding="utf-8"))["loss_state"]
            model = factory(in_dim=int(run["in_dim"]), n_outputs=int(run["n_outputs"]))
            model.load_state_dict(torch.load(fold_dir / "model.pt", map_location="cpu", weights_only=True))
            ids, out, att, index = predict_bags(model.to(self.device), loader,
                                                MILTaskLoss(spec, state=state).to(self.device), self.device)
            outputs = outputs + out / len(folds)
            if att[0] is not None:
                attention = [a / len(folds) + (0 if attention is None else attention[i]) for i, a in enumerate(att)]
        out_dir = self.output_dir
        rows = [[case, len(folds)] + prediction_values(spec, outputs[i]) for i, case in enumerate(ids)]
        path = write_csv(out_dir / "predictions.csv", ["id", "n_models"] + prediction_header(spec, False), rows)
        cases = []
        if attention is not None:
            for i, case in enumerate(ids):
                write_attention_csv(out_dir / "attention" / f"{case}.csv", index[i], attention[i])
                cases.append({"id": case, "slice_index": index[i], "attention": attention[i], "bag": dataset.bags[i],
                              "score": float(outputs[i][0]), "title": f"{case} (output {outputs[i][0]:.3g})"})
            plot_top_attended(cases, out_dir / "attention_top_slices.png", self.plot_cases, self.top_k)
        logger.info("predicted %d cases with %d fold model(s) -> %s", len(ids), len(folds), path)
        return {"n_cases": len(ids), "folds": folds, "predictions": str(path)}
