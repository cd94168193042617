#!/usr/bin/env python3
"""NIfTI gzip benchmark: writing a ``.nii.gz`` with SimpleITK's own writer against ``io.images.write_sitk_image``
(SimpleITK's uncompressed ``.nii`` gzipped in parallel blocks by ``io.images.gzip_file``) at several zlib levels
and thread counts: wall and CPU seconds, file size, and that the decompressed bytes are SimpleITK's.

    python benchmarks/nifti_gzip.py [--large-fov-cases DIR] [--levels 1 2 3 4 6] [--threads 1 2] [--repeats 2]
        [--out benchmarks/results-nifti-gzip]

Images: the 0.75 mm trunk CT's fixed image (``large_fov.py``'s ``ct_0.75mm`` case, int16, 86.5 M voxels, the
size and type of its ``warped.nii.gz``; skipped when absent) and a 2 mm brain (the skull-stripped Colin27
template ``ch2bet`` of ``synthetic_pairs.py`` resampled to 2 mm, float32). Each variant runs ``--repeats`` times,
alternating, in this process (SimpleITK and zlib run without Python's lock, so ``--threads`` is what the gzip
may use).
Runtime: ~1.5 min on two cores (mostly the CT: ~3-11 CPU s per write). Writes ``nifti_gzip.json`` and ``nifti_gzip.md``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "DeepRegistration"))
import revisions  # noqa: E402


def _images(args) -> dict:
    import SimpleITK as sitk

    out = {}
    ct = args.large_fov_cases / "ct_0.75mm" / "fixed.nii.gz"
    if ct.exists():
        out["ct_0.75mm (int16)"] = sitk.ReadImage(str(ct))
    else:
        print(f"no {ct} (run benchmarks/large_fov.py first): the CT is skipped", file=sys.stderr)
    import synthetic_pairs as sp

    templates = sp.find_templates(None, download_to=REPO / ".cache" / "mricron-data")
    brain = sitk.ReadImage(str(templates / "ch2bet.nii.gz"), sitk.sitkFloat32)
    size = [int(round(n * s / 2.0)) for n, s in zip(brain.GetSize(), brain.GetSpacing())]
    out["brain 2 mm (float32)"] = sitk.Resample(brain, size, sitk.Transform(), sitk.sitkLinear, brain.GetOrigin(),
                                                (2.0, 2.0, 2.0), brain.GetDirection(), 0.0, sitk.sitkFloat32)
    return out


def _digest_gz(path: Path) -> str:
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    import large_fov
    import SimpleITK as sitk

    from DeepRegistrationLib.io import images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results-nifti-gzip")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    saved = images.GZIP_LEVEL
    with tempfile.TemporaryDirectory(prefix="nifti-gzip-") as tmp:
        for name, img in _images(args).items():
            sitk.WriteImage(img, f"{tmp}/raw.nii", False)
            raw = hashlib.sha256(Path(f"{tmp}/raw.nii").read_bytes()).hexdigest()[:16]
            variants = [("SimpleITK WriteImage", None, 1)] + [(f"gzip_file level {lv}", lv, th)
                                                              for lv in args.levels for th in args.threads]
            for rep in range(args.repeats):
                for label, level, threads in revisions.alternating(variants, rep):
                    path = Path(tmp) / "out.nii.gz"
                    c0, w0 = time.process_time(), time.perf_counter()
                    if level is None:
                        sitk.WriteImage(img, str(path), True)
                    else:
                        images.GZIP_LEVEL = level
                        try:
                            images.write_sitk_image(img, path, threads=threads)
                        finally:
                            images.GZIP_LEVEL = saved
                    row = {"image": name, "variant": label, "threads": threads, "repeat": rep,
                           "wall_s": round(time.perf_counter() - w0, 3), "cpu_s": round(time.process_time() - c0, 3),
                           "mb": round(path.stat().st_size / 1e6, 2), "same_bytes": _digest_gz(path) == raw}
                    print(row, flush=True)
                    rows.append(row)
    lines = ["| image | writer | threads | wall s (min) | CPU s (min) | MB | decompressed = SimpleITK's .nii |",
             "|---" * 7 + "|"]
    for key in dict.fromkeys((r["image"], r["variant"], r["threads"]) for r in rows):
        rs = [r for r in rows if (r["image"], r["variant"], r["threads"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {min(r['wall_s'] for r in rs):.2f} | "
                     f"{min(r['cpu_s'] for r in rs):.2f} | {rs[0]['mb']} | {all(r['same_bytes'] for r in rs)} |")
    env = {"current": revisions.resolve("HEAD"), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    md = [f"# NIfTI gzip ({args.repeats} runs per variant, alternating; load average at the end "
          f"{env['load_avg'][0]:.1f} on {env['cpus']} CPUs)", "", *lines]
    revisions.write_results(args.out, "nifti_gzip", env, rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
