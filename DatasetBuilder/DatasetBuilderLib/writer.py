"""Learn2Reg-layout output: atomic, de-identified file writes, the dataset JSON, manifest and state.

Layout (docs/CONVENTIONS.md §5): ``imagesTr/ labelsTr/ masksTr/ keypointsTr/`` (+ ``Ts``), ``transformsTr/`` (ground
truth ``.h5``, fixed → moving, LPS), ``headersTr/`` (+ ``Ts``: de-identified DICOM header summaries of
DICOM input), ``thumbnails/``, ``<TASK>_dataset.json``, ``manifest.json`` (SHA-256 of every file),
``report.md`` and ``meta/`` (builder state: pseudonymous case registry, splits, label table; one sidecar per
finished case, written last, which is what makes a case count as done on resume).
Names: ``<TASK>_<case:04d>_<modality:04d>.nii.gz``; images of one session (same study) in different modalities
share the case number (``_0000``, ``_0001``, Learn2Reg style). Keypoints: ``<name>.csv`` rows ``i,j,k`` (voxel
indices, Learn2Reg) and ``<name>_lps.csv`` ``id,x,y,z`` (LPS mm) in the same row order, sorted by keypoint ID.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegistrationLib.core.errors import DeepRegistrationError
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk, sha256_file

from .deid import deterministic_gzip, scrub_nifti_bytes
from .hdf5_times import zero_object_header_times

MARKER = "meta/datasetbuilder.json"
STATE = "meta/state.json"


class NotOurDatasetError(DeepRegistrationError, RuntimeError):
    """The output folder is not empty and is not a DatasetBuilder dataset."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file in the same folder, fsyncs and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """JSON as UTF-8 text, non-ASCII characters unescaped (so the PHI scan sees "Müller", not "M\\u00fcller")."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def nifti_bytes(image: Image) -> bytes:
    """De-identified, deterministic ``.nii.gz`` bytes of an engine image (header text fields zeroed)."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.nii"
        sitk.WriteImage(image_to_sitk(image), str(p), False)
        return deterministic_gzip(scrub_nifti_bytes(p.read_bytes()))


def write_image(path: Path, image: Image) -> None:
    atomic_write_bytes(path, nifti_bytes(image))


def write_transform(path: Path, transform: sitk.Transform) -> None:
    """ITK ``.h5`` transform, byte-reproducible (HDF5 header time stamps zeroed), written atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "t.h5"
        sitk.WriteTransform(transform, str(p))
        data, _ = zero_object_header_times(p.read_bytes())
    atomic_write_bytes(path, data)


def keypoint_csvs(points_lps: np.ndarray, ids: list[str], image: Image) -> tuple[bytes, bytes]:
    """(Learn2Reg voxel-index CSV, LPS CSV with IDs) of points, rows sorted by ID."""
    order = sorted(range(len(ids)), key=lambda n: ids[n])
    pts = np.asarray(points_lps, float)[order]
    ijk = (np.c_[pts, np.ones(len(pts))] @ image.grid.world_to_index.T)[:, :3]
    vox = "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in ijk)
    lps = "id,x,y,z\n" + "".join(f"{ids[n]}," + ",".join(f"{v:.6f}" for v in p) + "\n" for n, p in zip(order, pts))
    return vox.encode(), lps.encode()


def case_name(task: str, number: int, modality_index: int) -> str:
    return f"{task}_{number:04d}_{modality_index:04d}"


def prepare_output(out_dir: Path, task: str) -> bool:
    """Checks the folder; True when it already holds this builder's dataset for ``task`` (resume/update).

    Raises:
        NotOurDatasetError: non-empty folder without the builder's marker, or another task's dataset.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("task") != task:
            raise NotOurDatasetError(f"{out_dir} holds the dataset of task {info.get('task')!r}, not {task!r}")
        for tmp in out_dir.rglob(".tmp-*"):  # left by an interrupted write
            tmp.unlink()
        return True
    if any(out_dir.iterdir()):
        raise NotOurDatasetError(f"{out_dir} is not empty and is not a DatasetBuilder dataset: choose an empty "
                                 "or new folder")
    atomic_write_json(marker, {"builder": "DatasetBuilder", "task": task})
    return False


def load_state(out_dir: Path) -> dict:
    p = out_dir / STATE
    return json.loads(p.read_text()) if p.exists() else {"cases": {}, "splits": {}, "labels": {}, "augmented": {}}


def write_manifest(out_dir: Path, builder_version: str, parameters: dict, source_count: int) -> dict:
    """``manifest.json``: SHA-256 of every other file, version, parameters, number of sources."""
    files = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest = {"builder_version": builder_version, "parameters": parameters, "source_count": source_count,
                "files": files}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def dataset_json(task: str, labels: dict, modalities: dict, entries: list[dict], pairs: dict[str, list[dict]],
                 shape: list[int] | None) -> dict:
    """The Learn2Reg ``<TASK>_dataset.json`` content."""
    training = [e for e in entries if e["split"] in ("train", "val")]
    test = [e for e in entries if e["split"] == "test"]
    return {
        "name": task, "description": "Built by DeepRegistration DatasetBuilder (de-identified)",
        "tensorImageSize": "3D", "tensorImageShape": {"0": shape} if shape else {},
        "modality": modalities, "labels": labels,
        "training": training, "test": test, "numTraining": len(training), "numTest": len(test),
        "training_paired_images": pairs["train"], "numPairedTraining": len(pairs["train"]),
        "registration_val": pairs["val"], "numRegistration_val": len(pairs["val"]),
        "registration_test": pairs["test"], "numRegistration_test": len(pairs["test"]),
    }
