"""Calibration of the automatic quality verdict (:mod:`DeepRegistrationLib.evaluation.quality`) on the bundled pair.

Cases: the bundled Colin27 pair as given (default settings and 4 mm), swapped (moving ↔ fixed), the moving
image turned by 30° (found by the default search initialization), and deliberate failures: the moving
image turned by 120° and by 90° with the search turned off (``initialization="moments"``), an unrelated
image (smooth random shapes from :mod:`DeepRegistrationLib.learning.synth`, a different object) and smooth noise.
Guide landmarks (run end to end by :func:`~DeepRegistrationLib.registration.run.run_registration`, which measures
their residual for the verdict): six of the bundled landmark pairs as given, and the same six mispaired (each
fixed point with another point's partner: a user's labelling mistake).

Truth without looking at the verdict's signals: a registration *failed* when its label Dice is below half
the Dice of the pair registered as given (or when the images are unrelated), else it *succeeded*.

    .venv/bin/python benchmarks/quality_calibration.py            # registers every case (minutes on 2 cores)
    .venv/bin/python benchmarks/quality_calibration.py --reassess # recomputes verdicts from the saved signals
    .venv/bin/python benchmarks/quality_calibration.py --real-pair DIR --only real  # adds the real pair's cases

``DIR`` is the pair folder that ``benchmarks/real_pair.py`` builds (ICBM152 2009a vs Colin27, tissue labels).

Writes ``benchmarks/QUALITY_RESULTS.json`` (signals, verdicts, confusion matrix) and ``QUALITY_RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DeepRegistration"))

from DeepRegistrationLib.evaluation import explain, quality  # noqa: E402
from DeepRegistrationLib.core.config import RegistrationConfig  # noqa: E402
from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.core.image import Image  # noqa: E402
from DeepRegistrationLib.io.images import read_image, read_label_image  # noqa: E402
from DeepRegistrationLib.evaluation.metrics import mean_dice  # noqa: E402
from DeepRegistrationLib.registration.pipeline import register  # noqa: E402
from DeepRegistrationLib.spatial.resampling import warp_image  # noqa: E402
from DeepRegistrationLib.learning.synth import labels_to_image, random_label_maps, smooth_noise  # noqa: E402
from DeepRegistrationLib.evaluation.uncertainty import restart_spread  # noqa: E402
from DeepRegistrationLib.io.landmarks import Landmarks, match_landmarks, read_landmarks, write_landmarks_csv  # noqa: E402
from DeepRegistrationLib.registration.run import run_registration  # noqa: E402

SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"
OUT_JSON = Path(__file__).with_name("QUALITY_RESULTS.json")
OUT_MD = Path(__file__).with_name("QUALITY_RESULTS.md")
#: Mean GM/WM Dice of the real pair without registration (benchmarks/REAL_RESULTS.md, "none" row).
REAL_NONE_DICE = 0.67


def rotated(image: Image, axis, degrees: float) -> Image:
    """The same voxels placed rotated about the field-of-view centre (a new header, no resampling)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    g = image.grid
    c = g.center()
    origin = c + rot @ (np.asarray(g.origin) - c)
    return Image(image.array, Grid(g.shape, g.spacing, tuple(origin), tuple((rot @ g.direction_matrix).ravel())),
                 image.name)


def unrelated(grid: Grid, kind: str, seed: int = 3) -> Image:
    gen = torch.Generator().manual_seed(seed)
    if kind == "shapes":
        lab = random_label_maps(1, grid.shape, 8, 6.0, gen)
        arr = labels_to_image(lab, 8, gen)[0, 0].numpy()
    else:
        arr = smooth_noise(1, 1, grid.shape, 3.0, gen)[0, 0].numpy()
    return Image(arr.astype(np.float32), grid, kind)


