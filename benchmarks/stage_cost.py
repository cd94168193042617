#!/usr/bin/env python3
"""Stage cost benchmark: CPU seconds of each registration stage (preprocessing, initialization search, linear,
deformable), one thread, in-process, for the engine at a baseline revision and the engine of this checkout.

    python benchmarks/stage_cost.py [--baseline REV] [--cases syn2_0 syn2_1 mm2_0 ct2mm] [--repeats 2]
        [--inner 2] [--out benchmarks/results-stage-cost]

Every case runs in a fresh process per variant and repeat, alternating baseline / current (ABAB); inside a
process the registration runs once to warm up and then ``--inner`` times, and each stage's *minimum* CPU time
(user + system of the process, ``time.process_time``) is kept (the least disturbed run on a shared machine).
The stage times come from wrapping the pipeline's stage functions (``prepare``, ``initialization.search``,
``_optimize_linear``, ``_optimize_field``), so they exist for both the layer layout and the flat layout before it
(there the initialization search does not exist). Writing the outputs and their evaluation are not included
(``regression.py`` times whole processes).

Cases:
- ``syn2_<seed>``: the synthetic Colin27 pair at 2 mm of ``synthetic_pairs.py`` (as ``regression.py``);
- ``mm2_<seed>``: the same with the inverted second contrast, ``--similarity mi``;
- ``ct2mm``: TotalSegmentator's example CT (``robustness.totalsegmentator_ct``) B-spline resampled to 2 mm
  (183×152×168, 4.7 M voxels) as fixed; moving = the same CT through a known rigid (8°, 3°, 4°; 12, -6, 5 mm) and a
  smooth B-spline deformation (5³ control points, σ 3 mm), on the fixed grid; label Dice of the 117 classes.

Runtime: about 1 min per synthetic case and variant and repeat on one core, 3 min for ``ct2mm``. Writes
``stage_cost.json`` and ``stage_cost.md``; prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import revisions  # noqa: E402
STAGES = ("prepare", "init", "linear", "deformable", "total")


def _pair(case: str, work: Path):
    """(fixed Image, moving Image, fixed labels Image | None, moving labels Image | None, extra config)."""
    import numpy as np
    import SimpleITK as sitk

    try:
        from DeepRegistrationLib.io.images import read_image, sitk_to_image
    except ImportError:  # the flat layout
        from DeepRegistrationLib.io import read_image, sitk_to_image
    if case == "ct2mm":
        import robustness

        ct_path, seg_path = robustness.totalsegmentator_ct(REPO / ".cache")
        ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
        seg = sitk.ReadImage(str(seg_path))
        size = [int(round(s * sp / 2.0)) for s, sp in zip(ct.GetSize(), ct.GetSpacing())]
        ref = sitk.Image(size, sitk.sitkFloat32)
        ref.SetSpacing([2.0] * 3)
        ref.SetOrigin(ct.GetOrigin())
        ref.SetDirection(ct.GetDirection())
        fixed = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkBSpline, -1024.0)
        flab = sitk.Resample(seg, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        center = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
        rigid = sitk.Euler3DTransform(center, np.radians(8.0), np.radians(-3.0), np.radians(4.0), (12.0, -6.0, 5.0))
        bspline = sitk.BSplineTransformInitializer(fixed, [5, 5, 5])
        bspline.SetParameters(np.random.default_rng(0).normal(0, 3.0, len(bspline.GetParameters())).tolist())
        both = sitk.CompositeTransform([rigid, bspline])
        moving = sitk.Resample(ct, fixed, both, sitk.sitkBSpline, -1024.0)
        mlab = sitk.Resample(seg, fixed, both, sitk.sitkNearestNeighbor, 0)
        return (sitk_to_image(fixed, "fixed"), sitk_to_image(moving, "moving"), sitk_to_image(flab, "fl", np.int16),
                sitk_to_image(mlab, "ml", np.int16), {})
    import synthetic_pairs as sp

    kind, seed = case.split("_")
    templates = sp.find_templates(None, download_to=REPO / ".cache" / "mricron-data")
    pair = sp.make_pair(templates, 2.0, int(seed), work / case,
                        moving_contrast="inverted" if kind == "mm2" else "same")
    return read_image(pair.fixed), read_image(pair.moving), None, None, ({"similarity": "mi"} if kind == "mm2" else {})


def child(case: str, inner: int, work: Path) -> dict:
    """Runs in the variant's process (``PYTHONPATH`` = its tree)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    try:
        from DeepRegistrationLib.registration import initialization as I
        from DeepRegistrationLib.registration import pipeline as P
        from DeepRegistrationLib.core.config import RegistrationConfig
        from DeepRegistrationLib.spatial.resampling import warp_image
        from DeepRegistrationLib.evaluation.metrics import mean_dice
    except ImportError:  # the flat layout
        from DeepRegistrationLib import pipeline as P
        from DeepRegistrationLib.config import RegistrationConfig
        from DeepRegistrationLib.resampling import warp_image
        from DeepRegistrationLib.metrics import mean_dice
        I = None
    acc: dict = {}

    def wrap(obj, name, label):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.process_time()
            out = fn(*a, **k)
            acc[label] = acc.get(label, 0.0) + time.process_time() - t
            return out

        setattr(obj, name, timed)

    for obj, name, label in ((P, "prepare", "prepare"), (P, "_optimize_linear", "linear"),
                             (P, "_optimize_field", "deformable")) + (((I, "search", "init"),) if I else ()):
        wrap(obj, name, label)
    fixed, moving, flab, mlab, extra = _pair(case, work)
    best: dict = {}
    for rep in range(inner + 1):
        acc.clear()
        t = time.process_time()
        res = P.register(fixed, moving, RegistrationConfig(threads=1, **extra))
        acc["total"] = time.process_time() - t
        if rep:
            best = {k: min(best.get(k, 1e9), v) for k, v in acc.items()}
    row = {k: round(v, 3) for k, v in best.items()}
    row["similarity_after"] = round(float(res.similarity_after), 6)
    if flab is not None:
        row["dice"] = round(float(mean_dice(flab.array, warp_image(mlab, flab.grid, res.transform, "nearest").array)), 4)
    row["start"] = getattr(res, "initialization", {}).get("start")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="d775fa9^", metavar="REV", help="baseline revision (default: the engine "
                   "before the initialization search and the overlap-aware similarity)")
    p.add_argument("--cases", nargs="+", default=["syn2_0", "syn2_1", "mm2_0"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results-stage-cost")
    p.add_argument("--child", nargs=2, metavar=("CASE", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(args.child[0], args.inner, Path(args.child[1]))))
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rev = revisions.resolve(args.baseline)
    with tempfile.TemporaryDirectory(prefix="stage-cost-") as tmp, revisions.baseline_worktree(rev, Path(tmp)) as base:
        rows = revisions.run_rows({"baseline": base, "current": REPO}, args.cases, args.repeats,
                                  lambda case, rep, _variant: [str(Path(__file__).resolve()), "--inner",
                                                               str(args.inner), "--child", case,
                                                               str(Path(tmp) / "pairs")])
    (out / "stage_cost.json").write_text(json.dumps({"baseline": rev, "rows": rows}, indent=1))
    lines = [f"# Stage cost, 1 thread, CPU s (min of {args.inner} runs per process; baseline {rev[:10]})", "",
             "| case | variant | n | " + " | ".join(STAGES) + " | Dice | similarity after |", "|---" * (len(STAGES) + 5) + "|"]
    for case in args.cases:
        for variant in ("baseline", "current"):
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and r["ok"]]
            if not rs:
                continue
            cell = lambda k: (f"{min(r[k] for r in rs):.2f}" if all(k in r for r in rs) else "–")
            lines.append(f"| {case} | {variant} | {len(rs)} | " + " | ".join(cell(k) for k in STAGES) +
                         f" | {rs[-1].get('dice', '–')} | {rs[-1]['similarity_after']} |")
    (out / "stage_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
