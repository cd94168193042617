#!/usr/bin/env python3
"""Robustness benchmark: large initial misalignment and partial fields of view, DeepRegistration vs ANTs SyN
vs elastix vs FireANTs, every method one whole process per case, in one run.

    python benchmarks/robustness.py --out benchmarks/results-robustness [--cases ...] [--methods ...]
        [--threads 2] [--timeout 900]

Cases (every moving image is exact: a new header or a crop of the same voxels, no extra resampling):
- brain (MR, 2 mm): the synthetic Colin27 pair of ``synthetic_pairs.py`` (seed 0: a random affine + smooth
  deformation + intensity change), its moving image then turned about its field-of-view centre and shifted:
  ``rot35_s`` 35° mostly about S + 36 mm, ``pitch25`` 25° about L-R + 40 mm, ``rot60_oblique`` 60° about
  (1, 1, 1) + 30 mm, ``rot90_ap`` 90° about A-P + 20 mm; or cropped: ``slab_upper`` the upper half of the
  brain, ``crop_inplane`` the central 60 % in x and y;
- CT (3 mm): TotalSegmentator's test CT (``tests/reference_files/example_ct.nii.gz`` of its PyPI sdist, with
  ``example_seg.nii.gz``, 117 classes) as fixed; moving = the same CT through a known rigid transform (8°,
  12 mm) on its own grid, then ``ct_part55`` 55 % of the scan range (slices 12–67 %: the segmented slices of the
  test CT are its lowest 27 %), or ``ct_rot30`` turned 30° about S and shifted 30 mm (full range).

Score: mean Dice over labels, counted only inside the fixed voxels whose true correspondence lies inside the
moving field of view (the only part any method can match), labels with ≥ 20 voxels there; folding % of the
transform on the fixed grid; wall-clock time and peak RSS of the whole process (on a shared machine: compare
the methods within one run). Writes ``robustness.json`` / ``robustness.md`` / ``robustness.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_benchmark as rb  # noqa: E402
import synthetic_pairs as sp  # noqa: E402

BRAIN_CASES = {  # name: (axis (LPS), degrees, shift mm) or ("crop", lo/hi fractions per array axis z, y, x)
    "rot35_s": ("rotate", (0.15, 0.1, 1.0), 35.0, (22.0, -20.0, 20.0)),
    "pitch25": ("rotate", (1.0, 0.0, 0.0), 25.0, (0.0, 30.0, -26.5)),
    "rot60_oblique": ("rotate", (1.0, 1.0, 1.0), 60.0, (17.0, -17.0, 17.0)),
    "rot90_ap": ("rotate", (0.0, 1.0, 0.0), 90.0, (10.0, 10.0, -14.0)),
    "slab_upper": ("crop", ((0.5, 1.0), (0.0, 1.0), (0.0, 1.0))),
    "crop_inplane": ("crop", ((0.0, 1.0), (0.2, 0.8), (0.2, 0.8))),
}
CT_CASES = {
    "ct_part55": ("crop", ((0.12, 0.67), (0.0, 1.0), (0.0, 1.0))),
    "ct_rot30": ("rotate", (0.0, 0.0, 1.0), 30.0, (20.0, -15.0, 17.0)),
}
METHODS = ("deepreg", "ants", "elastix", "fireants", "fireants_m1")
DEFAULT_METHODS = METHODS[:4]  # fireants_m1: FireANTs started from the centre of mass only (a check of its start)


# --------------------------------------------------------------------------------------------------
# Exact moving-image variants (sitk images)
# --------------------------------------------------------------------------------------------------
def rotate_header(img: sitk.Image, axis, degrees: float, shift) -> sitk.Image:
    """The same voxels placed turned by ``degrees`` about ``axis`` (LPS) through the field-of-view centre,
    then shifted by ``shift`` mm: a rigid motion of the scanned object, exactly."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    size = np.asarray(img.GetSize(), float)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    sp_ = np.asarray(img.GetSpacing())
    centre = np.asarray(img.GetOrigin()) + d @ (sp_ * (size - 1) / 2)
    out = sitk.Image(img)
    out.SetDirection(tuple((rot @ d).ravel()))
    out.SetOrigin(tuple(centre + rot @ (np.asarray(img.GetOrigin()) - centre) + np.asarray(shift)))
    return out


