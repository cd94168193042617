"""Benchmark of the multi-pair workflows against their peers, side by side in one run.

    .venv/bin/python benchmarks/workflows.py [--out benchmarks/results/workflows] [--threads 1] [--spacing 6]

Data: the bundled sample (Colin27 T1 + AAL labels, Debian ``mricron-data``, BSD-3-clause), resampled to
``--spacing`` (default 6 mm, about 27×33×28 voxels, to fit a small shared CPU; 3 is the bundled resolution).
1. **Sequence** (8 frames): frame t = the brain through a smooth periodic displacement (each component a sine
   of another axis, wavelength 150 mm) scaled by 9 mm × sin(2π t / 8) — breathing-like motion, frame 0 the
   reference; labels known per frame (the AAL map through the same displacement). DeepRegistration
   ``register_sequence`` (warm start; also cold, every frame from scratch) vs ANTsPy
   ``ants.motion_correction(type_of_transform="SyN")``. Score: mean AAL Dice of every frame's labels
   warped onto the reference, per frame.
2. **Template** (6 subjects): the bundled fixed and moving brains and 4 more (each through a random small
   rigid motion and a random smooth periodic displacement of 5 mm), labels known. DeepRegistration
   ``build_template`` (3 passes) vs ``ants.build_template`` (3 iterations, SyN). Score: label agreement in
   template space (every subject's labels warped onto the template: mean Dice with the majority vote, mean
   pairwise Dice); ANTs returns no transforms, so its subjects are registered onto its template afterwards
   (SyN, untimed).
3. **Batch**: the 6 subjects onto the bundled fixed brain: ``run_batch`` in one process vs a loop of
   ``deepregistration register`` processes (time per pair, and the largest difference of the transforms).
Each method runs as one separate process (``--worker``), timed from spawn to exit, with the same thread
limits. Results: ``OUT/WORKFLOWS.json``, ``OUT/WORKFLOWS.md``, ``OUT/workflows.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"
sys.path.insert(0, str(ROOT / "DeepRegistration"))

FRAMES = 8
AMP = 9.0  # mm, largest displacement of the sequence


def periodic_field(img: sitk.Image, amp_mm: float, wavelength_mm: float = 150.0, phase=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``(Z, Y, X, 3)`` mm: component x = sin of the y position, y of z, z of x (physical index × spacing)."""
    shape = sitk.GetArrayFromImage(img).shape
    sp = img.GetSpacing()[::-1]
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    w = 2 * np.pi / wavelength_mm
    return amp_mm * np.stack([np.sin(w * j + phase[0]), np.sin(w * k + phase[1]), np.sin(w * i + phase[2])], -1)


def warp_by(img: sitk.Image, field: np.ndarray, labels: bool, rigid: sitk.Transform | None = None) -> sitk.Image:
    f = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    f.CopyInformation(img)
    tx = sitk.CompositeTransform([rigid, sitk.DisplacementFieldTransform(f)]) if rigid is not None else \
        sitk.DisplacementFieldTransform(f)
    return sitk.Resample(img, img, tx, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0, img.GetPixelID())


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = [v for v in np.unique(a) if v != 0]
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / max(1, np.sum(a == v) + np.sum(b == v)) for v in labels]))


def resampled(path: Path, spacing: float, labels: bool = False) -> sitk.Image:
    """A bundled image on a grid of ``spacing`` mm over the same field of view (anti-aliased unless labels)."""
    img = sitk.ReadImage(str(path), sitk.sitkUInt16 if labels else sitk.sitkFloat32)
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    if not labels:
        img = sitk.SmoothingRecursiveGaussian(img, [0.5 * spacing] * 3)
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         img.GetOrigin(), [spacing] * 3, img.GetDirection())


