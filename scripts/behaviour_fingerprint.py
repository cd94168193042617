"""Fingerprint of what `train` and `build_dataset` produce, to show that a refactoring changed no behaviour.

Prints (and with ``--out FILE`` writes) one JSON object; run it before and after a change and compare:

    .venv/bin/python scripts/behaviour_fingerprint.py --out /tmp/before.json
    ... change ...
    .venv/bin/python scripts/behaviour_fingerprint.py --out /tmp/after.json --compare /tmp/before.json

What it records (CPU, one thread, fixed seeds; ~1-2 min on a loaded 2-core machine):

- ``train``: three small runs of :func:`DeepRegistrationLib.learning.training.train` on synthetic pairs (16³, 3-4
  steps): ``synthetic`` with validation and checkpoints, ``multi-task`` with pseudo-labels and MI-free LNCC, and a
  ``synthetic`` run cancelled at step 2 then resumed from its checkpoint. For each: the loss log (exact floats,
  as ``repr``), the validation records, the progress messages, the SHA-256 of every saved model tensor (final and
  best model), the model cards without the fields that vary between identical runs (``training.seconds``,
  ``training.hardware``, ``training.recipe.output_dir``, ``versions``) and the SHA-256 of the checkpoint's model
  tensors.
- ``build_dataset``: the test fixtures' scenes (3 subjects x 2 sessions from the bundled sample pair, one saved as
  ``.mrb``, with identifying strings injected; ``Testing/datasetbuilder/test_dataset_build.make_subject_scene``)
  built three ways: augmented (1 copy per training case), the same build cancelled after three cases and resumed,
  and inter-subject pairs with shifted dates. For each: the SHA-256 of every output file. The builder writes no
  time stamps (NIfTI gzip headers and HDF5 object times are zeroed), so every file is compared, ``manifest.json``
  included; the pseudonym key is the same fixed file for every run.

Needs slicer-core (the scenes are real MRML); without it the ``build_dataset`` part is reported as skipped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "DeepRegistration", ROOT / "DatasetBuilder", ROOT / "Testing", ROOT / "Testing" / "datasetbuilder"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

KEY = "5f" * 32  # a fixed pseudonym key (hex), so that pseudonyms are comparable between runs


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_sha(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: sha(v.numpy().tobytes()) for k, v in sorted(load_file(str(path)).items())}


def card_without_run_fields(path: Path) -> dict:
    """The model card minus what differs between identical runs: wall time, hardware, versions, the output
    folder (a temporary one); the weights' hash is kept."""
    card = json.loads(path.read_text())
    training = card.get("training", {})
    for key in ("seconds", "hardware"):
        training.pop(key, None)
    training.get("recipe", {}).pop("output_dir", None)
    card.pop("versions", None)
    return card


