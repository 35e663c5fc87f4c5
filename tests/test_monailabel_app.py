"""``medvol monailabel-app`` in the core environment (no MONAI Label): folder layout, overrides, checks.

The real MONAI Label runs on the prepared folder in tests/real_monailabel/ (``make test-monailabel``).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLES_DIR
from monai.bundle import ConfigParser

from medvol.apps.cli import main
from medvol.apps.monailabel_app import prepare_app

BUNDLE = BUNDLES_DIR / "fewshot_segmentation"
TINY = {"unet": {"channels": [4, 8, 16], "norm": "instance"}}


def _state_dict(path, backbone_options=None):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), **({"backbone_options": backbone_options} if backbone_options else {})})
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture
def app_dir(tmp_path):
    """An app folder that already has MONAI Label's main.py (as after `monailabel apps --download`)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("# MONAI Label app placeholder\n")
    return app


def test_prepare_app_layout_and_overrides(app_dir, tmp_path):
    ckpt = _state_dict(tmp_path / "model.pt", TINY)
    app = prepare_app(app_dir, BUNDLE, checkpoint=ckpt, name="seg_ct",
                      overrides={"backbone_options": TINY, "preset": "ct", "spacing": [2, 2, 2]})
    model = app_dir / "model" / "seg_ct"
    assert app.bundle_dir == model
    for f in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "LICENSE", "docs/README.md",
              "models/model.pt"):
        assert (model / f).is_file(), f
    for config in ("inference.json", "train.json"):  # evaluate.json is an overlay of train.json: it inherits them
        data = json.loads((model / "configs" / config).read_text(encoding="utf-8"))
        assert data["preset"] == "ct" and data["spacing"] == [2, 2, 2] and data["backbone_options"] == TINY
    evaluate = json.loads((model / "configs" / "evaluate.json").read_text(encoding="utf-8"))
    assert not {"preset", "spacing", "backbone_options"} & set(evaluate)
    assert app.command(studies="/data/studies", port=8123) == (
        f"monailabel start_server --app {app_dir} --studies /data/studies --conf models seg_ct "
        "--conf zoo_source github --host 127.0.0.1 --port 8123")
    # the repository's bundle is untouched
    assert json.loads((BUNDLE / "configs" / "inference.json").read_text(encoding="utf-8"))["preset"] == "mri"


def test_cli_prints_start_server_line(app_dir, tmp_path, capsys):
    ckpt = _state_dict(tmp_path / "model.pt")
    assert main(["monailabel-app", str(app_dir), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt),
                 "--studies", "/data/s"]) == 0
    out = capsys.readouterr().out
    assert (f"monailabel start_server --app {app_dir} --studies /data/s --conf models fewshot_segmentation "
            "--conf zoo_source github --host 127.0.0.1 --port 8000") in out
    # a second run without --overwrite refuses to replace the model; with it, replaces
    assert main(["monailabel-app", str(app_dir), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["monailabel-app", str(app_dir), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt),
                 "--overwrite"]) == 0


@pytest.mark.parametrize("case", ["mismatch", "unknown_key", "no_checkpoint", "no_app"])
def test_user_errors_are_one_line(case, app_dir, tmp_path, capsys, monkeypatch):
    ckpt = _state_dict(tmp_path / "model.pt", TINY)  # trained with tiny channels
    args = ["monailabel-app", str(app_dir), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt)]
    expected = {"mismatch": "does not fit the bundle's network_def", "unknown_key": "--set nope: no such key",
                "no_checkpoint": "does not exist", "no_app": "has no main.py"}[case]
    if case == "unknown_key":
        args += ["--set", "nope=1", "--set", f"backbone_options={json.dumps(TINY)}"]
    elif case == "no_checkpoint":
        args[-1] = str(tmp_path / "missing.pt")
    elif case == "no_app":
        import medvol.apps.monailabel_app as mla

        monkeypatch.setattr(mla, "find_sample_app", lambda name=mla.SAMPLE_APP: None)
        args[1] = str(tmp_path / "new_app")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (app_dir / "model" / "fewshot_segmentation").exists()