def make_data(d: Path, spacing: float) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("fixed", "moving"):
        sitk.WriteImage(resampled(SAMPLE / f"{name}.nii.gz", spacing), str(d / f"{name}.nii.gz"))
        sitk.WriteImage(resampled(SAMPLE / f"{name}_labels.nii.gz", spacing, True), str(d / f"{name}_labels.nii.gz"))
    img = sitk.ReadImage(str(d / "fixed.nii.gz"), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(d / "fixed_labels.nii.gz"))
    frames, labs = [], []
    for t in range(FRAMES):
        field = periodic_field(img, AMP * np.sin(2 * np.pi * t / FRAMES))
        frames.append(warp_by(img, field, False))
        labs.append(warp_by(lab, field, True))
        sitk.WriteImage(labs[-1], str(d / f"seq_labels_{t}.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries(frames), str(d / "seq.nii.gz"))
    rng = np.random.default_rng(7)
    subjects = [(d / "fixed.nii.gz", d / "fixed_labels.nii.gz"), (d / "moving.nii.gz", d / "moving_labels.nii.gz")]
    for n in range(4):
        src, src_lab = subjects[n % 2]
        im = sitk.ReadImage(str(src), sitk.sitkFloat32)
        lb = sitk.ReadImage(str(src_lab))
        centre = im.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in im.GetSize()])
        rigid = sitk.Euler3DTransform(centre, *np.radians(rng.uniform(-5, 5, 3)), tuple(rng.uniform(-5, 5, 3)))
        field = periodic_field(im, 5.0, rng.uniform(110, 170), tuple(rng.uniform(0, 2 * np.pi, 3)))
        sitk.WriteImage(warp_by(im, field, False, rigid), str(d / f"subject_{n}.nii.gz"))
        sitk.WriteImage(warp_by(lb, field, True, rigid), str(d / f"subject_{n}_labels.nii.gz"))
        subjects.append((d / f"subject_{n}.nii.gz", d / f"subject_{n}_labels.nii.gz"))
    (d / "subjects.json").write_text(json.dumps([[str(a), str(b)] for a, b in subjects]))
    with open(d / "pairs.csv", "w") as fh:
        fh.write("fixed,moving,fixed_labels,moving_labels,name\n")
        for n, (a, b) in enumerate(subjects):
            fh.write(f"{d / 'fixed.nii.gz'},{a},{d / 'fixed_labels.nii.gz'},{b},s{n}\n")
    return {"subjects": subjects}