def crop(img: sitk.Image, fractions) -> sitk.Image:
    """The voxels between the given fractions of each array axis ``(z, y, x)``, at their true position."""
    size = img.GetSize()  # (x, y, z)
    lo, hi = [], []
    for axis, (a, b) in zip((2, 1, 0), fractions):
        lo.append((axis, int(round(size[axis] * a))))
        hi.append((axis, int(round(size[axis] * b))))
    start = [0, 0, 0]
    stop = list(size)
    for (axis, a), (_, b) in zip(lo, hi):
        start[axis], stop[axis] = a, b
    return img[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]


def variant(img: sitk.Image, spec) -> sitk.Image:
    return rotate_header(img, *spec[1:]) if spec[0] == "rotate" else crop(img, spec[1])


# --------------------------------------------------------------------------------------------------
# Cases: files + the exact fixed -> moving transform (for the overlap mask)
# --------------------------------------------------------------------------------------------------
def _rotation_transform(spec, img: sitk.Image) -> sitk.Transform:
    """Maps points of the original moving space to the turned one (the header change as a transform)."""
    moved = rotate_header(img, *spec[1:])
    a = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    b = np.asarray(moved.GetDirection()).reshape(3, 3) * np.asarray(moved.GetSpacing())
    m = b @ np.linalg.inv(a)
    t = np.asarray(moved.GetOrigin()) - m @ np.asarray(img.GetOrigin())
    return sitk.AffineTransform(tuple(m.ravel()), tuple(t))


def write_case(root: Path, name: str, fixed: sitk.Image, fixed_labels: sitk.Image, moving: sitk.Image,
               moving_labels: sitk.Image, spec, gt_fixed_to_moving: sitk.Transform) -> dict:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    mov, mlab = variant(moving, spec), variant(moving_labels, spec)
    t = sitk.CompositeTransform(3)
    if spec[0] == "rotate":
        t.AddTransform(_rotation_transform(spec, moving))
    t.AddTransform(gt_fixed_to_moving)  # applied first: fixed -> original moving, then the header change
    ones = sitk.Image(mov.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(mov)
    mask = sitk.Resample(ones, fixed_labels, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    paths = {k: str(d / f"{k}.nii.gz") for k in ("fixed", "fixed_labels", "moving", "moving_labels", "overlap")}
    for key, img in (("fixed", fixed), ("fixed_labels", fixed_labels), ("moving", mov), ("moving_labels", mlab),
                     ("overlap", mask)):
        sitk.WriteImage(img, paths[key], True)
    return {"name": name, "spec": repr(spec), **paths,
            "overlap_fraction_of_fixed_labels": float(
                (sitk.GetArrayFromImage(mask) * (sitk.GetArrayFromImage(fixed_labels) > 0)).sum()
                / max(1, (sitk.GetArrayFromImage(fixed_labels) > 0).sum()))}


def brain_cases(root: Path, cache: Path, names: list[str]) -> list[dict]:
    templates = sp.find_templates(None, download_to=cache / "mricron-data")
    pair = sp.make_pair(templates, 2.0, 0, root / "brain_pair")
    gt = rb.gt_inverse_transform(pair)
    f, fl = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.fixed_labels))
    m, ml = sitk.ReadImage(str(pair.moving)), sitk.ReadImage(str(pair.moving_labels))
    return [write_case(root, n, f, fl, m, ml, BRAIN_CASES[n], gt) for n in names if n in BRAIN_CASES]


def totalsegmentator_ct(cache: Path) -> tuple[Path, Path]:
    """``example_ct.nii.gz`` and ``example_seg.nii.gz`` from TotalSegmentator's PyPI sdist (pip download)."""
    dest = cache / "totalsegmentator"
    ct, seg = dest / "example_ct.nii.gz", dest / "example_seg.nii.gz"
    if not (ct.exists() and seg.exists()):
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "totalsegmentator==2.18.0", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("totalsegmentator-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(("tests/reference_files/example_ct.nii.gz",
                                             "tests/reference_files/example_seg.nii.gz")):
                        member.name = Path(member.name).name
                        tar.extract(member, dest)
    return ct, seg


