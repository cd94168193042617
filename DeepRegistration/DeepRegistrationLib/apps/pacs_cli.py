"""The ``deepregistration pacs`` commands (argparse only at import; the work is in :mod:`~DeepRegistrationLib.dicom.pacs`).

    deepregistration pacs register --server URL --fixed-study UID --moving-study UID [options]
    deepregistration pacs watch --server URL --rule FILE --state FILE [options]
    deepregistration pacs import REG_FILE -o transform.h5 [--fixed DIR --moving DIR]

Credentials are never taken from the command line: ``--user NAME`` with the password in
``--password-file FILE`` or ``$DEEPREG_PACS_PASSWORD``; or a bearer token in ``--token-file FILE`` or
``$DEEPREG_PACS_TOKEN``. TLS certificates are verified (``--ca-bundle FILE`` for a private CA).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .options import copy_registration_options

EPILOG = """\
authentication (never on the command line):
  --user NAME + --password-file FILE (or $DEEPREG_PACS_PASSWORD)   HTTP basic
  --token-file FILE (or $DEEPREG_PACS_TOKEN)                       bearer token

stored in the fixed study: one Spatial Registration object (rigid/affine) or Deformable Spatial
Registration object (deformable), plus the moving series resampled onto the fixed series (a derived
series in the fixed frame of reference) unless --no-derived-series. Everything is stored in one STOW-RS
request after the registration succeeded.

examples:
  deepregistration pacs register --server https://pacs.example.org/dicom-web --user reg \\
      --password-file ~/.pacs-password --fixed-study 1.2.3 --moving-study 1.2.4 --mode affine
  deepregistration pacs watch --server https://pacs.example.org/dicom-web --token-file ~/.pacs-token \\
      --rule mr-head.json --state ~/.deepreg-watch.json --interval 60
