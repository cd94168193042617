"""Draws the extension and module icons (128 x 128 RGBA PNG) with Pillow.

- ``DeepRegistration.png`` (repository root, the Extensions Index icon) and
  ``DeepRegistration/Resources/Icons/DeepRegistration.png`` (the module icon, same image):
  a moving brain (orange) on a deformed grid, aligned by a curved arrow onto a fixed brain (teal).
- ``DatasetBuilder/Resources/Icons/DatasetBuilder.png``: a stack of image slices turned into a table
  of cases.

Drawn at 4x and downsampled for anti-aliasing. Deterministic; run from anywhere::

    python scripts/make_icon.py
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
SS = 4  # supersampling factor
S = SIZE * SS

BACKGROUND = (24, 36, 58, 255)
GRID = (120, 150, 190, 150)
FIXED = (64, 208, 200, 255)
MOVING = (255, 150, 50, 255)
ARROW = (255, 255, 255, 255)


def px(v: float) -> float:
    """Icon pixels (0..128) to supersampled pixels."""
    return v * SS


def rounded_background(draw: ImageDraw.ImageDraw, color, radius: float = 22) -> None:
    draw.rounded_rectangle([px(2), px(2), px(SIZE - 2), px(SIZE - 2)], radius=px(radius), fill=color)


def warp(x: np.ndarray, y: np.ndarray, amount: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth displacement (icon pixels), the same for the grid and the moving brain."""
    dx = amount * np.sin(2 * math.pi * y / 90.0 + 0.6) * np.cos(2 * math.pi * x / 140.0)
    dy = amount * np.sin(2 * math.pi * x / 80.0 + 1.1) * np.cos(2 * math.pi * y / 150.0)
    return x + dx, y + dy


def brain_outline(cx: float, cy: float, rx: float, ry: float, n: int = 400) -> np.ndarray:
    """Points (icon pixels) of an axial brain outline: an egg shape, gently lobulated, notched at the midline."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = 1 + 0.018 * np.sin(13 * t) + 0.012 * np.sin(7 * t + 0.5)
    egg = 1 + 0.07 * np.sin(t)  # wider posteriorly (bottom of the icon)
    x = cx + rx * r * egg * np.cos(t)
    y = cy + ry * r * np.sin(t)
    # interhemispheric notches at the front (top, t = -pi/2) and back (bottom, t = pi/2)
    for t0, depth in ((-math.pi / 2, 0.12), (math.pi / 2, 0.07)):
        d = np.angle(np.exp(1j * (t - t0)))
        y -= math.copysign(1, math.sin(t0)) * depth * ry * np.exp(-(d / 0.13) ** 2)
    return np.stack([x, y], axis=1)


def brain_details(cx: float, cy: float, rx: float, ry: float) -> list[np.ndarray]:
    """Midline fissure and, per hemisphere, two concentric gyral arcs (polylines, icon pixels)."""
    y = np.linspace(cy - 0.84 * ry, cy + 0.90 * ry, 30)
    lines = [np.stack([cx + 0.8 * np.sin(np.linspace(0, 5, 30)), y], 1)]
    for side in (-1, 1):
        for k, (fy, length) in enumerate(((-0.52, 0.42), (-0.05, 0.5), (0.45, 0.44))):
            u = np.linspace(-1, 1, 40)
            x = cx + side * (0.48 + 0.04 * (k - 1)) * rx + 0.5 * length * rx * u
            y = cy + fy * ry + 0.07 * ry * np.sin(math.pi * u * 1.3 + k + (side > 0))
            lines.append(np.stack([x, y], 1))
    return lines


def to_px(points: np.ndarray) -> list[tuple[float, float]]:
    return [(px(x), px(y)) for x, y in points]


def transform_points(points: np.ndarray, angle_deg: float, shift: tuple[float, float], center, amount: float) -> np.ndarray:
    """Rotates about ``center``, shifts, then warps: where the moving brain sits before registration."""
    a = math.radians(angle_deg)
    c = np.asarray(center, float)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    p = (points - c) @ rot.T + c + np.asarray(shift, float)
    x, y = warp(p[:, 0], p[:, 1], amount)
    return np.stack([x, y], 1)


def draw_brain(img: Image.Image, outline: np.ndarray, details: list[np.ndarray], color, fill_alpha: int, width: float) -> None:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    d.polygon(to_px(outline), fill=color[:3] + (fill_alpha,))
    d.line(to_px(np.vstack([outline, outline[:1]])), fill=color, width=int(px(width)), joint="curve")
    for line in details:
        d.line(to_px(line), fill=color[:3] + (210,), width=int(px(width * 0.6)), joint="curve")
    img.alpha_composite(layer)


def draw_grid(img: Image.Image, amount: float) -> None:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    ticks = np.linspace(8, SIZE - 8, 9)
    s = np.linspace(6, SIZE - 6, 120)
    for v in ticks:
        for x, y in ((np.full_like(s, v), s), (s, np.full_like(s, v))):
            wx, wy = warp(x, y, amount)
            d.line(to_px(np.stack([wx, wy], 1)), fill=GRID, width=int(px(1.0)))
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle([px(4), px(4), px(SIZE - 4), px(SIZE - 4)], radius=px(20), fill=255)
    layer.putalpha(Image.fromarray(np.minimum(np.asarray(layer.getchannel("A")), np.asarray(mask))))
    img.alpha_composite(layer)


def draw_arrow(img: Image.Image, start, control, end, color, width: float = 3.2, head: float = 9.0) -> None:
    """Quadratic Bezier arrow (icon pixels) with a filled head at ``end``."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    t = np.linspace(0, 1, 60)[:, None]
    p0, p1, p2 = (np.asarray(v, float) for v in (start, control, end))
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    direction = p2 - p1
    direction /= np.linalg.norm(direction)
    normal = np.array([-direction[1], direction[0]])
    base = p2 - head * direction
    shaft = curve[np.linalg.norm(curve - p2, axis=1) > head * 0.8]
    shadow = (0, 0, 0, 110)
    d.line(to_px(shaft), fill=shadow, width=int(px(width + 2.2)), joint="curve")
    d.line(to_px(shaft), fill=color, width=int(px(width)), joint="curve")
    tri = [p2, base + normal * head * 0.6, base - normal * head * 0.6]
    d.polygon(to_px(np.asarray(tri)), fill=color, outline=shadow)
    img.alpha_composite(layer)


