"""Draw docs/images/layers.png: medvol's floors and the imports between sub-packages (from the real imports).

    python scripts/layers_diagram.py [OUTPUT_PNG]

The floors and the import graph come from tests/test_layers.py, so the picture shows what the test enforces.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTES = {
    "errors": "DataError, ConfigError",
    "io": "readers, datalists, splits,\nbags, atomic writes, manifests",
    "networks": "UNet3D, SwinUNETR, heads,\nmomentum, MIL pooling",
    "losses": "InfoNCE, MoCo, local,\nrestoration, swapped",
    "bundles": "shipped bundles by name,\nexport, demo data",
    "transforms": "presets, N4, views,\nslices, writers",
    "engines": "SSL trainer, handlers,\nbatch runner, embedding",
    "cluster": "k-means, Sinkhorn,\npseudo-labels",
    "mil": "bags dataset, MIL\ncross-validation",
    "methods": "14 pretext tasks: contrastive,\nclustering, restoration, masked, LoVT",
    "search": "FAISS similar-case\nindex, id map",
    "evaluation": "k-NN / linear probes,\nvoxel baseline",
    "apps": "medvol CLI: preprocess, embed, index, search, probe, bundle, demo, monailabel-app",
}


def load_layers():
    spec = importlib.util.spec_from_file_location("test_layers", ROOT / "tests" / "test_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(out: str | None = None) -> Path:
    layers = load_layers()
    floors = defaultdict(list)
    for name, level in layers.FLOORS.items():
        floors[level].append(name)
    edges = set()
    for module, imports in layers.graph().items():
        src = module.split(".")[1] if "." in module else None
        for target in imports:
            dst = target.split(".")[1] if "." in target else None
            if src in layers.FLOORS and dst in layers.FLOORS and src != dst:
                edges.add((src, dst))
    fig, ax = plt.subplots(figsize=(11, 6.5))
    pos = {}
    for level, names in floors.items():
        for i, name in enumerate(names):
            x = (i + 0.5) / len(names)
            pos[name] = (x, level)
            w = 0.8 / len(names)
            ax.add_patch(FancyBboxPatch((x - w / 2, level - 0.3), w, 0.6, boxstyle="round,pad=0.01",
                                        fc=plt.cm.Blues(0.25 + 0.15 * level), ec="black"))
            ax.text(x, level + 0.1, name, ha="center", va="center", fontsize=12, weight="bold")
            ax.text(x, level - 0.14, NOTES.get(name, ""), ha="center", va="center", fontsize=7.5)
    for src, dst in sorted(edges):
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        if y0 == y1:  # same floor: an arc above the boxes, in another colour
            ax.add_patch(FancyArrowPatch((x0, y0 + 0.3), (x1, y1 + 0.3), arrowstyle="-|>", mutation_scale=9,
                                         color="tab:orange", lw=0.9,
                                         connectionstyle=f"arc3,rad={-0.3 if x1 > x0 else 0.3}"))
            continue
        ax.add_patch(FancyArrowPatch((x0, y0 - 0.3), (x1, y1 + 0.3), arrowstyle="-|>", mutation_scale=9,
                                     color="0.45", lw=0.7, connectionstyle="arc3,rad=0.05"))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, max(floors) + 0.5)
    ax.axis("off")
    ax.set_title("medvol floors: grey arrows import downwards, orange ones within a floor (no circles); "
                 "checked by tests/test_layers.py", fontsize=10)
    path = Path(out) if out else ROOT / "docs" / "images" / "layers.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path} ({len(edges)} sub-package imports)")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:])
