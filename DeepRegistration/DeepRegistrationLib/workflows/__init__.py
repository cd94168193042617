"""Multi-pair workflows on top of the registration run (:func:`DeepRegistrationLib.outputs.run_registration`).

Layer: above the single registration (``outputs`` / ``pipeline``), below the command line. Every workflow
runs many registrations in one process (the start-up of Python + torch, about 1.2 s, is paid once) and,
under ``torchrun``, splits its independent registrations over the ranks (:mod:`.batch`):

- :mod:`.batch`: ``register-batch`` — a CSV of pairs, per-pair outputs, summary, resume, failing rows.
- :mod:`.sequence`: ``register-sequence`` — every frame of a 4D image onto a reference (warm-started).
- :mod:`.template`: ``template`` — unbiased groupwise template building.
- :mod:`.commands`: the argparse of the three subcommands.
"""
