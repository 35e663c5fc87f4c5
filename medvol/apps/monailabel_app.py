"""``medvol monailabel-app``: a MONAI Label app folder that serves a medvol bundle (no model-zoo download).

MONAI Label's bundle app (``monaibundle``, shipped inside the ``monailabel`` package) serves the bundles it
finds under ``APP/model/<name>/`` when started with ``--conf models <name> --conf zoo_source github``: with any
zoo source other than ``monaihosting`` a bundle folder that exists locally is used as it is. This module

1. copies that sample app into ``APP`` (unless ``APP/main.py`` exists already, e.g. from
   ``monailabel apps --download --name monaibundle``),
2. copies the bundle's ``configs/``, ``docs/`` and ``LICENSE`` to ``APP/model/<name>/`` and the checkpoint to
   ``APP/model/<name>/models/model.pt`` (where MONAI Label's infer task reads it and its train task writes it),
3. writes ``--set KEY=VALUE`` overrides (the values used in training: ``preset``, ``spacing``,
   ``backbone_options`` ...) into the copied ``inference.json`` / ``train.json`` / ``evaluate.json``, since
   MONAI Label runs the configs without command-line overrides,
4. checks that the checkpoint loads into the configured ``network_def`` (a wrong ``backbone_options`` fails
   here with one line, not later inside the server),

and returns the ``monailabel start_server`` command line.

Example (writes an app folder; ``medvol monailabel-app`` is the command-line form)::

    from medvol.apps.monailabel_app import prepare_app
    app = prepare_app("apps/medvol", "bundles/fewshot_segmentation", checkpoint="runs/seg/models/model.pt")
    print(app.command(studies="/data/studies"))
    # monailabel start_server --app apps/medvol --studies /data/studies --conf models fewshot_segmentation ...
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medvol.errors import ConfigError, DataError
from medvol.io.checkpoint import read_checkpoint

__all__ = ["MonaiLabelApp", "prepare_app", "find_sample_app", "SAMPLE_APP"]

SAMPLE_APP = "monaibundle"
CONFIG_FILES = ("inference.json", "train.json", "evaluate.json")


@dataclass
class MonaiLabelApp:
    """A prepared app folder: ``app_dir/model/<name>/`` holds the bundle."""

    app_dir: Path
    name: str

    @property
    def bundle_dir(self) -> Path:
        return self.app_dir / "model" / self.name

    def command(self, studies: str | os.PathLike = "STUDIES", host: str = "127.0.0.1", port: int = 8000,
                extra_conf: Mapping[str, str] | None = None) -> str:
        """The ``monailabel start_server`` line for this app (shell-quoted)."""
        args = ["monailabel", "start_server", "--app", str(self.app_dir), "--studies", str(studies),
                "--conf", "models", self.name, "--conf", "zoo_source", "github"]
        for key, value in (extra_conf or {}).items():
            args += ["--conf", key, str(value)]
        args += ["--host", host, "--port", str(port)]
        return shlex.join(args)


def find_sample_app(name: str = SAMPLE_APP) -> Path | None:
    """Folder of MONAI Label's sample app ``name`` in this Python environment, or ``None``.

    The ``monailabel`` wheel installs its sample apps as data files under ``<prefix>/monailabel/sample-apps``;
    the same places ``monailabel apps`` searches are tried.
    """
    candidates = [Path(sys.prefix) / "monailabel" / "sample-apps",
                  Path(sys.prefix) / "local" / "monailabel" / "sample-apps",
                  Path.home() / ".local" / "monailabel" / "sample-apps"]
    try:
        import monailabel

        candidates.insert(0, Path(monailabel.__file__).resolve().parents[1] / "sample-apps")
    except ImportError:
        pass
    for root in candidates:
        if (root / name / "main.py").is_file():
            return root / name
    return None


def _set_nested(config: dict, key: str, value) -> bool:
    """Set ``a#b#c`` in ``config`` if its parent exists and the key is present; True when set."""
    *parents, last = key.split("#")
    node = config
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    if isinstance(node, dict) and last in node:
        node[last] = value
        return True
    return False


