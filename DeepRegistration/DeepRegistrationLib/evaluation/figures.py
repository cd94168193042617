"""``report.png``: a visual check of a registration in three orthogonal planes.

Rows: axial, coronal, sagittal slices through the centre of the fixed image. Columns: fixed image;
moving image before registration (resampled onto the fixed grid as it lies); moving image after;
checkerboard of fixed/moving before and after; Jacobian determinant of the transform (blue = shrink,
red = expand, 0–2 with its colour bar, black contour where det J <= 0).

With explainability maps (``maps``, see :func:`DeepRegistrationLib.evaluation.explain.explanation_maps`; and
``uncertainty``), three more rows (axial, coronal, sagittal again) show, one column each: the residual
``|fixed − warped|`` (0–0.5 of the normalized range), the local similarity (LNCC cc², shown 0.5–1; or
the local MI in nats, 0 to its 99th percentile), the displacement magnitude (mm, 0 to its 99th
percentile) and, when present, the restart spread (mm), each with a colour bar.

The figure is composed as one RGB array (panels scaled to their physical aspect ratio, nearest neighbour) and
written with Pillow (a dependency of matplotlib) in matplotlib's font, DejaVu Sans: only the three central slices
of each volume are read, and matplotlib itself is imported only for the colour maps of the explainability rows.
"""
from __future__ import annotations

import os

import numpy as np

from ..core.grid import Grid
from ..core.image import Image

#: Size (pixels) of the square box each panel is fitted into, and the gap between boxes.
CELL = 180
GAP = 12

#: zlib level of ``report.png`` (lossless at any level: the same pixels). The 1292×636 figure of the 2 mm trunk CT:
#: Pillow's default 6 0.18 CPU s, 345 kB; 3 0.08 s, 350 kB; 1 0.06 s, 421 kB.
PNG_COMPRESS_LEVEL = 3

#: ColorBrewer "RdBu" (11 classes, Cynthia Brewer, Apache-2.0), blue (low) to red (high): the Jacobian's colours.
_RDBU_R = np.array([(5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240),
                    (247, 247, 247), (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43),
                    (103, 0, 31)], dtype=np.float64)