def cases(fixed, moving, flab, mlab, real: Path | None = None):
    if real is not None:  # benchmarks/real_pair.py's pair: two people's brains (ICBM152 2009a, Colin27), 1 mm
        rf, rm = read_image(real / "fixed.nii.gz", "fixed image"), read_image(real / "moving.nii.gz", "moving image")
        yield "real inter-subject ICBM152 vs Colin27 (4 mm)", rf, rm, \
            read_label_image(real / "fixed_labels.nii.gz", "fixed labels", rf.grid), \
            read_label_image(real / "moving_labels.nii.gz", "moving labels", rm.grid), {"spacing": 4.0}
        yield "real: Colin27 turned 120 deg, no search (4 mm)", rf, rotated(rm, (1, 0, 0), 120), None, None, \
            {"spacing": 4.0, "initialization": "moments"}
    yield "as given (defaults)", fixed, moving, flab, mlab, {}
    yield "as given (4 mm)", fixed, moving, flab, mlab, {"spacing": 4.0}
    yield "swapped (4 mm)", moving, fixed, mlab, flab, {"spacing": 4.0}
    yield "rotated 30 deg, search (4 mm)", fixed, rotated(moving, (0, 0, 1), 30), flab, rotated(mlab, (0, 0, 1), 30), \
        {"spacing": 4.0}
    yield "rotated 120 deg, no search (4 mm)", fixed, rotated(moving, (1, 0, 0), 120), flab, \
        rotated(mlab, (1, 0, 0), 120), {"spacing": 4.0, "initialization": "moments"}
    yield "rotated 90 deg, no search (4 mm)", fixed, rotated(moving, (0, 1, 0), 90), flab, \
        rotated(mlab, (0, 1, 0), 90), {"spacing": 4.0, "initialization": "moments"}
    yield "unrelated: random shapes (4 mm)", fixed, unrelated(moving.grid, "shapes"), None, None, {"spacing": 4.0}
    yield "unrelated: smooth noise (4 mm)", fixed, unrelated(moving.grid, "noise"), None, None, {"spacing": 4.0}


GUIDE_CASES = {"guide landmarks, 6 correct pairs (4 mm)": 0, "guide landmarks, 6 mispaired (4 mm)": 2}
"""Guide cases: name -> how far the moving landmarks are rolled against the fixed ones (0 = correct pairs)."""


