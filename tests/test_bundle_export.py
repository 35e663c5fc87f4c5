"""``medvol.bundles`` and ``medvol bundle``: the shipped bundles by name, and exporting one as a bundle folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES_DIR, DEMO_DIR, REPO_ROOT

import medvol.bundles as mb
from medvol.apps.cli import main
from medvol.errors import ConfigError

SHIPPED = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())


def static_files(folder: Path) -> set[str]:
    """Files of a bundle folder an export must carry (what setup.py ships: all but run outputs, hidden files)."""
    skipped_dirs = {"runs", "models", "eval", "__pycache__"}
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.suffix not in (".pyc", ".tmp")
            and not any(part in skipped_dirs or part.startswith(".") for part in p.relative_to(folder).parts)}


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_checkout_finds_the_root_folders():
    assert mb.bundles_root() == BUNDLES_DIR and mb.demo_data_dir() == DEMO_DIR
    assert mb.list_bundles() == SHIPPED and "fewshot_segmentation" in SHIPPED and len(SHIPPED) >= 7
    assert mb.bundle_path("caid") == BUNDLES_DIR / "caid"


def test_an_installed_package_prefers_its_own_copies(tmp_path, monkeypatch):
    """Inside site-packages the copies under medvol/_bundles and medvol/_demo_data are found."""
    package = tmp_path / "site-packages" / "medvol"
    (package / "_bundles" / "one" / "configs").mkdir(parents=True)
    (package / "_bundles" / "one" / "configs" / "metadata.json").write_text("{}")
    (package / "_bundles" / "not_a_bundle").mkdir()
    (package / "_demo_data").mkdir()
    monkeypatch.setattr(mb, "PACKAGE_DIR", package)
    assert mb.list_bundles() == ["one"] and mb.demo_data_dir() == package / "_demo_data"
    with pytest.raises(ConfigError, match="unknown bundle 'caid'; the bundles shipped with medvol are: one$"):
        mb.bundle_path("caid")


def test_a_package_without_its_data_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(mb, "PACKAGE_DIR", tmp_path / "site-packages" / "medvol")
    with pytest.raises(ConfigError, match=r"medvol's bundles folder is missing \(looked in .*_bundles and "):
        mb.list_bundles()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        mb.bundle_path("fewshot")
    assert str(err.value) == (f"unknown bundle 'fewshot'; the bundles shipped with medvol are: {', '.join(SHIPPED)}")


@pytest.mark.parametrize("name", SHIPPED)
def test_export_copies_every_static_file(name, tmp_path):
    out = mb.export_bundle(name, tmp_path / "b")
    assert out == tmp_path / "b"
    assert files(out) == static_files(BUNDLES_DIR / name)  # zoo files (large_files.yml, ...) included
    for required in mb.REQUIRED_FILES:
        assert (out / required).read_bytes() == (BUNDLES_DIR / name / required).read_bytes()
    for f in static_files(BUNDLES_DIR / name) - {"configs/inference.json"}:
        assert (out / f).read_bytes() == (BUNDLES_DIR / name / f).read_bytes(), f
    assert not (out / "models").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # the staging folder is gone


def test_export_leaves_run_outputs_behind(tmp_path, monkeypatch):
    src = tmp_path / "bundles" / "mine"
    for f in mb.REQUIRED_FILES:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text(f)
    (src / "large_files.yml").write_text("large_files: []\n")
    for junk in ("runs/models/model.pt", "models/model.pt", "eval/metrics.csv", "configs/__pycache__/x.pyc",
                 ".DS_Store", "configs/train.json.tmp"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk")
    monkeypatch.setattr(mb, "PACKAGE_DIR", tmp_path / "medvol")  # a checkout: <root>/bundles beside medvol/
    out = mb.export_bundle("mine", tmp_path / "out")
    assert files(out) == {*mb.REQUIRED_FILES, "large_files.yml"}


def test_export_with_a_checkpoint_ships_it_as_models_model_pt(tmp_path):
    ckpt = tmp_path / "trained.pt"
    torch.save({"w": torch.arange(3.0)}, ckpt)
    out = mb.export_bundle("fewshot_segmentation", tmp_path / "b", checkpoint=ckpt)
    assert (out / "models" / "model.pt").read_bytes() == ckpt.read_bytes()


OVERLAY_INFERENCE = [b for b in SHIPPED if "imports" not in json.loads(
    (BUNDLES_DIR / b / "configs" / "inference.json").read_text(encoding="utf-8"))]


@pytest.mark.parametrize("name", OVERLAY_INFERENCE)
def test_exported_inference_json_is_standalone(name, tmp_path):
    """model-zoo and MONAI Label read configs/inference.json alone: the exported one is train.json merged with the
    overlay, the same config MONAI builds from ['train.json', 'inference.json'] of the shipped bundle."""
    from monai.bundle import ConfigParser

    out = mb.export_bundle(name, tmp_path / "b")
    configs = BUNDLES_DIR / name / "configs"
    merged = ConfigParser.load_config_files([str(configs / "train.json"), str(configs / "inference.json")])
    alone = ConfigParser.load_config_files(str(out / "configs" / "inference.json"))
    assert alone == merged and "imports" in alone
    text = (out / "configs" / "inference.json").read_text(encoding="utf-8")
    assert text == json.dumps(alone, indent=4) + "\n"  # model-zoo's pretty-format-json


def test_exported_overlay_inference_passes_monai_checks_alone(tmp_path):
    from monai.bundle import verify_net_in_out

    out = mb.export_bundle("caid", tmp_path / "b")
    verify_net_in_out(net_id="network_def", meta_file=str(out / "configs" / "metadata.json"),
                      config_file=str(out / "configs" / "inference.json"), bundle_root=str(out), n=1, device="cpu")


@pytest.mark.parametrize("name", ["caid", "fewshot_segmentation"])
def test_inference_of_an_exported_bundle_loads_its_released_weights(name, tmp_path):
    """model-zoo layout: inference.json's default ckpt_path is the exported models/model.pt; without it, the
    file training writes under output_dir."""
    from monai.bundle import ConfigParser

    def ckpt_path(root):
        configs = root / "configs"
        files = [configs / "inference.json"] if name == "fewshot_segmentation" else [configs / "train.json",
                                                                                     configs / "inference.json"]
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser["bundle_root"] = str(root)
        return parser.get_parsed_content("ckpt_path"), parser.get_parsed_content("output_dir")

    ckpt = tmp_path / "trained.pt"
    torch.save({"w": torch.arange(3.0)}, ckpt)
    released = mb.export_bundle(name, tmp_path / "released", checkpoint=ckpt)
    assert ckpt_path(released)[0] == str(released / "models" / "model.pt")
    plain = mb.export_bundle(name, tmp_path / "plain")
    path, output_dir = ckpt_path(plain)
    assert path == str(Path(output_dir) / "models" / "model.pt") and not (plain / "models").exists()


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not weights\n")
    with pytest.raises(ConfigError, match="notes.pt: not a torch checkpoint"):
        mb.export_bundle("fewshot_segmentation", tmp_path / "b", checkpoint=bad)
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["notes.pt"]


def test_export_into_an_existing_folder(tmp_path):
    dest = tmp_path / "b"
    dest.mkdir()
    mb.export_bundle("caid", dest)  # empty: fine
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"b is not empty: .*--force"):
        mb.export_bundle("fewshot_segmentation", dest)
    assert (dest / "notes.txt").is_file()  # untouched
    mb.export_bundle("fewshot_segmentation", dest, force=True)
    assert files(dest) == static_files(BUNDLES_DIR / "fewshot_segmentation")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        mb.export_bundle("caid", tmp_path / "file", force=True)


def test_export_never_overwrites_the_shipped_bundle(tmp_path):
    for dest in (BUNDLES_DIR / "caid", BUNDLES_DIR, BUNDLES_DIR / "caid" / "copy"):
        with pytest.raises(ConfigError, match="overlaps the shipped bundle"):
            mb.export_bundle("caid", dest, force=True)
    assert (BUNDLES_DIR / "caid" / "configs" / "train.json").is_file()


def test_failed_force_export_keeps_the_old_folder(tmp_path, monkeypatch):
    dest = tmp_path / "b"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    real = os.replace

    def fail_second(src, dst):  # moving the old folder aside works, putting the new one in place fails
        if Path(src).name == "bundle":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(mb.os, "replace", fail_second)
    with pytest.raises(OSError, match="No space left"):
        mb.export_bundle("caid", dest, force=True)
    assert files(dest) == {"notes.txt"} and [p.name for p in tmp_path.iterdir()] == ["b"]


def test_cli_list_path_export(tmp_path, capsys):
    assert main(["bundle", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == SHIPPED and lines[-1] == f"({BUNDLES_DIR})"
    meta = json.loads((BUNDLES_DIR / SHIPPED[0] / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert lines[0].split(None, 2) == [SHIPPED[0], meta["version"], meta["task"]]
    assert main(["bundle", "path", "pixel_clustering"]) == 0
    assert capsys.readouterr().out.strip() == str(BUNDLES_DIR / "pixel_clustering")
    assert main(["bundle", "export", "pixel_clustering", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"--config_file {tmp_path / 'b'}/configs/train.json --bundle_root {tmp_path / 'b'}" in out
    assert files(tmp_path / "b") == static_files(BUNDLES_DIR / "pixel_clustering")


@pytest.mark.parametrize("args, message", [
    (["bundle", "path", "nope"], "medvol bundle: error: unknown bundle 'nope'; the bundles shipped with medvol are: "),
    (["bundle", "export", "caid", "{tmp}/b", "--checkpoint", "{tmp}/missing.pt"],
     "medvol bundle: error: --checkpoint {tmp}/missing.pt does not exist or is not a file"),
    (["bundle", "export", "caid", "{tmp}"], "medvol bundle: error: {tmp} is not empty"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(tmp=tmp_path)), err


def test_bundle_commands_answer_without_heavy_imports(tmp_path):
    """list / path / export without a checkpoint import neither torch nor MONAI (they answer at once)."""
    code = ("import sys; from medvol.apps.cli import main; "
            f"codes = [main(['bundle', 'list']), main(['bundle', 'export', 'caid', {str(tmp_path / 'b')!r}]), "
            "main(['demo', '--where'])]; "
            "print(codes, sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace",
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[0, 0, 0] []"


def test_demo_where_prints_the_shipped_demo_data(capsys):
    assert main(["demo", "--where"]) == 0
    where = Path(capsys.readouterr().out.strip())
    assert where == DEMO_DIR and (where / "hippocampus" / "LICENSE").is_file()


@pytest.mark.parametrize("bundle, message", [
    ("nope", "medvol embed: error: --bundle nope: no such folder, and unknown bundle 'nope'; the bundles shipped "
             "with medvol are: " + ", ".join(SHIPPED)),
    ("lecl_slice_embedding", "medvol embed: error: the bundle has no trained checkpoint "),  # found by name
])
def test_embed_takes_a_shipped_bundle_by_name(bundle, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert main(["embed", str(DEMO_DIR / "hippocampus" / "imagesTr"), str(tmp_path / "out"), "--bundle", bundle]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    if bundle != "nope":
        assert str(BUNDLES_DIR / bundle) in err[0]
