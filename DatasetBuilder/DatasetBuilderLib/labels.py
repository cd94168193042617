"""One label table for the whole dataset, from segment terminology and names with a user synonyms mapping.

A segment is identified first by its **terminology** (Slicer's ``TerminologyEntry`` tag: DICOM/SNOMED coded
type, type modifier and anatomic region, e.g. ``SCT^10200004`` "Liver"), so segments that users named
differently ("Leber", "liver_seg_final") but coded alike share a label; Slicer's default entry ("Tissue",
what every new segment gets) carries no meaning and is ignored. Then by **name**: normalised (case,
spaces, ``-``/``_``). Both are looked up in the synonyms mapping (keys are names or codes such as
``"SCT^10200004"``; ``{"left hippocampus": "Hippocampus_L", ...}``) to a canonical name; a coded segment
without a synonym is canonically its code meaning (with modifier/region: ``"Kidney (Left)"``).
With a fixed table (``names``) only those canonical names get IDs and every other segment is reported as
unmatched (and left out of the label maps, never guessed); without one, every canonical name seen gets
an ID, in sorted order (stable for a given set of names). Label 0 is background.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


# Slicer's default terminology type ("Tissue"): every uncoded segment has it, so it identifies nothing.
DEFAULT_TYPE_CODE = "SCT^85756007"


@dataclass(frozen=True)
class Term:
    """A segment's coded terminology: ``code`` like ``"SCT^10200004"`` (+ ``"/SCT^7771000"`` modifier, region)
    and its human ``meaning`` like ``"Kidney (Left)"``."""

    code: str
    meaning: str


def parse_terminology(entry: str | None) -> Term | None:
    """The :class:`Term` of a Slicer ``TerminologyEntry`` string, or None for no/default terminology.

    Format (``~``-separated): context, category, type, type modifier, anatomic context, region, region
    modifier; each coded field is ``scheme^value^meaning``.
    """
    if not entry:
        return None
    fields = entry.split("~")
    if len(fields) < 3:
        return None

    def coded(i: int) -> tuple[str, str] | None:
        if i >= len(fields):
            return None
        parts = fields[i].split("^")
        if len(parts) < 3 or not parts[0] or not parts[1]:
            return None
        return f"{parts[0]}^{parts[1]}", parts[2]

    kind = coded(2)
    if kind is None:
        return None
    modifier, region, region_modifier = coded(3), coded(5), coded(6)
    if kind[0] == DEFAULT_TYPE_CODE and not (modifier or region):
        return None
    code = "/".join(c[0] for c in (kind, modifier, region, region_modifier) if c)
    extras = [c[1] for c in (modifier, region_modifier, region) if c]
    meaning = kind[1] + (f" ({', '.join(extras)})" if extras else "")
    return Term(code, meaning)


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

    def canonical(self, segment_name: str, term: Term | None = None) -> str | None:
        """Canonical name of a segment (terminology first, then name), or None when it does not match
        (fixed tables)."""
        candidates = []
        if term is not None:
            candidates += [term.code, term.code.split("/")[0], term.meaning]
        candidates.append(segment_name)
        for key in map(normalize, candidates):
            if key in self.synonyms:
                return self.synonyms[key]
        if self.fixed:
            return None
        return term.meaning if term is not None else segment_name.strip()

    def observe(self, segment_names: list[str], terms: list[Term | None] | None = None) -> None:
        """Registers the segments of one case (open tables: new canonical names; counts unmatched)."""
        for name, term in zip(segment_names, terms or [None] * len(segment_names)):
            canon = self.canonical(name, term)
            if canon is None:
                self.unmatched[name] = self.unmatched.get(name, 0) + 1
            elif canon not in self.ids and not self.fixed:
                self.ids[canon] = -1  # numbered by finalize()

    def finalize(self) -> None:
        """Numbers an open table's names: 1..N in sorted order."""
        if not self.fixed:
            self.ids = {name: n for n, name in enumerate(sorted(self.ids), start=1)}

    def id_of(self, segment_name: str, term: Term | None = None) -> int:
        """Label ID of a segment (0 = not in the table)."""
        canon = self.canonical(segment_name, term)
        return self.ids.get(canon, 0) if canon is not None else 0

    def as_json(self) -> dict[str, str]:
        """Learn2Reg ``labels`` entry: ``{"0": "background", "1": name, ...}``."""
        out = {"0": "background"}
        out.update({str(i): name for name, i in sorted(self.ids.items(), key=lambda kv: kv[1])})
        return out
