"""PyTorch dataset of registration pairs from a Learn2Reg-layout folder (as DatasetBuilder writes it).

Pairs come from ``<TASK>_dataset.json`` (``training_paired_images``, ``registration_val`` or
``registration_test``); each item holds both images as tensors ``(1, Z, Y, X)`` float32, their grids (LPS mm),
label maps ``(Z, Y, X)`` int64 and masks ``(Z, Y, X)`` bool when present, keypoints matched by ID between the
two images (``(N, 3)`` LPS mm, float64; from ``*_lps.csv``), and the path of a ground-truth ITK transform
(fixed → moving, LPS) when the pair has one. Grids are not tensors: batch with :func:`collate_pairs` (lists
for grids and variable-size entries) or use ``batch_size=1``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from ..core.grid import Grid

PAIR_LISTS = ("training_paired_images", "registration_val", "registration_test")


def _read(path: Path) -> tuple[np.ndarray, Grid]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), Grid.from_sitk(img)


def read_keypoints_lps(path: Path) -> dict[str, np.ndarray]:
    """``{id: (3,) LPS mm}`` from a DatasetBuilder ``*_lps.csv`` (``id,x,y,z``)."""
    with open(path, newline="") as f:
        return {row["id"]: np.array([float(row["x"]), float(row["y"]), float(row["z"])])
                for row in csv.DictReader(f)}


class L2RPairDataset(Dataset):
    """Registration pairs of a Learn2Reg-layout dataset.

    Args:
        root: Dataset folder (holds ``<TASK>_dataset.json``).
        pairs: Which pair list: ``training_paired_images`` (default), ``registration_val``,
            ``registration_test``.
        dataset_json: Name of the JSON when the folder holds several (default: the only ``*_dataset.json``).
    """

    def __init__(self, root: str | os.PathLike, pairs: str = "training_paired_images",
                 dataset_json: str | None = None) -> None:
        self.root = Path(root)
        if pairs not in PAIR_LISTS:
            raise ValueError(f"pairs must be one of {', '.join(PAIR_LISTS)}, got {pairs!r}")
        if dataset_json is None:
            found = sorted(self.root.glob("*_dataset.json"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one *_dataset.json in {self.root}, found {len(found)}")
            path = found[0]
        else:
            path = self.root / dataset_json
        self.meta = json.loads(path.read_text())
        self.pairs = list(self.meta.get(pairs, []))
        self.cases = {e["image"]: e for e in self.meta.get("training", []) + self.meta.get("test", [])}
        self.labels = {int(k): v for k, v in self.meta.get("labels", {}).items()}

    def __len__(self) -> int:
        return len(self.pairs)

    def _side(self, image_rel: str, prefix: str) -> dict:
        entry = self.cases.get(image_rel, {"image": image_rel})
        array, grid = _read(self.root / image_rel)
        out = {f"{prefix}": torch.from_numpy(array.astype(np.float32))[None], f"{prefix}_grid": grid,
               f"{prefix}_path": str(self.root / image_rel)}
        if "label" in entry:
            out[f"{prefix}_label"] = torch.from_numpy(_read(self.root / entry["label"])[0].astype(np.int64))
        if "mask" in entry:
            out[f"{prefix}_mask"] = torch.from_numpy(_read(self.root / entry["mask"])[0] != 0)
        if "keypoints_lps" in entry:
            out[f"_{prefix}_kp"] = read_keypoints_lps(self.root / entry["keypoints_lps"])
        return out

    def __getitem__(self, index: int) -> dict:
        """One pair (keys ``fixed``, ``moving``, ``*_grid``, ``*_label``, ``*_mask``, ``*_keypoints``, ...)."""
        pair = self.pairs[index]
        item = self._side(pair["fixed"], "fixed")
        item.update(self._side(pair["moving"], "moving"))
        fkp, mkp = item.pop("_fixed_kp", None), item.pop("_moving_kp", None)
        if fkp and mkp:
            ids = sorted(set(fkp) & set(mkp))
            item["keypoint_ids"] = ids
            item["fixed_keypoints"] = torch.from_numpy(np.array([fkp[i] for i in ids]).reshape(-1, 3))
            item["moving_keypoints"] = torch.from_numpy(np.array([mkp[i] for i in ids]).reshape(-1, 3))
        transform = next((g.get("transform") for g in pair.get("gold_standard", []) if g.get("transform")), None)
        if transform:
            item["transform_path"] = str(self.root / transform)
        item["gold_standard"] = [g["kind"] for g in pair.get("gold_standard", [])]
        return item


def collate_pairs(items: list[dict]) -> dict:
    """Batches pairs: same-shape tensors stacked, everything else (grids, keypoints, paths) as lists."""
    out: dict = {}
    for key in items[0]:
        values = [it.get(key) for it in items]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1 \
                and not key.endswith("keypoints"):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
