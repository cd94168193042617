"""Automatic quality control of a registration: a verdict ``ok | suspect | failed`` with its reasons.

:func:`assess` is a pure function of measured signals, none of which needs ground truth:

- similarity: the configured loss and the global NCC before/after (``loss_before``, ``loss_after``,
  ``ncc_before``, ``ncc_after``), and the mean local ``cc²`` of LNCC over the structured overlap after
  registration (``local_cc2``, see :func:`DeepRegistrationLib.evaluation.explain.measure`);
- coverage: the fraction of the fixed foreground covered by the warped moving field of view
  (``overlap_fraction``) and the Dice of the two foregrounds there (``foreground_dice``);
- the deformation: ``folding_percent``, ``extreme_jacobian_percent`` (det J outside [1/5, 5]),
  ``jacobian_min``/``jacobian_max``;
- the linear part: ``rotation_deg``, ``scale_min``/``scale_max``, ``reflection``
  (:func:`DeepRegistrationLib.evaluation.explain.linear_part`);
- optional: the spread of perturbed restarts (``uncertainty_median_mm``, ``uncertainty_p95_mm``,
  :mod:`DeepRegistrationLib.evaluation.uncertainty`) and the residual of guide landmarks (``landmark_residual_mm``).

A missing or NaN signal is skipped. The intensity criteria (``ncc_after``, ``local_cc2``) assume one
modality and are skipped for ``similarity == "mi"``. Every threshold below is a named constant with the
measurement behind it (``benchmarks/quality_calibration.py``, results in ``benchmarks/QUALITY_RESULTS.md``:
the bundled 3 mm Colin27 pair as given, swapped and turned by 30°, a real inter-subject pair, and deliberate
failures: 120°/90° rotations with the search off, unrelated images, mispaired guide landmarks). They sit
in the gaps between the good and the failed cases seen there, with margin; other anatomy or contrasts may
need other values.
"""
from __future__ import annotations

import math

VERDICTS = ("ok", "suspect", "failed")

# --- similarity on the overlap (mono-modal only) ---------------------------------------------------------
#: Mean local cc² (LNCC, the registration's window) after registration: the main failure signal. Measured
#: (benchmarks/QUALITY_RESULTS.md): good registrations 0.968–0.983 (bundled pair as given, swapped, turned
#: 30°, and two people's brains, ICBM152 vs Colin27); a 120° or 90° rotation stuck without the search
#: 0.78–0.82 (Dice 0.01–0.02 on the bundled pair), unrelated images 0.13–0.72.
LOCAL_CC2_FAILED = 0.85
LOCAL_CC2_SUSPECT = 0.92
#: Global NCC after registration. Measured: good 0.996–0.997, stuck rotations 0.96 (NCC does not separate
#: them: it went up from 0.7 to 0.96), random shapes 0.91, noise −0.29: it only catches gross failures.
NCC_FAILED = 0.5
NCC_SUSPECT = 0.8

# --- coverage ------------------------------------------------------------------------------------------------
#: Fraction of the fixed foreground inside the warped moving field of view. Measured: 1.0 in every case;
#: a scan that covers less than half of the fixed anatomy is flagged (a slab is legitimate: suspect only).
OVERLAP_SUSPECT = 0.5
#: Dice of the fixed and warped-moving foregrounds (intensity > explain.FOREGROUND) on the overlap.
#: Measured: good 0.981–0.993; stuck rotations and random shapes 0.975–0.978 (the outline matches, the
#: inside does not); noise 0.63. Only a grossly wrong outline is flagged.
FOREGROUND_DICE_FAILED = 0.8
FOREGROUND_DICE_SUSPECT = 0.9

# --- the deformation -------------------------------------------------------------------------------------------
#: % voxels with det J <= 0. Measured: good 0.0 with the default regularization, failures up to 0.006.
FOLDING_SUSPECT = 0.5
FOLDING_FAILED = 5.0
#: % voxels with det J outside [1/5, 5] (a local volume change by a factor above 5). Measured: good 0.0,
#: failures up to 0.12.
EXTREME_JACOBIAN_SUSPECT = 1.0

