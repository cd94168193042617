"""Training field predictors: unsupervised, semi-supervised, supervised and SynthMorph-style synthetic.

Losses, for a predicted displacement ``u`` (mm) and the moving image warped by it:

- ``unsupervised``: similarity (LNCC, MI or MSE) + ``reg_weight`` · diffusion(u);
- ``semi-supervised``: the above + ``dice_weight`` · (1 − soft Dice of the warped one-hot moving labels);
- ``supervised``: ``supervised_weight`` · mean |u − u_true|² / spacing² (voxels²) + ``reg_weight`` · diffusion;
- ``synthetic``: SynthMorph's recipe, soft Dice of labels only + ``reg_weight`` · diffusion (contrast-agnostic);
- ``multi-task``: the semi-supervised loss + ``seg_weight`` · (cross-entropy + soft Dice) of a segmentation
  head that shares the encoder-decoder and labels both images (``num_labels`` classes). With
  ``pseudo_labels_after`` = N > 0, after N steps every unlabeled image (an all-zero label map, as
  :class:`~DeepRegistrationLib.learning.dataset_pairs.DatasetPairs` gives cases without labels) takes the
  segmentation head's own labels (argmax, no gradient) in both the Dice and the segmentation terms:
  self-training on unlabeled cases once the head has learned from the labelled ones.

Mechanics: one seed fixes model initialization and data; :func:`train` writes ``checkpoint.pt``
(model, optimizer, data-generator states, step, history; read back with ``weights_only=True``) every
``checkpoint_every`` steps and resumes from it at the same step with identical state; validation on a fixed
synthetic set every ``val_every`` steps (hard Dice, folding %) keeps the best model; the progress callback
can cancel (a checkpoint is written first); AMP on CUDA; DistributedDataParallel when launched by
``torchrun`` (NCCL on CUDA, gloo on CPU; each rank draws its own data, rank 0 writes files); optional
TensorBoard event files (``train/loss`` per step, ``validation/*`` per validation) in ``output_dir/tensorboard``.
Data come from :class:`~DeepRegistrationLib.learning.synth.SynthPairs`, or with ``dataset`` set from a Learn2Reg-layout
dataset through :class:`~DeepRegistrationLib.learning.dataset_pairs.DatasetPairs` (weighted sampling, random crops;
validation on its ``registration_val`` pairs with labels, else on synthetic pairs); any other source plugs in
through ``data``.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import model_files
from ..core.errors import Cancelled, InputError
from ..evaluation.metrics import mean_dice
from .networks import UNetFieldPredictor, depth_for_shape
from ..core.progress import Progress, ProgressCallback
from ..registration.regularizers import diffusion, jacobian_determinant
from ..registration.similarity import LNCC, MutualInformation
from .synth import SynthBatch, SynthPairs, warp

logger = logging.getLogger(__name__)

TRAINING_MODES = ("unsupervised", "semi-supervised", "supervised", "synthetic", "multi-task")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the model card as the recipe)."""

    mode: str = "synthetic"
    similarity: str = "lncc"
    reg_weight: float = 1.0
    dice_weight: float = 1.0
    supervised_weight: float = 1.0
    seg_weight: float = 1.0
    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-3
    shape: tuple[int, int, int] = (32, 32, 32)
    spacing: float = 2.0
    channels: tuple[int, ...] | None = None  # None: width 8/16 with the depth from the shape
    block: str = "separable"
    output: str = "svf"
    max_displacement_mm: float = 8.0
    num_labels: int = 16
    label_scale: float = 6.0
    field_scale: float = 8.0
    same_contrast: bool = False
    input_features: str = "intensity"  # or "local-contrast" (networks.local_contrast: contrast-invariant inputs)
    seed: int = 0
    val_every: int = 0
    val_pairs: int = 4
    checkpoint_every: int = 0
    output_dir: str | None = None
    model_name: str = "model"
    init_model: str | None = None  # registry name or path: fine-tune from it
    amp: bool = True
    device: str = "auto"
    dataset: str | None = None  # Learn2Reg-layout folder; None = synthetic pairs
    dataset_pairs: str = "training_paired_images"
    tensorboard: bool = False  # TensorBoard event files in output_dir/tensorboard (needs the tensorboard package)
    pseudo_labels_after: int = 0  # multi-task: after this many steps, unlabeled images take the head's labels (0 = off)

    def __post_init__(self) -> None:
        if self.mode not in TRAINING_MODES:
            raise InputError(f"training mode must be one of {', '.join(TRAINING_MODES)}, not {self.mode!r}")
        if self.similarity not in ("lncc", "mi", "mse"):
            raise InputError(f"similarity must be lncc, mi or mse, not {self.similarity!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch size must be at least 1")
        if self.pseudo_labels_after < 0 or (self.pseudo_labels_after and self.mode != "multi-task"):
            raise InputError("pseudo-labels come from the segmentation head of mode multi-task: use --mode multi-task "
                             f"with a step >= 1, or leave pseudo_labels_after at 0 (got {self.pseudo_labels_after} "
                             f"with mode {self.mode})")
        self.shape = tuple(int(s) for s in self.shape)
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)


