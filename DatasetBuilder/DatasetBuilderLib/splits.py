"""Subject-grouped train/val/test splits, deterministic from a seed and stable under additions.

Each subject gets a rank key ``sha256(seed:pseudonym)``. Subjects already assigned (from an earlier build
of the same dataset) keep their split. New subjects, in rank-key order, go one at a time to the split
whose count is furthest below its target share of the new total (ties: train, val, test). A first build
therefore gives the exact 7:1:2 (rounded) proportions, and later additions never move anybody.
"""
from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def rank_key(seed: int, subject: str) -> str:
    """Deterministic order key of a subject pseudonym for a seed."""
    return hashlib.sha256(f"{seed}:{subject}".encode("utf-8")).hexdigest()


def assign_splits(subjects: list[str], ratios: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
                  existing: dict[str, str] | None = None) -> dict[str, str]:
    """Split of every subject.

    Args:
        subjects: Subject pseudonyms (duplicates ignored).
        ratios: Target shares of train, val, test (normalised; zeros allowed).
        seed: Seed of the rank keys.
        existing: Earlier assignment (subject → split), kept as is.

    Returns:
        Subject → ``"train" | "val" | "test"`` for every subject of ``subjects`` and ``existing``.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be 3 non-negative numbers, got {ratios}")
    share = [r / sum(ratios) for r in ratios]
    out = dict(existing or {})
    for split in out.values():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in the existing assignment")
    counts = [sum(1 for s in out.values() if s == name) for name in SPLITS]
    new = sorted({s for s in subjects if s not in out}, key=lambda s: rank_key(seed, s))
    for subject in new:
        total = sum(counts) + 1
        deficits = [share[i] * total - counts[i] for i in range(3)]
        best = max(range(3), key=lambda i: (deficits[i], -i))
        out[subject] = SPLITS[best]
        counts[best] += 1
    return out