def _lut(name: str) -> np.ndarray:
    """256-entry RGB colour table (uint8, shape ``(256, 3)``) of a colour map."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "gray":
        return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    if name == "RdBu_r":
        nodes = np.linspace(0.0, 1.0, len(_RDBU_R))
        return np.stack([np.interp(x, nodes, _RDBU_R[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)
    from matplotlib import colormaps  # only the explainability rows' perceptual maps need it

    return (colormaps[name](x)[:, :3] * 255).round().astype(np.uint8)


def _lps_orientation(grid: Grid) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], tuple[float, float, float]]:
    """How to view a ``(Z, Y, X)`` array in the closest LPS axis order (what SimpleITK's ``DICOMOrient(img, "LPS")``
    does to the whole volume): for the new array axes ``(S, P, L)``, the source array axis, whether it is
    reversed, and the voxel size (mm) along it. The closest world axis of every index axis is chosen greedily by
    the largest absolute direction cosine."""
    d = np.abs(grid.direction_matrix)  # [world axis, index axis]
    world_of = {}
    for _ in range(3):
        w, a = np.unravel_index(int(np.argmax(d)), d.shape)
        world_of[int(a)] = int(w)
        d[w, :] = -1.0
        d[:, a] = -1.0
    index_of = {w: a for a, w in world_of.items()}
    axes, flips, sizes = [], [], []
    for w in (2, 1, 0):  # new array axes: S (world z), P (world y), L (world x)
        a = index_of[w]
        axes.append(2 - a)  # index axis i, j, k = array axis 2, 1, 0
        flips.append(bool(grid.direction_matrix[w, a] < 0))
        sizes.append(grid.spacing[a])
    return tuple(axes), tuple(flips), tuple(sizes)


def _lps_slices(arr: np.ndarray, grid: Grid) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal central slices for display, with their pixel aspect ratios (height / width).

    The volume is viewed in the closest LPS axis order (:func:`_lps_orientation`; no copy of the volume) and
    shown in radiological convention: anterior up in axial, superior up in coronal/sagittal.
    """
    axes, flips, (sz, sy, sx) = _lps_orientation(grid)
    vol = np.transpose(np.asarray(arr), axes)  # (S, P, L) index order, a view
    vol = vol[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    cz, cy, cx = (n // 2 for n in vol.shape)
    axial = vol[cz]  # rows posterior-down, columns toward patient left
    coronal = vol[:, cy, :][::-1]
    sagittal = vol[:, :, cx][::-1]
    return [(np.array(s, dtype=np.float32), asp) for s, asp in
            ((axial, sy / sx), (coronal, sz / sx), (sagittal, sz / sy))]


def _checker(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    yy, xx = np.indices(a.shape)
    mask = ((yy * tiles // a.shape[0]) + (xx * tiles // a.shape[1])) % 2 == 0
    return np.where(mask, a, b)


#: Above this many voxels the display range is taken from every k-th voxel (about this many values).
NORM_SAMPLE = 2_000_000


def _display_range(arr: np.ndarray, percentiles=(1.0, 99.5)) -> tuple[float, float]:
    """The robust display range of a volume (its percentiles; of a regular subsample of a large volume)."""
    flat = np.asarray(arr).reshape(-1)
    step = max(1, flat.size // NORM_SAMPLE)
    lo, hi = np.percentile(flat[::step], percentiles)
    return float(lo), float(hi)


def _normed(slices: list[tuple[np.ndarray, float]], lo: float, hi: float) -> list[tuple[np.ndarray, float]]:
    return [(np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1), asp) for s, asp in slices]


def _colour(sl: np.ndarray, lut: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``(h, w)`` values → ``(h, w, 3)`` uint8 through ``lut`` on ``[vmin, vmax]``; NaN white."""
    x = (np.nan_to_num(sl, nan=vmin) - vmin) / max(vmax - vmin, 1e-12)
    idx = np.clip(np.floor(x * 256), 0, 255).astype(np.intp)
    rgb = lut[idx]
    rgb[np.isnan(sl)] = 255
    return rgb


def _fit(shape: tuple[int, int], aspect: float) -> tuple[int, int]:
    """Pixel size ``(height, width)`` of a ``shape`` slice with pixel aspect ``aspect`` fitted into a CELL box."""
    h, w = shape
    scale = CELL / max(w, h * aspect)
    return max(1, round(h * aspect * scale)), max(1, round(w * scale))


def _upsample(sl: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes."""
    rows = np.minimum(((np.arange(out_h) + 0.5) * sl.shape[0] / out_h).astype(np.intp), sl.shape[0] - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * sl.shape[1] / out_w).astype(np.intp), sl.shape[1] - 1)
    return sl[rows][:, cols]


def _font(size: int = 12):
    """DejaVu Sans (matplotlib's own font, read from its package data without importing matplotlib), else
    Pillow's default font."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.isfile(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


class _Canvas:
    """An RGB image with panels, colour bars and text placed in pixels."""

    def __init__(self, height: int, width: int, font):
        self.rgb = np.full((height, width, 3), 255, np.uint8)
        self.font = font
        self.texts: list[tuple] = []

    def panel(self, top: int, left: int, sl: np.ndarray, aspect: float, lut: np.ndarray, vmin: float,
              vmax: float, contour: np.ndarray | None = None) -> None:
        """A slice centred in the CELL box at ``(top, left)``, framed; ``contour``: a mask outlined in black."""
        out_h, out_w = _fit(sl.shape, aspect)
        rgb = _upsample(_colour(sl, lut, vmin, vmax), out_h, out_w)
        if contour is not None and contour.any():
            m = _upsample(contour, out_h, out_w)
            edge = np.zeros_like(m)
            edge[1:] |= m[1:] != m[:-1]
            edge[:, 1:] |= m[:, 1:] != m[:, :-1]
            rgb[edge] = 0
        y0, x0 = top + (CELL - out_h) // 2, left + (CELL - out_w) // 2
        self.rgb[y0 - 1:y0 + out_h + 1, x0 - 1:x0 + out_w + 1] = 0  # a one-pixel black frame
        self.rgb[y0:y0 + out_h, x0:x0 + out_w] = rgb

    def colour_bar(self, top: int, left: int, height: int, width: int, lut: np.ndarray, vmin: float, vmax: float,
                   label: str, vertical: bool) -> None:
        """A colour bar with five (vertical) or three (horizontal) tick labels and its label."""
        ramp = np.linspace(1.0, 0.0, height) if vertical else np.linspace(0.0, 1.0, width)
        idx = np.clip(np.floor(ramp * 256), 0, 255).astype(np.intp)
        strip = lut[idx][:, None, :].repeat(width, 1) if vertical else lut[idx][None].repeat(height, 0)
        self.rgb[top - 1:top + height + 1, left - 1:left + width + 1] = 0
        self.rgb[top:top + height, left:left + width] = strip
        ticks = np.linspace(vmin, vmax, 5 if vertical else 3)
        fmt = (lambda v: f"{v:.2f}") if vmax - vmin < 10 else (lambda v: f"{v:.0f}")
        for n, v in enumerate(ticks):
            f = n / (len(ticks) - 1)
            if vertical:
                y = top + round((1 - f) * (height - 1))
                self.rgb[y, left + width:left + width + 4] = 0
                self.text(left + width + 6, y, fmt(v), anchor="lm")
            else:
                x = left + round(f * (width - 1))
                self.rgb[top + height:top + height + 4, x] = 0
                self.text(x, top + height + 5, fmt(v), anchor="mt")
        if vertical:
            self.text(left + width + 48, top + height // 2, label, anchor="mm", rotate=True)
        else:
            self.text(left + width // 2, top + height + 21, label, anchor="mt")

    def text(self, x: int, y: int, s: str, anchor: str = "mm", rotate: bool = False) -> None:
        self.texts.append((x, y, s, anchor, rotate))

    def save(self, path) -> None:
        from PIL import Image as PILImage
        from PIL import ImageDraw

        img = PILImage.fromarray(self.rgb)
        draw = ImageDraw.Draw(img)
        for x, y, s, anchor, rotate in self.texts:
            if not rotate:
                draw.text((x, y), s, fill=(0, 0, 0), font=self.font, anchor=anchor)
                continue
            l, t, r, b = draw.textbbox((0, 0), s, font=self.font)
            label = PILImage.new("RGB", (r - l + 2, b - t + 2), (255, 255, 255))
            ImageDraw.Draw(label).text((1 - l, 1 - t), s, fill=(0, 0, 0), font=self.font)
            label = label.rotate(90, expand=True)
            img.paste(label, (x - label.width // 2, y - label.height // 2))
        img.save(os.fspath(path), format="PNG", compress_level=PNG_COMPRESS_LEVEL)


#: The explainability rows: map name -> (column title, colour map, fixed (vmin, vmax) or None = 0..p99, colour bar label).
MAP_ROWS = {"residual": ("residual |fixed - warped|", "magma", (0.0, 0.5), "normalized intensity"),
            "local_similarity": ("local similarity (LNCC cc²)", "viridis", (0.5, 1.0), "cc²"),
            "local_mi": ("local similarity (local MI)", "viridis", None, "nats"),
            "displacement": ("displacement |T(x) - x|", "plasma", None, "mm"),
            "uncertainty": ("uncertainty (restart spread)", "inferno", None, "mm")}


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at ``" | "`` into lines no wider than ``width`` pixels."""
    parts, lines = text.split(" | "), []
    for part in parts:
        if lines and font.getlength(lines[-1] + " | " + part) <= width:
            lines[-1] += " | " + part
        else:
            lines.append(part)
    return lines


def draw_report(fixed: Image, moving_before: Image, warped: Image, jacobian: Image, path: str | os.PathLike,
                lines: list[str] | None = None, maps: dict[str, Image] | None = None) -> None:
    """Draws the report figure to ``path`` (PNG). All images must lie on the fixed grid.

    Args:
        maps: Optional maps on the fixed grid by name (keys of :data:`MAP_ROWS`: ``residual``,
            ``local_similarity`` (LNCC cc²) or ``local_mi``, ``displacement``, ``uncertainty``), drawn as three
            extra rows.
    """
    g = fixed.grid
    gray, rdbu = _lut("gray"), _lut("RdBu_r")
    cols = [(title, _normed(_lps_slices(im.array, g), *_display_range(im.array)))
            for title, im in (("fixed", fixed), ("moving (before)", moving_before), ("moving (after)", warped))]
    chk_b = [(_checker(a, b), asp) for (a, asp), (b, _) in zip(cols[0][1], cols[1][1])]
    chk_a = [(_checker(a, b), asp) for (a, asp), (b, _) in zip(cols[0][1], cols[2][1])]
    cols += [("checkerboard before", chk_b), ("checkerboard after", chk_a)]
    jac = _lps_slices(jacobian.array, g)
    extra = [(name, m) for name, m in (maps or {}).items() if name in MAP_ROWS]
    rows = 6 if extra else 3
    ncols = len(cols) + 1
    left0, bar_w = 30, 110
    width = left0 + ncols * (CELL + GAP) + bar_w
    font = _font()
    head = _wrap("DeepRegistration — " + " | ".join(lines), font, width - 40) if lines else []
    top0 = 16 + 16 * len(head) + 24  # the title lines, then the column titles
    row_top = [top0 + r * (CELL + GAP) + (24 if r >= 3 else 0) for r in range(rows)]
    height = row_top[-1] + CELL + (100 if extra else 16)
    canvas = _Canvas(height, width, font)
    for n, line in enumerate(head):
        canvas.text(width // 2, 12 + 16 * n, line, anchor="mt")
    col_left = [left0 + c * (CELL + GAP) for c in range(ncols)]
    for c, (title, slices) in enumerate(cols):
        canvas.text(col_left[c] + CELL // 2, top0 - 8, title, anchor="md")
        for r, (sl, aspect) in enumerate(slices):
            canvas.panel(row_top[r], col_left[c], sl, aspect, gray, 0.0, 1.0)
    c = len(cols)
    canvas.text(col_left[c] + CELL // 2, top0 - 8, "Jacobian det", anchor="md")
    for r, (sl, aspect) in enumerate(jac):
        canvas.panel(row_top[r], col_left[c], sl, aspect, rdbu, 0.0, 2.0, contour=sl <= 0)
    bar_h = (row_top[2] + CELL - row_top[0]) // 2
    canvas.colour_bar(row_top[0] + bar_h // 2, col_left[c] + CELL + 8, bar_h, 14, rdbu, 0.0, 2.0, "det J", True)
    for c, (name, m) in enumerate(extra):
        title, cmap, limits, label = MAP_ROWS[name]
        arr = np.nan_to_num(np.asarray(m.array, dtype=np.float32))
        vmin, vmax = limits or (0.0, max(float(np.percentile(arr, 99)), 1e-6))
        lut = _lut(cmap)
        canvas.text(col_left[c] + CELL // 2, row_top[3] - 8, title, anchor="md")
        for r, (sl, aspect) in enumerate(_lps_slices(arr, g)):
            canvas.panel(row_top[3 + r], col_left[c], sl, aspect, lut, vmin, vmax)
        canvas.colour_bar(row_top[5] + CELL + 6, col_left[c] + CELL // 10, 10, CELL * 8 // 10, lut, vmin, vmax,
                          label, False)
    for r in range(rows):
        canvas.text(12, row_top[r] + CELL // 2, ("axial", "coronal", "sagittal")[r % 3], rotate=True)
    canvas.save(path)
