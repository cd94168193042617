"""Command line: ``deepregistration dataset build INPUT... -o OUTDIR [options]``.

The main CLI adds this with :func:`add_subparser` and dispatches to :func:`run`; for testing the module also
runs alone: ``python -m DatasetBuilderLib.cli dataset build ...`` (with ``DatasetBuilder/`` and
``DeepRegistration/`` on ``PYTHONPATH``). ``--feedback LOG`` adds users' accepted results as pairs
(:mod:`DatasetBuilderLib.feedback`). Exit codes: 0 built, 1 PHI found, 2 bad input/options,
3 output folder refused, 130 cancelled. With ``--machine-progress`` (a parent process, see
:mod:`DeepRegistrationLib.core.jobs`) it writes that module's JSON lines on stdout and ends itself when its
stdin closes (the parent cancelled or went away): finished cases stay, and the same build resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Adds ``dataset`` (with its ``build`` sub-command) to an argparse ``subparsers`` object."""
    dataset = subparsers.add_parser("dataset", help="build de-identified Learn2Reg training sets from Slicer scenes")
    sub = dataset.add_subparsers(dest="dataset_command", required=True)
    b = sub.add_parser("build", help="scenes (.mrb/.mrml or folders) -> dataset folder")
    b.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="scene files (.mrb, .mrml) or folders of them (or of DICOM series); optional with --feedback")
    b.add_argument("-o", "--out", required=True, metavar="OUTDIR",
                   help="new/empty folder, or a dataset to update: it then mirrors the INPUTs given (new cases "
                        "added, earlier ones kept unchanged, cases whose inputs are not given again removed)")
    b.add_argument("--key", required=True, metavar="FILE",
                   help="pseudonym key file, outside OUTDIR (created when missing; keep it for updates)")
    b.add_argument("--task", default="DREG", help="task name, the file prefix (default DREG)")
    b.add_argument("--subjects", metavar="CSV", help="CSV scene,subject[,session] for scenes without DICOM identity")
    b.add_argument("--subject-from-file", action="store_true",
                   help="scenes without DICOM identity or mapping: the scene file name is the subject")
    b.add_argument("--pairing", choices=("intra", "inter", "atlas"), default="intra")
    b.add_argument("--max-pairs", type=int, default=None, help="bound of inter-subject pairs per split")
    b.add_argument("--atlas-case", type=int, default=None, help="case number of the atlas (pairing atlas)")
    b.add_argument("--split", default="0.7,0.1,0.2", help="train,val,test shares (default 0.7,0.1,0.2)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--labels", metavar="JSON",
                   help='label table JSON {"names": [...], "synonyms": {"segment name": "label"}}')
    b.add_argument("--augment", type=int, default=0, help="augmented copies per training case")
    b.add_argument("--no-intensity", action="store_true", help="augmentation without bias/gamma/noise")
    b.add_argument("--classical", action="store_true",
                   help="add an algorithmic ground truth per pair (engine registration, flagged, with scores)")
    b.add_argument("--classical-method", choices=("engine", "ants"), default="engine",
                   help="method of --classical: the engine's optimization (default) or ANTs SyN (needs antspyx)")
    b.add_argument("--feedback", metavar="LOG",
                   help="feedback log of 'deepregistration feedback' / the Accept-Reject buttons: accepted results "
                        "become pairs with their transform as ground truth flagged 'accepted by a user'; rejected "
                        "ones are listed (by result id) in report.md for expert review (docs/FEEDBACK.md)")
    b.add_argument("--dates", choices=("remove", "shift"), default="remove",
                   help="study dates: write none (default) or shift them per subject by a keyed offset "
                        "(keeps the intervals between a subject's sessions)")
    b.add_argument("--modality", default="MR", help="modality when a scene does not say (default MR)")
    b.add_argument("--machine-progress", action="store_true",
                   help="JSON progress/result/error lines on stdout for a parent process (DeepRegistrationLib.core.jobs)")
    return dataset


class _Bar:
    def __init__(self) -> None:
        self.last = -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(100 * fraction)
        if percent != self.last:
            self.last = percent
            sys.stderr.write(f"\r[{'#' * (percent // 5):<20}] {percent:3d}% {message:<40}")
            if fraction >= 1:
                sys.stderr.write("\n")
            sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Runs ``dataset build`` from parsed arguments; returns the exit code."""
    from DeepRegistrationLib.core import jobs
    from DeepRegistrationLib.core.errors import Cancelled

    from .build import BuildOptions, PhiFoundError, build_dataset
    from .classical import ClassicalOptions
    from .writer import NotOurDatasetError

    machine = jobs.Emitter(sys.stdout) if getattr(args, "machine_progress", False) else None
    if machine is not None:
        jobs.watch_stdin(grace=1.0)  # a parent's Cancel (or its end) closes stdin: stop, keep finished cases

    def fail(text: str, kind: str, code: int, after: str = "") -> int:
        sys.stderr.write(f"\n{'' if kind == 'cancelled' else 'error: '}{text}\n{after}")
        if machine is not None:
            machine.error(text, kind)
        return code

    try:
        ratios = tuple(float(v) for v in args.split.split(","))
        if len(ratios) != 3:
            raise ValueError
    except ValueError:
        return fail(f"--split needs three numbers like 0.7,0.1,0.2, got {args.split!r}", "input", 2)
    names = synonyms = None
    if args.labels:
        try:
            table = json.loads(open(args.labels).read())
            names, synonyms = table.get("names"), table.get("synonyms")
        except (OSError, ValueError) as exc:
            return fail(f"cannot read the label table {args.labels}: {exc}", "input", 2)
    options = BuildOptions(key_file=args.key, task=args.task, subject_mapping=args.subjects,
                           subject_from_file=args.subject_from_file, pairing=args.pairing,
                           max_pairs_per_split=args.max_pairs, atlas_case=args.atlas_case, split_ratios=ratios,
                           seed=args.seed, label_names=names, label_synonyms=synonyms,
                           augment_per_case=args.augment, augment_intensity=not args.no_intensity,
                           modality=args.modality, classical=args.classical,
                           classical_options=ClassicalOptions(method=args.classical_method), dates=args.dates,
                           feedback_log=getattr(args, "feedback", None))
    if not args.inputs and options.feedback_log is None:
        return fail("nothing to build from: give scene files or folders (INPUT...), or --feedback LOG", "input", 2)
    try:
        result = build_dataset(args.inputs, args.out, options, progress=machine or _Bar())
    except NotOurDatasetError as exc:
        return fail(str(exc), "refused", 3)
    except PhiFoundError as exc:
        return fail(str(exc), "phi", 1, "See report.md in the output folder.\n")
    except Cancelled as exc:
        return fail(str(exc), "cancelled", 130)
    except (ValueError, OSError) as exc:
        return fail(str(exc), "input", 2)
    summary = (f"built {result.cases_total} cases ({result.augmented} augmented), pairs {result.pairs}, "
               f"{len(result.skipped)} inputs skipped; PHI scan clean; report: {result.out_dir / 'report.md'}")
    if options.feedback_log is not None:
        summary += (f"\nfeedback: {result.feedback_pairs} accepted result(s) used as pairs, "
                    f"{len(result.feedback_rejected)} rejected (listed in report.md), "
                    f"{len(result.feedback_unusable)} not usable")
    if machine is not None:
        machine.result({"message": summary, "out_dir": str(result.out_dir), "cases": result.cases_total,
                        "pairs": result.pairs})
    else:
        print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepregistration")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
