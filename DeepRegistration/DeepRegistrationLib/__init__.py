"""DeepRegistration engine: physical-space image registration on PyTorch.

World frame: LPS millimetres; arrays ``(Z, Y, X)``; transforms map fixed → moving points (see
:mod:`DeepRegistrationLib.grid` and :mod:`DeepRegistrationLib.transforms`). Importing this package is
cheap: torch and SimpleITK load when a submodule needing them is imported.

Typical use::

    from DeepRegistrationLib.outputs import run_registration
    from DeepRegistrationLib.config import RegistrationConfig
    run_registration("fixed.nii.gz", "moving.nii.gz", "out", RegistrationConfig(mode="deformable"))
"""
from __future__ import annotations

__version__ = "0.1.0"
