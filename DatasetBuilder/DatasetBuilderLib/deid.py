"""De-identification: keyed pseudonyms, NIfTI header scrubbing, deterministic gzip, and the PHI scan.

* Pseudonyms are ``HMAC-SHA256(key, subject identity)``: stable across runs and incremental builds, not
  reversible without the key. The key lives outside the dataset (a file the user keeps) and is never written.
* NIfTI-1 header text fields (``db_name``, ``descrip``, ``aux_file``, ``intent_name``) are zeroed; files are
  gzipped with an empty embedded file name and ``mtime = 0`` (the gzip header would otherwise carry the
  source name and a time stamp, and rebuilds would not be byte-identical).
* The PHI scan searches every output byte (``.gz`` decompressed) for every identifying string seen in the
  inputs; digit-only strings and UIDs must not be part of a longer number to count as a hit.
"""
from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MIN_PHI_LENGTH = 4  # shorter strings ("M", "F", "45") match by chance everywhere and are not searched
# Digit-only strings need 6 digits: "0001" or "4711" would match case numbers ("DREG_0001_0000") and, by chance,
# the hex pseudonyms of the builder's own files; dates (8), times (6), UIDs and record numbers are longer.
MIN_NUMERIC_LENGTH = 6
# Role, modality and body-part words ("fixed", "Volume_2", "T1", "HEAD", "MR Brain", "Chest CT 3") identify nobody
# and also occur in the builder's own output ("fixed" in every pair, "head" in the report): not searched.
_GENERIC_WORD = (r"(volume|segmentation|labelmap|labels?|f|l|markupsfiducial|pointlist|segment|mask|patient|"
                 r"subject|study|series|fixed|moving|image|template|atlas|reference|landmarks|t1|t2|flair|dwi|"
                 r"ct|mr|mri|pet|brain|head|neck|chest|thorax|abdomen|pelvis|spine|knee|hip|body|whole|scan|"
                 r"contrast|axial|coronal|sagittal|routine|baseline|followup|follow up|true|false|none|null|yes|off)")
GENERIC_TEXT = re.compile(rf"^{_GENERIC_WORD}([ _-]{_GENERIC_WORD})*([ _]?\d+)?$", re.IGNORECASE)
# NIfTI-1 text fields: (offset, length) in the 348-byte header
NIFTI_TEXT_FIELDS = {"db_name": (4, 18), "descrip": (148, 80), "aux_file": (228, 24), "intent_name": (328, 16)}


def load_or_create_key(path: str | os.PathLike) -> bytes:
    """Reads the pseudonym key (hex text) at ``path``, creating a random 256-bit key there if absent."""
    p = Path(path)
    if p.exists():
        key = bytes.fromhex(p.read_text().strip())
        if len(key) < 16:
            raise ValueError(f"the pseudonym key in {p} is shorter than 128 bits")
        return key
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    logger.info("created a new pseudonym key at %s (keep it outside the dataset)", p)
    return key