# --- the linear part ------------------------------------------------------------------------------------------
#: Rotation of the linear part (degrees). Measured: good 1–23°; the registration of unrelated images ended at
#: 171–173°. Scans of one body part rarely differ by more than this, but the default search recovers larger
#: ones correctly (a 70° test case), so this alone is a warning, not a failure.
ROTATION_SUSPECT_DEG = 45.0
#: Scales (singular values of the linear part) outside these bounds. Measured: good 0.94–1.07 (the bundled
#: pair's true scales are 0.94–1.05); a stuck 120° rotation 0.82–1.23, noise 0.73.
SCALE_SUSPECT = (0.75, 1.33)
SCALE_FAILED = (0.5, 2.0)

# --- uncertainty and landmarks ---------------------------------------------------------------------------------
#: Median restart spread inside the anatomy as a fraction of the perturbation (mm / mm). Measured: good
#: 0.02–0.04, failures 0.04–0.06: it does not separate them on these cases (every restart shares a wrong
#: start), so only a gross disagreement, far above both, is flagged.
UNCERTAINTY_SUSPECT = 0.15
#: Residual of the guide landmarks after registration (mm): mean distance of the mapped fixed landmarks to
#: the moving ones (typical landmark localization error: 1–3 mm). Measured (4 mm, default guide weight): six
#: correct pairs of the bundled landmarks 0.08 mm; the same six mispaired 12.7 mm (the registration followed
#: them and failed, Dice 0.001).
LANDMARK_SUSPECT_MM = 5.0
LANDMARK_FAILED_MM = 10.0


def thresholds() -> dict:
    """All thresholds by name (for reports and the calibration)."""
    return {k: v for k, v in globals().items() if k.isupper() and k != "VERDICTS" and not k.startswith("_")}


def _num(signals: dict, key: str) -> float | None:
    v = signals.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def assess(signals: dict) -> dict:
    """The verdict for measured ``signals`` (keys as in the module docstring; missing ones are skipped).

    Returns:
        ``{"verdict": "ok" | "suspect" | "failed", "reasons": [str, ...], "signals": signals}``: ``failed``
        when any failure criterion holds, else ``suspect`` when any warning holds, else ``ok``; each reason
        names the signal, its value and the threshold.
    """
    failed: list[str] = []
    suspect: list[str] = []

    def below(key, fail, warn, label, fmt="{:.3f}"):
        v = _num(signals, key)
        if v is None:
            return
        if fail is not None and v < fail:
            failed.append(f"{label} {fmt.format(v)} < {fmt.format(fail)}")
        elif warn is not None and v < warn:
            suspect.append(f"{label} {fmt.format(v)} < {fmt.format(warn)}")

    def above(key, fail, warn, label, fmt="{:.3f}"):
        v = _num(signals, key)
        if v is None:
            return
        if fail is not None and v > fail:
            failed.append(f"{label} {fmt.format(v)} > {fmt.format(fail)}")
        elif warn is not None and v > warn:
            suspect.append(f"{label} {fmt.format(v)} > {fmt.format(warn)}")

    if signals.get("similarity") != "mi":
        below("local_cc2", LOCAL_CC2_FAILED, LOCAL_CC2_SUSPECT, "local similarity (LNCC cc²) after")
        below("ncc_after", NCC_FAILED, NCC_SUSPECT, "NCC after")
    lb, la = _num(signals, "loss_before"), _num(signals, "loss_after")
    if lb is not None and la is not None and la > lb + 1e-6:
        suspect.append(f"similarity got worse ({signals.get('similarity', 'loss')} {lb:.4f} -> {la:.4f})")
    below("overlap_fraction", None, OVERLAP_SUSPECT, "fraction of the fixed anatomy covered")
    below("foreground_dice", FOREGROUND_DICE_FAILED, FOREGROUND_DICE_SUSPECT, "foreground overlap (Dice)")
    above("folding_percent", FOLDING_FAILED, FOLDING_SUSPECT, "folding %", "{:.2f}")
    above("extreme_jacobian_percent", None, EXTREME_JACOBIAN_SUSPECT, "% voxels with det J outside [0.2, 5]",
          "{:.2f}")
    above("rotation_deg", None, ROTATION_SUSPECT_DEG, "rotation of the linear part (deg)", "{:.0f}")
    for key, bound in (("scale_min", 0), ("scale_max", 1)):
        v = _num(signals, key)
        if v is None:
            continue
        bad = (lambda b: v < b[0]) if bound == 0 else (lambda b: v > b[1])
        lim = lambda b: b[bound]
        if bad(SCALE_FAILED):
            failed.append(f"scaling of the linear part {v:.2f} beyond {lim(SCALE_FAILED):.2f}")
        elif bad(SCALE_SUSPECT):
            suspect.append(f"scaling of the linear part {v:.2f} beyond {lim(SCALE_SUSPECT):.2f}")
    if signals.get("reflection") is True:
        suspect.append("the linear part mirrors the image")
    un, pert = _num(signals, "uncertainty_median_mm"), _num(signals, "uncertainty_perturbation_mm")
    if un is not None and pert:
        if un > UNCERTAINTY_SUSPECT * pert:
            suspect.append(f"restarts disagree: median spread {un:.2f} mm > {UNCERTAINTY_SUSPECT:.2f} × "
                           f"{pert:.2f} mm perturbation")
    above("landmark_residual_mm", LANDMARK_FAILED_MM, LANDMARK_SUSPECT_MM, "landmark residual (mm)", "{:.1f}")
    verdict = "failed" if failed else "suspect" if suspect else "ok"
    return {"verdict": verdict, "reasons": failed + suspect, "signals": dict(signals)}