def ct_cases(root: Path, cache: Path, names: list[str]) -> list[dict]:
    names = [n for n in names if n in CT_CASES]
    if not names:
        return []
    ct_path, seg_path = totalsegmentator_ct(cache)
    fixed = sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat32)
    labels = sitk.Resample(sitk.ReadImage(str(seg_path)), fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    # moving = the same CT through a known rigid S (moving -> fixed) on its own grid, moving(y) = fixed(S(y))
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()]))
    s = sitk.Euler3DTransform(tuple(centre), np.radians(5.0), np.radians(-4.0), np.radians(4.5), (6.0, -8.0, 7.0))
    grid = sitk.Image(fixed)
    grid.SetOrigin(tuple(np.asarray(fixed.GetOrigin()) + np.array([3.0, -4.5, 1.5])))
    moving = sitk.Resample(fixed, grid, s, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    mlabels = sitk.Resample(labels, grid, s, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return [write_case(root, n, fixed, labels, moving, mlabels, CT_CASES[n], s.GetInverse()) for n in names]


# --------------------------------------------------------------------------------------------------
# Running and scoring
# --------------------------------------------------------------------------------------------------
def commands(method: str, case: dict, run_dir: Path, args) -> tuple[list[str], list[str] | None]:
    f, m = case["fixed"], case["moving"]
    py = args.peer_python
    if method == "deepreg":
        exe = Path(sys.executable).parent / "deepregistration"
        return ([str(exe), "register", f, m, "-o", str(run_dir), "--overwrite", "--no-png", "-q", "--threads",
                 str(args.threads)] + args.deepreg_args.split(), None)
    if method == "ants":
        return [py, str(HERE / "run_ants.py"), "register", f, m, str(run_dir), "--seed", "0", "--threads",
                str(args.threads)], None
    if method == "elastix":
        r = [py, str(HERE / "run_elastix.py")]
        return (r + ["register", f, m, str(run_dir), "--threads", str(args.threads)],
                r + ["export", f, m, case["moving_labels"], str(run_dir), "--threads", str(args.threads)])
    if method in ("fireants", "fireants_m1"):
        return ([py, str(HERE / "run_fireants.py"), "register", f, m, str(run_dir), "--threads", str(args.threads)]
                + (["--moments", "1"] if method == "fireants_m1" else []), None)
    raise ValueError(method)


def load_transform(method: str, run_dir: Path) -> sitk.Transform:
    if method.startswith("fireants"):
        return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(run_dir / "warp.nii.gz")),
                                                         sitk.sitkVectorFloat64))
    return rb.load_transform(method, run_dir)


def score(case: dict, transform: sitk.Transform) -> dict:
    fl = sitk.ReadImage(case["fixed_labels"])
    ml = sitk.ReadImage(case["moving_labels"])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(case["overlap"])) > 0
    warped = sitk.GetArrayFromImage(sitk.Resample(ml, fl, transform, sitk.sitkNearestNeighbor, 0, ml.GetPixelID()))
    fa = sitk.GetArrayFromImage(fl).astype(np.int64) * mask
    wa = warped.astype(np.int64) * mask
    labels = np.array([v for v in np.unique(fa[fa > 0]) if (fa == v).sum() >= 20])
    dice = rb.dice_per_label(fa, wa, labels)
    disp = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fl.GetSize(), fl.GetOrigin(),
                                             fl.GetSpacing(), fl.GetDirection())
    jac = sp.jacobian_determinant(disp)
    return {"dice_mean": float(np.nanmean(dice)), "n_labels": int(len(labels)),
            "folding_pct": float(100.0 * np.mean(jac[mask] <= 0))}


def run_case(case: dict, methods: list[str], out: Path, args) -> list[dict]:
    rows = [{"case": case["name"], "method": "none", **score(case, sitk.Transform(3, sitk.sitkIdentity))}]
    env = rb.thread_env(args.threads)
    for method in methods:
        run_dir = out / "runs" / case["name"] / method
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cmd, export = commands(method, case, run_dir, args)
        # the log beside the run folder, not in it: the engine replaces its output folder as a whole
        res = rb.run_measured(cmd, run_dir.parent / f"{method}.log", env, args.timeout)
        row = {"case": case["name"], "method": method, "time_s": res.wall_s, "cpu_s": res.cpu_s,
               "peak_mb": res.peak_rss_mb, "returncode": res.returncode}
        if res.returncode == 0 and export:
            rb.run_measured(export, run_dir.parent / f"{method}.export.log", env, args.timeout)
        try:
            row.update(score(case, load_transform(method, run_dir)) if res.returncode == 0 else
                       {"dice_mean": float("nan"), "error": res.log[-500:]})
        except Exception as exc:  # a method that wrote no usable transform
            row.update({"dice_mean": float("nan"), "error": f"{type(exc).__name__}: {exc}"})
        if method == "deepreg" and (run_dir / "report.json").exists():
            init = json.loads((run_dir / "report.json").read_text()).get("initialization", {})
            row["init_start"], row["init_score"] = init.get("start"), init.get("score")
        for big in ("warp.nii.gz", "displacement.nii.gz", "transform.h5", "warped.nii.gz", "jacobian.nii.gz"):
            if (run_dir / big).exists() and not args.keep_runs:
                (run_dir / big).unlink()
        print(f"{case['name']:>14} {method:>9}: Dice {row['dice_mean']:.3f} time {row['time_s']:.1f} s "
              f"(CPU {row['cpu_s']:.1f} s)", flush=True)
        rows.append(row)
    return rows