# ------------------------------------------------------------------------------------------ workers
def worker(kind: str, method: str, data: Path, out: Path, threads: int, spacing: float) -> None:
    """One timed method in this process; writes ``out/result.json`` (in-process seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if method.startswith("deepreg"):
        from DeepRegistrationLib.core.config import RegistrationConfig

        cfg = RegistrationConfig(spacing=spacing, threads=threads)
    if kind == "sequence" and method.startswith("deepreg"):
        from DeepRegistrationLib.workflows.sequence import register_sequence

        register_sequence(data / "seq.nii.gz", out / "run", cfg, write_png=False, warm_start=method == "deepreg")
    elif kind == "sequence":
        import ants

        img = ants.image_read(str(data / "seq.nii.gz"))
        fixed = ants.slice_image(img, axis=3, idx=0)
        mc = ants.motion_correction(img, fixed=fixed, type_of_transform="SyN")
        seconds = time.perf_counter() - t0
        for t, tx in enumerate(mc["motion_parameters"]):
            lab = ants.image_read(str(data / f"seq_labels_{t}.nii.gz"))
            w = ants.apply_transforms(fixed, lab, transformlist=tx, interpolator="nearestNeighbor")
            ants.image_write(w, str(out / f"warped_labels_{t}.nii.gz"))
        (out / "result.json").write_text(json.dumps({"seconds": seconds}))
        return
    elif kind == "template" and method == "deepreg":
        from DeepRegistrationLib.workflows.template import build_template

        subjects = json.loads((data / "subjects.json").read_text())
        build_template([a for a, _ in subjects], out / "run", cfg, iterations=3, labels=[b for _, b in subjects],
                       write_png=True)
    elif kind == "template":
        import ants

        subjects = json.loads((data / "subjects.json").read_text())
        imgs = [ants.image_read(a) for a, _ in subjects]
        tpl = ants.build_template(image_list=imgs, iterations=3, type_of_transform="SyN")
        seconds = time.perf_counter() - t0
        ants.image_write(tpl, str(out / "template.nii.gz"))
        for n, (img, (_, lab)) in enumerate(zip(imgs, subjects)):  # untimed: ANTs returns no transforms
            reg = ants.registration(tpl, img, type_of_transform="SyN")
            w = ants.apply_transforms(tpl, ants.image_read(lab), transformlist=reg["fwdtransforms"],
                                      interpolator="nearestNeighbor")
            ants.image_write(w, str(out / f"warped_labels_{n}.nii.gz"))
        (out / "result.json").write_text(json.dumps({"seconds": seconds}))
        return
    elif kind == "batch":
        from DeepRegistrationLib.workflows.batch import read_pairs, run_batch

        run_batch(read_pairs(data / "pairs.csv"), out / "run", cfg, write_png=False)
    (out / "result.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ scoring
def seq_scores(data: Path, run: Path, method: str) -> list[float]:
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "seq_labels_0.nii.gz")))
    ref_img = sitk.ReadImage(str(data / "seq_labels_0.nii.gz"))
    out = []
    for t in range(FRAMES):
        if method.startswith("deepreg"):
            tx = sitk.ReadTransform(str(run / "run" / f"frame_{t:04d}" / "transform.h5"))
            lab = sitk.ReadImage(str(data / f"seq_labels_{t}.nii.gz"))
            w = sitk.GetArrayFromImage(sitk.Resample(lab, ref_img, tx, sitk.sitkNearestNeighbor))
        else:
            w = sitk.GetArrayFromImage(sitk.ReadImage(str(run / f"warped_labels_{t}.nii.gz")))
        out.append(mean_dice(ref, w))
    return out


def template_scores(run: Path, method: str, n: int) -> dict:
    from DeepRegistrationLib.workflows.template import label_agreement, majority_vote

    if method == "deepreg":
        maps = [sitk.GetArrayFromImage(sitk.ReadImage(str(run / "run" / f"subject_{i:04d}" / "warped_labels.nii.gz")))
                for i in range(n)]
    else:
        maps = [sitk.GetArrayFromImage(sitk.ReadImage(str(run / f"warped_labels_{i}.nii.gz"))) for i in range(n)]
    return label_agreement(maps, majority_vote(maps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "workflows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spacing", type=float, default=6.0, help="voxel size of the data and of the registrations (mm)")
    ap.add_argument("--only", nargs="+", default=["sequence", "template", "batch"])
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "METHOD", "DATA", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], Path(a.worker[2]), Path(a.worker[3]), a.threads, a.spacing)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads), ANTS_RANDOM_SEED="1")
    out = a.out.absolute()
    import shutil

    shutil.rmtree(out / "runs", ignore_errors=True)
    data = out / "runs" / "data"
    info = make_data(data, a.spacing)
    n = len(info["subjects"])
    results: dict = {"threads": a.threads, "cpu": os.cpu_count(), "spacing_mm": a.spacing}
    me = [sys.executable, str(Path(__file__).resolve()), "--threads", str(a.threads), "--spacing", str(a.spacing),
          "--worker"]
    if "sequence" in a.only:
        results["sequence"] = {}
        for method in ("deepreg", "deepreg-cold", "ants"):
            run = out / "runs" / f"sequence_{method}"
            wall = timed(me + ["sequence", method, str(data), str(run)], env)
            inproc = json.loads((run / "result.json").read_text())["seconds"]
            dice = seq_scores(data, run, method)
            results["sequence"][method] = {"process_s": round(wall, 2), "algorithm_s": round(inproc, 2),
                                           "dice_per_frame": [round(x, 4) for x in dice],
                                           "dice_mean_moving_frames": round(float(np.mean(dice[1:])), 4)}
            print(method, results["sequence"][method], flush=True)
        before = [mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "seq_labels_0.nii.gz"))),
                            sitk.GetArrayFromImage(sitk.ReadImage(str(data / f"seq_labels_{t}.nii.gz"))))
                  for t in range(FRAMES)]
        results["sequence"]["uncorrected"] = {"dice_per_frame": [round(x, 4) for x in before],
                                              "dice_mean_moving_frames": round(float(np.mean(before[1:])), 4)}
    if "template" in a.only:
        results["template"] = {}
        for method in ("deepreg", "ants"):
            run = out / "runs" / f"template_{method}"
            wall = timed(me + ["template", method, str(data), str(run)], env)
            inproc = json.loads((run / "result.json").read_text())["seconds"]
            results["template"][method] = {"process_s": round(wall, 2), "algorithm_s": round(inproc, 2),
                                           **template_scores(run, method, n)}
            if method == "deepreg":
                rep = json.loads((run / "run" / "report.json").read_text())
                results["template"][method]["mean_displacement_mm_per_pass"] = [
                    round(p["mean_displacement_mm"], 3) for p in rep["iterations"] if "mean_displacement_mm" in p]
            print(method, results["template"][method], flush=True)
    if "batch" in a.only:
        run = out / "runs" / "batch_inprocess"
        wall = timed(me + ["batch", "deepreg", str(data), str(run)], env)
        loop = out / "runs" / "batch_loop"
        loop.mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).with_name("deepregistration"))
        t0 = time.perf_counter()
        for i, (mov, lab) in enumerate(info["subjects"]):
            timed([exe, "register", str(data / "fixed.nii.gz"), str(mov), "-o", str(loop / f"s{i}"), "--spacing", str(a.spacing),
                   "--threads", str(a.threads), "--no-png", "-q", "--fixed-labels", str(data / "fixed_labels.nii.gz"),
                   "--moving-labels", str(lab)], env)
        loop_s = time.perf_counter() - t0
        from DeepRegistrationLib.spatial.transforms import SpatialTransform

        diffs = []
        for i in range(n):
            ta = SpatialTransform.from_sitk(sitk.ReadTransform(str(run / "run" / f"s{i}" / "transform.h5")))
            tb = SpatialTransform.from_sitk(sitk.ReadTransform(str(loop / f"s{i}" / "transform.h5")))
            diffs.append(max(float(np.abs(ta.affine - tb.affine).max()), float(np.abs(ta.field - tb.field).max())))
        summary = json.loads((run / "run" / "summary.json").read_text())
        results["batch"] = {"pairs": n, "batch_process_s": round(wall, 2), "batch_per_pair_s": round(wall / n, 2),
                            "loop_s": round(loop_s, 2), "loop_per_pair_s": round(loop_s / n, 2),
                            "max_transform_difference": diffs and max(diffs),
                            "dice_after_mean": round(float(np.mean([r["dice_after"] for r in summary["pairs"]])), 4)}
        print(results["batch"], flush=True)
    (out / "WORKFLOWS.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "WORKFLOWS.md")
    draw(results, out / "workflows.png")
    return 0


def write_markdown(r: dict, path: Path) -> None:
    lines = [f"# Workflows benchmark ({r['threads']} threads, {r['cpu']} cores)", ""]
    if "sequence" in r:
        lines += [f"## Sequence ({FRAMES} frames, periodic deformation up to {AMP:g} mm, {r['spacing_mm']:g} mm voxels)", "",
                  "| method | process s | algorithm s | mean Dice, moving frames | Dice per frame |", "|---|---|---|---|---|"]
        for m, v in r["sequence"].items():
            lines.append(f"| {m} | {v.get('process_s', '')} | {v.get('algorithm_s', '')} | {v['dice_mean_moving_frames']} "
                         f"| {' '.join(f'{x:.3f}' for x in v['dice_per_frame'])} |")
    if "template" in r:
        lines += ["", "## Template (6 subjects, 3 iterations)", "",
                  "| method | process s | algorithm s | Dice to fused | pairwise Dice |", "|---|---|---|---|---|"]
        for m, v in r["template"].items():
            lines.append(f"| {m} | {v['process_s']} | {v['algorithm_s']} | {v['dice_to_fused_mean']:.4f} "
                         f"| {v['pairwise_dice_mean']:.4f} |")
    if "batch" in r:
        b = r["batch"]
        lines += ["", f"## Batch ({b['pairs']} pairs)", "", "| run | total s | per pair s |", "|---|---|---|",
                  f"| register-batch (one process) | {b['batch_process_s']} | {b['batch_per_pair_s']} |",
                  f"| loop of register processes | {b['loop_s']} | {b['loop_per_pair_s']} |", "",
                  f"Largest difference between the transforms: {b['max_transform_difference']:.3g}; "
                  f"mean Dice after: {b['dice_after_mean']}."]
    path.write_text("\n".join(lines) + "\n")


def draw(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if "sequence" in r:
        for m, v in r["sequence"].items():
            axes[0].plot(range(FRAMES), v["dice_per_frame"], "o-", label=m)
        axes[0].set_xlabel("frame")
        axes[0].set_ylabel("mean Dice vs reference")
        axes[0].legend(fontsize=8)
        axes[0].set_title("sequence")
    if "template" in r:
        ms = list(r["template"])
        axes[1].bar([f"{m}\nto fused" for m in ms], [r["template"][m]["dice_to_fused_mean"] for m in ms])
        axes[1].bar([f"{m}\npairwise" for m in ms], [r["template"][m]["pairwise_dice_mean"] for m in ms])
        axes[1].set_ylabel("label Dice in template space")
        axes[1].set_title("template")
    if "batch" in r:
        b = r["batch"]
        axes[2].bar(["register-batch", "loop of register"], [b["batch_per_pair_s"], b["loop_per_pair_s"]])
        axes[2].set_ylabel("seconds per pair")
        axes[2].set_title("batch")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
