"""Writes the Sample Data thumbnail of the bundled pair (260 × 280 px, the size Slicer's module template asks for):
``DeepRegistration/Resources/Icons/DeepRegistrationBrainPair.png``, the middle axial slice of the fixed (left) and
moving (right) brains of ``DeepRegistration/Resources/SampleData``, over their mid-coronal slices.

    python scripts/make_sample_thumbnail.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"
OUT = ROOT / "DeepRegistration" / "Resources" / "Icons" / "DeepRegistrationBrainPair.png"
WIDTH, HEIGHT = 260, 280


def _slices(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Middle axial and coronal slices, resampled to 1 mm in-plane, as 0..255 arrays (display orientation)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(path), sitk.sitkFloat32), "LPS")
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    spacing = image.GetSpacing()
    high = np.percentile(array, 99.5)
    out = []
    for plane, cell in ((array[array.shape[0] // 2], (spacing[1], spacing[0])),          # axial: y rows, x cols
                        (array[:, array.shape[1] // 2][::-1], (spacing[2], spacing[0]))):  # coronal: z up
        scaled = np.clip(plane / high, 0, 1) * 255
        rows, cols = scaled.shape
        picture = Image.fromarray(scaled.astype(np.uint8)).resize(
            (int(round(cols * cell[1])), int(round(rows * cell[0]))), Image.BILINEAR)
        out.append(np.asarray(picture))
    return out[0], out[1]


def main() -> None:
    canvas = Image.new("L", (WIDTH, HEIGHT), 0)
    half = WIDTH // 2
    for column, name in enumerate(("fixed.nii.gz", "moving.nii.gz")):
        axial, coronal = _slices(SAMPLE / name)
        for row, plane in enumerate((axial, coronal)):
            tile = Image.fromarray(plane)
            tile.thumbnail((half - 4, HEIGHT // 2 - 4))
            x = column * half + (half - tile.width) // 2
            y = row * (HEIGHT // 2) + (HEIGHT // 2 - tile.height) // 2
            canvas.paste(tile, (x, y))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(OUT, optimize=True)
    print(f"wrote {OUT} ({WIDTH} x {HEIGHT})")


if __name__ == "__main__":
    main()
