"""Extension layout: what the Slicer build, the Extensions Index and Slicer's module loader rely on.

None of these checks needs Slicer: CMake files, the catalog entry and the .ui file are parsed as text/XML,
the module files are compiled (not imported) and read with ``ast``.
"""
from __future__ import annotations

import ast
import json
import fnmatch
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("DeepRegistration", "DatasetBuilder")
SCHEMA_NAME = "slicer-extension-catalog-entry-schema-v1.0.1.json"
# The shared copy is the reference; a clean clone (CI) has only the copy kept in the repository.
SCHEMA_CANDIDATES = (ROOT.parent / "shared" / "slicer" / SCHEMA_NAME, ROOT / "Testing" / "Resources" / SCHEMA_NAME)
MODULE_FILE = ROOT / "DeepRegistration" / "DeepRegistration.py"
UI_FILE = ROOT / "DeepRegistration" / "Resources" / "UI" / "DeepRegistration.ui"


def cmake_text(path: Path) -> str:
    """CMake source without comments."""
    return re.sub(r"#[^\n]*", "", path.read_text())


def cmake_set(path: Path, variable: str) -> list[str]:
    """Items of ``set(VARIABLE ...)`` with ``${MODULE_NAME}`` substituted."""
    text = cmake_text(path)
    name = re.search(r"set\(\s*MODULE_NAME\s+(\S+?)\s*\)", text).group(1)
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path.relative_to(ROOT)} has no set({variable} ...)"
    return [item.replace("${MODULE_NAME}", name) for item in match.group(1).split()]


