"""DeepRegistration engine: physical-space image registration on PyTorch.

World frame: LPS millimetres; arrays ``(Z, Y, X)``; transforms map fixed → moving points (see
:mod:`DeepRegistrationLib.core.grid` and :mod:`DeepRegistrationLib.spatial.transforms`). Importing this package is
cheap: torch and SimpleITK load when a submodule needing them is imported.

Layers, lowest first (a module imports only from its own layer or lower ones; ``Testing/test_architecture.py``
checks it): ``core`` (torch-free) → ``io`` (torch-free) → ``spatial`` → ``registration`` → ``learning`` →
``evaluation`` → ``workflows``, ``dicom`` → ``apps``. ``evaluation.metrics`` and ``evaluation.figures`` are torch-free and sit
just above ``io``; ``learning.model_files`` and ``learning.registry`` are torch-free too; ``registration.run``
(read, register, score, write) sits just above ``evaluation``, below ``workflows`` and ``apps``.

Typical use::

    import DeepRegistrationLib as dr
    dr.run_registration("fixed.nii.gz", "moving.nii.gz", "out", dr.RegistrationConfig(mode="deformable"))
"""
from __future__ import annotations

__version__ = "0.1.0"

# The public API, loaded on first use (PEP 562): ``import DeepRegistrationLib`` stays cheap (no torch, no
# SimpleITK) and ``DeepRegistrationLib.register`` etc. import only what they need.
_PUBLIC = {
    "register": "registration.pipeline",
    "RegistrationResult": "registration.pipeline",
    "run_registration": "registration.run",
    "RegistrationConfig": "core.config",
    "Grid": "core.grid",
    "Image": "core.image",
    "SpatialTransform": "spatial.transforms",
    "read_image": "io.images",
    "write_image": "io.images",
    "DeepRegistrationError": "core.errors",
    "InputError": "core.errors",
    "Cancelled": "core.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
