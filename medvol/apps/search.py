"""``medvol search``: turn a query (scan, embedding file, text) into a vector, and the self-contained results page.

The page (:func:`render_results_page`) is one HTML file with everything inlined (PNG slices as data URIs, CSS, a
few lines of script that count the images that decoded): a red bar above the query, a blue bar above each
neighbour, the axial / coronal / sagittal mid slices of its source volume (RAS, radiological display as in the QC
pictures) and a metadata table. A volume that cannot be read shows a grey box saying why, never a broken page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError, DataError, one_line
from medvol.io.atomic import atomic_write_text

__all__ = ["Query", "resolve_query", "mid_slices", "render_results_page", "write_results_page", "QUERY_COLOUR",
           "NEIGHBOUR_COLOUR"]

QUERY_COLOUR, NEIGHBOUR_COLOUR = "#d62728", "#1f77b4"
_VIEW_WIDTH = 150  # CSS pixels per slice picture
_PLANES = ("axial", "coronal", "sagittal")


@dataclass
class Query:
    """A resolved query: the vector, what it was, and the volume to show for it (if any)."""

    vector: np.ndarray
    kind: str  # "scan", "embedding" or "text"
    label: str
    source: str = ""
    file: str = ""
    meta: dict = field(default_factory=dict)


def _looks_like_path(text: str) -> bool:
    from medvol.io.readers import volume_suffix
    from medvol.search.vectors import EMBEDDING_SUFFIXES

    return (os.sep in text or text.lower().endswith(EMBEDDING_SUFFIXES) or volume_suffix(text) is not None
            or text.startswith("."))


def resolve_query(query: str, meta: Mapping, bundle: str | None = None, checkpoint: str | None = None,
                  overrides: Mapping | None = None, device: str = "cpu") -> Query:
    """The vector of ``query``: an embedding file (pooled like the index's), a scan (embedded with the index's
    bundle and checkpoint, or ``bundle``/``checkpoint``), or a text string (needs the index's text encoder).

    Raises:
        ConfigError: a missing file, a scan without a recorded or given embedder, a checkpoint other than the
            index's, a text query on an index without a text encoder.
        DataError: an unreadable embedding file or scan (the message names it).
    """
    from medvol.search.vectors import EMBEDDING_SUFFIXES, read_embedding

    path = Path(query)
    if not path.exists():
        if _looks_like_path(query):
            raise ConfigError(f"query {query} does not exist (a file or folder was expected)")
        return _text_query(query, meta)
    if path.is_file() and path.name.lower().endswith(EMBEDDING_SUFFIXES):
        rec = read_embedding(path, meta["pooling"])
        return Query(rec.vector, "embedding", f"embedding {path.name}", rec.source, str(path),
                     {"case_id": rec.case_id, "file": str(path), "source": rec.source or "(not recorded)",
                      "rows pooled": rec.n_rows, "dim": rec.dim})
    return _scan_query(path, meta, bundle, checkpoint, overrides, device)


def _text_query(text: str, meta: Mapping) -> Query:
    encoder = meta.get("text_encoder")
    if not encoder:
        raise ConfigError(f"query {text!r} is not a file, and this index has no text encoder: query with a scan or "
                          "an embedding file (text queries need an index of image-report (LoVT) embeddings)")
    raise ConfigError(f"this index names a text encoder ({json.dumps(encoder)[:200]}) but this medvol cannot load "
                      "text encoders yet")


def _scan_query(path: Path, meta: Mapping, bundle, checkpoint, overrides, device) -> Query:
    from medvol.engines.embedding import default_checkpoint, load_embedding_model
    from medvol.search.vectors import pool_rows

    embedder = dict(meta.get("embedder") or {})
    bundle = bundle or embedder.get("bundle")
    if not bundle:
        raise ConfigError(f"query {path} is a scan, but the index records no bundle to embed it with: pass "
                          "--bundle and --checkpoint (those the indexed embeddings were made with), or query with "
                          "an embedding file")
    if overrides is None:
        overrides = embedder.get("overrides") or {}
    checkpoint = checkpoint or embedder.get("checkpoint") or default_checkpoint(bundle, overrides)
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint {checkpoint} to embed the query with does not exist")
    model = load_embedding_model(bundle, checkpoint, overrides, device)
    expected = meta.get("checkpoint_sha256") or ""
    if expected and model.sha256 != expected:
        raise ConfigError(f"checkpoint {checkpoint} (sha256 {model.sha256[:12]}...) is not the one the index's "
                          f"embeddings were made with ({expected[:12]}...)")
    try:
        data = model.transform({"image": str(path)})
    except Exception as e:  # MONAI's Compose wraps the reader's DataError
        from medvol.errors import find_error

        err = find_error(e, DataError)
        raise (err if err is not None else DataError(path, f"cannot be embedded ({one_line(e)[:300]})")) from None
    feats = model.embed(data["image"], 64).numpy()
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(path, "no slice to embed (check skip_empty_threshold)")
    vector = pool_rows(feats, meta["pooling"])
    return Query(vector, "scan", f"scan {path.name}", str(path), str(path),
                 {"source": str(path), "slices embedded": int(feats.shape[0]), "dim": int(feats.shape[1]),
                  "bundle": str(bundle), "checkpoint": str(checkpoint)})


def mid_slices(source: str | os.PathLike) -> tuple[list[np.ndarray], list[float]]:
    """Axial, coronal and sagittal mid slices (RAS, radiological display) of a volume and their aspect ratios.

    Raises:
        DataError: the volume cannot be read (the message names it).
    """
    import torch
    from monai.transforms import Orientation

    from medvol.apps.qc import _views
    from medvol.io.readers import LoadVolume

    image = LoadVolume(ensure_channel_first=True)(str(source))
    image = Orientation(axcodes="RAS", labels=None)(image)
    volume = np.asarray(image[0].detach().cpu().float() if isinstance(image, torch.Tensor) else image[0])
    spacing = [float(s) for s in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)]
    sx, sy, sz = spacing
    # display height / width of each view (rows run along y, z, z; columns along x, x, y)
    aspects = [sy / sx, sz / sx, sz / sy]
    return _views(volume), aspects


def _png_data_uri(view: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    finite = view[np.isfinite(view)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    buf = io.BytesIO()
    mpimg.imsave(buf, np.nan_to_num(view), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _views_html(source: str) -> str:
    if not source:
        return '<div class="missing">no source volume recorded for this embedding</div>'
    try:
        views, aspects = mid_slices(source)
    except Exception as e:  # noqa: BLE001 - any unreadable volume: say why on the page, keep the rest
        err = e if isinstance(e, DataError) else None
        if err is None:
            from medvol.errors import find_error

            err = find_error(e, DataError) or e
        return f'<div class="missing">source volume not shown: {html.escape(one_line(err)[:300])}</div>'
    parts = []
    for plane, view, aspect in zip(_PLANES, views, aspects):
        rows, cols = view.shape
        height = max(1, round(_VIEW_WIDTH * rows * aspect / max(cols, 1)))
        parts.append(f'<figure><img class="view" data-plane="{plane}" alt="{plane} mid slice" width="{_VIEW_WIDTH}" '
                     f'height="{height}" src="{_png_data_uri(view)}"><figcaption>{plane}</figcaption></figure>')
    return "".join(parts)


def _table(rows: Mapping) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f'<table class="meta">{cells}</table>'


_CSS = f"""
body {{ margin: 0; padding: 8px; background: #ffffff; font: 13px/1.35 sans-serif; color: #222; }}
h1 {{ font-size: 18px; margin: 4px 0 8px 0; }}
.case {{ border: 1px solid #bbb; margin: 0 0 10px 0; background: #fafafa; }}
.bar {{ height: 24px; line-height: 24px; color: #fff; font-weight: bold; padding-left: 48px; white-space: nowrap;
        overflow: hidden; }}
.query .bar {{ background: {QUERY_COLOUR}; }}
.neighbour .bar {{ background: {NEIGHBOUR_COLOUR}; }}
.body {{ display: flex; gap: 12px; padding: 6px; align-items: flex-start; }}
.views {{ display: flex; gap: 6px; min-width: {3 * _VIEW_WIDTH + 12}px; }}
figure {{ margin: 0; text-align: center; }}
img.view {{ display: block; background: #000; image-rendering: pixelated; }}
figcaption {{ font-size: 11px; color: #555; }}
.missing {{ width: {3 * _VIEW_WIDTH + 12}px; height: 60px; background: #ddd; color: #333; padding: 6px;
            box-sizing: border-box; }}
table.meta {{ border-collapse: collapse; }}
table.meta th {{ text-align: left; padding: 1px 8px 1px 0; color: #555; font-weight: normal; }}
table.meta td {{ font-family: monospace; word-break: break-all; }}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.view'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
});
"""


def render_results_page(query: Query, results: Sequence[Mapping], index_meta: Mapping, title: str | None = None) -> str:
    """The HTML of the results page: ``results`` are dicts with ``rank``, ``distance``, ``id`` and ``item``."""
    metric = index_meta.get("metric", "")
    what = "1 - cosine similarity" if metric == "cosine" else "squared L2 distance"
    head = (f"<h1>{html.escape(title or 'medvol similar-case search')}</h1>"
            f"<p>{len(results)} nearest of {index_meta.get('n', '?')} indexed volumes "
            f"({html.escape(str(index_meta.get('kind', '')))} index, distance: {what}).</p>")
    sections = [f'<section class="case query" id="query"><div class="bar">query: {html.escape(query.label)}</div>'
                f'<div class="body"><div class="views">{_views_html(query.source)}</div>{_table(query.meta)}</div>'
                "</section>"]
    for r in results:
        item = r["item"]
        meta = {"distance": f"{r['distance']:.4f}", "id": r["id"], "case_id": item.get("case_id", ""),
                "source": item.get("source") or "(not recorded)", "embedding file": item.get("file", ""),
                "slices / rows": item.get("n_rows", ""), "spacing": "x".join(f"{s:g}" for s in item.get("spacing", []))}
        sections.append(
            f'<section class="case neighbour" id="n{r["rank"]}" data-rank="{r["rank"]}" data-id="{r["id"]}">'
            f'<div class="bar">#{r["rank"]} {html.escape(str(item.get("case_id", "")))} '
            f'(distance {r["distance"]:.4f})</div><div class="body"><div class="views">'
            f'{_views_html(item.get("source", ""))}</div>{_table(meta)}</div></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title or 'medvol search')}</title><style>{_CSS}</style>"
            f"<script>{_SCRIPT}</script></head><body>{head}{''.join(sections)}</body></html>\n")


def write_results_page(path: str | os.PathLike, query: Query, results: Sequence[Mapping], index_meta: Mapping,
                       title: str | None = None) -> Path:
    """Write :func:`render_results_page` to ``path`` atomically."""
    return atomic_write_text(path, render_results_page(query, results, index_meta, title))