"""


def _add_server_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--server", required=True, metavar="URL", help="DICOMweb base URL (QIDO/WADO/STOW)")
    g.add_argument("--user", metavar="NAME", help="HTTP basic user; password from --password-file or "
                   "$DEEPREG_PACS_PASSWORD")
    g.add_argument("--password-file", metavar="FILE", help="file holding the password")
    g.add_argument("--token-file", metavar="FILE", help="file holding a bearer token (or $DEEPREG_PACS_TOKEN)")
    g.add_argument("--ca-bundle", metavar="FILE", help="CA certificates to verify the server's TLS certificate")
    g.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries when the server is away, with doubling waits (default: %(default)s)")
    g.add_argument("--series-filter", metavar="REGEX", help="only series whose description matches (case-insensitive)")
    g.add_argument("--modality", metavar="CT|MR|PT", help="only series of this modality")
    g.add_argument("--body-part", metavar="NAME", help="only series of this Body Part Examined")
    g.add_argument("--no-derived-series", action="store_true", help="store the registration object only")
    g.add_argument("--keep-results", metavar="DIR",
                   help="keep each result (its series and registration folder) in DIR/result_NNNN, for "
                        "'deepregistration feedback DIR/result_NNNN/registration --accept|--reject' "
                        "(default: temporary, removed)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")



def add_subparser(sub) -> None:
    """Adds ``pacs register`` and ``pacs watch`` to the ``deepregistration`` subcommands."""
    register_parser = sub.choices.get("register")
    p = sub.add_parser("pacs", help="register studies on a PACS over DICOMweb and store the result there",
                       description="Fetch studies over DICOMweb, register them, store DICOM registration objects "
                                   "(and the resampled series) back.")
    psub = p.add_subparsers(dest="pacs_command", metavar="ACTION")
    # allow_abbrev=False: "--password SECRET" must be an error, not an abbreviation of --password-file
    r = psub.add_parser("register", help="register one study onto another and store the result",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    r.add_argument("--fixed-study", required=True, metavar="UID", help="Study Instance UID of the fixed study")
    r.add_argument("--moving-study", required=True, metavar="UID", help="Study Instance UID of the moving study")
    r.add_argument("--allow-different-patients", action="store_true",
                   help="register studies of different patients (refused otherwise)")
    r.add_argument("--dry-run", action="store_true", help="register and build the objects, store nothing")
    _add_server_options(r)
    copy_registration_options(r, register_parser)
    w = psub.add_parser("watch", help="register every new study to the patient's most recent prior study",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    w.add_argument("--rule", required=True, metavar="FILE",
                   help='JSON {"modality": "MR", "body_part": "HEAD", "series_description": "T1"} (any key optional)')
    w.add_argument("--state", required=True, metavar="FILE", help="state file (created; keeps what was done)")
    w.add_argument("--interval", type=float, default=60.0, metavar="S", help="seconds between polls (default: 60)")
    w.add_argument("--max-polls", type=int, default=None, metavar="N", help="stop after N polls (default: run on)")
    w.add_argument("--queue-size", type=int, default=10, metavar="N",
                   help="at most N registrations per poll (default: %(default)s)")
    w.add_argument("--include-existing", action="store_true",
                   help="on the first run also register studies already on the server (default: only new ones)")
    _add_server_options(w)
    copy_registration_options(w, register_parser)
    i = psub.add_parser("import", help="turn a DICOM (deformable) spatial registration file into transform.h5",
                        description="Read a Spatial Registration or Deformable Spatial Registration object (e.g. "
                                    "retrieved from the PACS) and write it as an ITK transform, fixed -> moving, "
                                    "as 'register' writes transform.h5. With --fixed/--moving series folders the "
                                    "object must link their frames of reference.", allow_abbrev=False)
    i.add_argument("registration", metavar="REG_FILE", help="the DICOM registration object")
    i.add_argument("-o", "--output", required=True, metavar="FILE", help="transform file to write (.h5)")
    i.add_argument("--fixed", metavar="DIR", help="fixed series folder (its frame must be the registered one)")
    i.add_argument("--moving", metavar="DIR", help="moving series folder")
    i.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")


def _client(args):
    from ..dicom.dicomweb import PacsClient, auth_from_options

    auth = auth_from_options(args.user, args.password_file, args.token_file)
    return PacsClient(args.server, auth, ca_bundle=args.ca_bundle, retries=max(0, args.retries))


def _rule(args):
    from ..dicom.pacs import SeriesRule

    rule = SeriesRule(args.modality, args.body_part, args.series_filter)
    if getattr(args, "rule", None):
        base = SeriesRule.from_file(args.rule)
        rule = SeriesRule(args.modality or base.modality, args.body_part or base.body_part,
                          args.series_filter or base.series_description)
    rule.check()
    return rule


def _register_function(args):
    """``register(fixed_dir, moving_dir, out_dir) -> report``: the ``register`` command on two folders."""
    from ..core.config import RegistrationConfig
    from .register_command import register_command

    def register(fixed_dir: Path, moving_dir: Path, out_dir: Path) -> dict:
        ns = argparse.Namespace(**vars(args))
        ns.fixed, ns.moving, ns.output, ns.overwrite = str(fixed_dir), str(moving_dir), str(out_dir), False
        for name in ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "fixed_landmarks",
                     "moving_landmarks", "guide_landmarks"):
            setattr(ns, name, None)
        # the register options pacs does not copy: no guide landmarks, no extra maps, the report as it is, and
        # warped.nii.gz at full resolution whatever the size when it becomes the derived series stored on the PACS
        ns.no_png, ns.explain, ns.uncertainty, ns.fail_on = True, False, False, None
        ns.warped = "auto" if args.no_derived_series else "full"
        ns.guide_weight = RegistrationConfig().guide_weight
        stdout = sys.stdout
        sys.stdout = sys.stderr  # the register command's summary goes to stderr; stdout is ours
        try:
            register_command(ns)
        finally:
            sys.stdout = stdout
        return json.loads((out_dir / "report.json").read_text())

    return register


def run(args: argparse.Namespace) -> int:
    """Runs ``pacs register`` / ``pacs watch``; returns the exit status (errors are raised)."""
    from ..core.errors import InputError
    from ..dicom import pacs

    if args.pacs_command is None:
        raise InputError("give an action: deepregistration pacs register, watch or import (see --help)")
    if args.pacs_command == "import":
        from ..dicom.registration_objects import import_registration
        from ..dicom.series import read_series

        fixed = read_series(args.fixed, "fixed series") if args.fixed else None
        moving = read_series(args.moving, "moving series") if args.moving else None
        reg = import_registration(args.registration, args.output, fixed, moving, args.overwrite)
        print(json.dumps({"output": str(args.output), "deformable": reg.deformable, "fixed_frame": reg.fixed_frame_uid,
                          "moving_frame": reg.moving_frame_uid}, indent=1))
        return 0
    client = _client(args)
    rule = _rule(args)
    register = _register_function(args)
    if args.pacs_command == "register":
        keep = pacs.new_result_folder(args.keep_results) if args.keep_results else None
        try:
            result = pacs.register_studies(client, args.fixed_study, args.moving_study, register, rule=rule,
                                           allow_different_patients=args.allow_different_patients,
                                           derived=not args.no_derived_series, store=not args.dry_run,
                                           work_dir=keep, keep_failed=False)
        except BaseException:
            if keep is not None:  # refused before any download: nothing of it stays
                shutil.rmtree(keep, ignore_errors=True)
            raise
        print(json.dumps({"stored": not args.dry_run,
                          **({"result": str(keep / "registration")} if keep is not None else {}),
                          "registration_sop_class": result.registration_sop_class,
                          "registration_uid": result.registration_uid,
                          "derived_series_uid": result.derived_series_uid, "instances": len(result.stored_uids),
                          "fixed_series": result.fixed_series, "moving_series": result.moving_series}, indent=1))
        return 0
    summary = pacs.watch(client, rule, args.state, register, interval_s=args.interval, max_polls=args.max_polls,
                         queue_size=max(1, args.queue_size), include_existing=args.include_existing,
                         derived=not args.no_derived_series, results_dir=args.keep_results)
    print(json.dumps(summary.to_dict(), indent=1))
    return 0
