#!/usr/bin/env python3
"""Large fields of view: ``deepregistration register`` on a trunk CT at 2 mm and at 0.75 mm, ANTs SyN at 2 mm
beside it, in one run: whole-process wall, CPU and peak memory, the engine's stage breakdown, Dice.

    python benchmarks/large_fov.py [--out benchmarks/results-large-fov] [--spacings 2.0 0.75] [--threads 2]
        [--ants-spacing 2.0] [--no-ants] [--quick]

Data: TotalSegmentator's test CT (``tests/reference_files/example_ct.nii.gz`` and ``example_seg.nii.gz`` of its
PyPI sdist, 3 mm, 122×101×112; fetched like ``robustness.py`` does), cropped in-plane to the body (HU > -500,
10 mm margin) and **B-spline resampled** to each spacing: at 0.75 mm the workload's size is real (tens of
millions of voxels), its detail is not (nothing finer than the 3 mm source). The fixed image is that CT (int16,
as scanners write CT); the moving image is the same source through a known map onto its own grid with another
scan range: a rigid motion (4°, 12 mm) and a smooth deformation (up to ~6 mm), covering the lowest 78 % of the
fixed scan range shifted by 15 mm; the labels (117 classes, of which the segmented slices are the lowest 27 % of
the source) go through the same map (nearest neighbour), so Dice is meaningful. Dice is counted only on fixed
voxels whose true correspondence lies inside the moving field of view (as in ``robustness.py``), on labels with
at least 20 such voxels, at each case's own spacing.

Each method runs as one measured process (``run_benchmark.run_measured``): the engine with its default options
(``report.png`` included; above 16 M fixed voxels that writes no ``warped.nii.gz``, so on such a case it runs a
second time as ``deepreg-full`` with ``--warped full``, unless ``--no-full``), ANTs SyN with the antspyx defaults
(``run_ants.py``). The engine's stages (read,
preprocess, initialization, linear, deformable, write_and_evaluate) come from its ``report.json``. Writes
``large_fov.json``, ``large_fov.md`` and ``large_fov.png`` into ``--out``; the stage table gives the share of the
whole process spent reading, preprocessing, writing and evaluating (the input/output work of item 4 of the
robustness issue).

Runtime (2 threads): measured on a 2-core Xeon shared with other jobs (load ~6), building the 2 mm and 0.75 mm
data took 4.6 min wall (83 s CPU; cached in ``--out/cases`` for later runs), the engine at 0.75 mm 7 min wall
(196 s CPU, before the separable warp), ``--quick`` (4 mm and 3 mm, ANTs at 4 mm) 4.4 min wall in all. An idle
machine should need well under half of that (not measured); give ``--timeout`` (s per process) room either way.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import robustness  # noqa: E402
import run_benchmark as rb  # noqa: E402

#: The default ``--out``, and its case folder: the default case folder of every benchmark using these CT pairs.
OUT = HERE / "results-large-fov"
CASES = OUT / "cases"
STAGES = ("read", "preprocess", "initialization", "linear", "deformable", "evaluate", "write_and_evaluate")
#: The moving image's map (moving -> source/fixed space): rigid part, then a smooth displacement.
ROTATION_DEG = (2.0, -2.5, 4.0)
SHIFT_MM = (6.0, -8.0, 15.0)
DEFORMATION_MM = 6.0
#: Fraction of the fixed scan range (array axis z) the moving image covers, from the lowest slice.
MOVING_RANGE = 0.78
#: The stages that read, prepare, write and evaluate (the share the stage table reports).
IO_STAGES = ("read", "preprocess", "write_and_evaluate")


def _body_box(ct: sitk.Image, margin_mm: float = 10.0) -> sitk.Image:
    """The source CT cropped in-plane (x, y) to the voxels above -500 HU, plus a margin."""
    a = sitk.GetArrayViewFromImage(ct) > -500
    m = int(np.ceil(margin_mm / min(ct.GetSpacing()[:2])))
    ys, xs = np.nonzero(a.any(axis=0))
    x0, x1 = max(0, xs.min() - m), min(ct.GetSize()[0], xs.max() + 1 + m)
    y0, y1 = max(0, ys.min() - m), min(ct.GetSize()[1], ys.max() + 1 + m)
    return ct[int(x0):int(x1), int(y0):int(y1), :]


def _grid_like(src: sitk.Image, spacing: float, z_fraction: float = 1.0, shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty image covering ``src``'s box (its lowest ``z_fraction`` along array z) at ``spacing`` mm."""
    size = np.asarray(src.GetSize(), float)
    extent = (size - 1) * np.asarray(src.GetSpacing())
    extent[2] *= z_fraction
    n = [int(np.floor(e / spacing)) + 1 for e in extent]
    out = sitk.Image(n, sitk.sitkInt16)
    out.SetSpacing((spacing,) * 3)
    out.SetDirection(src.GetDirection())
    d = np.asarray(src.GetDirection()).reshape(3, 3)
    out.SetOrigin(tuple(np.asarray(src.GetOrigin()) + d @ np.asarray(shift, float)))
    return out


