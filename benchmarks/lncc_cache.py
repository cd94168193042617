"""LNCC's cache of the fixed image's window statistics: does it matter, and how often is it refilled?

Registers the bundled sample pair (``DeepRegistration/Resources/SampleData``) with the default deformable settings twice in one
process, alternating: ``cache`` (LNCC as shipped: the fixed image's local mean/variance/structure are computed
once per fixed tensor and reused while it is unchanged; over a cut moving field of view they are reused until
``similarity.VIEW_REFRESH`` of the view changed) and ``nocache`` (the same LNCC recomputing both at every
call). Prints, per run, the wall time of :func:`register`, the number of LNCC calls, of whole-grid and of
field-of-view statistics computations, and the final loss (the whole-grid cache cannot change it; the reused
view statistics may, in the last digits). About 70 s per repeat on the sample pair (2 threads).

    .venv/bin/python benchmarks/lncc_cache.py [--repeats 2] [--spacing 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DeepRegistration"))

from DeepRegistrationLib.core.config import RegistrationConfig  # noqa: E402
from DeepRegistrationLib.io.images import read_image  # noqa: E402
from DeepRegistrationLib.registration import pipeline, similarity  # noqa: E402


class Counting(similarity.LNCC):
    """LNCC counting its calls and its computations of the fixed image's statistics (over the whole grid,
    :meth:`_fixed_stats`, and over a cut moving field of view, :meth:`_view_fixed_stats`); ``cache=False``
    drops both caches at every call."""

    calls = computes = view_computes = 0
    cache = True

    def _rekey(self, fixed, region):
        if not Counting.cache:
            self._key = None  # forget: the whole-grid and the view statistics are recomputed
        super()._rekey(fixed, region)

    def _fixed_stats(self, fixed, region):
        before = self._stats
        out = super()._fixed_stats(fixed, region)
        Counting.computes += out is not before
        return out

    def _view_fixed_stats(self, fixed, region, view):
        before = self._view_stats
        out = super()._view_fixed_stats(fixed, region, view)
        Counting.view_computes += out is not before
        return out

    def per_sample(self, *args, **kwargs):
        Counting.calls += 1
        return super().per_sample(*args, **kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sample = ROOT / "DeepRegistration" / "Resources" / "SampleData"
    fixed, moving = read_image(sample / "fixed.nii.gz"), read_image(sample / "moving.nii.gz")
    cfg = RegistrationConfig(spacing=args.spacing, threads=args.threads)
    similarity.LNCC = Counting  # what make_similarity builds
    rows = []
    for r in range(args.repeats):
        for mode in ("cache", "nocache") if r % 2 == 0 else ("nocache", "cache"):
            Counting.cache, Counting.calls, Counting.computes, Counting.view_computes = mode == "cache", 0, 0, 0
            t = time.perf_counter()
            result = pipeline.register(fixed, moving, cfg)
            rows.append({"mode": mode, "seconds": round(time.perf_counter() - t, 2), "lncc_calls": Counting.calls,
                         "fixed_stat_computations": Counting.computes,
                         "view_stat_computations": Counting.view_computes,
                         "similarity_after": round(float(result.similarity_after), 6)})
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
