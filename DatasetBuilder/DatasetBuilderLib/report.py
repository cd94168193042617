"""``report.md``: counts, label table, PHI-scan result, skipped and rejected items, warnings.

The report holds no identifying text: skipped inputs are named by a keyed tag (``input-…``), PHI hits by
output file and kind of string (never the string itself).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .writer import atomic_write_bytes

THUMBNAIL_PAIRS = 3


def _slice_u8(path: Path, height: int) -> np.ndarray:
    """Middle axial slice of an image, 0..255 (1st-99th percentile), padded to ``height`` rows."""
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))
    s = a[a.shape[0] // 2][::-1]
    lo, hi = np.percentile(s, (1, 99))
    u8 = (np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return np.pad(u8, ((0, height - u8.shape[0]), (0, 2)))


def write_thumbnails(out: Path, pairs: list[dict]) -> list[str]:
    """PNG of the middle axial slices (fixed | moving) of the first pairs; returns their relative paths."""
    written = []
    for n, pair in enumerate(pairs[:THUMBNAIL_PAIRS]):
        paths = [out / pair["fixed"], out / pair["moving"]]
        height = max(sitk.ReadImage(str(p)).GetSize()[1] for p in paths)
        tile = np.hstack([_slice_u8(p, height) for p in paths])
        rel = f"thumbnails/pair_{n:03d}.png"
        with tempfile.TemporaryDirectory() as tmp:
            sitk.WriteImage(sitk.GetImageFromArray(tile), str(Path(tmp) / "t.png"))
            atomic_write_bytes(out / rel, (Path(tmp) / "t.png").read_bytes())
        written.append(rel)
    for old in (out / "thumbnails").glob("*.png") if (out / "thumbnails").is_dir() else []:
        if f"thumbnails/{old.name}" not in written:  # of an earlier build (maybe of a removed subject)
            old.unlink()
    return written


def write_dataset_report(out: Path, task: str, result, table, hits: list, thumbnails: list[str] | None = None) -> None:
    """Writes ``report.md`` for a build result (see :class:`DatasetBuilderLib.build.BuildResult`)."""
    lines = [f"# Dataset {task}", "",
             "## Counts", "",
             f"- cases: {result.cases_total}",
             f"- augmented cases: {result.augmented}; augmentation draws rejected by the Jacobian check: "
             f"{result.augment_rejected}",
             f"- pairs: train {result.pairs.get('train', 0)}, val {result.pairs.get('val', 0)}, "
             f"test {result.pairs.get('test', 0)}",
             f"- skipped inputs: {len(result.skipped)}",
             f"- cases removed because their inputs were not given again: {getattr(result, 'removed', 0)}", "",
             "## Label table", "", "| ID | name |", "|---|---|"]
    lines += [f"| {i} | {name} |" for name, i in sorted(table.ids.items(), key=lambda kv: kv[1])]
    lines += ["", f"Segment names matching no label (left out): {sum(table.unmatched.values())} segment(s), "
                  f"{len(table.unmatched)} distinct name(s) (names not listed: they may identify).", ""]
    lines += ["## PHI scan", "",
              f"Every output file (decompressed) was searched for {result.phi_strings} identifying strings "
              "from the inputs."]
    if hits:
        lines += ["", "**FAILED**: identifying text found in:"]
        lines += [f"- `{f}`: {kind}" for f, kind in sorted({(h.file, h.kind) for h in hits})]
    else:
        lines += ["", "Result: **no identifying string found**."]
    lines += ["", "## Skipped", ""]
    lines += [f"- {s.source}: {s.reason}" for s in result.skipped] or ["- none"]
    lines += ["", "## Warnings", "",
              "- Head MR/CT: faces may be recognizable from the images (surface rendering). Face removal is "
              "not done by this version; do it before sharing the dataset outside your institution.", ""]
    if thumbnails:
        lines += ["## Pairs (middle axial slices, fixed | moving)", ""]
        lines += [f"![pair {n}]({rel})" for n, rel in enumerate(thumbnails)] + [""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode("utf-8"))