def png_size(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:33]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def parameter_node_fields(path: Path) -> dict[str, str]:
    """Fields of the ``@parameterNodeWrapper`` class in a module file: name -> annotation source."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "parameterNodeWrapper"
                for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError(f"{path.name} has no @parameterNodeWrapper class")


# ---------------------------------------------------------------------------------------------------------
# Icons


@pytest.mark.parametrize("relpath", ["DeepRegistration.png", "DeepRegistration/Resources/Icons/DeepRegistration.png",
                                     "DatasetBuilder/Resources/Icons/DatasetBuilder.png"])
def test_icons_are_128_px_rgba_png(relpath):
    width, height, depth, colour = png_size(ROOT / relpath)
    assert (width, height) == (128, 128), f"{relpath} is {width}x{height}, the Extensions Index wants 128x128"
    assert (depth, colour) == (8, 6), f"{relpath} should be 8-bit RGBA"


def test_module_icon_is_the_extension_icon():
    assert (ROOT / "DeepRegistration.png").read_bytes() == \
        (ROOT / "DeepRegistration/Resources/Icons/DeepRegistration.png").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Extensions Index catalog entry


def test_catalog_entry_validates_against_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = next(p for p in SCHEMA_CANDIDATES if p.exists())
    schema = json.loads(schema_path.read_text())
    entry = json.loads((ROOT / "DeepRegistration.json").read_text())
    jsonschema.validate(entry, schema)
    assert entry["category"] == "Registration"
    assert entry["scm_url"].startswith("https://github.com/")


def test_schema_copy_matches_shared_schema():
    shared, copy = SCHEMA_CANDIDATES
    if not shared.exists():
        pytest.skip("no shared schema next to this checkout (clean clone)")
    assert json.loads(copy.read_text()) == json.loads(shared.read_text())


def test_catalog_entry_matches_cmake_project():
    text = cmake_text(ROOT / "CMakeLists.txt")
    project = re.search(r"project\(\s*(\w+)", text).group(1)
    assert (ROOT / f"{project}.json").exists(), "the catalog entry must be named after the CMake project"
    entry = json.loads((ROOT / f"{project}.json").read_text())
    depends = re.search(r'set\(\s*EXTENSION_DEPENDS\s+"?([^")]*)"?\s*\)', text).group(1).split()
    assert sorted(entry.get("build_dependencies", [])) == sorted(d for d in depends if d != "NA")
    category = re.search(r'set\(\s*EXTENSION_CATEGORY\s+"([^"]*)"', text).group(1)
    assert entry["category"] == category


# ---------------------------------------------------------------------------------------------------------
# CMake


def test_top_level_cmakelists():
    text = cmake_text(ROOT / "CMakeLists.txt")
    assert re.search(r"cmake_minimum_required\(\s*VERSION", text)
    assert re.search(r"project\(\s*DeepRegistration\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\(\s*{var}\s+\S", text), f"{var} is not set"
    assert re.search(r'EXTENSION_ICONURL\s+"https://[^"]+/DeepRegistration\.png"', text)
    assert re.search(r'EXTENSION_DEPENDS\s+"?PyTorch"?', text)
    assert re.search(r"find_package\(\s*Slicer\s+REQUIRED\s*\)", text)
    assert "include(${Slicer_USE_FILE})" in text
    for module in MODULES:
        assert re.search(rf"add_subdirectory\(\s*{module}\s*\)", text), f"add_subdirectory({module}) missing"
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text
    # the order matters: modules after find_package, CPack last
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(") < text.index("Slicer_EXTENSION_CPACK")
    # icon and screenshot URLs point into this repository's main branch at files that exist
    urls = re.findall(r'"(https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/[^"\s]+)"', text)
    assert len(urls) >= 2, urls
    for url in urls:
        path = url.split("/main/", 1)[1]
        assert (ROOT / path).is_file(), f"{url}: {path} is not in the repository"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists_lists_every_python_file(module):
    folder = ROOT / module
    listed = cmake_set(folder / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    resources = cmake_set(folder / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")  # e.g. scripts run as subprocesses
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    missing = sorted(set(on_disk) - set(listed) - set(resources))
    absent = sorted(set(listed) - set(on_disk))
    assert not missing, f"{module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS misses {missing} (Slicer would not install them)"
    assert not absent, f"{module}/CMakeLists.txt lists files that do not exist: {absent}"
    assert len(listed) == len(set(listed)), "duplicate entries"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists_resources_and_tests(module):
    folder = ROOT / module
    text = cmake_text(folder / "CMakeLists.txt")
    assert re.search(rf"set\(\s*MODULE_NAME\s+{module}\s*\)", text)
    resources = [r for r in cmake_set(folder / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES") if "${" not in r]
    assert f"Resources/Icons/{module}.png" in resources
    for resource in resources:
        assert (folder / resource).is_file(), f"{module}/CMakeLists.txt lists a missing resource: {resource}"
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for keyword in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS"):
        assert re.search(rf"\b{keyword}\b", call), f"slicerMacroBuildScriptedModule without {keyword}"
    assert re.search(r"if\(\s*BUILD_TESTING\s*\).*slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)"
                     r".*endif\(", text, re.S)


def test_deep_registration_resources_listed():
    resources = cmake_set(ROOT / "DeepRegistration" / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    assert "Resources/UI/DeepRegistration.ui" in resources
    text = cmake_text(ROOT / "DeepRegistration" / "CMakeLists.txt")
    sample_listed = "Resources/SampleData/" in text
    assert sample_listed, "the bundled sample data (used by the module's self-test) must be installed as resources"
    # every file under Resources is installed: listed by name or by one of the module's GLOBs
    globs = re.findall(r"file\(GLOB\s+(\w+)\s+RELATIVE\s+\S+\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\s*\)", text)
    assert {name for name, _ in globs} == {"MODULE_SAMPLE_DATA", "MODULE_MODELS"}
    assert all(f"${{{name}}}" in resources for name, _ in globs)
    folder = ROOT / "DeepRegistration"
    for path in sorted(p for p in (folder / "Resources").rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        assert rel in resources or any(fnmatch.fnmatch(rel, pattern) for _, pattern in globs), \
            f"{rel} is not installed (add it to MODULE_PYTHON_RESOURCES)"


# ---------------------------------------------------------------------------------------------------------
# Python sources


def python_sources() -> list[Path]:
    files = [ROOT / m / f"{m}.py" for m in MODULES]
    files += sorted((ROOT / "DeepRegistration" / "DeepRegistrationLib").rglob("*.py"))
    files += sorted((ROOT / "DeepRegistration" / "DeepRegistrationSlicerLib").glob("*.py"))
    files += sorted((ROOT / "DeepRegistration" / "DeepRegistrationWidgets").glob("*.py"))
    return files


@pytest.mark.parametrize("path", python_sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_sources_compile(path):
    compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("module", MODULES)
def test_module_file_has_the_template_classes(module):
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        assert module + suffix in classes, f"{module}.py has no class {module + suffix}"
        assert base in classes[module + suffix]
    source = (ROOT / module / f"{module}.py").read_text()
    # Slicer's built-in "Registration" category, translated as the 5.8 template does
    # (../shared/slicer/python/v5.8.1/Utilities/Templates/Modules/Scripted/TemplateKey.py: translate("qSlicerAbstractCoreModule", ...))
    assert re.search(r'categories\s*=\s*\[\s*translate\("qSlicerAbstractCoreModule",\s*"Registration"\)\s*\]', source)
    text = " ".join(source.split()).lower()
    assert "research use" in text and "not for clinical decisions" in text, "help text needs the intended use"


def test_module_python_files_do_not_import_torch_at_load_time():
    """Slicer imports every module file at start-up; torch must come later, through PyTorchUtils."""
    for module in MODULES:
        tree = ast.parse((ROOT / module / f"{module}.py").read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("torch", "DeepRegistrationLib", "SimpleITK", "monai"), \
                    f"{module}.py imports {name} at module level"


# ---------------------------------------------------------------------------------------------------------
# Qt Designer file vs parameter node


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def widget_property(widget: ET.Element, name: str) -> ET.Element | None:
    return next((p for p in widget.findall("property") if p.get("name") == name), None)


def test_ui_parses_and_parameter_names_match_parameter_node():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    fields = parameter_node_fields(MODULE_FILE)
    bound = {}
    for name, widget in ui_widgets().items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            bound[prop.findtext("string")] = widget
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName values with no parameter-node field: {unknown}"
    # 'model': its combo box lists the installed models, known only at run time, so the widget fills it
    # and writes the parameter itself (a bound QComboBox needs a Choice fixed when the class is defined)
    unbound = sorted(set(fields) - set(bound) - {"model"})
    assert not unbound, f"parameter-node fields with no widget in the .ui: {unbound}"
    assert "model" in fields and "modelComboBox" in ui_widgets()
    for param, widget in bound.items():
        annotation = fields[param]
        if annotation.startswith("vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox", param
            node_types = [s.text for s in widget_property(widget, "nodeTypes").iter("string")]
            assert annotation in node_types, f"{param}: nodeTypes {node_types} do not include {annotation}"
        elif "Choice(" in annotation:
            assert widget.get("class") == "QComboBox", param
        elif "float" in annotation:
            assert widget.get("class") in ("ctkSliderWidget", "QDoubleSpinBox"), param


def test_ui_structure_and_scene_connections():
    widgets = ui_widgets()
    titles = {w.findtext("property/string") for w in widgets.values() if w.get("class") == "ctkCollapsibleButton"}
    assert {"Inputs", "Settings", "Outputs"} <= titles
    assert widgets["applyButton"].get("class") == "QPushButton"
    assert any(w.get("class") == "QProgressBar" for w in widgets.values())
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos and combos <= connected, f"node combo boxes without a scene connection: {sorted(combos - connected)}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert {c for c in used if c.startswith(("qMRML", "ctk"))} <= custom, "custom widgets missing from <customwidgets>"


def test_widget_code_uses_only_widgets_of_the_ui():
    names = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert names, "the widget does not use self.ui"
    missing = sorted(names - set(ui_widgets()))
    assert not missing, f"DeepRegistration.py uses self.ui.{missing} absent from the .ui file"


# ---------------------------------------------------------------------------------------------------------
# Packaging files


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
