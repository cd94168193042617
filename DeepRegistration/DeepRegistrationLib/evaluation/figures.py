"""``report.png``: a visual check of a registration in three orthogonal planes.

Rows: axial, coronal, sagittal slices through the centre of the fixed image. Columns: fixed image;
moving image before registration (resampled onto the fixed grid as it lies); moving image after;
checkerboard of fixed/moving before and after; Jacobian determinant of the transform (blue = shrink,
red = expand, black contour where det J <= 0).

With explainability maps (``maps``, see :func:`DeepRegistrationLib.evaluation.explain.explanation_maps`; and
``uncertainty``), three more rows (axial, coronal, sagittal again) show, one column each: the residual
``|fixed − warped|`` (0–0.5 of the normalized range), the local similarity (LNCC cc², shown 0.5–1; or
the local MI in nats, 0 to its 99th percentile), the displacement magnitude (mm, 0 to its 99th
percentile) and, when present, the restart spread (mm).
"""
from __future__ import annotations

import os

import numpy as np

from ..core.grid import Grid
from ..core.image import Image


def _lps_slices(arr: np.ndarray, grid: Grid) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal central slices for display, with their pixel aspect ratios.

    The volume is first reoriented to the closest LPS axis order (SimpleITK ``DICOMOrient``), then
    shown in radiological convention: anterior up in axial, superior up in coronal/sagittal.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.float32)))
    grid.apply_to_sitk(img)
    img = sitk.DICOMOrient(img, "LPS")
    vol = sitk.GetArrayFromImage(img)  # (S, P, L) index order
    sx, sy, sz = img.GetSpacing()
    cz, cy, cx = (n // 2 for n in vol.shape)
    axial = vol[cz]  # rows posterior-down, columns toward patient left
    coronal = vol[:, cy, :][::-1]
    sagittal = vol[:, :, cx][::-1]
    return [(axial, sy / sx), (coronal, sz / sx), (sagittal, sz / sy)]


def _checker(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    yy, xx = np.indices(a.shape)
    mask = ((yy * tiles // a.shape[0]) + (xx * tiles // a.shape[1])) % 2 == 0
    return np.where(mask, a, b)


def _norm(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [1, 99.5])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


#: The explainability rows: map name -> (column title, colour map, fixed (vmin, vmax) or None = 0..p99, colour bar label).
MAP_ROWS = {"residual": ("residual |fixed - warped|", "magma", (0.0, 0.5), "normalized intensity"),
            "local_similarity": ("local similarity (LNCC cc²)", "viridis", (0.5, 1.0), "cc²"),
            "local_mi": ("local similarity (local MI)", "viridis", None, "nats"),
            "displacement": ("displacement |T(x) - x|", "plasma", None, "mm"),
            "uncertainty": ("uncertainty (restart spread)", "inferno", None, "mm")}


def draw_report(fixed: Image, moving_before: Image, warped: Image, jacobian: Image, path: str | os.PathLike,
                lines: list[str] | None = None, maps: dict[str, Image] | None = None) -> None:
    """Draws the report figure to ``path`` (PNG). All images must lie on the fixed grid.

    Args:
        maps: Optional maps on the fixed grid by name (keys of :data:`MAP_ROWS`: ``residual``,
            ``local_similarity`` (LNCC cc²) or ``local_mi``, ``displacement``, ``uncertainty``), drawn as three
            extra rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = fixed.grid
    f, mb, mw = _norm(fixed.array), _norm(moving_before.array), _norm(warped.array)
    cols = [("fixed", _lps_slices(f, g), "gray"), ("moving (before)", _lps_slices(mb, g), "gray"),
            ("moving (after)", _lps_slices(mw, g), "gray")]
    chk_b = [(_checker(a, b), asp) for (a, asp), (b, _) in zip(cols[0][1], cols[1][1])]
    chk_a = [(_checker(a, b), asp) for (a, asp), (b, _) in zip(cols[0][1], cols[2][1])]
    cols += [("checkerboard before", chk_b, "gray"), ("checkerboard after", chk_a, "gray"),
             ("Jacobian det", _lps_slices(jacobian.array, g), "RdBu_r")]
    extra = [(name, m) for name, m in (maps or {}).items() if name in MAP_ROWS]
    rows = 6 if extra else 3
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 2.8 * rows))
    for c, (title, slices, cmap) in enumerate(cols):
        for r, (sl, aspect) in enumerate(slices):
            ax = axes[r, c]
            kw = dict(vmin=0.0, vmax=2.0) if cmap == "RdBu_r" else dict(vmin=0, vmax=1)
            im = ax.imshow(sl, cmap=cmap, aspect=aspect, interpolation="nearest", **kw)
            if cmap == "RdBu_r" and (sl <= 0).any():
                ax.contour(sl <= 0, levels=[0.5], colors="k", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        if cmap == "RdBu_r":
            fig.colorbar(im, ax=axes[:, c], shrink=0.5, label="det J")
    for c in range(len(cols)):
        if c >= len(extra):
            for r in range(3, rows):
                axes[r, c].axis("off")
            continue
        name, m = extra[c]
        title, cmap, limits, label = MAP_ROWS[name]
        arr = np.nan_to_num(np.asarray(m.array, dtype=np.float32))
        vmin, vmax = limits or (0.0, max(float(np.percentile(arr, 99)), 1e-6))
        for r, (sl, aspect) in enumerate(_lps_slices(arr, g)):
            ax = axes[3 + r, c]
            im = ax.imshow(sl, cmap=cmap, aspect=aspect, interpolation="nearest", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[5, c], orientation="horizontal", fraction=0.08, pad=0.04, label=label)
    for r in range(rows):
        axes[r, 0].set_ylabel(("axial", "coronal", "sagittal")[r % 3], fontsize=9)
    if lines:
        fig.suptitle("DeepRegistration — " + " | ".join(lines), fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