def pseudonym(key: bytes, identity: str, prefix: str = "S", length: int = 10) -> str:
    """Stable pseudonym of a subject identity, e.g. ``S3fa9c01b2e`` (hex of HMAC-SHA256, ``length`` chars)."""
    digest = hmac.new(key, identity.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return prefix + digest[:length]


def scrub_nifti_bytes(raw: bytes) -> bytes:
    """NIfTI-1 file bytes (uncompressed) with the header text fields zeroed and extensions dropped."""
    if len(raw) < 352:
        raise ValueError("not a NIfTI-1 file (too short)")
    b = bytearray(raw)
    if int.from_bytes(b[0:4], "little") != 348 and int.from_bytes(b[0:4], "big") != 348:
        raise ValueError("not a NIfTI-1 file (sizeof_hdr != 348)")
    for offset, length in NIFTI_TEXT_FIELDS.values():
        b[offset:offset + length] = bytes(length)
    b[348:352] = bytes(4)  # extension flag: none (ITK writes none; data still starts at vox_offset)
    return bytes(b)


def deterministic_gzip(data: bytes) -> bytes:
    """gzip bytes without file name and with ``mtime = 0`` (byte-identical for identical input)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as f:
        f.write(data)
    return buf.getvalue()


def read_maybe_gzip(path: str | os.PathLike) -> bytes:
    """File bytes, decompressed when the name ends in ``.gz``."""
    data = Path(path).read_bytes()
    return gzip.decompress(data) if str(path).endswith(".gz") else data


@dataclass
class PhiStrings:
    """Identifying strings seen in the inputs, with where they came from (the kinds only go to the report)."""

    values: dict[str, str] = field(default_factory=dict)  # string -> kind ("DICOM.PatientName", "node name", ...)

    def add(self, value, kind: str) -> None:
        """Records ``value`` (and, for DICOM person names ``A^B``, its components) when long enough
        (``MIN_PHI_LENGTH`` characters, 3 of them letters or digits: ``"----"`` is not searched) and not
        generic words only (:data:`GENERIC_TEXT`)."""
        if value is None:
            return
        text = str(value).strip()
        parts = {text} | ({p.strip() for p in re.split(r"[\^=]", text)} if "^" in text else set())
        for part in parts:
            if GENERIC_TEXT.match(part):
                continue
            if re.fullmatch(r"[0-9.]+", part) and sum(ch.isdigit() for ch in part) < MIN_NUMERIC_LENGTH:
                continue
            if len(part) >= MIN_PHI_LENGTH and sum(ch.isalnum() for ch in part) >= 3:
                self.values.setdefault(part, kind)

    def update(self, other: "PhiStrings") -> None:
        for value, kind in other.values.items():
            self.values.setdefault(value, kind)

    def needles(self) -> list[tuple[str, bytes, bool]]:
        """``(value, lower-case UTF-8 bytes, numeric)``; numeric values (IDs, dates, UIDs) must not be part
        of a longer number to count as found."""
        out = []
        for v in sorted(self.values):
            numeric = bool(re.fullmatch(r"[0-9.]+", v))
            forms = {v.lower()}
            if not v.isascii():  # also as JSON writes it escaped ("m\u00fcller"), whoever wrote the file
                forms.add(json.dumps(v.lower())[1:-1])
            out += [(v, form.encode("utf-8"), numeric) for form in sorted(forms)]
        return out


SHORT_WORD = 5  # text needles this short count only as whole words ("Case" is not in "cases")


def _found(data: bytes, needle: bytes, numeric: bool) -> bool:
    """Whether ``needle`` occurs in (lower-cased) ``data``. Numeric needles and text needles of up to
    :data:`SHORT_WORD` characters count only as whole tokens (not inside a longer number, word or hex digest;
    ``_``, ``-``, spaces and punctuation separate tokens); longer text needles count anywhere."""
    start = data.find(needle)
    whole = numeric or len(needle) <= SHORT_WORD
    while start >= 0:
        if not whole:
            return True
        before = data[start - 1:start] if start else b""
        after = data[start + len(needle):start + len(needle) + 1]
        if not (before.isalnum() or (numeric and before == b".")) and not after.isalnum():
            return True
        start = data.find(needle, start + 1)
    return False


def occurs_in(text: str, needles: list[tuple[str, bytes, bool]]) -> bool:
    """Whether any needle (:meth:`PhiStrings.needles`) occurs in ``text`` by the scan's rules."""
    data = str(text).lower().encode("utf-8")
    return any(_found(data, needle, numeric) for _, needle, numeric in needles)


@dataclass
class PhiHit:
    """One identifying string found in an output file (``value`` never goes into the dataset's report)."""

    file: str
    kind: str
    value: str


def scan_for_phi(root: str | os.PathLike, phi: PhiStrings, skip: set[str] | None = None) -> list[PhiHit]:
    """Searches every file under ``root`` (``.gz`` decompressed) for every string of ``phi``.

    Args:
        root: Output folder.
        phi: Identifying strings from the inputs.
        skip: Relative paths not to scan (none by default).

    Returns:
        One hit per (file, string) found; empty when the folder is clean.
    """
    root = Path(root)
    needles = phi.needles()
    hits: list[PhiHit] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if skip and rel in skip:
            continue
        data = (read_maybe_gzip(path) + b"\n" + rel.encode("utf-8")).lower()  # file names too
        for value, needle, numeric in needles:
            if _found(data, needle, numeric):
                hits.append(PhiHit(rel, phi.values[value], value))
    return hits