def train_runs(tmp: Path) -> dict:
    import torch

    from DeepRegistrationLib.core.errors import Cancelled
    from DeepRegistrationLib.learning.training import CHECKPOINT, TrainConfig, train

    torch.set_num_threads(1)
    common = dict(shape=(16, 16, 16), spacing=4.0, channels=(4, 8), device="cpu", amp=False, seed=7, num_labels=6,
                  val_pairs=1)
    runs = {
        "synthetic": dict(mode="synthetic", steps=4, val_every=2, checkpoint_every=2),
        "multi-task": dict(mode="multi-task", steps=3, val_every=3, pseudo_labels_after=2, similarity="lncc"),
        "unsupervised-mse": dict(mode="unsupervised", similarity="mse", steps=3),
        "resumed": dict(mode="synthetic", steps=4, val_every=2, checkpoint_every=2),
    }
    out = {}
    for name, kw in runs.items():
        folder = tmp / f"train-{name}"
        cfg = TrainConfig(**common, **kw, output_dir=str(folder), model_name="m")
        messages = []

        def progress(fraction, message, stop_at=None):
            messages.append(f"{fraction:.4f} {message}")
            return not (stop_at is not None and message.startswith(f"step {stop_at}/"))

        if name == "resumed":
            try:
                train(cfg, progress=lambda f, m: progress(f, m, stop_at=2))
                raise AssertionError("the cancel did not stop training")
            except Cancelled:
                messages.append("cancelled")
        result = train(cfg, progress=progress)
        entry = {"losses": [repr(x) for x in result.losses], "validation": result.validation,
                 "best": [repr(result.best_metric), result.best_step], "step": result.step, "messages": messages,
                 "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())}
        for stem in ("m", "m-best"):
            if (folder / f"{stem}.safetensors").is_file():
                entry[f"{stem}.tensors"] = tensors_sha(folder / f"{stem}.safetensors")
                entry[f"{stem}.card"] = card_without_run_fields(folder / f"{stem}.json")
        if (folder / CHECKPOINT).is_file():
            blob = torch.load(folder / CHECKPOINT, weights_only=True)
            entry["checkpoint.model"] = {k: sha(v.numpy().tobytes()) for k, v in sorted(blob["model"].items())}
            entry["checkpoint.step"] = int(blob["step"])
        out[name] = entry
    return out


def build_runs(tmp: Path) -> dict:
    try:
        import slicer  # noqa: F401  (slicer-core)
    except ImportError:
        return {"skipped": "slicer-core not installed"}
    import test_dataset_build as T
    from DatasetBuilderLib import build as B
    from DeepRegistrationLib.core.errors import Cancelled

    sample = Path(os.environ.get("DEEPREG_SAMPLE_DIR", ROOT / "DeepRegistration" / "Resources" / "SampleData"))
    inputs = tmp / "scenes" / "in"
    for n in range(T.N_SUBJECTS):
        for session in range(2):
            T.make_subject_scene(sample, inputs, n, session, "mrb" if (n, session) == (2, 1) else "mrml")
    (tmp / "secret").mkdir()
    (tmp / "secret" / "key.hex").write_text(KEY)

    def options(**kw):
        return T.options(tmp, **kw)

    def hashes(folder: Path) -> dict:
        return {p.relative_to(folder).as_posix(): sha(p.read_bytes()) for p in sorted(folder.rglob("*"))
                if p.is_file()}

    out = {}
    B.build_dataset([inputs], tmp / "augmented", options())
    out["augmented"] = hashes(tmp / "augmented")
    seen = []

    def cancel_after_three_cases(fraction, message):
        seen.append(message)
        return not (message.startswith("writing case 4/"))

    try:
        B.build_dataset([inputs], tmp / "resumed", options(), progress=cancel_after_three_cases)
        raise AssertionError("the cancel did not stop the build")
    except Cancelled:
        pass
    B.build_dataset([inputs], tmp / "resumed", options())
    out["resumed"] = hashes(tmp / "resumed")
    out["resumed_progress_until_cancel"] = seen
    result = B.build_dataset([inputs], tmp / "inter-shifted", options(pairing="inter", dates="shift",
                                                                      augment_per_case=0))
    out["inter-shifted"] = hashes(tmp / "inter-shifted")
    out["inter-shifted-result"] = {"cases_total": result.cases_total, "cases_written": result.cases_written,
                                   "pairs": result.pairs, "skipped": [s.reason for s in result.skipped],
                                   "phi_strings": result.phi_strings}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the fingerprint JSON here")
    ap.add_argument("--compare", help="a fingerprint JSON to compare with; exit status 1 when they differ")
    ap.add_argument("--only", choices=("train", "build"), help="run one part only")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        fp = {}
        if args.only in (None, "train"):
            fp["train"] = train_runs(Path(tmp))
        if args.only in (None, "build"):
            fp["build_dataset"] = build_runs(Path(tmp))
    text = json.dumps(fp, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    digest = {part: sha(json.dumps(v, sort_keys=True).encode())[:16] for part, v in fp.items()}
    print(json.dumps(digest))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe
        diff = [k for k in sorted(fp) if not same(old.get(k), fp[k])]
        for part in diff:
            for sub in sorted(set(old.get(part, {})) | set(fp[part])):
                if not same(old.get(part, {}).get(sub), fp[part].get(sub)):
                    print(f"DIFFERENT: {part}/{sub}")
        print("identical" if not diff else "DIFFERENT")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
