"""Slicer's own Python code, loaded on PyPI slicer-core's real MRML, for tests of the Slicer modules.

For a Slicer tag (``v5.8.1``, ``v5.10.0``, ``v5.12.3``) whose Python sources are in
``<repo>/../shared/slicer/python/<tag>/``, :func:`load` registers Slicer's REAL

- ``Base/Python/slicer/parameterNodeWrapper/`` as ``slicer.parameterNodeWrapper``,
- ``Base/Python/slicer/ScriptedLoadableModule.py`` as ``slicer.ScriptedLoadableModule``,
- ``Base/Python/slicer/i18n.py`` as ``slicer.i18n``,
- ``Base/Python/slicer/util.py`` as ``slicer.util`` (it replaces slicer-core's copy while loaded),
- ``Modules/Scripted/SampleData/SampleData.py`` as ``SampleData``,

on top of slicer-core's ``slicer`` package (real ``vtkMRMLScene``, nodes, storage nodes and module logics). Only the
C++/Qt application around them is stood in for:

- ``qt`` and ``ctk`` are inert: any class can be created, subclassed and called and does nothing. Nothing that needs
  Qt behaviour (signals, widgets, dialogs, ``slicer.util.tempDirectory``) can be tested through them. Only
  ``qt.QFile`` (exists, remove) and ``qt.QDir`` (mkpath, exists) act, on the OS, because SampleData relies on them.
- ``slicer.app`` (:class:`App`): ``translate`` returns the text (an English GUI), ``testingEnabled()`` is True (as
  in Slicer's self-tests: dialogs answer OK), ``connect(signal, slot)`` records the slot so a test can
  :meth:`App.emit` it, ``moduleManager().connect`` likewise, ``temporaryPath``/``cachePath`` are folders of the test, and ``coreIOManager()`` loads
  files with the real MRML module logics, as Slicer's readers do (volumes: ``vtkSlicerVolumesLogic``,
  segmentations: ``vtkSlicerSegmentationsModuleLogic``, markups: ``vtkSlicerMarkupsLogic``, transforms:
  ``vtkSlicerTransformLogic``).
- ``slicer.modules`` / ``slicer.moduleNames`` are plain namespaces, as Slicer's own ``slicer/__init__.py`` makes them.

Each :func:`load` starts from a clean slate: the modules above (and the scripted modules loaded through
:meth:`SlicerEnv.loadModule`) are purged from ``sys.modules`` before and restored after, so three tags can be
tested one after the other in one process without seeing each other's code.

Use in a test module::

    from slicer_real import slicerEnv  # noqa: F401  (the fixture, parametrized over TAGS)

    def test_something(slicerEnv):
        mod = slicerEnv.loadModule(ROOT / "DeepRegistration" / "DeepRegistration.py")
        logic = mod.DeepRegistrationLogic()
        p = logic.getParameterNode()          # the module's parameterNodeWrapper class, Slicer's real code
        ...

or ``with slicer_real.load("v5.10.0", tmpdir) as env: ...`` outside pytest fixtures. Tests using it skip with a
clear reason when ``../shared/slicer/python/<tag>`` is absent.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICER_PYTHON = ROOT.parent / "shared" / "slicer" / "python"
TAGS = ("v5.8.1", "v5.10.0", "v5.12.3")

for _folder in (ROOT / "DeepRegistration", ROOT / "DatasetBuilder"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# modules this harness owns while loaded (purged before, restored after)
_OWNED = ("qt", "ctk", "slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper",
          "slicer.modules", "slicer.moduleNames", "SampleData")
_QT_MRML_CLASSES = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLUtils",
                    "qMRMLWidget", "qSlicerWidget", "qMRMLScreenShotDialog", "qMRMLSubjectHierarchyTreeView",
                    "qMRMLSegmentSelectorWidget", "qMRMLTableView", "qSlicerFileDialog",
                    "qMRMLCheckableNodeComboBox")  # Qt widgets: inert
_SLICER_ATTRIBUTES = _QT_MRML_CLASSES + ("util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "modules", "moduleNames",
                      "app", "mrmlScene", "selfTests")


def missingReason(tag: str) -> str | None:
    """Why Slicer's sources for ``tag`` cannot be loaded (None when they can)."""
    folder = SLICER_PYTHON / tag
    try:
        import slicer  # noqa: F401
    except ImportError:
        return "PyPI slicer-core (the test extra) is not installed"
    if not (folder / "Base" / "Python" / "slicer" / "parameterNodeWrapper" / "__init__.py").is_file():
        return f"Slicer's Python sources for {tag} are not in {folder} (../shared/slicer/python/<tag> next to the repo)"
    return None


