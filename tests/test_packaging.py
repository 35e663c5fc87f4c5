"""The distribution: built from an sdist like pip builds it, the wheel carries every bundle and the demo data, and
an installed copy (wheel or editable) finds them outside the repository.

The installed copy is imported with the repository off ``sys.path`` (``python -I -S``, then the install folder
and this interpreter's site-packages, in that order): the shared environment's own editable medvol, whose
import finder would otherwise answer ``import medvol``, comes after it.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import BUNDLES_DIR, DEMO_DIR, REPO_ROOT
from test_bundle_export import SHIPPED, files, static_files

import medvol.bundles as mb

SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "medvol", "bundles", "demo_data")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "runs", "models", "eval", ".*")
# sys.argv: target folder, module, args...; the install folder goes first, then site-packages (own finder last)
LAUNCH = (
    "import atexit, runpy, site, sys; target = sys.argv.pop(1); module = sys.argv.pop(1); "
    "site.addsitedir(target); site.addsitedir({purelib!r}); sys.argv[0] = module; "
    "atexit.register(lambda: print('MEDVOL_FILE', getattr(sys.modules.get('medvol'), '__file__', None))); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
).format(purelib=sysconfig.get_paths()["purelib"])


def _run(cmd, cwd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _pip(*args, cwd):
    return _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd)


def _build(hook: str, src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    name = _run([sys.executable, "-c", code], cwd=src).stdout.strip().splitlines()[-1]
    return out / name


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """sdist from a copy of the sources, then the wheel from the unpacked sdist (what `python -m build` does)."""
    root = tmp_path_factory.mktemp("dist")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copy(path, src / name)
    sdist = _build("build_sdist", src, root / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    unpacked = next((root / "unpacked").iterdir())
    wheel = _build("build_wheel", unpacked, root / "wheel")
    return {"src": src, "sdist": sdist, "wheel": wheel, "root": root}


@pytest.fixture(scope="module")
def installed(dist) -> Path:
    target = dist["root"] / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(target), str(dist["wheel"]), cwd=dist["root"])
    return target


def medvol_run(target: Path, module: str, *args: str, cwd: Path, timeout: int = 300) -> tuple[str, Path]:
    """``python -m MODULE ARGS`` with medvol imported from ``target``; returns (stdout, medvol.__file__)."""
    proc = _run([sys.executable, "-I", "-S", "-c", LAUNCH, str(target), module, *args], cwd=cwd, timeout=timeout)
    *lines, last = proc.stdout.rstrip("\n").splitlines()
    assert last.startswith("MEDVOL_FILE "), proc.stdout[-2000:]
    return "\n".join(lines), Path(last.split(" ", 1)[1])


def test_setup_skips_what_medvol_bundles_skips():
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id.startswith("SKIPPED")}
    dirs = {p for p in mb.SKIPPED if "*" not in p}
    suffixes = {p[1:] for p in mb.SKIPPED if p.startswith("*.")}
    assert consts["SKIPPED_DIRS"] == dirs and consts["SKIPPED_SUFFIXES"] == suffixes
    assert ".*" in mb.SKIPPED  # hidden files: setup.py skips names starting with "."


def test_distribution_name_and_dependencies(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode("utf-8")
    assert dist["wheel"].name.startswith("medvol_ssl-") and "\nName: medvol-ssl\n" in meta
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    assert any(r.startswith("SimpleITK") for r in requires)
    itk = [r for r in requires if r.lower().startswith("itk")]
    assert itk and all('extra == "itk"' in r for r in itk)  # ITK only with the [itk] extra


@pytest.mark.parametrize("name", SHIPPED)
def test_every_bundle_declares_the_installable_distribution(name):
    meta = json.loads((BUNDLES_DIR / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
    packages = meta["required_packages_version"]
    assert "medvol" not in packages, "`medvol` on PyPI is another project: require medvol-ssl"
    assert packages["medvol-ssl"] == _version()


def _version() -> str:
    tree = ast.parse((REPO_ROOT / "medvol" / "__init__.py").read_text(encoding="utf-8"))
    return next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", "") == "__version__" for t in n.targets))


def test_sdist_and_wheel_carry_every_bundle_and_the_demo_data(dist):
    with tarfile.open(dist["sdist"]) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    with zipfile.ZipFile(dist["wheel"]) as z:
        in_wheel = set(z.namelist())
    for name in SHIPPED:
        expected = static_files(BUNDLES_DIR / name)
        assert {"configs/train.json", "configs/metadata.json", "docs/README.md", "LICENSE"} <= expected
        assert {f"bundles/{name}/{f}" for f in expected} <= in_sdist, name
        assert {f"medvol/_bundles/{name}/{f}" for f in expected} <= in_wheel, name
    assert "medvol/_bundles/meta_schema.json" in in_wheel
    demo = static_files(DEMO_DIR)
    assert {"hippocampus/LICENSE", "ct/LICENSE", "dicom/LICENSE", "nrrd/LICENSE", "README.md"} <= demo
    assert {f"medvol/_demo_data/{f}" for f in demo} <= in_wheel  # every scan travels with its licence
    assert {"medvol/data/pixel_clustering_hippocampus_unet8.pt", "medvol/data/LICENSE.hippocampus"} <= in_wheel
    assert not [n for n in in_wheel if "/runs/" in n or "/models/" in n or "__pycache__" in n]
    assert dist["wheel"].stat().st_size < 15_000_000


def test_installed_wheel_lists_and_exports_outside_the_repository(installed, tmp_path):
    out, medvol_file = medvol_run(installed, "medvol", "bundle", "list", cwd=tmp_path)
    assert medvol_file == installed / "medvol" / "__init__.py"
    assert [ln.split()[0] for ln in out.splitlines()[:-1]] == SHIPPED
    assert out.splitlines()[-1] == f"({installed / 'medvol' / '_bundles'})"
    out, _ = medvol_run(installed, "medvol", "bundle", "export", "fewshot_segmentation", str(tmp_path / "b"),
                        cwd=tmp_path)
    assert files(tmp_path / "b") == static_files(BUNDLES_DIR / "fewshot_segmentation")
    where, _ = medvol_run(installed, "medvol", "demo", "--where", cwd=tmp_path)
    assert Path(where) == installed / "medvol" / "_demo_data"
    assert files(Path(where)) == static_files(DEMO_DIR)


def test_editable_install_reads_the_source_folders(dist, tmp_path):
    """An editable install (PEP 660, as `pip install -e .` builds it) finds bundles/ and demo_data/ at the root."""
    editable = _build("build_editable", dist["src"], tmp_path / "wheel")
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(target), str(editable), cwd=tmp_path)
    out, medvol_file = medvol_run(target, "medvol", "bundle", "path", "caid", cwd=tmp_path)
    assert medvol_file == dist["src"] / "medvol" / "__init__.py"
    assert Path(out) == dist["src"] / "bundles" / "caid"
    where, _ = medvol_run(target, "medvol", "demo", "--where", cwd=tmp_path)
    assert Path(where) == dist["src"] / "demo_data"


@pytest.mark.slow
def test_exported_bundle_trains_from_the_installed_wheel(installed, tmp_path):
    """The done-when of issue 14: export a bundle with the wheel's medvol, train it on the shipped demo data."""
    bundle = tmp_path / "b"
    medvol_run(installed, "medvol", "bundle", "export", "fewshot_segmentation", str(bundle), cwd=tmp_path)
    data = installed / "medvol" / "_demo_data" / "hippocampus"
    out, medvol_file = medvol_run(
        installed, "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json"),
        "--bundle_root", str(bundle), "--dataset_dir", str(data), "--max_epochs", "1", "--iterations_per_epoch", "1",
        "--num_labeled", "2", "--backbone_options", "{'unet': {'channels': [4, 8, 16]}}",
        "--pad_size", "[32, 48, 32]", "--roi_size", "[16, 16, 16]", cwd=tmp_path, timeout=600)
    assert medvol_file == installed / "medvol" / "__init__.py"
    assert (bundle / "runs" / "models" / "model.pt").stat().st_size > 1000
    import torch

    state = torch.load(bundle / "runs" / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state)
