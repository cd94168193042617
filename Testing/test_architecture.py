"""The engine's layers, read from its files: no upward import, no import cycle, torch-free layers stay torch-free,
and ``import DeepRegistrationLib`` costs nothing.

Layers, lowest first (``DeepRegistrationLib/__init__.py`` names them): core → io → spatial → registration →
learning → evaluation → workflows, dicom → apps. A module may import from its own layer and lower ones. Imports inside
functions count too (``ast`` walks the whole file), and so do ``TYPE_CHECKING`` imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import fresh_python

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "DeepRegistration"
LIB = MODULE_DIR / "DeepRegistrationLib"
PKG = "DeepRegistrationLib"

# Longest prefix wins. evaluation.metrics / .figures are torch-free measures and pictures that registration and
# training use, so they rank just above io; the rest of evaluation scores whole methods and ranks above learning.
RANK = {
    "core": 0,
    "io": 1,
    "evaluation.metrics": 1.5,
    "evaluation.figures": 1.5,
    "spatial": 2,
    "registration": 3,
    "learning": 4,
    "evaluation": 5,
    # the run that reads inputs, registers, scores (metrics, quality verdict) and writes outputs sits on top of
    # evaluation; only workflows and apps use it
    "registration.run": 5.5,
    "workflows": 6,
    "dicom": 6,
    "apps": 7,
}
# Cycles accepted for now, each with its reason (every other cycle fails the test).
ACCEPTED_CYCLES: dict = {}
TORCH_FREE = ["core", "io", "evaluation.metrics", "evaluation.figures", "learning.model_files", "learning.registry"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIB.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(MODULE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported engine module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and (t == PKG or t.startswith(PKG + ".")):
                found.append((node.lineno, t))
    return found


def _rank(name: str) -> float | None:
    rel = name[len(PKG) + 1:] if name.startswith(PKG + ".") else ""
    best = None
    for prefix in RANK:
        if rel == prefix or rel.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else RANK[best]


def test_every_engine_module_belongs_to_a_layer():
    homeless = [n for n in MODULES if n != PKG and _rank(n) is None]
    assert not homeless, f"modules outside the layers (put them in a subpackage): {homeless}"
    flat = [n for n in MODULES if n.count(".") == 1 and n.split(".")[1] not in {k.split(".")[0] for k in RANK}]
    assert not flat, f"modules directly under {PKG}/ (only __init__.py belongs there): {flat}"


def test_no_upward_imports_between_layers():
    offenders = []
    for name, path in MODULES.items():
        mine = _rank(name)
        for line, target in _imports(name, path):
            theirs = _rank(target)
            if target == PKG:
                theirs = -1  # the package itself holds only __version__ and the lazy API
            if mine is not None and theirs is not None and theirs > mine:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {name} (layer {mine}) imports {target} "
                                 f"(layer {theirs})")
    assert not offenders, "upward imports:\n" + "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_engine():
    graph = {n: {t for _, t in _imports(n, p) if t != PKG} for n, p in MODULES.items()}
    graph[PKG] = set()  # the lazy API imports on demand only
    found = _cycles(graph)
    cycles = [c for c in found if frozenset(c) not in ACCEPTED_CYCLES]
    assert not cycles, f"import cycles (imports inside functions count): {cycles}"
    stale = [sorted(c) for c in ACCEPTED_CYCLES if list(sorted(c)) not in found]
    assert not stale, f"these cycles are gone: remove them from ACCEPTED_CYCLES: {stale}"


def _package_graph(folder: Path, package: str) -> dict[str, set[str]]:
    names = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for stem, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    mods = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and (node.module or "").startswith(package + "."):
                    mods = [node.module.split(".")[1]]
                else:
                    continue
                deps |= {m.split(".")[0] for m in mods if m and m.split(".")[0] in names and m.split(".")[0] != stem}
        graph[stem] = deps
    return graph


@pytest.mark.parametrize("folder,package", [(ROOT / "DatasetBuilder" / "DatasetBuilderLib", "DatasetBuilderLib"),
                                            (MODULE_DIR / "DeepRegistrationSlicerLib", "DeepRegistrationSlicerLib"),
                                            (MODULE_DIR / "DeepRegistrationWidgets", "DeepRegistrationWidgets")])
def test_no_import_cycles_in_the_slicer_libraries(folder, package):
    cycles = _cycles(_package_graph(folder, package))
    assert not cycles, f"import cycles in {package} (imports inside functions count): {cycles}"


def test_torch_free_layers_import_without_torch():
    names = [n for n in MODULES if any(n == f"{PKG}.{t}" or n.startswith(f"{PKG}.{t}.") for t in TORCH_FREE)]
    assert len(names) >= 10
    code = ("import importlib, json, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps({'file': sys.modules['DeepRegistrationLib'].__file__, "
            "'heavy': sorted(m for m in ('torch', 'monai', 'slicer', 'qt') if m in sys.modules)}))\n")
    result = fresh_python(code)
    assert Path(result["file"]).resolve().parent == LIB.resolve()
    assert result["heavy"] == [], f"torch-free layers loaded {result['heavy']}"


def test_public_api_is_lazy_and_complete():
    import DeepRegistrationLib as dr

    code = ("import json, sys, DeepRegistrationLib as dr\n"
            "before = sorted(m for m in sys.modules if m.startswith('DeepRegistrationLib.') or m in ('torch', 'numpy', 'SimpleITK'))\n"
            "print(json.dumps({'before': before, 'all': dr.__all__}))\n")
    result = fresh_python(code)
    assert result["before"] == [], f"import DeepRegistrationLib loaded {result['before']}"
    for name in result["all"]:
        assert getattr(dr, name) is not None, name
    from DeepRegistrationLib.core.grid import Grid
    from DeepRegistrationLib.registration.run import run_registration

    assert dr.Grid is Grid and dr.run_registration is run_registration
    with pytest.raises(AttributeError):
        dr.no_such_name
