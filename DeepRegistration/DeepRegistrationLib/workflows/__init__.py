"""Multi-pair workflows on top of the registration run (:func:`DeepRegistrationLib.registration.run.run_registration`).

Layer: above the single registration (``outputs`` / ``pipeline``), below the command line. Every workflow
runs many registrations in one process (the start-up of Python + torch, about 1.2 s, is paid once) and,
under ``torchrun``, splits its independent registrations over the ranks (:mod:`~DeepRegistrationLib.workflows.batch`):

- :mod:`~DeepRegistrationLib.workflows.batch`: ``register-batch`` — a CSV of pairs, per-pair outputs, summary, resume, failing rows.
- :mod:`~DeepRegistrationLib.workflows.sequence`: ``register-sequence`` — every frame of a 4D image onto a reference (warm-started).
- :mod:`~DeepRegistrationLib.workflows.template`: ``template`` — unbiased groupwise template building.
- :mod:`~DeepRegistrationLib.workflows.feedback`: users' verdicts on results (accepted / rejected, a note) in
  ``report.json`` and a feedback log, read back by the DatasetBuilder (docs/FEEDBACK.md).
- :mod:`~DeepRegistrationLib.apps.workflow_commands`: the argparse of the three subcommands.
"""
