"""Every ``>>>`` example in medvol's docstrings runs and shows what it claims (examples are tests, not decoration).

Modules without examples are not imported (some, like the command-line apps, are slow to import).
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import medvol

PACKAGE_DIR = Path(medvol.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_examples_are_found():
    assert len(MODULES) > 10 and "medvol.losses.moco" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(PACKAGE_DIR.parent)  # examples name demo files relative to the repository root
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"