@dataclass
class TrainResult:
    """What :func:`train` did. Losses are per step (this rank's batch); paths are None when not written."""

    step: int
    losses: list[float]
    validation: list[dict] = field(default_factory=list)
    best_metric: float = float("nan")
    best_step: int = -1
    model_path: Path | None = None
    best_model_path: Path | None = None
    checkpoint_path: Path | None = None
    seconds: float = 0.0
    model: UNetFieldPredictor | None = None


class PairSource(Protocol):
    """Training data: ``sample(batch) -> SynthBatch``, with a savable random state."""

    def sample(self, batch: int) -> SynthBatch: ...
    def state(self) -> torch.Tensor: ...
    def set_state(self, state: torch.Tensor) -> None: ...


# ------------------------------------------------------------------------------------------------ losses
def lncc(fixed: torch.Tensor, warped: torch.Tensor, radius: int = 2, eps: float = 1e-5) -> torch.Tensor:
    """The registration's :class:`~DeepRegistrationLib.registration.similarity.LNCC` with every window counted: ``1 - mean(cc²)``
    over ``(2r+1)³`` windows of batched ``(B, 1, Z, Y, X)`` images (flat windows included, ``eps`` 1e-5), no caching
    (a new batch may reuse the memory of the last one)."""
    return LNCC(radius, eps=eps, flat=-math.inf)(fixed, warped)


