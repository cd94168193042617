"""The engine package must stay free of Slicer: it runs from the command line, in CI and in a PythonSlicer
subprocess, and Slicer loads it as a plain library of the module."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "DeepRegistration"
LIB = MODULE_DIR / "DeepRegistrationLib"

# Top-level names that exist only inside the Slicer application (or drag it in).
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "mrml", "vtkSlicer", "vtkITK", "vtkAddon", "PythonQt", "__main__",
             "SampleData", "PyTorchUtils", "DeepRegistration", "DatasetBuilder"}


def _forbidden(name: str) -> bool:
    top = name.split(".")[0]
    return top in FORBIDDEN or top.startswith(("qMRML", "qSlicer", "vtkMRML", "vtkSlicer"))


def test_engine_sources_do_not_import_slicer():
    offenders = []
    files = sorted(LIB.rglob("*.py"))
    assert files, f"no engine sources under {LIB}"
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # also catches imports inside functions
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names if _forbidden(name)]
    assert not offenders, "engine files import Slicer-only modules:\n" + "\n".join(offenders)


def test_engine_import_leaves_slicer_out_of_sys_modules():
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "import DeepRegistrationLib, DeepRegistrationLib.registration.pipeline, DeepRegistrationLib.registration.run\n"
        "print(json.dumps({'lib': DeepRegistrationLib.__file__, 'modules': sorted(sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["lib"]).resolve().parent == LIB.resolve()
    loaded = sorted({m.split(".")[0] for m in result["modules"] if m.split(".")[0] in {"slicer", "qt", "ctk", "vtk", "mrml"}})
    assert not loaded, f"importing the engine loaded Slicer-side modules: {loaded}"
