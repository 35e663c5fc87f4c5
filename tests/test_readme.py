"""The README's "Use it on your scans" commands run as written, in order, from a fresh checkout's root.

The ```bash blocks of that section are read from README.md (the test fails if the section or its blocks are
missing) and run one by one with bash in a temporary folder laid out like the repository root: ``demo_data`` and
``bundles`` are symbolic links to the repository's, outputs go to the folder's own ``runs/``. ``. .venv/bin/activate``
is replaced by putting this interpreter's bin folder (which has ``medvol``) first on ``PATH``.

To keep the test to a couple of minutes, each command gets small settings, added to what the README says
(nothing else is changed):

- every training command (``monai.bundle run`` of a bundle's ``train.json`` alone): ``--max_epochs 1`` (replacing
  the README's value when it gives one) and ``TRAIN_SMALL[bundle]``;
- every command of a bundle (training, evaluation, inference overlays): ``NETWORK_SMALL[bundle]``, so that
  training, evaluation and inference build the same (small) network;
- ``medvol embed``: ``--set`` of LeCL's ``NETWORK_SMALL`` values, which the checkpoint was trained with.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
SECTION = "Use it on your scans"
ACTIVATE = ". .venv/bin/activate"
TINY_UNET = "{'unet': {'channels': [8, 16, 32, 64], 'norm': 'instance'}}"
NETWORK_SMALL = {
    "caid": {"backbone_options": TINY_UNET},
    "fewshot_segmentation": {"backbone_options": TINY_UNET},
    "lecl_slice_embedding": {"spatial_size": "32",
                             "encoder_options": "{'mambaout': {'dims': [8, 16], 'depths': [1, 1]}}"},
}
TRAIN_SMALL = {
    "caid": {"batch_size": "4"},
    "fewshot_segmentation": {"iterations_per_epoch": "2"},
    "lecl_slice_embedding": {"batch_size": "8", "samples_per_volume": "2", "method#proj_dim": "16",
                             "method#hidden_dim": "32", "method#pred_hidden_dim": "32"},
}
EMBED_SET = {"spatial_size": "32", "encoder_options": '{"mambaout": {"dims": [8, 16], "depths": [1, 1]}}'}


def readme_commands(text: str) -> list[str]:
    """The commands of the section's ```bash blocks, in order (continuation lines joined, comments dropped)."""
    match = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {SECTION}' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert blocks, f"the '{SECTION}' section of README.md has no ```bash code blocks"
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" # ")[0].strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def _option(args: list[str], key: str) -> str | None:
    return args[args.index(f"--{key}") + 1] if f"--{key}" in args else None


def _set(args: list[str], key: str, value: str) -> None:
    if f"--{key}" in args:
        args[args.index(f"--{key}") + 1] = value
    else:
        args += [f"--{key}", value]


def small(command: str) -> str:
    """``command`` with the test's small settings (see the module docstring)."""
    args = shlex.split(command)
    if args[:4] == ["python", "-m", "monai.bundle", "run"]:
        bundle = Path(_option(args, "bundle_root")).name
        for key, value in NETWORK_SMALL.get(bundle, {}).items():
            _set(args, key, value)
        if _option(args, "config_file").endswith("/train.json"):
            for key, value in {"max_epochs": "1", **TRAIN_SMALL.get(bundle, {})}.items():
                _set(args, key, value)
    elif args[:2] == ["medvol", "embed"]:
        for key, value in EMBED_SET.items():
            args += ["--set", f"{key}={value}"]
    return shlex.join(args)


def test_readme_section_lists_runnable_commands():
    """Cheap checks of the section (the slow test runs it): activation first, paths and configs that exist."""
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands[0] == ACTIVATE
    tools = [shlex.split(c)[:2] for c in commands[1:]]
    assert ["medvol", "preprocess"] in tools and ["medvol", "embed"] in tools
    configs = [_option(shlex.split(c), "config_file") for c in commands if "monai.bundle run" in c]
    assert any(c.endswith("evaluate.json']") for c in configs) and any(c.endswith("inference.json']") for c in configs)
    for command in commands[1:]:
        args = shlex.split(command)
        for arg in args:
            for path in re.findall(r"(?:bundles|demo_data)/[\w./-]+", arg):
                assert (REPO_ROOT / path).exists(), f"{path} in README command: {command}"
        assert not any(a.startswith("/") for a in args), f"absolute path in README command: {command}"


def test_small_settings_replace_or_add():
    args = shlex.split(small("python -m monai.bundle run --config_file bundles/caid/configs/train.json "
                             "--bundle_root bundles/caid --max_epochs 100"))
    assert _option(args, "max_epochs") == "1" and args.count("--max_epochs") == 1
    assert _option(args, "backbone_options") == TINY_UNET
    infer = shlex.split(small("python -m monai.bundle run --config_file bundles/fewshot_segmentation/configs/"
                              "inference.json --bundle_root bundles/fewshot_segmentation"))
    assert "--max_epochs" not in infer and "--iterations_per_epoch" not in infer and "--backbone_options" in infer


def test_missing_section_or_blocks_fail():
    with pytest.raises(AssertionError, match="no '## Use it on your scans' section"):
        readme_commands("# medvol\n## Quick start\n```bash\nmake demo\n```\n")
    with pytest.raises(AssertionError, match="no ```bash code blocks"):
        readme_commands("## Use it on your scans\nrun things\n## Install\n```bash\npip install\n```\n")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands[0] == ACTIVATE, "the section should start by activating .venv"
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "medvol").is_file(), f"no medvol script next to {sys.executable}"
    for name in ("demo_data", "bundles"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "2"}
    outputs = {}
    for command in commands[1:]:
        run = small(command)
        proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True,
                              encoding="utf-8", errors="replace",
                              timeout=600)
        assert proc.returncode == 0, f"$ {run}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[command] = proc.stdout + proc.stderr

    runs = tmp_path / "runs"
    images = sorted(p.name for p in (REPO_ROOT / "demo_data" / "hippocampus" / "imagesTr").iterdir())
    manifest = list(csv.DictReader(open(runs / "preprocessed" / "manifest.csv")))
    assert len(manifest) == len(images) and {r["status"] for r in manifest} == {"ok"}
    assert (runs / "preprocessed" / "qc.png").is_file()
    assert sorted(p.name for p in (runs / "preprocessed" / "imagesTr").iterdir()) == images
    for run in ("caid", "seg", "lecl"):
        assert (runs / run / "models" / "model.pt").is_file(), run
    assert len(list((runs / "caid" / "embeddings").iterdir())) == len(images)
    metrics = dict(csv.reader(open(runs / "seg" / "eval" / "metrics.csv")))
    assert 0 <= float(metrics["val_mean_dice"]) <= 1
    evaluate = next(out for c, out in outputs.items() if "evaluate.json" in c)
    assert "val_mean_dice " in evaluate and "including the ones the model was trained on" in evaluate
    segs = sorted(p.name for p in (runs / "seg" / "segmentations").iterdir())
    assert segs == [i.replace(".nii.gz", "_seg.nii.gz") for i in images]
    bags = list(csv.DictReader(open(runs / "embeddings" / "manifest.csv")))
    assert len(bags) == len(images) and {r["status"] for r in bags} == {"ok"}
    assert len(list((runs / "embeddings").glob("*.h5"))) == len(images)
