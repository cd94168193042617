"""The ``deepregistration feedback`` command (argparse only at import; the work is in
:mod:`~DeepRegistrationLib.workflows.feedback`).

    deepregistration feedback OUTDIR --accept|--reject [--note TEXT] [--reviewer NAME] [--log FILE]

Prints the result id (stdout, one line) and exits 0; bad input exits 2 with one message, nothing written.
"""
from __future__ import annotations

import argparse

EPILOG = """\
The verdict is written into OUTDIR/report.json ("feedback") and appended to the feedback log (JSON lines,
keyed by the result's random result_id; default: the per-user log, or $DEEPREG_FEEDBACK_LOG). A second
verdict on the same result replaces the first; the log keeps both. The note may be clinical free text: it is
kept in report.json and the log only, never in a dataset built from them.

then: deepregistration dataset build --feedback LOG ... turns accepted results into training pairs
(docs/FEEDBACK.md).

examples:
  deepregistration feedback out --accept
  deepregistration feedback out --reject --note "misaligned at the skull base" --reviewer dr-a
"""


def add_subparser(sub) -> None:
    """Adds ``feedback`` to the ``deepregistration`` subcommands."""
    p = sub.add_parser("feedback", help="record a user's verdict (accept / reject) on a registration result",
                       description="Store a verdict on a registration result with the result and in the "
                                   "feedback log, for the DatasetBuilder's --feedback.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", metavar="OUTDIR", help="a registration output folder (holds report.json)")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--accept", dest="verdict", action="store_const", const="accepted",
                   help="the registration is good: it may become a training pair")
    v.add_argument("--reject", dest="verdict", action="store_const", const="rejected",
                   help="the registration is wrong: kept out of training, listed for expert review")
    p.add_argument("--note", metavar="TEXT", help="free-text note (kept locally only)")
    p.add_argument("--reviewer", metavar="NAME", help="a name to sign the verdict with (optional)")
    p.add_argument("--log", metavar="FILE", help="feedback log to append to (default: the per-user log)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def run(args: argparse.Namespace) -> int:
    """Runs ``feedback``; InputError propagates to the main command (exit 2, one message)."""
    from ..workflows.feedback import record

    entry = record(args.result, args.verdict, note=args.note, log=args.log, reviewer=args.reviewer)
    print(entry["result_id"])
    return 0
