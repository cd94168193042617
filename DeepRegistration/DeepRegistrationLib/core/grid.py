"""The one geometry type of the engine: a regular 3D voxel grid placed in world space.

World frame
-----------
Everything inside the engine speaks **LPS millimetres** (the physical space of ITK, SimpleITK, ANTs
and DICOM): x grows to the patient's Left, y to Posterior, z to Superior. Slicer's RAS is reached
only in the Slicer I/O layer (x and y negated).

Index and array order
---------------------
A voxel index is written ``(i, j, k)`` = (x-index, y-index, z-index), the ITK order. Arrays hold
voxels in the reverse, C order ``array[k, j, i]``, i.e. shape ``(Z, Y, X)`` exactly like
``SimpleITK.GetArrayFromImage``. ``Grid.shape`` is that array shape ``(Z, Y, X)``; ``spacing``,
``origin`` and the columns of ``direction`` are in ITK order ``(x, y, z)`` / ``(i, j, k)``.

    world = origin + direction @ (spacing * (i, j, k))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in LPS world space.

    Attributes:
        shape: Array shape ``(Z, Y, X)`` (number of voxels along k, j, i).
        spacing: Voxel size in mm along the index axes ``(i, j, k)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3×3 rotation-or-reflection matrix, row-major as a 9-tuple (SimpleITK's layout);
            column ``c`` is the LPS unit vector of index axis ``c``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in np.asarray(self.direction).ravel()))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Grid needs 3 sizes, 3 spacings, 3 origin coordinates and a 3x3 direction")
        if min(self.shape) < 1 or min(self.spacing) <= 0:
            raise ValueError(f"Grid sizes must be >= 1 and spacings > 0, got {self.shape}, {self.spacing}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sitk(cls, image) -> "Grid":
        """Grid of a 3D SimpleITK image (``image.GetSize()`` is (X, Y, Z))."""
        size = image.GetSize()
        return cls(shape=(size[2], size[1], size[0]), spacing=image.GetSpacing(),
                   origin=image.GetOrigin(), direction=image.GetDirection())

    @classmethod
    def from_index_to_world(cls, shape: Sequence[int], matrix: np.ndarray) -> "Grid":
        """Grid from an array shape ``(Z, Y, X)`` and a 4×4 (i, j, k, 1) → LPS matrix."""
        m = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        return cls(shape=tuple(shape), spacing=tuple(spacing), origin=tuple(m[:3, 3]),
                   direction=tuple((m[:3, :3] / spacing).ravel()))

    # ------------------------------------------------------------------ matrices
    @property
    def size(self) -> tuple[int, int, int]:
        """Number of voxels along ``(i, j, k)`` = ``(X, Y, Z)`` (SimpleITK's ``GetSize`` order)."""
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        """3×3 direction matrix (columns = LPS unit vectors of the i, j, k axes)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes ``(Z, Y, X)`` (``spacing`` reversed)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_to_mm(self) -> np.ndarray:
        """3×3 matrix ``direction · diag(spacing)`` mapping a vector in voxel steps, components ``(i, j, k)``,
        to LPS mm, components ``(x, y, z)``: column ``c`` is the world vector of one step along index axis ``c``.
        Its inverse turns index derivatives into world derivatives."""
        return self.direction_matrix * np.asarray(self.spacing)[None, :]

    @property
    def index_to_world(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.voxel_to_mm
        m[:3, 3] = self.origin
        return m

    @property
    def world_to_index(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous LPS mm to continuous ``(i, j, k, 1)``."""
        return np.linalg.inv(self.index_to_world)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    # ------------------------------------------------------------------ points
    def world_points(self, dtype=np.float64) -> np.ndarray:
        """LPS coordinates of every voxel centre, shape ``(Z, Y, X, 3)``, components (x, y, z) mm."""
        k, j, i = np.meshgrid(*[np.arange(n, dtype=dtype) for n in self.shape], indexing="ij")
        ijk = np.stack([i, j, k], axis=-1)
        m = self.index_to_world.astype(dtype)
        return ijk @ m[:3, :3].T + m[:3, 3]

    def corners(self) -> np.ndarray:
        """LPS coordinates (mm) of the 8 outer corners of the grid's field of view, shape ``(8, 3)``.

        The field of view extends half a voxel beyond the outermost voxel centres.
        """
        lo = -0.5 * np.ones(3)
        hi = np.asarray(self.size, dtype=float) - 0.5
        pts = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        m = self.index_to_world
        return pts @ m[:3, :3].T + m[:3, 3]

    def center(self) -> np.ndarray:
        """LPS position (mm) of the centre of the field of view, shape ``(3,)``."""
        return self.corners().mean(axis=0)

    def extent_mm(self) -> np.ndarray:
        """Field-of-view size in mm along ``(i, j, k)``."""
        return np.asarray(self.size) * np.asarray(self.spacing)

    # ------------------------------------------------------------------ derived grids
    def with_spacing(self, spacing: float | Sequence[float]) -> "Grid":
        """Grid covering the same field of view (same direction) with a new voxel size.

        The number of voxels is rounded so the field of view changes by less than one new voxel;
        the field of view stays centred on the original one.

        Args:
            spacing: New voxel size in mm, a scalar (isotropic) or 3 values along (i, j, k).
        """
        sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
        extent = self.extent_mm()
        size = np.maximum(1, np.round(extent / sp)).astype(int)
        centre = self.center()
        d = self.direction_matrix
        origin = centre - d @ (sp * (size - 1) / 2.0)
        return Grid(shape=(size[2], size[1], size[0]), spacing=tuple(sp), origin=tuple(origin),
                    direction=self.direction)

    def downsampled(self, factor: int) -> "Grid":
        """Grid of ``avg_pool3d(kernel=factor, stride=factor, ceil_mode=True)`` applied to this grid."""
        if factor == 1:
            return self
        size = np.ceil(np.asarray(self.size) / factor).astype(int)
        sp = np.asarray(self.spacing) * factor
        origin = np.asarray(self.origin) + self.direction_matrix @ (np.asarray(self.spacing) * (factor - 1) / 2.0)
        return Grid(shape=(size[2], size[1], size[0]), spacing=tuple(sp), origin=tuple(origin),
                    direction=self.direction)

    # ------------------------------------------------------------------ comparisons / export
    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        """True when both grids have the same shape and place every voxel within ``tol`` mm."""
        if self.shape != other.shape:
            return False
        diff = np.abs(self.index_to_world - other.index_to_world)
        return bool(diff[:3, 3].max() < tol and diff[:3, :3].max() * max(self.size) < tol)

    def overlap_fraction(self, other: "Grid") -> float:
        """Fraction of this grid's axis-aligned LPS bounding box covered by ``other``'s bounding box."""
        a0, a1 = self.corners().min(0), self.corners().max(0)
        b0, b1 = other.corners().min(0), other.corners().max(0)
        inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
        return float(np.prod(inter) / max(np.prod(a1 - a0), 1e-12))

    def to_dict(self) -> dict:
        """JSON-friendly description (lists, mm, LPS)."""
        return {"shape_zyx": list(self.shape), "spacing_mm": list(self.spacing),
                "origin_lps_mm": list(self.origin), "direction": list(self.direction)}

    def apply_to_sitk(self, image) -> None:
        """Sets spacing, origin and direction of a SimpleITK image whose size matches this grid."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def __repr__(self) -> str:
        return (f"Grid(shape={self.shape}, spacing={tuple(round(s, 4) for s in self.spacing)}, "
                f"origin={tuple(round(o, 3) for o in self.origin)}, "
                f"direction={tuple(round(d, 4) for d in self.direction)})")


def isotropic(value: float) -> tuple[float, float, float]:
    """``(value, value, value)``; raises ValueError unless ``value`` is a finite positive number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"spacing must be a positive number of millimetres, got {value!r}")
    return (float(value),) * 3
