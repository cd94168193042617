"""One label table for the whole dataset, from segment names with a user synonyms mapping.

Segment names are normalised (case, spaces, ``-``/``_``) and looked up in the synonyms mapping
(``{"left hippocampus": "Hippocampus_L", ...}``) to a canonical name. With a fixed table (``names``) only
those canonical names get IDs and every other segment name is reported as unmatched (and left out of the
label maps, never guessed); without one, every canonical name seen gets an ID, in sorted order (stable
for a given set of names). Label 0 is background.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


def normalize(name: str) -> str:
    """Lower-case, separators collapsed to one space: ``"Left_Hippo-campus "`` → ``"left hippo campus"``."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@dataclass
class LabelTable:
    """Canonical label names → integer IDs (1..N) shared by every case of a dataset.

    Attributes:
        ids: Canonical name → ID.
        synonyms: Normalised segment name → canonical name.
        fixed: True when only the given names are accepted.
        unmatched: Segment names seen that map to no label, with their count (report only).
    """

    ids: dict[str, int] = field(default_factory=dict)
    synonyms: dict[str, str] = field(default_factory=dict)
    fixed: bool = False
    unmatched: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, names: list[str] | None = None, synonyms: dict[str, str] | None = None) -> "LabelTable":
        """Table with a fixed list of canonical ``names`` (IDs in that order), or an open one."""
        syn = {normalize(k): v for k, v in (synonyms or {}).items()}
        table = cls(synonyms=syn, fixed=names is not None)
        for n, name in enumerate(names or [], start=1):
            table.ids[name] = n
            syn.setdefault(normalize(name), name)
        return table

    def canonical(self, segment_name: str) -> str | None:
        """Canonical name of a segment name, or None when it does not match (fixed tables)."""
        key = normalize(segment_name)
        if key in self.synonyms:
            return self.synonyms[key]
        if self.fixed:
            return None
        return segment_name.strip()

    def observe(self, segment_names: list[str]) -> None:
        """Registers the segment names of one case (open tables: new canonical names; counts unmatched)."""
        for name in segment_names:
            canon = self.canonical(name)
            if canon is None:
                self.unmatched[name] = self.unmatched.get(name, 0) + 1
            elif canon not in self.ids and not self.fixed:
                self.ids[canon] = -1  # numbered by finalize()

    def finalize(self) -> None:
        """Numbers an open table's names: 1..N in sorted order."""
        if not self.fixed:
            self.ids = {name: n for n, name in enumerate(sorted(self.ids), start=1)}

    def id_of(self, segment_name: str) -> int:
        """Label ID of a segment name (0 = not in the table)."""
        canon = self.canonical(segment_name)
        return self.ids.get(canon, 0) if canon is not None else 0

    def as_json(self) -> dict[str, str]:
        """Learn2Reg ``labels`` entry: ``{"0": "background", "1": name, ...}``."""
        out = {"0": "background"}
        out.update({str(i): name for name, i in sorted(self.ids.items(), key=lambda kv: kv[1])})
        return out