def uncertainty_signals(summary: dict) -> dict:
    """The signals of an :meth:`~DeepRegistrationLib.evaluation.uncertainty.Uncertainty.summary`."""
    return {"uncertainty_median_mm": summary.get("median_mm"), "uncertainty_p95_mm": summary.get("p95_mm"),
            "uncertainty_perturbation_mm": summary.get("perturbation_mm")}


def signals_from_result(result, fixed, moving, fixed_mask=None, moving_mask=None,
                        landmark_residual_mm: float | None = None, pair=None) -> dict:
    """Measures every signal of a :class:`~DeepRegistrationLib.registration.pipeline.RegistrationResult` (no ground truth).

    Args:
        result: The registration result (its transform, similarities, Jacobian and settings).
        fixed / moving: The images registered (engine Images); masks as given to the registration.
        landmark_residual_mm: Mean residual of guide landmarks, when any were given.
        pair: A :class:`~DeepRegistrationLib.evaluation.explain.WorkingPair` already computed for these images.

    Returns:
        A JSON-friendly dict of floats (and ``similarity``, ``reflection``) for :func:`assess`.
    """
    from . import explain

    cfg = result.config
    pair = pair or explain.working_pair(fixed, moving, result.transform, cfg, fixed_mask, moving_mask)
    out = {"similarity": cfg.similarity, "loss_before": float(result.similarity_before),
           "loss_after": float(result.similarity_after), "ncc_before": float(result.ncc_before),
           "ncc_after": float(result.ncc_after)}
    out.update(explain.measure(pair, cfg.lncc_radius))
    out.update(explain.jacobian_signals(result.jacobian))
    out.update(explain.linear_part(result.transform.affine))
    if landmark_residual_mm is not None:
        out["landmark_residual_mm"] = float(landmark_residual_mm)
    return out


def summary_line(quality: dict) -> str:
    """One line for a console or a table: ``quality: failed (reason; reason)``."""
    reasons = quality.get("reasons") or []
    return f"quality: {quality['verdict']}" + (f" ({'; '.join(reasons)})" if reasons else "")
