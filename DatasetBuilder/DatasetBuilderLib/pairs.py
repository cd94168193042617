"""Registration pairs within one split: intra-subject, inter-subject (all or a bounded sample), atlas.

A pair is ``(fixed case, moving case)`` by case key; every pair's two cases are in the same split
(:func:`check_no_cross_split` enforces it, the builder calls it before writing).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

STRATEGIES = ("intra", "inter", "atlas")


@dataclass(frozen=True)
class CaseRef:
    """What pairing needs of a case: its key, subject pseudonym, split, session order and modality."""

    key: str
    subject: str
    split: str
    session: str = ""
    modality: str = "MR"


def make_pairs(cases: list[CaseRef], strategy: str = "intra", max_pairs_per_split: int | None = None,
               seed: int = 0, atlas_key: str | None = None) -> list[tuple[str, str]]:
    """Pairs ``(fixed_key, moving_key)`` of the cases.

    Args:
        cases: All cases.
        strategy: ``intra``: every ordered pair of cases of one subject (longitudinal / multimodal);
            ``inter``: every ordered pair of cases of different subjects within a split, or a random sample
            of at most ``max_pairs_per_split`` of them; ``atlas``: every case of the atlas's split to the case
            ``atlas_key`` (the atlas is fixed).
        max_pairs_per_split: Bound for ``inter`` (None = all).
        seed: Seed of the ``inter`` sample.
        atlas_key: Template case for ``atlas``.

    Returns:
        Sorted list of pairs, none crossing splits.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    ordered = sorted(cases, key=lambda c: (c.split, c.subject, c.session, c.key))
    pairs: list[tuple[str, str]] = []
    if strategy == "intra":
        by_subject: dict[str, list[CaseRef]] = {}
        for c in ordered:
            by_subject.setdefault(c.subject, []).append(c)
        for group in by_subject.values():
            pairs += [(a.key, b.key) for a, b in itertools.permutations(group, 2) if a.split == b.split]
    elif strategy == "inter":
        for split in sorted({c.split for c in ordered}):
            members = [c for c in ordered if c.split == split]
            candidates = [(a.key, b.key) for a, b in itertools.permutations(members, 2) if a.subject != b.subject]
            if max_pairs_per_split is not None and len(candidates) > max_pairs_per_split:
                candidates = random.Random(f"{seed}:{split}").sample(candidates, max_pairs_per_split)
            pairs += candidates
    else:
        atlas = next((c for c in ordered if c.key == atlas_key), None)
        if atlas is None:
            raise ValueError(f"atlas case {atlas_key!r} is not among the cases")
        pairs = [(atlas.key, c.key) for c in ordered if c.split == atlas.split and c.key != atlas.key]
    check_no_cross_split(pairs, {c.key: c.split for c in cases})
    return sorted(pairs)


def check_no_cross_split(pairs: list[tuple[str, str]], split_of: dict[str, str]) -> None:
    """Raises ValueError if a pair joins two splits."""
    bad = [p for p in pairs if split_of[p[0]] != split_of[p[1]]]
    if bad:
        raise ValueError(f"{len(bad)} pairs cross splits, e.g. {bad[0]}")
