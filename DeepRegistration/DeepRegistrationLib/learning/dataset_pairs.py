"""Training pairs from a Learn2Reg-layout dataset (e.g. the DatasetBuilder's output), weighted and cropped.

:class:`DatasetPairs` is a training data source with the interface of :class:`~DeepRegistrationLib.learning.synth.
SynthPairs` (``sample(batch) -> SynthBatch``, ``state()``, ``set_state()``), so :func:`~DeepRegistrationLib.
training.train` trains on real pairs exactly as on synthetic ones:

- **Sampling**: pairs are drawn with probability proportional to their weight — the mean of the two
  cases' ``weight`` in the dataset JSON (the DatasetBuilder writes inverse modality frequencies; 1 when
  absent) — from one seeded ``torch.Generator`` (its state is checkpointed, so a resumed run draws the
  same pairs).
- **Working grid**: both images are resampled (SimpleITK; linear, labels nearest neighbour) onto one
  ``shape`` grid of isotropic ``spacing`` mm with identity direction (LPS axes, so field components
  (x, y, z) are the index axes (i, j, k)), centred on the fixed image's centre plus a random shift of up
  to ``jitter`` of the half-extent left over (training crops; validation uses the centre). The pair
  is used as stored: no affine pre-alignment (DatasetBuilder pairs are in one world frame).
- **Intensities**: each image mapped to [0, 1] by its 0.5 / 99.5 percentiles, as the engine does.
- **Labels** keep the dataset's label IDs (one table for the whole dataset); zeros when a case has none.
- **Known field** (supervised mode): from the pair's ground-truth ``.h5`` (fixed → moving, LPS), as
  ``u(x) = T(x) - x`` in mm on the working grid; zeros for pairs without one (``need_field`` keeps only
  pairs with one). Ground truth is the augmentation's exact field or, for real pairs, the algorithmic
  transform of a classical registration (DatasetBuilder ``--classical``): pseudo ground truth, so unlabeled
  real pairs can train a model in supervised mode (self-training from the instance optimization or ANTs).

Tensors are ``(B, C, Z, Y, X)``; the batch grid has origin 0 (the arrays are already on the working grid,
and the training losses only use spacing and shape).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..core.errors import InputError
from ..core.grid import Grid
from .l2r_dataset import L2RPairDataset
from ..registration.preprocess import normalize_intensity
from .synth import SynthBatch

logger = logging.getLogger(__name__)


class DatasetPairs:
    """Weighted, randomly cropped pairs of a Learn2Reg-layout dataset (see the module doc).

    Args:
        root: Dataset folder (``<TASK>_dataset.json``).
        shape: Working-grid shape ``(Z, Y, X)``.
        spacing: Working voxel size, mm.
        pairs: Pair list (``training_paired_images``, ``registration_val``, ``registration_test``).
        need_field: Keep only pairs with a ground-truth transform (supervised training).
        need_labels: Keep only pairs whose two cases have label maps (validation, label losses).
        jitter: Random crop shift as a fraction of the room left on each side (0 = always the centre).
        seed: Seed of the generator.

    Raises:
        InputError: no dataset there, or no pair left after the filters.
    """

    def __init__(self, root: str | os.PathLike, shape=(32, 32, 32), spacing: float = 2.0,
                 pairs: str = "training_paired_images", need_field: bool = False, need_labels: bool = False,
                 jitter: float = 1.0, seed: int = 0) -> None:
        try:
            self.data = L2RPairDataset(root, pairs)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"cannot read a Learn2Reg dataset at {root}: {exc}") from None
        self.root = Path(root)
        self.shape = tuple(int(s) for s in shape)
        self.spacing = float(spacing)
        self.jitter = float(jitter)
        self.grid = Grid(self.shape, (self.spacing,) * 3, (0.0, 0.0, 0.0))
        keep = []
        for n, pair in enumerate(self.data.pairs):
            gold = [g for g in pair.get("gold_standard", []) if g.get("transform")]
            fixed, moving = (self.data.cases.get(pair[s], {}) for s in ("fixed", "moving"))
            if need_field and not gold:
                continue
            if need_labels and not ("label" in fixed and "label" in moving):
                continue
            keep.append(n)
        if not keep:
            what = " with a ground-truth transform" if need_field else " with labels on both sides" if need_labels else ""
            raise InputError(f"the dataset at {root} has no '{pairs}' pair{what}; "
                             + ("supervised training needs augmented pairs (DatasetBuilder --augment N)"
                                if need_field else "choose another pair list or dataset"))
        self.indices = keep
        weights = []
        for n in keep:
            pair = self.data.pairs[n]
            w = [float(self.data.cases.get(pair[s], {}).get("weight", 1.0)) for s in ("fixed", "moving")]
            weights.append(max(np.mean(w), 0.0))
        self.weights = torch.tensor(weights, dtype=torch.float64)
        if float(self.weights.sum()) <= 0:
            self.weights = torch.ones(len(keep), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._images: dict[str, sitk.Image] = {}
        labels = [int(k) for k in self.data.labels] or [0]
        self.num_labels = max(labels) + 1
        logger.info("dataset %s: %d '%s' pairs", self.root.name, len(keep), pairs)

    def __len__(self) -> int:
        return len(self.indices)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def pick(self, count: int) -> list[int]:
        """``count`` pair numbers (positions in the kept pairs) drawn by weight, with replacement."""
        return [int(i) for i in torch.multinomial(self.weights, count, replacement=True, generator=self.generator)]

    def _read(self, rel: str) -> sitk.Image:
        if rel not in self._images:
            self._images[rel] = sitk.ReadImage(str(self.root / rel))
        return self._images[rel]

    def _working_grid(self, fixed: sitk.Image, random: bool) -> sitk.Image:
        g = Grid.from_sitk(fixed)
        centre = g.center()
        size = Grid(self.shape, (self.spacing,) * 3, (0.0, 0.0, 0.0)).size  # (X, Y, Z)
        half = (np.asarray(size, float) - 1) / 2 * self.spacing  # (x, y, z)
        room = np.maximum(np.ptp(g.corners(), axis=0) / 2 - half, 0)  # LPS bounding box of the field of view
        if random and self.jitter > 0:
            u = torch.rand(3, generator=self.generator, dtype=torch.float64).numpy() * 2 - 1
            centre = centre + u * room * self.jitter
        ref = sitk.Image(list(size), sitk.sitkUInt8)
        Grid(self.shape, (self.spacing,) * 3, np.asarray(centre) - half).apply_to_sitk(ref)  # identity direction
        return ref

    def _resample(self, rel: str | None, ref: sitk.Image, labels: bool = False) -> np.ndarray:
        if rel is None:
            return np.zeros(self.shape, np.int64)
        image = self._read(rel)
        interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        out = sitk.Resample(image if labels else sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), interp, 0)
        return sitk.GetArrayFromImage(out)

    def item(self, k: int, random: bool = True) -> dict:
        """Pair ``k`` (position in the kept pairs) on a working grid: arrays and the known field."""
        pair = self.data.pairs[self.indices[k]]
        fixed_e, moving_e = (self.data.cases.get(pair[s], {"image": pair[s]}) for s in ("fixed", "moving"))
        ref = self._working_grid(self._read(pair["fixed"]), random)
        out = {}
        for side, entry in (("fixed", fixed_e), ("moving", moving_e)):
            array = self._resample(entry["image"], ref)
            inside = array != 0
            out[side] = normalize_intensity(array, inside if inside.any() else None)
            out[f"{side}_labels"] = self._resample(entry.get("label"), ref, labels=True).astype(np.int64)
        gold = next((g for g in pair.get("gold_standard", []) if g.get("transform")), None)
        if gold is not None:
            transform = sitk.ReadTransform(str(self.root / gold["transform"]))
            field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                                      ref.GetSpacing(), ref.GetDirection())
            out["field"] = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0).astype(np.float32)
        else:
            out["field"] = np.zeros((3, *self.shape), np.float32)
        return out

    def _batch(self, items: list[dict]) -> SynthBatch:
        def stack(key, dtype):
            return torch.from_numpy(np.stack([it[key] for it in items])).to(dtype)

        return SynthBatch(stack("fixed", torch.float32)[:, None], stack("moving", torch.float32)[:, None],
                          stack("fixed_labels", torch.int64)[:, None], stack("moving_labels", torch.int64)[:, None],
                          stack("field", torch.float32), self.grid)

    def sample(self, batch: int = 1) -> SynthBatch:
        """``batch`` weighted random pairs, randomly cropped (see the module doc)."""
        return self._batch([self.item(k, random=True) for k in self.pick(batch)])

    def fixed_batches(self, count: int | None = None) -> list[SynthBatch]:
        """The first ``count`` pairs (all by default), centre crops, one per batch (validation)."""
        n = len(self) if count is None else min(count, len(self))
        return [self._batch([self.item(k, random=False)]) for k in range(n)]