def write_outputs(out: Path, rows: list[dict], cases: list[dict], args) -> None:
    env = rb.environment(argparse.Namespace(threads=args.threads, peer_python=args.peer_python,
                                            moving_contrast="same", model=None, deepreg_args=args.deepreg_args))
    (out / "robustness.json").write_text(json.dumps({"environment": env, "cases": cases, "rows": rows},
                                                    indent=1, default=str))
    methods = ["none"] + [m for m in METHODS if any(r["method"] == m for r in rows)]
    names = [c["name"] for c in cases if any(r["case"] == c["name"] for r in rows)]
    get = {(r["case"], r["method"]): r for r in rows}
    lines = [f"# Robustness benchmark ({_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')})", "",
             f"{env.get('cpu_model', '')}; {args.threads} threads per method. Mean Dice inside the true overlap of the "
             "two fields of view; time = whole process, wall clock and CPU (user + system) seconds; the machine "
             "may be shared: compare methods within this run, and by CPU time when it was busy.", "", "## Dice", "",
             "| case | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{get[(n, m)]['dice_mean']:.3f}" if (n, m) in get else "–" for m in methods) + " |")
    lines += ["", "## Wall time (s) / CPU time (s) / peak memory (MB) / folding (%)", "",
              "| case | " + " | ".join(methods[1:]) + " |", "|---" * len(methods) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{get[(n, m)]['time_s']:.1f} / {get[(n, m)].get('cpu_s', float('nan')):.1f} / "
            f"{get[(n, m)].get('peak_mb', float('nan')):.0f} / {get[(n, m)].get('folding_pct', float('nan')):.3f}"
            if (n, m) in get else "–" for m in methods[1:]) + " |")
    lines += ["", "## DeepRegistration's initialization", "", "| case | winning start | score |", "|---|---|---|"]
    for n in names:
        r = get.get((n, "deepreg"), {})
        if r.get("init_start"):
            lines.append(f"| {n} | {r['init_start']} | {r['init_score']:.4f} |")
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(13, 4.2))
        w = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax[0].bar(np.arange(len(names)) + i * w, [get.get((n, m), {}).get("dice_mean", np.nan) for n in names],
                      w, label=m, color=f"C{i}")  # one colour per method in both panels
            if m != "none":
                ax[1].bar(np.arange(len(names)) + i * w, [get.get((n, m), {}).get("cpu_s", np.nan) for n in names],
                          w, label=m, color=f"C{i}")
        for a, title in zip(ax, ("mean Dice (overlap)", "whole-process CPU time (s)")):
            a.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
            a.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            a.set_title(title)
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "robustness.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # plotting is a convenience
        print(f"plot skipped: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "results-robustness")
    p.add_argument("--cache", type=Path, default=HERE.parent / ".cache")
    p.add_argument("--cases", nargs="+", default=list(BRAIN_CASES) + list(CT_CASES))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--deepreg-args", default="")
    p.add_argument("--keep-runs", action="store_true")
    p.add_argument("--tables-only", action="store_true",
                   help="rewrite the tables and the plot from OUT/robustness.json without running anything")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        saved = json.loads((args.out / "robustness.json").read_text())
        write_outputs(args.out, saved["rows"], saved["cases"], args)
        return 0
    cases = brain_cases(args.out / "cases", args.cache, args.cases) + ct_cases(args.out / "cases", args.cache,
                                                                               args.cases)
    rows: list[dict] = []
    for case in cases:
        rows += run_case(case, args.methods, args.out, args)
        write_outputs(args.out, rows, cases, args)  # after every case: a partial run is still readable
    return 0


if __name__ == "__main__":
    sys.exit(main())
