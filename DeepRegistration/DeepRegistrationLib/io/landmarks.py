"""Landmark (point list) files: reading, writing and pairing, always returning LPS millimetres.

Accepted inputs (chosen by file name):

- ``*.mrk.json`` / ``*.json``: Slicer markups JSON. ``markups[0].coordinateSystem`` is "LPS" (the
  schema's default, used when absent) or "RAS"; ``controlPoints[].label`` / ``.position``. Points whose
  ``positionStatus`` is "undefined" (placeholders without a position) are skipped with a warning.
- ``*.fcsv``: legacy Slicer fiducial CSV. ``# CoordinateSystem = RAS|LPS|0|1`` (0 = RAS, 1 = LPS;
  **RAS when the line is absent**, as in files written before Slicer 4.11); columns from the
  ``# columns =`` line, else ``id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,...``.
- ``*.csv`` / ``*.tsv`` / ``*.txt``: a header row naming a label column (``label``, ``name``, ``id``,
  ``landmark``, ``point``; optional, else labels are "1", "2", …) and ``x, y, z`` columns (case and
  units such as ``x_mm`` / ``X (mm)`` ignored). The frame is **LPS unless stated**: by a comment line
  ``# coordinateSystem = RAS`` or by a ``coordinateSystem`` column (per row). Columns named ``r, a, s``
  or ``l, p, s`` instead of ``x, y, z`` also state the frame. A CSV that is really an ``.fcsv`` (first
  line ``# Markups fiducial file version``) is read as one.

RAS points are converted to LPS by negating x and y (:mod:`~DeepRegistrationLib.core.frames`). Every problem raises :class:`InputError`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.frames import lps_to_ras, ras_to_lps

logger = logging.getLogger(__name__)

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                  "Schema/markups-schema-v1.0.3.json#")
_LABEL_NAMES = ("label", "name", "landmark", "point", "id")
_SYSTEM_NAMES = ("coordinatesystem", "coordsystem", "coordinateframe", "space", "frame", "system")
_FCSV_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                 "associatedNodeID"]


@dataclass
class Landmarks:
    """A named point list.

    Attributes:
        labels: One label per point (may be empty strings or repeat, see :func:`match_landmarks`).
        points: Shape ``(N, 3)``, LPS mm, components ``(x, y, z)``.
    """

    labels: list[str]
    points: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)
        self.labels = [str(v) for v in self.labels]
        if len(self.labels) != len(self.points):
            raise ValueError(f"{len(self.labels)} labels for {len(self.points)} points")

    def __len__(self) -> int:
        return len(self.points)


# ---------------------------------------------------------------------------------------------- reading
def _system(value: str, where: str) -> str:
    v = str(value).strip().upper()
    if v in ("RAS", "0"):
        return "RAS"
    if v in ("LPS", "1"):
        return "LPS"
    raise InputError(f"{where}: unknown coordinate system '{value}'. Use RAS or LPS.")


def _to_lps(points: np.ndarray, systems: list[str]) -> np.ndarray:
    ras = np.array([s == "RAS" for s in systems], dtype=bool)
    points = points.copy()
    points[ras] = ras_to_lps(points[ras])
    return points


def _number(text: str, where: str) -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        raise InputError(f"{where}: coordinate '{text}' is not a number. Fix or remove that point.") from None
    if not np.isfinite(value):
        raise InputError(f"{where}: coordinate '{text}' is not finite (NaN or infinity). Fix or remove that point.")
    return value


def _finish(path: Path, labels: list[str], points: list, systems: list[str]) -> Landmarks:
    if not points:
        raise InputError(f"landmark file '{path}' contains no points. Add at least one point.")
    lms = Landmarks(labels, _to_lps(np.asarray(points, dtype=np.float64), systems))
    logger.info("read %d landmarks from %s (%s -> LPS)", len(lms), path.name, "/".join(sorted(set(systems))))
    return lms


def _norm(name: str) -> str:
    """Header name without case, spaces, units: ``'X (mm)'`` → ``'x'``, ``'position_x_mm'`` → ``'x'``."""
    n = re.sub(r"[\(\[].*?[\)\]]", "", name.strip().lower())
    n = re.sub(r"[\s_\-\.]+", "", n)
    short = re.sub(r"^(position|pos|coordinate|coord)(?=[xyz](mm)?$)", "", n)
    return re.sub(r"^([xyzraslp])mm$", r"\1", short)


def _read_fcsv(path: Path, text: str) -> Landmarks:
    system, columns = "RAS", list(_FCSV_COLUMNS)
    labels, points, systems = [], [], []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("#"):
            m = re.match(r"#\s*coordinate\s*system\s*=\s*(\S+)", line, re.I)
            if m:
                system = _system(m.group(1), f"{path}, line {number}")
            m = re.match(r"#\s*columns\s*=\s*(.+)", line, re.I)
            if m:
                columns = [c.strip() for c in m.group(1).split(",")]
    lower = [c.lower() for c in columns]
    if not {"x", "y", "z"} <= set(lower):
        raise InputError(f"{path}: the '# columns =' line has no x, y, z columns.")
    ix, iy, iz = lower.index("x"), lower.index("y"), lower.index("z")
    il = lower.index("label") if "label" in lower else None
    body = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip() and not ln.startswith("#")]
    for (number, _), row in zip(body, csv.reader([ln for _, ln in body])):
        where = f"{path}, line {number}"
        if len(row) <= max(ix, iy, iz):
            raise InputError(f"{where}: expected at least {max(ix, iy, iz) + 1} comma-separated values.")
        points.append([_number(row[i], where) for i in (ix, iy, iz)])
        labels.append(row[il].strip() if il is not None and il < len(row) else str(len(points)))
        systems.append(system)
    return _finish(path, labels, points, systems)


def _read_csv(path: Path, text: str) -> Landmarks:
    if text.lstrip().lower().startswith("# markups fiducial file"):
        return _read_fcsv(path, text)
    system = "LPS"
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            m = re.match(r"\s*#\s*coordinate\s*system\s*[=:]\s*([A-Za-z0-9]+)", line, re.I)
            if m:
                system = _system(m.group(1), f"{path}, line {number}")
        elif line.strip():
            rows.append((number, line))
    if not rows:
        raise InputError(f"landmark file '{path}' contains no points. Add a header label,x,y,z and one row per point.")
    head = rows[0][1]
    delimiter = "\t" if "\t" in head else (";" if ";" in head and "," not in head else ",")
    table = list(csv.reader(io.StringIO("\n".join(ln for _, ln in rows)), delimiter=delimiter))
    header = [_norm(h) for h in table[0]]
    col_system = system
    for names, frame in ((("x", "y", "z"), None), (("r", "a", "s"), "RAS"), (("l", "p", "s"), "LPS")):
        if all(n in header for n in names):
            coords = [header.index(n) for n in names]
            col_system = frame or system
            break
    else:
        raise InputError(f"{path}: the first row must be a header naming the columns x, y, z (and optionally "
                         f"label), e.g. 'label,x,y,z'; found {table[0]!r}.")
    il = next((header.index(n) for n in _LABEL_NAMES if n in header), None)
    isys = next((header.index(n) for n in _SYSTEM_NAMES if n in header), None)
    labels, points, systems = [], [], []
    for (number, _), row in zip(rows[1:], table[1:]):
        where = f"{path}, line {number}"
        if len(row) <= max(coords):
            raise InputError(f"{where}: expected {len(header)} values, found {len(row)}.")
        points.append([_number(row[i], where) for i in coords])
        labels.append(row[il].strip() if il is not None and il < len(row) else str(len(points)))
        sys_value = row[isys] if isys is not None and isys < len(row) and row[isys].strip() else None
        systems.append(_system(sys_value, where) if sys_value is not None else col_system)
    return _finish(path, labels, points, systems)


def _read_markups_json(path: Path, text: str) -> Landmarks:
    try:
        doc = json.loads(text)
        markups = doc["markups"]
        node = markups[0]
        control_points = node.get("controlPoints") or []
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise InputError(f"{path} is not a Slicer markups JSON file (needs markups[0].controlPoints): {exc}") from None
    if len(markups) > 1:
        logger.warning("%s holds %d markups; only the first is used", path.name, len(markups))
    system = _system(node.get("coordinateSystem", "LPS"), str(path))
    units = str(node.get("coordinateUnits", "mm")).strip().lower()
    if units not in ("mm", "um"):
        raise InputError(f"{path}: unsupported coordinateUnits '{units}'. Use mm.")
    scale = 1e-3 if units == "um" else 1.0
    labels, points, skipped = [], [], 0
    for n, cp in enumerate(control_points, 1):
        where = f"{path}, control point {n}"
        if not isinstance(cp, dict):
            raise InputError(f"{where}: expected an object with 'label' and 'position'.")
        if cp.get("positionStatus", "defined") == "undefined":
            skipped += 1
            continue
        pos = cp.get("position")
        if not isinstance(pos, (list, tuple)) or len(pos) != 3:
            raise InputError(f"{where}: 'position' must be a list of 3 numbers, got {pos!r}.")
        points.append([_number(v, where) * scale for v in pos])
        labels.append(str(cp.get("label", n)))
    if skipped:
        logger.warning("%s: skipped %d control points without a position (positionStatus 'undefined')",
                       path.name, skipped)
    return _finish(path, labels, points, [system] * len(points))


def read_landmarks(path) -> Landmarks:
    """Reads a landmark file (``.csv``/``.tsv``/``.txt``, ``.mrk.json``/``.json``, ``.fcsv``).

    Args:
        path: File path.

    Returns:
        :class:`Landmarks` in LPS mm.

    Raises:
        InputError: Missing or unreadable file, unknown extension, no points, bad or non-finite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file '{path}' does not exist. Check the path.")
    name = path.name.lower()
    if name.endswith(".json"):
        reader = _read_markups_json
    elif name.endswith(".fcsv"):
        reader = _read_fcsv
    elif name.endswith((".csv", ".tsv", ".txt")):
        reader = _read_csv
    else:
        raise InputError(f"landmark file '{path}' has an unknown extension. Use .csv (label,x,y,z in LPS mm), "
                         "Slicer .mrk.json or .fcsv.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read landmark file '{path}': {exc}") from None
    return reader(path, text)


