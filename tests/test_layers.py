"""The package's floors (docs/architecture.md): a lower floor never imports a higher one, no import circles.

Every ``import`` / ``from ... import`` of ``medvol`` in every module counts, also those inside functions (a lazy
import is still a dependency). Floors, bottom to top:

    errors -> io, networks, losses, bundles -> transforms, engines, cluster, mil -> methods, search, evaluation
    -> apps

``medvol/__main__.py`` (the ``python -m medvol`` entry point) may import apps; ``medvol/__init__.py`` imports
nothing (sub-packages load lazily by name).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medvol"

FLOORS = {
    "errors": 0,
    "io": 1, "networks": 1, "losses": 1, "bundles": 1,
    "transforms": 2, "engines": 2, "cluster": 2, "mil": 2,
    "methods": 3, "search": 3, "evaluation": 3,
    "apps": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def medvol_imports(path: Path) -> set[str]:
    """Modules of medvol that ``path`` imports (``from medvol.x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "medvol"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medvol":
                continue
            found.add(target)
            for alias in node.names:  # `from medvol.engines import config` imports the module config
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                        (PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").is_file():
                    found.add(candidate)
    return {m for m in found if m != this}


def graph() -> dict[str, set[str]]:
    return {module_name(p): medvol_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_import_parser_sees_lazy_and_relative_imports():
    # the checker itself must not be blind: a function-level import and a relative one are both found
    imports = medvol_imports(PACKAGE / "mil" / "__init__.py")
    assert "medvol.mil.crossval" in imports and "medvol.mil.data" in imports
    assert "medvol.apps.demo" in medvol_imports(PACKAGE / "apps" / "cli.py")  # imported inside cmd_demo


def test_every_subpackage_has_a_floor():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    subpackages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert subpackages <= set(FLOORS), f"sub-packages without a floor: {sorted(subpackages - set(FLOORS))}"


def test_nothing_below_apps_imports_apps():
    offenders = [(m, i) for m, imps in graph().items() for i in imps
                 if i.startswith("medvol.apps") and not m.startswith("medvol.apps") and m != "medvol.__main__"]
    assert not offenders, f"imports of medvol.apps from below it: {offenders}"


def test_no_lower_floor_imports_a_higher_one():
    offenders = []
    for module, imports in graph().items():
        own = floor(module)
        if own is None:
            continue
        offenders += [(module, i) for i in imports if (floor(i) or 0) > own]
    assert not offenders, f"upward imports: {offenders}"


def test_package_root_imports_nothing():
    assert graph()["medvol"] == set()


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_circles():
    # a package __init__ re-exporting its modules is an edge too: a module importing its own package's
    # __init__ closes a circle that Python survives only by import order
    cycles = _cycles(graph())
    assert not cycles, f"import circles: {cycles}"
