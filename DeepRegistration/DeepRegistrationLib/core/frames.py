"""World frames: Slicer's RAS and the engine's LPS (ITK, SimpleITK, ANTs, DICOM), and the one conversion between them.

RAS x grows to the patient's Right, y Anterior, z Superior; LPS x Left, y Posterior, z Superior. Points and
vectors convert with ``C = diag(-1, -1, 1)`` in both directions (``C`` is its own inverse); a homogeneous 4×4
matrix ``M`` that maps into RAS maps into LPS as ``RAS_TO_LPS_4 @ M``. Only the I/O boundary uses this module
(landmark files, the MRML glue); see docs/CONVENTIONS.md §1. Torch-free.
"""
from __future__ import annotations

import numpy as np

#: ``C``: RAS → LPS (and LPS → RAS) for points and vectors, 3×3.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: The same for homogeneous 4×4 matrices (and points ``(x, y, z, 1)``).
RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

_FLIP = np.array([-1.0, -1.0, 1.0])


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Points or vectors ``(..., 3)`` in RAS mm as LPS mm (x and y negated; a new float64 array)."""
    return np.asarray(points, dtype=np.float64) * _FLIP


#: LPS → RAS is the same map.
lps_to_ras = ras_to_lps