# ---------------------------------------------------------------------------------------------- writing
def write_landmarks_csv(landmarks: Landmarks, path) -> None:
    """Writes ``label,x,y,z`` (LPS mm) after a ``# coordinateSystem = LPS`` comment line."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("# coordinateSystem = LPS\n# units = mm (x: right-to-left, y: anterior-to-posterior, "
                "z: inferior-to-superior)\n")
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label", "x", "y", "z"])
        for label, p in zip(landmarks.labels, landmarks.points):
            w.writerow([label] + [repr(float(v)) for v in p])


def write_markups_json(landmarks: Landmarks, path, coordinate_system: str = "LPS") -> None:
    """Writes a Slicer markups Fiducial JSON file (schema v1.0.3).

    Args:
        landmarks: Points in LPS mm.
        path: Output file, conventionally ``*.mrk.json``.
        coordinate_system: Frame written in the file, "LPS" (Slicer's default) or "RAS".
    """
    system = _system(coordinate_system, "write_markups_json")
    pts = lps_to_ras(landmarks.points) if system == "RAS" else landmarks.points * 1.0
    orientation = ([-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0] if system == "LPS"
                   else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    control_points = [{"id": str(n), "label": label, "description": "", "associatedNodeID": "",
                       "position": [float(v) for v in p], "orientation": orientation, "selected": True,
                       "locked": False, "visibility": True, "positionStatus": "defined"}
                      for n, (label, p) in enumerate(zip(landmarks.labels, pts), 1)]
    doc = {"@schema": MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", "locked": False,
                        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                        "lastUsedControlPointNumber": len(control_points), "controlPoints": control_points,
                        "measurements": []}]}
    Path(path).write_text(json.dumps(doc, indent=4), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- pairing
def match_landmarks(a: Landmarks, b: Landmarks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pairs two landmark lists (e.g. fixed and moving).

    Rules: when the labels of each list are unique and non-empty and both lists have the same label set,
    points are paired by label (in ``a``'s order). When the label sets overlap only partially, an
    :class:`InputError` names the unmatched labels. Otherwise (no shared label, e.g. Slicer's default
    "F-1…" vs "M-1…", or repeated/empty labels) lists of equal length are paired by order, with a warning.

    Returns:
        ``(points_a, points_b, labels)``: two ``(N, 3)`` LPS mm arrays and ``a``'s labels of the pairs.

    Raises:
        InputError: Partially overlapping label sets, or different counts that cannot be paired.
    """
    la, lb = list(a.labels), list(b.labels)

    def unique(labels: list[str]) -> bool:
        return len(set(labels)) == len(labels) and all(label.strip() for label in labels)

    if unique(la) and unique(lb):
        sa, sb = set(la), set(lb)
        if sa == sb:
            index = {label: n for n, label in enumerate(lb)}
            order = [index[label] for label in la]
            return a.points.copy(), b.points[order].copy(), la
        if sa & sb:
            only_a, only_b = sorted(sa - sb), sorted(sb - sa)
            raise InputError(f"landmark labels do not match: {len(sa & sb)} shared, only in the first list: "
                             f"{', '.join(only_a) or 'none'}; only in the second list: {', '.join(only_b) or 'none'}. "
                             "Rename or remove those points so both lists have the same labels.")
    if len(la) == len(lb):
        logger.warning("landmark labels cannot be matched by name (no shared labels, or repeated/empty "
                       "labels): pairing the %d points by their order in the files", len(la))
        return a.points.copy(), b.points.copy(), la
    raise InputError(f"the landmark lists cannot be paired: the first has {len(la)} points, the second "
                     f"{len(lb)}, and their labels do not match. Give both lists the same points, with the "
                     "same unique labels or in the same order.")