def draw_deep_registration() -> Image.Image:
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    rounded_background(ImageDraw.Draw(img), BACKGROUND)
    amount = 5.0
    draw_grid(img, amount)
    # fixed brain: centred, slightly right/down; moving brain: rotated, shifted up-left, warped
    cx, cy, rx, ry = 74, 70, 32, 40
    fixed = brain_outline(cx, cy, rx, ry)
    fixed_details = brain_details(cx, cy, rx, ry)
    args = dict(angle_deg=-20, shift=(-22, -14), center=(cx, cy), amount=amount)
    moving = transform_points(fixed, **args)
    moving_details = [transform_points(line, **args) for line in fixed_details]
    draw_brain(img, moving, moving_details, MOVING, fill_alpha=70, width=3.0)
    draw_brain(img, fixed, fixed_details, FIXED, fill_alpha=60, width=3.0)
    draw_arrow(img, start=(20, 88), control=(22, 116), end=(50, 108), color=ARROW)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def draw_dataset_builder() -> Image.Image:
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    rounded_background(d, BACKGROUND)
    # a stack of three image slices (parallelograms) with a brain on the top one
    for i, shade in enumerate((90, 120, 150)):
        ox, oy = 10 + 6 * i, 70 - 12 * i
        quad = [(ox, oy), (ox + 40, oy - 8), (ox + 52, oy + 22), (ox + 12, oy + 30)]
        d.polygon([(px(x), px(y)) for x, y in quad], fill=(shade, shade + 20, shade + 40, 255),
                  outline=(220, 230, 245, 255), width=int(px(1.5)))
    top = brain_outline(0, 0, 1, 1, n=200)
    ox, oy = 22, 46
    # map the unit brain into the top slice's parallelogram (affine: skewed, flattened)
    m = np.array([[12.0, 4.0], [-2.5, 8.5]])
    pts = top @ m.T + np.array([ox + 26, oy + 3])
    d.polygon(to_px(pts), fill=FIXED[:3] + (230,))
    draw_arrow(img, start=(58, 70), control=(66, 54), end=(79, 64), color=ARROW, width=3.0, head=8.0)
    # a table of cases: header row plus rows of cells (images | labels | landmarks)
    x0, y0, w, h = 80, 34, 40, 62
    d.rounded_rectangle([px(x0), px(y0), px(x0 + w), px(y0 + h)], radius=px(4), fill=(235, 240, 248, 255))
    d.rectangle([px(x0), px(y0 + 2), px(x0 + w), px(y0 + 11)], fill=MOVING)
    d.rounded_rectangle([px(x0), px(y0), px(x0 + w), px(y0 + 11)], radius=px(4), fill=MOVING)
    for r in range(5):
        y = y0 + 15 + r * 9.2
        for c, colour in enumerate(((70, 90, 120, 255), FIXED, (70, 90, 120, 255))):
            cx0 = x0 + 3 + c * 12.5
            d.rectangle([px(cx0), px(y), px(cx0 + 9.5), px(y + 5)], fill=colour)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    icon = draw_deep_registration()
    for path in (ROOT / "DeepRegistration.png", ROOT / "DeepRegistration" / "Resources" / "Icons" / "DeepRegistration.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
        print("wrote", path.relative_to(ROOT))
    path = ROOT / "DatasetBuilder" / "Resources" / "Icons" / "DatasetBuilder.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_dataset_builder().save(path, optimize=True)
    print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
