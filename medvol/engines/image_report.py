"""Inference of an image-report model: image, sentence and report embeddings to HDF5, attention pictures.

:func:`image_report_inference` (what bundles/lovt/configs/inference.json runs) loads ``models/model.pt`` into an
:class:`~medvol.networks.ImageReportModel` and writes ``embeddings.h5`` atomically:

- ``image`` (N, D): L2-normalised global image embeddings; ``report`` (N, D): global report embeddings;
- ``sentence`` (M, D): every sentence's local embedding (encoded within its report; the global projection of
  the sentence alone for global-only models), ``sentence_item`` (M,) the row it belongs to, ``sentence_text``;
- ``image_path``, ``report_text`` (N,) strings; attribute ``dim``.

For the first ``attention_items`` items with a local model it draws per-sentence attention maps over the image
(``attention/<case>.png`` and the TensorBoard image ``attention/<case>``). An item that cannot be read is
skipped and listed in ``failures.json`` (file and one-line reason); the others are written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvol.engines.config import require_file
from medvol.errors import DataError, find_error, one_line
from medvol.io.atomic import atomic_path, atomic_write_text
from medvol.io.checkpoint import read_checkpoint

__all__ = ["image_report_inference", "attention_figure"]

logger = logging.getLogger("medvol.engines")


def attention_figure(image: np.ndarray, maps: np.ndarray, sentences: Sequence[str], title: str = ""):
    """A matplotlib figure: the image, then one panel per sentence with its attention map overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    n = len(sentences) + 1
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image, cmap="gray")
    axes.flat[0].set_title(textwrap.shorten(title, 40) or "image", fontsize=8)
    for ax, m, s in zip(list(axes.flat)[1:], maps, sentences):
        ax.imshow(image, cmap="gray")
        ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title("\n".join(textwrap.wrap(s, 38)[:3]), fontsize=7)
    fig.tight_layout()
    return fig


def _middle_slice(x: np.ndarray) -> np.ndarray:
    return x if x.ndim == 2 else x[..., x.shape[-1] // 2]


@torch.no_grad()
def image_report_inference(model, datalist: Sequence[dict], preprocessing: Callable, checkpoint: str | os.PathLike,
                           output_dir: str | os.PathLike, device: str | torch.device = "cpu",
                           attention_items: int = 8, tensorboard: bool = True) -> dict:
    """Write ``embeddings.h5`` (+ attention PNGs / TensorBoard images) for ``datalist`` (see the module docstring).

    Args:
        model: an :class:`~medvol.networks.ImageReportModel` built as for training.
        datalist: items of :func:`medvol.io.reports.image_report_datalist` (``image``, ``sentences``).
        preprocessing: the deterministic image transform of training (dict in, dict out).
        checkpoint: ``models/model.pt`` of the training run.
        output_dir: destination folder.
        attention_items: draw attention pictures for this many items (0: none).
        tensorboard: also log the pictures to ``output_dir/tensorboard``.

    Returns:
        ``{"written": n, "failed": [...], "path": str}``.

    Raises:
        ConfigError: when ``checkpoint`` does not exist.
    """
    import h5py

    device = torch.device(device)
    state = read_checkpoint(require_file(checkpoint, "ckpt_path"))
    model.load_state_dict(state)
    model.to(device).eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    if tensorboard and attention_items and model.has_local:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    images, reports, sentences, sentence_item, sentence_text, paths, texts, failed = [], [], [], [], [], [], [], []
    for item in datalist:
        try:
            x = preprocessing({"image": item["image"]})["image"]
            x = torch.as_tensor(x).float()[None].to(device)
            sents = list(item["sentences"])
            img = F.normalize(model.encode_image(x).global_, dim=1)
            rep = model.encode_report([sents])
            if model.has_local:
                loc = F.normalize(rep.local[0, : len(sents)], dim=1)
            else:
                loc = F.normalize(model.encode_report([[s] for s in sents]).global_, dim=1)
        except Exception as e:  # one bad item never stops the run
            err = find_error(e, DataError) or e
            failed.append({"image": str(item.get("image")), "error": one_line(err)})
            logger.warning(f"skipped {item.get('image')}: {one_line(err)}")
            continue
        row = len(paths)
        images.append(img[0].cpu())
        reports.append(F.normalize(rep.global_, dim=1)[0].cpu())
        sentences += list(loc.cpu())
        sentence_item += [row] * len(sents)
        sentence_text += sents
        paths.append(str(item["image"]))
        texts.append(str(item.get("report_text", "\n".join(sents))))
        if row < attention_items and model.has_local:
            maps, _ = model.sentence_attention(x, [sents])
            pic = _middle_slice(x[0, 0].cpu().numpy())
            mp = np.stack([_middle_slice(m) for m in maps[0, : len(sents)].cpu().numpy()])
            fig = attention_figure(pic, mp, sents, Path(paths[-1]).name)
            case = Path(paths[-1]).name.split(".")[0]
            (out / "attention").mkdir(exist_ok=True)
            with atomic_path(out / "attention" / f"{case}.png") as tmp:
                fig.savefig(tmp, dpi=90, format="png")
            if writer is not None:
                writer.add_figure(f"attention/{case}", fig, close=False)
            import matplotlib.pyplot as plt

            plt.close(fig)
    if writer is not None:
        writer.close()
    path = out / "embeddings.h5"
    if paths:
        strings = h5py.string_dtype("utf-8")
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("image", data=torch.stack(images).numpy())
                f.create_dataset("report", data=torch.stack(reports).numpy())
                f.create_dataset("sentence", data=torch.stack(sentences).numpy())
                f.create_dataset("sentence_item", data=np.asarray(sentence_item, dtype=np.int64))
                f.create_dataset("sentence_text", data=np.asarray(sentence_text, dtype=object), dtype=strings)
                f.create_dataset("image_path", data=np.asarray(paths, dtype=object), dtype=strings)
                f.create_dataset("report_text", data=np.asarray(texts, dtype=object), dtype=strings)
                f.attrs["dim"] = int(images[0].numel())
    atomic_write_text(out / "failures.json", json.dumps(failed, indent=1) + "\n")
    logger.info(f"wrote {len(paths)} image-report embeddings to {path}" + (f", {len(failed)} failed" if failed else ""))
    return {"written": len(paths), "failed": failed, "path": str(path)}