def _soft_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice ``(2 Σ p·t + 1e-5) / (Σ p + Σ t + 1e-5)`` of each foreground class present in ``target``, averaged.

    ``pred`` (probabilities) and ``target`` (one-hot) are ``(B, N, Z, Y, X)``; class 0 is background.
    """
    dims = (2, 3, 4)
    dice = (2 * (pred * target).sum(dims) + 1e-5) / (pred.sum(dims) + target.sum(dims) + 1e-5)
    present = (target.sum(dims) > 0).to(target.dtype)[:, 1:]
    return (dice[:, 1:] * present).sum() / present.sum().clamp_min(1.0)


def soft_dice_loss(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, u: torch.Tensor, grid,
                   num_labels: int) -> torch.Tensor:
    """``1 -`` mean soft Dice over foreground labels of the warped one-hot moving labels (differentiable in u)."""
    mov = F.one_hot(moving_labels[:, 0], num_labels).movedim(-1, 1).to(u.dtype)
    fix = F.one_hot(fixed_labels[:, 0], num_labels).movedim(-1, 1).to(u.dtype)
    return 1.0 - _soft_dice(warp(mov, u, grid), fix)


def segmentation_loss(logits: torch.Tensor, fixed_labels: torch.Tensor, moving_labels: torch.Tensor) -> torch.Tensor:
    """Mean over both images of cross-entropy + (1 − soft Dice over foreground classes present).

    ``logits`` ``(B, 2N, Z, Y, X)`` (fixed classes, then moving); labels ``(B, 1, Z, Y, X)`` int64 < N.
    """
    n = logits.shape[1] // 2
    total = logits.new_zeros(())
    for part, labels in ((logits[:, :n], fixed_labels), (logits[:, n:], moving_labels)):
        target = labels[:, 0].clamp(0, n - 1)
        prob = part.float().softmax(1)
        onehot = F.one_hot(target, n).movedim(-1, 1).to(prob.dtype)
        total = total + F.cross_entropy(part.float(), target) + (1.0 - _soft_dice(prob, onehot))
    return total / 2


def with_pseudo_labels(batch: SynthBatch, logits: torch.Tensor) -> SynthBatch:
    """``batch`` with the labels of every unlabeled image (label map all 0) replaced by the segmentation head's
    argmax (no gradient); labelled images keep theirs. ``logits`` ``(B, 2N, Z, Y, X)``: fixed classes, then moving."""
    n = logits.shape[1] // 2
    filled = []
    for labels, part in ((batch.fixed_labels, logits[:, :n]), (batch.moving_labels, logits[:, n:])):
        unlabeled = (labels.flatten(1).amax(1) == 0).view(-1, 1, 1, 1, 1)
        filled.append(torch.where(unlabeled, part.detach().argmax(1, keepdim=True), labels))
    return replace(batch, fixed_labels=filled[0], moving_labels=filled[1])


def training_loss(cfg: TrainConfig, model: torch.nn.Module, batch: SynthBatch,
                  mi: MutualInformation | None = None, pseudo_labels: bool = False) -> torch.Tensor:
    """The loss of ``cfg.mode`` for one batch (see the module docstring); ``pseudo_labels`` (multi-task):
    unlabeled images take the segmentation head's labels (:func:`with_pseudo_labels`)."""
    net = model.module if hasattr(model, "module") else model
    logits = None
    if cfg.mode == "multi-task":  # through DDP's forward so gradients are synchronized
        raw, logits = model(batch.fixed, batch.moving, with_segmentation=True)
        if pseudo_labels:
            batch = with_pseudo_labels(batch, logits)
    else:
        raw = model(batch.fixed, batch.moving)
    u = net.raw_to_mm(raw, batch.grid)
    loss = cfg.reg_weight * diffusion(u, batch.grid)
    if logits is not None:
        loss = loss + cfg.seg_weight * segmentation_loss(logits, batch.fixed_labels, batch.moving_labels)
    if cfg.mode in ("unsupervised", "semi-supervised", "multi-task"):
        warped = warp(batch.moving, u, batch.grid)
        if cfg.similarity == "lncc":
            loss = loss + lncc(batch.fixed, warped)
        elif cfg.similarity == "mi":
            loss = loss + mi(batch.fixed, warped.clamp(0, 1))
        else:
            loss = loss + (warped - batch.fixed).square().mean()
    if cfg.mode in ("semi-supervised", "synthetic", "multi-task"):
        loss = loss + cfg.dice_weight * soft_dice_loss(batch.fixed_labels, batch.moving_labels, u, batch.grid,
                                                       int(max(batch.fixed_labels.max(), batch.moving_labels.max())) + 1)
    if cfg.mode == "supervised":
        loss = loss + cfg.supervised_weight * ((u - batch.field) / cfg.spacing).square().mean()
    return loss


