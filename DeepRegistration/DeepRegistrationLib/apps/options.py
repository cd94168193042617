"""Command-line options shared by the commands built on ``register`` (pacs, register-batch/-sequence, template)."""
from __future__ import annotations

import argparse

REGISTRATION_GROUPS = ("registration", "learned model")
"""Titles of the ``register`` parser's option groups that the other commands take over as they are."""


def copy_registration_options(target: argparse.ArgumentParser, register_parser, skip: tuple[str, ...] = ()) -> None:
    """Adds the ``register`` command's registration and model options to ``target`` (same actions, same defaults),
    except those whose ``dest`` is in ``skip``; does nothing when ``register_parser`` is None."""
    if register_parser is None:
        return
    for group in register_parser._action_groups:  # noqa: SLF001 - argparse has no public accessor
        if group.title in REGISTRATION_GROUPS:
            new = target.add_argument_group(group.title)
            for action in group._group_actions:  # noqa: SLF001
                if action.dest not in skip:
                    new._add_action(action)  # noqa: SLF001