def _apply_overrides(configs_dir: Path, overrides: Mapping) -> None:
    loaded = {f: json.loads((configs_dir / f).read_text(encoding="utf-8")) for f in CONFIG_FILES
              if (configs_dir / f).is_file()}
    for key, value in overrides.items():
        hit = [f for f, config in loaded.items() if _set_nested(config, key, value)]
        if not hit:
            raise ConfigError(f"--set {key}: no such key in the bundle's {', '.join(loaded)}")
    for f, config in loaded.items():
        tmp = configs_dir / f"{f}.tmp"
        tmp.write_text(json.dumps(config, indent=4) + "\n")
        os.replace(tmp, configs_dir / f)


def _check_checkpoint(bundle_dir: Path, checkpoint: Path) -> None:
    """Load the checkpoint into inference.json's ``network_def`` exactly as MONAI Label does, but strictly."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_dir)})
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as e:  # noqa: BLE001 - any config problem is reported in one line
        raise ConfigError(f"network_def of {bundle_dir}/configs/inference.json cannot be built: {e}") from None
    try:
        state = read_checkpoint(checkpoint, mapping=False)
    except DataError as e:
        raise ConfigError(f"checkpoint {e}") from None
    state = state.get("model", state) if isinstance(state, Mapping) else state
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"checkpoint {checkpoint} does not fit the bundle's network_def ({first}); pass the "
                          "settings used in training, e.g. --set backbone=... --set backbone_options=...") from None


def prepare_app(
    app_dir: str | os.PathLike,
    bundle: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    overrides: Mapping | None = None,
    overwrite: bool = False,
) -> MonaiLabelApp:
    """Write (or update) a MONAI Label app folder serving ``bundle``.

    Args:
        app_dir: the app folder (created; the sample app is copied in unless ``app_dir/main.py`` exists).
        bundle: a bundle folder with ``configs/inference.json``, ``configs/train.json`` and ``metadata.json``.
        checkpoint: state dict for ``models/model.pt``; ``None`` uses ``bundle/models/model.pt``.
        name: model name in MONAI Label (default: the bundle folder's name).
        overrides: config ids and values written into the copied configs (keys with ``#`` reach nested ids).
        overwrite: replace an existing ``app_dir/model/<name>/``.

    Raises:
        ConfigError: with a one-line message (no bundle, no checkpoint, no sample app and no ``main.py``,
            an existing model folder without ``overwrite``, an override naming no key, a checkpoint that does
            not fit the network).
    """
    app_dir, bundle = Path(app_dir), Path(bundle)
    configs = bundle / "configs"
    for needed in ("inference.json", "train.json", "metadata.json"):
        if not (configs / needed).is_file():
            raise ConfigError(f"bundle {bundle} has no configs/{needed}")
    name = name or bundle.resolve().name
    if not name or "/" in name or "," in name:
        raise ConfigError(f"invalid model name {name!r}")
    checkpoint = Path(checkpoint) if checkpoint else bundle / "models" / "model.pt"
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} does not exist: train the bundle first "
                          "(its output_dir/models/model.pt) and pass it with --checkpoint")
    if app_dir.exists() and not app_dir.is_dir():
        raise ConfigError(f"{app_dir} exists and is not a folder")
    target = app_dir / "model" / name
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists: pass --overwrite to replace it")

    sample = None
    if not (app_dir / "main.py").is_file():
        sample = find_sample_app()
        if sample is None:
            raise ConfigError(f"{app_dir} has no main.py and MONAI Label's '{SAMPLE_APP}' sample app was not found "
                              "in this environment: run this command where monailabel is installed, or first "
                              f"'monailabel apps --download --name {SAMPLE_APP} --output DIR' and pass "
                              f"DIR/{SAMPLE_APP}")

    created = not app_dir.exists()
    staging = app_dir / "model" / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(configs, staging / "configs", ignore=shutil.ignore_patterns("monailabel_train.json"))
        for extra in ("docs", "LICENSE", "scripts"):
            src = bundle / extra
            if src.is_dir():
                shutil.copytree(src, staging / extra, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.is_file():
                shutil.copy2(src, staging / extra)
        (staging / "models").mkdir()
        shutil.copy2(checkpoint, staging / "models" / "model.pt")
        if overrides:
            _apply_overrides(staging / "configs", overrides)
        _check_checkpoint(staging, staging / "models" / "model.pt")
    except BaseException:
        shutil.rmtree(app_dir if created else staging, ignore_errors=True)  # nothing half-written is left
        raise
    if sample is not None:
        shutil.copytree(sample, app_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return MonaiLabelApp(app_dir, name)