# ------------------------------------------------------------------------------------------------ helpers
def _device(cfg: TrainConfig, rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() else torch.device("cpu")


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; initializes the process group when launched by torchrun."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def synth_pairs(cfg: TrainConfig, seed: int) -> SynthPairs:
    """The synthetic pair source ``cfg`` describes, seeded with ``seed``."""
    return SynthPairs(cfg.shape, cfg.spacing, cfg.num_labels, cfg.max_displacement_mm, cfg.field_scale,
                      cfg.label_scale, same_contrast=cfg.same_contrast, seed=seed)


def dataset_source(cfg: TrainConfig, seed: int):
    """The Learn2Reg dataset source ``cfg`` describes (supervised mode keeps pairs with a known field)."""
    from .dataset_pairs import DatasetPairs

    return DatasetPairs(cfg.dataset, cfg.shape, cfg.spacing, cfg.dataset_pairs,
                        need_field=cfg.mode == "supervised", seed=seed)


def validation_set(cfg: TrainConfig) -> list[SynthBatch]:
    """Fixed validation batches: the dataset's labelled ``registration_val`` pairs, else synthetic pairs."""
    if cfg.dataset:
        from .dataset_pairs import DatasetPairs

        try:
            return DatasetPairs(cfg.dataset, cfg.shape, cfg.spacing, "registration_val", need_labels=True,
                                jitter=0.0).fixed_batches(cfg.val_pairs)
        except InputError as exc:
            logger.warning("validating on synthetic pairs: %s", exc)
    return [synth_pairs(cfg, cfg.seed + 10_000_000 + i).sample(1) for i in range(cfg.val_pairs)]


def build_model(cfg: TrainConfig) -> UNetFieldPredictor:
    """A new network for ``cfg`` (seeded), or the model to fine-tune (``cfg.init_model``)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_model:
        from .registry import load

        return load(cfg.init_model).model.train()
    channels = cfg.channels or (8,) + (16,) * depth_for_shape(cfg.shape)
    max_vox = cfg.max_displacement_mm / cfg.spacing * 2
    seg_classes = cfg.num_labels if cfg.mode == "multi-task" else 0
    return UNetFieldPredictor(channels, max_vox, cfg.block, cfg.output, seg_classes=seg_classes,
                              input_features=cfg.input_features).train()


def validate(model: UNetFieldPredictor, batches: list[SynthBatch]) -> dict:
    """Hard Dice (nearest-neighbour warped labels), identity Dice and folding % on fixed validation pairs;
    for multi-task models also ``seg_dice``, the mean Dice of the segmentation head on both images."""
    dice, dice0, fold, seg = [], [], [], []
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in batches:
            b = _to(b, device)
            u = model.field_mm(b.fixed, b.moving, b.grid)
            w = warp(b.moving_labels, u, b.grid)
            fl, ml = b.fixed_labels[0, 0].cpu().numpy(), b.moving_labels[0, 0].cpu().numpy()
            dice.append(mean_dice(fl, w[0, 0].cpu().numpy()))
            dice0.append(mean_dice(fl, ml))
            fold.append(float((jacobian_determinant(u, b.grid) <= 0).float().mean()) * 100)
            if getattr(model, "seg_classes", 0):
                sf, sm = model.segment(b.fixed, b.moving)
                seg.append((mean_dice(fl, sf[0, 0].cpu().numpy()) + mean_dice(ml, sm[0, 0].cpu().numpy())) / 2)
    model.train(was)
    out = {"dice": float(np.mean(dice)), "dice_identity": float(np.mean(dice0)), "folding_percent": float(np.mean(fold))}
    if seg:
        out["seg_dice"] = float(np.mean(seg))
    return out


def _to(b: SynthBatch, device: torch.device) -> SynthBatch:
    return SynthBatch(*(t.to(device) for t in (b.fixed, b.moving, b.fixed_labels, b.moving_labels, b.field)), b.grid)


def _card(cfg: TrainConfig, result: TrainResult, world: int, device: torch.device, metrics: dict) -> dict:
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"name": cfg.model_name,
            "description": f"{cfg.output} U-Net ({cfg.block} blocks) trained in '{cfg.mode}' mode",
            "preprocessing": {"working_spacing_mm": cfg.spacing},
            "training": {"data": _data_summary(cfg),
                         "recipe": asdict(cfg), "hardware": hardware, "device": device.type, "processes": world,
                         "steps": result.step, "seconds": round(result.seconds, 1),
                         "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None},
            "metrics": metrics}


def _data_summary(cfg: TrainConfig) -> str:
    if cfg.dataset:
        import json

        try:
            meta = json.loads(next(Path(cfg.dataset).glob("*_dataset.json")).read_text())
        except (StopIteration, OSError, ValueError):
            meta = {}
        return (f"Learn2Reg-layout dataset '{meta.get('name', 'unnamed')}': {len(meta.get(cfg.dataset_pairs, []))} "
                f"'{cfg.dataset_pairs}' pairs, crops {list(cfg.shape)} at {cfg.spacing} mm, weighted sampling")
    return (f"synthetic SynthMorph-style pairs ({cfg.num_labels} random labels, shape {list(cfg.shape)}, "
            f"deformations up to {cfg.max_displacement_mm} mm, {'shared' if cfg.same_contrast else 'independent'} "
            "random contrasts)")


def _tensorboard(cfg: TrainConfig, out: Path | None):
    """A TensorBoard ``SummaryWriter`` in ``out/tensorboard`` when asked for, else None."""
    if not cfg.tensorboard:
        return None
    if out is None:
        raise InputError("TensorBoard logs need an output folder (output_dir / --output-dir)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("TensorBoard logs need the package tensorboard: pip install tensorboard "
                         "(or train without --tensorboard)") from None
    return SummaryWriter(str(out / "tensorboard"))


def _save_checkpoint(path: Path, model, opt, scaler, data_states: list[torch.Tensor], result: TrainResult,
                     cfg: TrainConfig) -> None:
    blob = {"step": result.step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "data_states": data_states,
            "losses": list(result.losses), "validation": list(result.validation),
            "best_metric": result.best_metric, "best_step": result.best_step, "seconds": result.seconds,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def _resume(ckpt: Path, net, opt, scaler, data: PairSource, rank: int, world: int, device: torch.device) -> TrainResult:
    """Model, optimizer, scaler and data-generator states from ``ckpt``; the run's state so far."""
    try:
        blob = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise InputError(f"cannot resume from '{ckpt}': it is corrupt or was written by another recipe "
                         f"({str(exc).splitlines()[0][:150]}). Use another output folder or do not resume.") from None
    if scaler is not None and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    states = blob["data_states"]
    if len(states) == world:
        data.set_state(states[rank].cpu())
    else:
        logger.warning("checkpoint written by %d processes, now %d: data streams restart", len(states), world)
    result = TrainResult(int(blob["step"]), list(blob["losses"]), list(blob["validation"]),
                         float(blob["best_metric"]), int(blob["best_step"]), seconds=float(blob["seconds"]))
    logger.info("resumed from %s at step %d", ckpt, result.step)
    return result


def _optimizer_step(loss: torch.Tensor, net, opt, scaler) -> None:
    """Backward pass, gradient clipping at norm 1 and the optimizer step (through the AMP scaler on CUDA)."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()


def _validate_and_keep_best(cfg: TrainConfig, net, val_set: list[SynthBatch], result: TrainResult, board,
                            out: Path | None, start: float, world: int, device: torch.device) -> None:
    """Validation at ``result.step``: recorded in ``result`` and TensorBoard; a better Dice saves ``-best``."""
    metrics = dict(validate(net, val_set), step=result.step)
    result.validation.append(metrics)
    if board is not None:
        for key in ("dice", "dice_identity", "folding_percent", "seg_dice"):
            if key in metrics:
                board.add_scalar(f"validation/{key}", metrics[key], result.step)
    logger.info("step %d validation: %s", result.step, metrics)
    if not metrics["dice"] <= result.best_metric:  # also true when best is NaN
        result.best_metric, result.best_step = metrics["dice"], result.step
        if out is not None:
            result.seconds = time.perf_counter() - start
            result.best_model_path = model_files.save_model(
                net, out / f"{cfg.model_name}-best", _card(cfg, result, world, device, metrics))


def _cancel_requested(prog: Progress, result: TrainResult, cfg: TrainConfig, world: int) -> bool:
    """Reports progress; True when the callback asked to stop (on any rank: all ranks stop together)."""
    import torch.distributed as dist

    stop = torch.zeros(1)
    try:
        prog(result.step / cfg.steps, f"step {result.step}/{cfg.steps}, loss {result.losses[-1]:.4f}")
    except Cancelled:
        stop += 1
    if world > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return stop.item() > 0


def train(cfg: TrainConfig, data: PairSource | None = None, progress: ProgressCallback | None = None,
          resume: bool = True) -> TrainResult:
    """Trains a field predictor; see the module docstring.

    Stages: :func:`_set_up` (processes, device, model; the data and the validation set; optimizer, resume),
    then per step :func:`_train_step` and :func:`_after_step` (validation, checkpoint, cancel), and
    :func:`_finish` (last checkpoint, final and best model).

    Args:
        cfg: The recipe. With ``cfg.output_dir`` set, checkpoints and models (``<model_name>.json`` /
            ``.safetensors``, best as ``<model_name>-best``) are written there.
        data: Pair source; default :class:`SynthPairs` seeded with ``cfg.seed`` + 1000 · rank.
        progress: ``callback(fraction, message)``; returning False cancels (after writing a checkpoint).
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists.

    Raises:
        Cancelled: the callback asked to stop.
    """
    run = _set_up(cfg, data, progress, resume)
    while run.result.step < run.cfg.steps:
        _train_step(run)
        _after_step(run)
    return _finish(run)


@dataclass
class _Run:
    """What the stages of one :func:`train` call share (made by :func:`_set_up`)."""

    cfg: TrainConfig  # the recipe, with the fine-tuned model's input features
    rank: int
    world: int
    device: torch.device
    out: Path | None  # output folder, None: nothing is written
    net: UNetFieldPredictor  # the network (``model`` wraps it in DistributedDataParallel on several processes)
    data: PairSource
    val_set: list[SynthBatch]  # fixed validation batches (rank 0 with ``val_every``), else empty
    model: torch.nn.Module = None
    opt: torch.optim.Optimizer = None
    scaler: object = None  # the AMP GradScaler (CUDA with ``amp``), else None
    use_amp: bool = False
    mi: MutualInformation | None = None
    ckpt: Path | None = None
    result: TrainResult = None
    board: object = None  # TensorBoard SummaryWriter or None
    prog: Progress = None
    start: float = 0.0  # perf_counter at step 0 (earlier when resumed: the seconds already spent)


def _set_up(cfg: TrainConfig, data: PairSource | None, progress: ProgressCallback | None, resume: bool) -> _Run:
    """Set-up: processes, device and model (:func:`_set_up_model`), data and validation set
    (:func:`_set_up_data`), then the output folder, optimizer, AMP scaler, resumed state, TensorBoard and
    progress (:func:`_set_up_optimization`). Nothing is written before the model and the data are known to work."""
    cfg, rank, world, device, net = _set_up_model(cfg)
    data, val_set = _set_up_data(cfg, net, data, rank)
    run = _Run(cfg, rank, world, device, Path(cfg.output_dir) if cfg.output_dir else None, net, data, val_set)
    _set_up_optimization(run, progress, resume)
    return run


def _set_up_model(cfg: TrainConfig) -> tuple[TrainConfig, int, int, torch.device, UNetFieldPredictor]:
    """The processes (torchrun), the device and the network on it: ``(cfg, rank, world, device, net)``; a
    fine-tuned model keeps its input features, and the returned recipe says so."""
    rank, world = _distributed()
    device = _device(cfg, rank)
    net = build_model(cfg).to(device)
    if net.input_features != cfg.input_features:  # fine-tuning keeps the model's inputs; the card says so
        logger.info("fine-tuning %s: the network sees %s", cfg.init_model, net.input_features)
        cfg = replace(cfg, input_features=net.input_features)
    return cfg, rank, world, device, net


def _set_up_data(cfg: TrainConfig, net: UNetFieldPredictor, data: PairSource | None, rank: int
                 ) -> tuple[PairSource, list[SynthBatch]]:
    """The training data (``data``, else the dataset or synthetic pairs of ``cfg`` seeded per rank) and the
    validation set (rank 0 with ``cfg.val_every``); InputError when the labels outnumber the segmentation head."""
    if data is None:
        data = (dataset_source if cfg.dataset else synth_pairs)(cfg, cfg.seed + 1000 * rank)
    if cfg.mode == "multi-task" and getattr(data, "num_labels", 0) > net.seg_classes:
        raise InputError(f"the training data have labels up to {data.num_labels - 1} but the segmentation head has "
                         f"{net.seg_classes} classes: set num_labels (--num-labels) to at least {data.num_labels}")
    val_set = validation_set(cfg) if cfg.val_every > 0 and rank == 0 else []
    return data, val_set


def _set_up_optimization(run: _Run, progress: ProgressCallback | None, resume: bool) -> None:
    """The output folder (rank 0), Adam, the AMP scaler (CUDA), MI, the state resumed from the checkpoint (or
    a new :class:`TrainResult`), TensorBoard, DistributedDataParallel and the progress reporter (rank 0)."""
    cfg, out = run.cfg, run.out
    if out is not None and run.rank == 0:  # only once the model and the data are known to work
        out.mkdir(parents=True, exist_ok=True)
    run.opt = torch.optim.Adam(run.net.parameters(), lr=cfg.lr)
    run.use_amp = cfg.amp and run.device.type == "cuda"
    run.scaler = torch.amp.GradScaler("cuda") if run.use_amp else None
    run.mi = MutualInformation() if cfg.similarity == "mi" else None
    run.ckpt = out / CHECKPOINT if out is not None else None
    if resume and run.ckpt is not None and run.ckpt.is_file():
        run.result = _resume(run.ckpt, run.net, run.opt, run.scaler, run.data, run.rank, run.world, run.device)
    else:
        run.result = TrainResult(step=0, losses=[])
    run.board = _tensorboard(cfg, out) if run.rank == 0 else None
    run.model = torch.nn.parallel.DistributedDataParallel(run.net) if run.world > 1 else run.net
    run.prog = Progress(progress if run.rank == 0 else None)
    run.start = time.perf_counter() - run.result.seconds


def _train_step(run: _Run) -> None:
    """One step: a batch, its loss (autocast on CUDA; pseudo-labels from ``cfg.pseudo_labels_after``), the
    optimizer step; the loss goes into ``run.result.losses`` and TensorBoard."""
    cfg, result = run.cfg, run.result
    batch = _to(run.data.sample(cfg.batch_size), run.device)
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.use_amp):
        loss = training_loss(cfg, run.model, batch, run.mi, pseudo_labels=0 < cfg.pseudo_labels_after <= result.step)
    _optimizer_step(loss, run.net, run.opt, run.scaler)
    result.step += 1
    result.losses.append(float(loss.detach()))
    if run.board is not None:
        run.board.add_scalar("train/loss", result.losses[-1], result.step)


def _after_step(run: _Run) -> None:
    """Validation every ``val_every`` steps (best model kept), a checkpoint every ``checkpoint_every`` steps,
    progress; a cancel writes a checkpoint and raises Cancelled."""
    cfg, result = run.cfg, run.result
    if run.val_set and result.step % cfg.val_every == 0:
        _validate_and_keep_best(cfg, run.net, run.val_set, result, run.board, run.out, run.start, run.world,
                                run.device)
    if cfg.checkpoint_every > 0 and result.step % cfg.checkpoint_every == 0:
        _checkpoint(run)
    if _cancel_requested(run.prog, result, cfg, run.world):
        _checkpoint(run)
        raise Cancelled(f"Training cancelled at step {result.step}; resume from the checkpoint to continue.")


def _checkpoint(run: _Run) -> None:
    """Gathers every rank's data-generator state and writes ``checkpoint.pt`` (rank 0, with an output folder)."""
    import torch.distributed as dist

    states = [run.data.state()]
    if run.world > 1:
        states = [torch.empty_like(states[0]) for _ in range(run.world)]
        dist.all_gather(states, run.data.state())
    run.result.seconds = time.perf_counter() - run.start
    if run.rank == 0 and run.ckpt is not None:
        _save_checkpoint(run.ckpt, run.net, run.opt, run.scaler, states, run.result, run.cfg)


def _finish(run: _Run) -> TrainResult:
    """The end: TensorBoard closed, the last checkpoint, the final model and its card (rank 0), the best
    model's path (when a validation saved one); the network in eval mode on the result."""
    result, out = run.result, run.out
    result.seconds = time.perf_counter() - run.start
    if run.board is not None:
        run.board.close()
    if out is not None:
        _checkpoint(run)
        result.checkpoint_path = run.ckpt
        if run.rank == 0:
            metrics = result.validation[-1] if result.validation else {}
            result.model_path = model_files.save_model(run.net, out / run.cfg.model_name,
                                                       _card(run.cfg, result, run.world, run.device, metrics))
            best = out / f"{run.cfg.model_name}-best.json"
            result.best_model_path = best if result.best_step > 0 and best.is_file() else None
    result.model = run.net.eval()
    return result