def _smooth_displacement(src: sitk.Image, seed: int = 0) -> sitk.Image:
    """A smooth random displacement (LPS mm, largest magnitude DEFORMATION_MM) on a 10 mm grid over ``src``."""
    from scipy.ndimage import gaussian_filter

    coarse = _grid_like(src, 10.0)
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(coarse.GetSize()))
    u = np.stack([gaussian_filter(rng.normal(size=shape), 2.0, mode="nearest") for _ in range(3)], axis=-1)
    u *= DEFORMATION_MM / np.linalg.norm(u, axis=-1).max()
    disp = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    disp.CopyInformation(coarse)
    return disp


def maps(src: sitk.Image) -> tuple[sitk.Transform, sitk.Transform]:
    """``(S, T)``: S maps moving points to source (= fixed) points, ``S(y) = B(y) + e(B(y))``; T = S⁻¹ is the
    true fixed → moving map, ``T(x) = B⁻¹(x + e⁻¹(x))``."""
    centre = np.asarray(src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()]))
    rigid = sitk.Euler3DTransform(tuple(centre), *np.radians(ROTATION_DEG), tuple(-np.asarray(SHIFT_MM) * 0.5))
    e = _smooth_displacement(src)
    e_inv = sitk.InvertDisplacementField(e, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01,
                                         meanErrorToleranceThreshold=0.001, enforceBoundaryCondition=False)
    s = sitk.CompositeTransform(3)
    s.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(e)))  # applied second
    s.AddTransform(rigid)  # applied first
    t = sitk.CompositeTransform(3)
    t.AddTransform(rigid.GetInverse())
    t.AddTransform(sitk.DisplacementFieldTransform(e_inv))
    return s, t


