"""Evaluation reports written by handlers: per-volume, per-class Dice as CSV and a JSON summary."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from medvol.io.atomic import atomic_write_text
from medvol.io.datalist import case_name

__all__ = ["dice_per_class", "DiceReport"]


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes 1..num_classes-1 between two label maps (any shape, integer-valued).

    A class absent from both maps gives NaN (it is left out of means), absent from one gives 0.
    """
    pred, label = torch.as_tensor(pred).round().long(), torch.as_tensor(label).round().long()
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        denom = int(p.sum()) + int(g.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


class DiceReport:
    """Collect per-class Dice of every evaluated volume; write ``dice_per_volume.csv`` and ``dice_summary.json``.

    Attach to a MONAI ``SupervisedEvaluator`` whose postprocessing turns ``pred`` into a label map (argmax,
    one channel). Files are written atomically in ``output_dir`` when the evaluation completes.

    Args:
        output_dir: destination folder.
        class_names: names of classes 1..K-1 (background excluded), e.g. ``["anterior", "posterior"]``.
        pred_key, label_key: keys of the decollated output items.
        prefix: file name prefix (``"dice"``).
    """

    def __init__(self, output_dir: str | os.PathLike, class_names, pred_key: str = "pred", label_key: str = "label",
                 prefix: str = "dice"):
        self.output_dir, self.class_names = Path(output_dir), [str(c) for c in class_names]
        self.pred_key, self.label_key, self.prefix = pred_key, label_key, prefix
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            label = item[self.label_key]
            source = str(label.meta.get("filename_or_obj", "")) if isinstance(label, MetaTensor) else ""
            scores = dice_per_class(item[self.pred_key], label, len(self.class_names) + 1)
            row = {"case": case_name(source) if source else f"case_{len(self.rows)}"}
            row.update({name: score for name, score in zip(self.class_names, scores)})
            row["mean"] = _nanmean(scores)
            self.rows.append(row)

    def summary(self) -> dict:
        """Mean and std over volumes of every class and of the per-volume mean (NaN entries left out)."""

        def stats(name: str) -> dict:
            values = [r[name] for r in self.rows if not math.isnan(r[name])]
            return {"mean": float(np.mean(values)) if values else float("nan"),
                    "std": float(np.std(values)) if values else float("nan"), "n": len(values)}

        return {"n_volumes": len(self.rows), "mean_dice": stats("mean"),
                "classes": {name: stats(name) for name in self.class_names}}

    def write(self, engine: Engine | None = None) -> dict:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["case", *self.class_names, "mean"], lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.output_dir / f"{self.prefix}_per_volume.csv", buf.getvalue())
        summary = self.summary()
        atomic_write_text(self.output_dir / f"{self.prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