def run_guide_case(name: str, roll: int) -> dict:
    """One guide-landmark case through ``run_registration`` (the bundled pair at 4 mm, labels for the Dice)."""
    fixed_pts, moving_pts, _ = match_landmarks(read_landmarks(SAMPLE / "fixed_landmarks.csv"),
                                               read_landmarks(SAMPLE / "moving_landmarks.csv"))
    chosen = np.arange(0, len(fixed_pts), max(1, len(fixed_pts) // 6))[:6]  # spread over the list
    labels = [f"p{i}" for i in range(len(chosen))]
    cfg = RegistrationConfig(threads=2, spacing=4.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_landmarks_csv(Landmarks(labels, fixed_pts[chosen]), tmp / "gf.csv")
        write_landmarks_csv(Landmarks(labels, np.roll(moving_pts[chosen], roll, axis=0)), tmp / "gm.csv")
        t = time.perf_counter()
        run = run_registration(SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz", tmp / "out", cfg,
                               fixed_labels=SAMPLE / "fixed_labels.nii.gz",
                               moving_labels=SAMPLE / "moving_labels.nii.gz", guide_fixed_landmarks=tmp / "gf.csv",
                               guide_moving_landmarks=tmp / "gm.csv", uncertainty=True, write_png=False)
        seconds = time.perf_counter() - t
    report = run.report
    signals = report["quality"]["signals"]
    print(name, json.dumps(signals), flush=True)
    return {"case": name, "settings": {"spacing": 4.0, "guide_landmarks": len(chosen), "roll": roll},
            "dice": report["metrics"]["labels"]["after"]["dice_mean"], "signals": signals,
            "seconds": {"run_registration": round(seconds, 1),
                        "uncertainty": report["timings_s"].get("uncertainty")}}


def run_cases(only: list[str] | None = None, real: Path | None = None) -> list[dict]:
    fixed = read_image(SAMPLE / "fixed.nii.gz", "fixed image")
    moving = read_image(SAMPLE / "moving.nii.gz", "moving image")
    flab = read_label_image(SAMPLE / "fixed_labels.nii.gz", "fixed labels", fixed.grid)
    mlab = read_label_image(SAMPLE / "moving_labels.nii.gz", "moving labels", moving.grid)
    rows = []
    for name, f, m, fl, ml, kw in cases(fixed, moving, flab, mlab, real):
        if only and not any(o in name for o in only):
            continue
        cfg = RegistrationConfig(threads=2, **kw)
        t = time.perf_counter()
        res = register(f, m, cfg)
        t_reg = time.perf_counter() - t
        t = time.perf_counter()
        signals = quality.signals_from_result(res, f, m)
        t_sig = time.perf_counter() - t
        t = time.perf_counter()
        unc = restart_spread(f, m, res.transform, cfg)
        t_unc = time.perf_counter() - t
        signals.update(quality.uncertainty_signals(unc.summary()))
        dice = None
        if fl is not None:
            dice = mean_dice(fl.array, warp_image(ml, fl.grid, res.transform, "nearest").array)
        rows.append({"case": name, "settings": kw, "dice": dice, "signals": signals,
                     "seconds": {"register": round(t_reg, 1), "signals": round(t_sig, 2), "uncertainty": round(t_unc, 2)}})
        print(name, dice, json.dumps(signals), flush=True)
    for name, roll in GUIDE_CASES.items():
        if not only or any(o in name for o in only):
            rows.append(run_guide_case(name, roll))
    return rows


def assess_rows(rows: list[dict]) -> dict:
    ref = max(r["dice"] for r in rows if r["case"].startswith("as given") and r["dice"] is not None)
    matrix = {"failed": {"ok": 0, "suspect": 0, "failed": 0}, "succeeded": {"ok": 0, "suspect": 0, "failed": 0}}
    for r in rows:
        if r["case"].startswith("real inter-subject"):  # tissue (GM/WM) labels: Dice above "none" = success
            truth = "succeeded" if r["dice"] is not None and r["dice"] > REAL_NONE_DICE else "failed"
        elif r["case"].startswith("real:"):
            truth = "failed"  # stuck 120 deg rotation, as on the bundled pair (no labels for the turned image)
        else:
            truth = "failed" if r["dice"] is None or r["dice"] < 0.5 * ref else "succeeded"
        q = quality.assess(r["signals"])
        r.update(truth=truth, verdict=q["verdict"], reasons=q["reasons"])
        matrix[truth][q["verdict"]] += 1
    return {"reference_dice": ref, "confusion": matrix, "thresholds": quality.thresholds(), "cases": rows}


def write(results: dict) -> None:
    OUT_JSON.write_text(json.dumps(results, indent=2))
    m = results["confusion"]
    lines = ["# Quality verdict calibration (bundled pair and deliberate failures)", "",
             "`.venv/bin/python benchmarks/quality_calibration.py` (CPU, 2 threads). Truth: *failed* when label Dice "
             f"< 0.5 × {results['reference_dice']:.3f} (the pair registered as given) or the images are unrelated.", "",
             "| truth \\ verdict | ok | suspect | failed |", "|---|---|---|---|"]
    for truth in ("succeeded", "failed"):
        lines.append(f"| {truth} | {m[truth]['ok']} | {m[truth]['suspect']} | {m[truth]['failed']} |")
    lines += ["", "| case | Dice | truth | verdict | NCC after | local cc² | fg Dice | rotation ° | "
              "uncertainty median mm | guide residual mm | reasons |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["cases"]:
        s = r["signals"]
        dice = "–" if r["dice"] is None else f"{r['dice']:.3f}"
        lines.append(f"| {r['case']} | {dice} | {r['truth']} | **{r['verdict']}** | {s['ncc_after']:.3f} | "
                     f"{s['local_cc2']:.3f} | {s['foreground_dice']:.3f} | {s['rotation_deg']:.0f} | "
                     f"{s.get('uncertainty_median_mm', float('nan')):.2f} | "
                     f"{s.get('landmark_residual_mm', float('nan')):.1f} | {'; '.join(r['reasons']) or '–'} |")
    lines += ["", f"Small by design ({len(results['cases'])} registrations: the bundled 3 mm pair and, with "
              "`--real-pair`, ICBM152 vs Colin27 at 1 mm): the thresholds in `DeepRegistrationLib/evaluation/quality.py` sit in "
              "the gaps seen here and in the tests; other anatomy or modalities may need other values. The "
              "uncertainty column is the median restart spread in the anatomy (perturbation 4.5 mm at the "
              "defaults, 6 mm at 4 mm); it was measured with `uncertainty.GRADIENT_QUANTILE = 0.9` (the module "
              "now uses 0.99, which keeps more of the spread in blank regions; the guide-landmark cases were measured "
              "with 0.99) and decides no verdict alone here. The guide-landmark cases run end to end "
              "(`run_registration` with `--uncertainty`, the default guide weight); the guide residual column is "
              "the mean distance of the mapped fixed guide landmarks to the moving ones after registration."]
    OUT_MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reassess", action="store_true", help="recompute verdicts from QUALITY_RESULTS.json")
    ap.add_argument("--real-pair", type=Path, help="folder written by benchmarks/real_pair.py (fixed.nii.gz, ...)")
    ap.add_argument("--only", nargs="*", help="run only the cases whose names contain one of these; the others "
                    "are kept from QUALITY_RESULTS.json")
    args = ap.parse_args()
    if args.reassess:
        rows = json.loads(OUT_JSON.read_text())["cases"]
    else:
        rows = run_cases(args.only, args.real_pair)
        if args.only and OUT_JSON.exists():
            new = {r["case"] for r in rows}
            rows = [r for r in json.loads(OUT_JSON.read_text())["cases"] if r["case"] not in new] + rows
    results = assess_rows(rows)
    write(results)
    print(json.dumps(results["confusion"]))


if __name__ == "__main__":
    main()