def build_case(root: Path, cache: Path, spacing: float) -> dict:
    """Writes the fixed/moving CT and labels at ``spacing`` (int16 / uint8) and the overlap mask; cached."""
    d = root / f"ct_{spacing:g}mm"
    files = {k: d / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels", "overlap")}
    info = d / "case.json"
    if info.exists() and all(p.exists() for p in files.values()):
        return json.loads(info.read_text())
    d.mkdir(parents=True, exist_ok=True)
    ct_path, seg_path = robustness.totalsegmentator_ct(cache)
    src = _body_box(sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat32))
    seg = sitk.Resample(sitk.ReadImage(str(seg_path)), src, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    s, t = maps(src)
    fixed_grid = _grid_like(src, spacing)
    moving_grid = _grid_like(src, spacing, MOVING_RANGE, (0.0, 0.0, SHIFT_MM[2]))
    bs = sitk.sitkBSpline
    fixed = sitk.Resample(src, fixed_grid, sitk.Transform(), bs, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(fixed, str(files["fixed"]))
    del fixed
    sitk.WriteImage(sitk.Resample(src, moving_grid, s, bs, -1024.0, sitk.sitkInt16), str(files["moving"]))
    sitk.WriteImage(sitk.Resample(seg, moving_grid, s, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
                    str(files["moving_labels"]))
    # labels and overlap only over the segmented part (its bounding box): what Dice is counted on
    flab = sitk.Resample(seg, fixed_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    nz = np.nonzero(sitk.GetArrayViewFromImage(flab))
    lo = [int(nz[a].min()) for a in (2, 1, 0)]
    hi = [int(nz[a].max()) + 1 for a in (2, 1, 0)]
    flab = flab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    sitk.WriteImage(flab, str(files["fixed_labels"]))
    ones = sitk.Image(moving_grid.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving_grid)
    sitk.WriteImage(sitk.Resample(ones, flab, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), str(files["overlap"]))
    case = {"name": f"ct_{spacing:g}mm", "spacing_mm": spacing, **{k: str(p) for k, p in files.items()},
            "fixed_size_xyz": list(fixed_grid.GetSize()), "moving_size_xyz": list(moving_grid.GetSize()),
            "fixed_voxels": int(np.prod(fixed_grid.GetSize())), "moving_voxels": int(np.prod(moving_grid.GetSize()))}
    info.write_text(json.dumps(case, indent=1))
    return case


def score(case: dict, transform: sitk.Transform, folding: bool) -> dict:
    """Mean Dice inside the true overlap (labels with >= 20 voxels there); folding % of the transform there."""
    out = robustness.score({"fixed_labels": case["fixed_labels"], "moving_labels": case["moving_labels"],
                            "overlap": case["overlap"]}, transform) if folding else None
    if out is not None:
        return out
    fl = sitk.ReadImage(case["fixed_labels"])
    ml = sitk.ReadImage(case["moving_labels"])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(case["overlap"])) > 0
    warped = sitk.GetArrayFromImage(sitk.Resample(ml, fl, transform, sitk.sitkNearestNeighbor, 0, ml.GetPixelID()))
    fa = sitk.GetArrayFromImage(fl).astype(np.int64) * mask
    wa = warped.astype(np.int64) * mask
    labels = np.array([v for v in np.unique(fa[fa > 0]) if (fa == v).sum() >= 20])
    return {"dice_mean": float(np.nanmean(rb.dice_per_label(fa, wa, labels))), "n_labels": int(len(labels))}


def run_method(method: str, case: dict, out: Path, args) -> dict:
    run_dir = out / "runs" / case["name"] / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    f, m = case["fixed"], case["moving"]
    if method.startswith("deepreg"):
        cmd = [str(Path(sys.executable).parent / "deepregistration"), "register", f, m, "-o", str(run_dir), "-q",
               "--threads", str(args.threads)] + (["--warped", "full"] if method == "deepreg-full" else [])
    else:
        run_dir.mkdir()
        cmd = [args.peer_python, str(HERE / "run_ants.py"), "register", f, m, str(run_dir), "--seed", "0",
               "--threads", str(args.threads)]
    res = rb.run_measured(cmd, run_dir.parent / f"{method}.log", rb.thread_env(args.threads), args.timeout)
    row = {"case": case["name"], "spacing_mm": case["spacing_mm"], "method": method, "wall_s": res.wall_s,
           "cpu_s": res.cpu_s, "peak_mb": res.peak_rss_mb, "returncode": res.returncode,
           "fixed_voxels": case["fixed_voxels"], "moving_voxels": case["moving_voxels"]}
    if res.returncode != 0:
        row["error"] = res.log[-800:]
        return row
    small = case["fixed_voxels"] <= 20_000_000  # the folding check resamples the transform densely
    row.update(score(case, rb.load_transform("deepreg" if method.startswith("deepreg") else method, run_dir),
                     folding=small))
    if method.startswith("deepreg"):
        report = json.loads((run_dir / "report.json").read_text())
        row["stages_s"] = {k: report["timings_s"].get(k, 0.0) for k in STAGES}
        row["engine_folding_pct"] = report["deformation"]["folding_percent"]
        row["outputs_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(run_dir.iterdir())
                             if p.is_file()}
    if not args.keep_runs:
        for big in run_dir.glob("*.nii.gz"):
            big.unlink()
    print(f"{case['name']:>10} {method:>8}: Dice {row.get('dice_mean', float('nan')):.3f} wall {res.wall_s:.1f} s "
          f"CPU {res.cpu_s:.1f} s peak {res.peak_rss_mb:.0f} MB", flush=True)
    return row


def write(out: Path, rows: list[dict], cases: list[dict], args) -> None:
    env = rb.environment(argparse.Namespace(threads=args.threads, peer_python=args.peer_python,
                                            moving_contrast="same", model=None, deepreg_args=""))
    (out / "large_fov.json").write_text(json.dumps({"environment": env, "cases": cases, "rows": rows}, indent=1,
                                                   default=str))
    lines = [f"# Large fields of view ({_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')})", "",
             f"{env.get('cpu_model', '')}; {args.threads} threads per method; time = whole process (imports "
             "included), wall clock and CPU (user + system) seconds; peak = resident memory high-water mark. "
             "The fine grid is B-spline resampled from the 3 mm source: its size is real, its detail is not.", "",
             "| case | method | fixed voxels | Dice | wall s | CPU s | peak MB | folding % |", "|---" * 8 + "|"]
    for r in rows:
        fold = r.get("folding_pct", r.get("engine_folding_pct", float("nan")))
        lines.append(f"| {r['case']} | {r['method']} | {r['fixed_voxels'] / 1e6:.1f} M | "
                     f"{r.get('dice_mean', float('nan')):.3f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['peak_mb']:.0f} | {fold:.3f} |")
    eng = [r for r in rows if "stages_s" in r]
    if eng:
        lines += ["", "## DeepRegistration's stages (s, from report.json)", "",
                  "| case | method | " + " | ".join(STAGES) + " | rest of the process | " + " + ".join(IO_STAGES) +
                  " share |", "|---" * (len(STAGES) + 4) + "|"]
        for r in eng:
            st = r["stages_s"]
            lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(f"{st[k]:.2f}" for k in STAGES) +
                         f" | {r['wall_s'] - sum(st.values()):.2f} | "
                         f"{100 * sum(st[k] for k in IO_STAGES) / r['wall_s']:.0f} % |")
        lines += ["", "Outputs (MB): " + "; ".join(f"{r['case']} {r['method']}: " + ", ".join(
            f"{k} {v}" for k, v in r["outputs_mb"].items()) for r in eng)]
    ants = {r["case"]: r for r in rows if r["method"] == "ants" and r["returncode"] == 0}
    for r in eng:
        if r["case"] in ants and r["method"] == "deepreg":
            a = ants[r["case"]]
            lines.append(f"\n{r['case']}: DeepRegistration / ANTs SyN wall {r['wall_s'] / a['wall_s']:.2f}×, "
                         f"CPU {r['cpu_s'] / a['cpu_s']:.2f}×; Dice {r['dice_mean']:.3f} vs {a['dice_mean']:.3f}.")
    (out / "large_fov.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(15.5, 4))
        names = [f"{r['case']}\n{r['method']}" for r in rows]
        colours = ["C0" if r["method"].startswith("deepreg") else "C1" for r in rows]
        ax[0].bar(names, [r.get("dice_mean", np.nan) for r in rows], color=colours)
        ax[0].set_title("mean Dice (overlap)")
        ax[1].bar(names, [r["peak_mb"] / 1024 for r in rows], color=colours)
        ax[1].axhline(4.0, color="k", lw=0.8, ls="--")
        ax[1].set_title("peak memory (GB)")
        bottom = np.zeros(len(eng))
        eng_names = [f"{r['case']}\n{r['method']}" for r in eng]
        for i, k in enumerate(STAGES):
            vals = np.array([r["stages_s"][k] for r in eng])
            ax[2].bar(eng_names, vals, bottom=bottom, label=k, color=f"C{i + 2}")
            bottom += vals
        ax[2].bar(eng_names, [r["wall_s"] for r in eng] - bottom, bottom=bottom, label="rest", color="0.8")
        for a in ants.values():
            ax[2].scatter([f"{a['case']}\ndeepreg"], [a["wall_s"]], color="C1", marker="D", zorder=3,
                          label="ANTs SyN wall")
        ax[2].set_title("DeepRegistration wall time by stage (s)")
        ax[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: it hid a point
        for a in ax:
            a.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "large_fov.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # plotting is a convenience
        print(f"plot skipped: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--cache", type=Path, default=HERE.parent / ".cache")
    p.add_argument("--spacings", nargs="+", type=float, default=[2.0, 0.75])
    p.add_argument("--ants-spacing", type=float, default=2.0)
    p.add_argument("--no-ants", action="store_true")
    p.add_argument("--quick", action="store_true", help="4 mm and 3 mm, ANTs at 4 mm: checks the whole path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--keep-runs", action="store_true")
    p.add_argument("--no-full", action="store_true", help="no second engine run with --warped full on the "
                   "cases above 16 M fixed voxels")
    args = p.parse_args(argv)
    if args.quick:
        args.spacings, args.ants_spacing = [4.0, 3.0], 4.0
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [build_case(args.out / "cases", args.cache, s) for s in args.spacings]
    rows: list[dict] = []
    for case in cases:
        from DeepRegistrationLib.core.config import FULL_GRID_MAX_VOXELS  # no warped.nii.gz above it

        methods = ["deepreg"] + (["deepreg-full"] if case["fixed_voxels"] > FULL_GRID_MAX_VOXELS and not args.no_full
                                 else []) + (["ants"] if not args.no_ants and case["spacing_mm"] == args.ants_spacing
                                             else [])
        for method in methods:
            rows.append(run_method(method, case, args.out, args))
            write(args.out, rows, cases, args)
    print((args.out / "large_fov.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
