"""Picture of the IXI parcellation benchmark's coarse label set (benchmarks/labels/ixi_dlmuse_coarse.json) on one
test volume: three orthogonal mid slices of the T1 with the 16 structures overlaid.

    MEDVOL_DATA=../shared/data python benchmarks/ixi_labels_figure.py docs/images/ixi_coarse_labels.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("MEDVOL_DATA", REPO.parent / "shared" / "data")) / "ixi_t1")
    parser.add_argument("--case", default=None, help="default: the first test case of the split")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    spec = json.loads((REPO / "benchmarks" / "labels" / "ixi_dlmuse_coarse.json").read_text(encoding="utf-8"))
    case = args.case or json.loads((REPO / "benchmarks" / "splits" / "ixi_parcellation.json").read_text(
        encoding="utf-8"))["test"][0]
    image = np.asarray(nib.load(args.data / "t1" / f"{case}_T1.nii.gz").get_fdata(), dtype=np.float32)
    seg = np.asarray(nib.load(args.data / "dlmuse_seg" / f"{case}_T1_DLMUSE.nii.gz").dataobj)
    coarse = np.zeros(seg.shape, np.uint8)
    for k, c in enumerate(spec["classes"], start=1):
        coarse[np.isin(seg, c["muse"])] = k
    order = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]  # dark shades first
    colors = plt.get_cmap("tab20").colors
    colors = [colors[i] for i in order[: len(spec["classes"])]]
    cmap = ListedColormap(colors)
    centre = [int(np.mean(index)) for index in np.nonzero(coarse)]  # one pass over the volume, not three
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    for a, ax in enumerate(axes):
        img = np.take(image, centre[a], axis=a)
        lab = np.take(coarse, centre[a], axis=a).astype(float)
        lab[lab == 0] = np.nan
        ax.imshow(np.rot90(img), cmap="gray")
        ax.imshow(np.rot90(lab) - 1, cmap=cmap, vmin=0, vmax=len(spec["classes"]) - 1, alpha=0.55,
                  interpolation="nearest")
        ax.set_axis_off()
    handles = [Patch(color=colors[k], label=c["name"].replace("_", " ")) for k, c in enumerate(spec["classes"])]
    fig.legend(handles=handles, loc="lower center", ncol=8, fontsize=7, frameon=False)
    fig.suptitle(f"IXI coarse labels (automatic DLMUSE, grouped): {case}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(args.output)


if __name__ == "__main__":
    main()