def sourceLine(tag: str, relativePath: str, text: str) -> int:
    """1-based line of the first occurrence of ``text`` in Slicer's ``relativePath`` at ``tag`` (for tests that cite
    Slicer source lines); fails when the text is not there any more."""
    lines = (SLICER_PYTHON / tag / relativePath).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not found in Slicer {tag} {relativePath}")


# --------------------------------------------------------------------------------------------------- inert Qt
class _InertValue:
    """A Qt enum value, method or property of an inert object: callable, combinable with ``|``, falsy."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        return _InertValue(self._name + "()")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertValue(f"{self._name}.{name}")

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __bool__(self):
        return False

    def __int__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __repr__(self):
        return f"<inert {self._name}>"


class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _InertValue(f"{cls.__name__}.{name}")
        setattr(cls, name, value)  # the same object each time: enum values compare equal to themselves
        return value


class _Inert(metaclass=_InertMeta):
    """Any Qt/CTK class: accepts any arguments, every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertValue(f"{type(self).__name__}.{name}")


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _InertMeta(name, (_Inert,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class _QFile(_Inert):
    """qt.QFile for the file operations Slicer's Python asks of it (SampleData: exists, remove), on the OS."""

    def __init__(self, path="", *args):
        self._path = str(path)

    def fileName(self):
        return self._path

    def exists(self):
        return os.path.exists(self._path)

    def remove(self):
        try:
            os.remove(self._path)
            return True
        except OSError:
            return False


class _QDir(_Inert):
    """qt.QDir for ``mkpath`` and ``exists`` (SampleData, util), on the OS."""

    def __init__(self, path="", *args):
        self._path = str(path)

    def mkpath(self, path):
        os.makedirs(str(path), exist_ok=True)
        return True

    def exists(self, path=None):
        return os.path.isdir(str(path) if path is not None else self._path)


_QT_FILE_CLASSES = {"QFile": _QFile, "QDir": _QDir}


# --------------------------------------------------------------------------------------------------- application
class IOManager:
    """Stands in for ``qSlicerCoreIOManager`` (C++): file types dispatched to the real MRML module logics."""

    def __init__(self, scene_getter):
        self._scene = scene_getter

    @staticmethod
    def fileType(fileName) -> str:
        name = str(fileName).lower()
        if name.endswith((".mrk.json", ".fcsv")):
            return "MarkupsFile"
        if name.endswith((".seg.nrrd", ".seg.nii.gz")):
            return "SegmentationFile"
        if name.endswith((".h5", ".tfm", ".txt")):
            return "TransformFile"
        return "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None) -> bool:
        import slicer

        scene = self._scene()
        fileName = str(properties["fileName"])
        name = properties.get("name")
        app = scene._keep[0] if hasattr(scene, "_keep") else None

        def logic(moduleName):
            found = app.GetModuleLogic(moduleName) if app is not None else None
            if found is None:
                raise RuntimeError(f"the scene has no {moduleName} logic (make it with SlicerEnv.newScene())")
            return found

        node = None
        if fileType == "VolumeFile":
            labelmap = 1 if properties.get("labelmap") else 0
            node = logic("Volumes").AddArchetypeVolume(fileName, name or Path(fileName).name.split(".")[0], labelmap)
        elif fileType == "SegmentationFile":
            node = logic("Segmentations").LoadSegmentationFromFile(fileName, True, name or "")
        elif fileType == "MarkupsFile":
            nodeId = logic("Markups").LoadMarkups(fileName, name or Path(fileName).name.split(".")[0])
            node = scene.GetNodeByID(nodeId) if nodeId else None
        elif fileType == "TransformFile":
            node = logic("Transforms").AddTransform(fileName, scene)
        if node is None:
            if userMessages is not None:
                userMessages.AddMessage(slicer.vtkCommand.ErrorEvent if hasattr(slicer, "vtkCommand") else 0,
                                        f"cannot read {fileName} as {fileType}")
            return False
        if name and node.GetName() != name:
            node.SetName(name)
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True


class App:
    """Stands in for ``slicer.app`` (qSlicerApplication) without Qt; see the module docstring."""

    applicationName = "Slicer"

    def __init__(self, tag: str, folder: Path, scene_getter):
        parts = tag.lstrip("v").split(".")
        self.majorVersion, self.minorVersion = int(parts[0]), int(parts[1])
        self.applicationVersion = tag.lstrip("v")
        self.temporaryPath = str(folder / "temp")
        self.cachePath = str(folder / "cache")
        self.slicerHome = str(folder / "home")
        self.documentationBaseUrl = f"https://slicer.readthedocs.io/en/{self.majorVersion}.{self.minorVersion}"
        for path in (self.temporaryPath, self.cachePath):
            Path(path).mkdir(parents=True, exist_ok=True)
        self.connections: dict[str, list] = {}
        self._io = IOManager(scene_getter)
        self._settings: dict = {}

    def translate(self, context, text):
        return text

    def testingEnabled(self) -> bool:
        return True

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True, testingEnabled=True)

    def connect(self, signal, slot) -> bool:
        self.connections.setdefault(signal, []).append(slot)
        return True

    def emit(self, signal) -> None:
        """Calls the slots connected to ``signal`` (e.g. ``"startupCompleted()"``)."""
        for slot in list(self.connections.get(signal, [])):
            slot()

    def coreIOManager(self):
        return self._io

    def moduleManager(self):
        return self  # connect()/disconnect() recorded like the application's signals

    def disconnect(self, signal, slot) -> bool:
        if slot in self.connections.get(signal, []):
            self.connections[signal].remove(slot)
        return True

    def processEvents(self, *args):
        pass

    def settings(self):
        return _Settings(self._settings)

    userSettings = settings

    def moduleDocumentationUrl(self, moduleName):
        return f"{self.documentationBaseUrl}/user_guide/modules/{moduleName.lower()}.html"

    def __getattr__(self, name):  # layoutManager, setOverrideCursor, ... : inert
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertValue(f"app.{name}")


class _Settings:
    def __init__(self, store):
        self._store = store

    def value(self, key, default=None):
        return self._store.get(key, default)

    def setValue(self, key, value):
        self._store[key] = value


# --------------------------------------------------------------------------------------------------- loading
class SlicerEnv:
    """Slicer's real Python of one tag, loaded (see the module docstring).

    Attributes:
        tag: e.g. ``"v5.8.1"``; ``version``: ``(5, 8)``.
        source: Folder of that tag's sources (``../shared/slicer/python/<tag>``).
        slicer: the ``slicer`` package; ``app``: the :class:`App`; ``scene``: ``slicer.mrmlScene``.
        util, i18n, ScriptedLoadableModule, parameterNodeWrapper, SampleData: Slicer's real modules.
    """

    def __init__(self, tag: str, folder: Path):
        import slicer

        self.tag = tag
        self.version = tuple(int(x) for x in tag.lstrip("v").split(".")[:2])
        self.source = SLICER_PYTHON / tag
        self.folder = Path(folder)
        self.slicer = slicer
        self._loaded: list[str] = []

    def newScene(self):
        """A fresh scene with the module logics (Colors, Markups, Segmentations, Transforms, Volumes,
        SubjectHierarchy) and a cache manager; becomes ``slicer.mrmlScene``."""
        from DeepRegistrationSlicerLib.nodes import makeScene

        scene = makeScene()
        if hasattr(self.slicer, "vtkCacheManager"):
            cache = self.slicer.vtkCacheManager()
            cache.SetRemoteCacheDirectory(self.app.cachePath)
            scene.SetCacheManager(cache)
            scene._keep = scene._keep + (cache,)
        self.slicer.mrmlScene = scene
        return scene

    @property
    def scene(self):
        return self.slicer.mrmlScene

    def sourcePath(self, relativePath: str) -> Path:
        return self.source / relativePath

    def sourceLine(self, relativePath: str, text: str) -> int:
        return sourceLine(self.tag, relativePath, text)

    def loadModule(self, path, name: str | None = None):
        """Imports a scripted module file (e.g. ``DeepRegistration/DeepRegistration.py``) as Slicer's scripted
        module factory does: by its file name, with its folder on ``sys.path``; purged when the env closes."""
        path = Path(path).resolve()
        name = name or path.stem
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        sys.modules.pop(name, None)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        self._loaded.append(name)
        spec.loader.exec_module(module)
        return module

    def instantiate(self, module, className: str | None = None):
        """Creates the module's ``ScriptedLoadableModule`` subclass the way qSlicerScriptedLoadableModule does: with
        a parent carrying ``path`` and receiving title, categories, helpText, ...; returns (instance, parent)."""
        name = className or module.__name__
        parent = types.SimpleNamespace(path=str(Path(module.__file__).resolve()), name=name)
        instance = getattr(module, name)(parent)
        setattr(self.slicer.modules, f"{name}Instance", instance)
        setattr(self.slicer.modules, name.lower(), parent)  # slicer.util.modulePath reads .path from here
        setattr(self.slicer.moduleNames, name, name)
        return instance, parent

    def createWidget(self, module, ui, className: str | None = None):
        """Creates and sets up the module's ``ScriptedLoadableModuleWidget`` subclass (Slicer's real base class)
        in an inert parent panel; ``slicer.util.loadUI`` and ``childWidgetVariables`` (Qt's UI loader) are stood
        in for by ``ui``, a namespace of (inert) widgets named as in the .ui file. Returns the widget; the inert
        panel is its ``parent`` (``parent.isEntered`` is True)."""
        import qt

        name = (className or module.__name__) + "Widget"
        panel = self.slicer.qMRMLWidget()
        panel.isEntered = True
        util = self.util
        saved = util.loadUI, util.childWidgetVariables
        util.loadUI = lambda path: ui.__dict__.get("_root") or qt.QWidget()
        util.childWidgetVariables = lambda widget: ui
        try:
            widget = getattr(module, name)(panel)
            widget.setup()
        finally:
            util.loadUI, util.childWidgetVariables = saved
        setattr(self.slicer.modules, name, widget)
        return widget

    # --------------------------------------------------------------------------------------------- internals
    def _exec(self, name: str, path: Path, package: bool = False):
        kwargs = {"submodule_search_locations": [str(path.parent)]} if package else {}
        spec = importlib.util.spec_from_file_location(name, path, **kwargs)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(self.slicer, name.split(".", 1)[1], module)
        spec.loader.exec_module(module)
        return module

    def _open(self):
        slicer = self.slicer
        base = self.source / "Base" / "Python" / "slicer"
        for name in ("qt", "ctk"):
            sys.modules[name] = _InertModule(name)
        for name, cls in _QT_FILE_CLASSES.items():
            setattr(sys.modules["qt"], name, cls)
        for name in _QT_MRML_CLASSES:
            setattr(slicer, name, getattr(sys.modules["qt"], name))
        for name in ("modules", "moduleNames"):
            module = types.ModuleType(f"slicer.{name}")
            sys.modules[f"slicer.{name}"] = module
            setattr(slicer, name, module)
        self.app = slicer.app = App(self.tag, self.folder, lambda: slicer.mrmlScene)
        self.newScene()
        self.i18n = self._exec("slicer.i18n", base / "i18n.py")
        self.util = self._exec("slicer.util", base / "util.py")
        self.parameterNodeWrapper = self._exec("slicer.parameterNodeWrapper", base / "parameterNodeWrapper" /
                                               "__init__.py", package=True)
        self.ScriptedLoadableModule = self._exec("slicer.ScriptedLoadableModule", base / "ScriptedLoadableModule.py")
        self.SampleData = self._exec("SampleData", self.source / "Modules" / "Scripted" / "SampleData" /
                                     "SampleData.py")
        return self


def _ownedNames():
    return [n for n in sys.modules if n in _OWNED or any(n.startswith(o + ".") for o in _OWNED)]


@contextlib.contextmanager
def load(tag: str, folder):
    """Loads Slicer ``tag``'s real Python (see the module docstring) for the duration of the ``with`` block;
    ``folder`` holds the stand-in application's temporary and cache folders."""
    reason = missingReason(tag)
    if reason:
        raise RuntimeError(reason)
    import slicer

    savedModules = {n: sys.modules[n] for n in _ownedNames()}
    savedAttributes = {a: getattr(slicer, a) for a in _SLICER_ATTRIBUTES if hasattr(slicer, a)}
    for name in savedModules:
        del sys.modules[name]
    env = SlicerEnv(tag, folder)
    try:
        yield env._open()
    finally:
        for name in _ownedNames() + env._loaded:
            sys.modules.pop(name, None)
        for name in [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper")]:
            del sys.modules[name]
        sys.modules.update(savedModules)
        for attribute in _SLICER_ATTRIBUTES:
            if attribute in savedAttributes:
                setattr(slicer, attribute, savedAttributes[attribute])
            elif hasattr(slicer, attribute):
                delattr(slicer, attribute)


@pytest.fixture(params=TAGS)
def slicerEnv(request, tmp_path):
    """Slicer's real Python at each of :data:`TAGS` (one test per tag), skipped when the sources are absent."""
    reason = missingReason(request.param)
    if reason:
        pytest.skip(reason)
    with load(request.param, tmp_path) as env:
        yield env
