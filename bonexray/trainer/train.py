"""Train BoneXRayNet on MURA-layout studies: epochs, study-level validation, checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bonexray.errors import BonexrayError, InvalidValueError
from bonexray.imaging import RESIZE_RULES
from bonexray.metrics import (
    bootstrap_ci,
    choose_threshold,
    json_safe,
    metrics_by_group,
    study_scores,
)
from bonexray.studies import Study, find_studies, seeded_rank
from bonexray.trainer.data import TrainAugment, ViewDataset, collate_views
from bonexray.trainer.network import ARCHITECTURE, INITS, BoneXRayNet, parse_freeze
from bonexray.trainer.recipes import DEFAULT, RECIPES

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
STEP_LOG_SECONDS = 30.0  # a training step line in the log at most this often
SCRATCH_LR = 5e-4  # OneCycle peak from scratch (README, "The defaults, and why")
FINETUNE_LR = 1e-4  # MURA's Adam rate for ImageNet-initialised weights
VALID_FRACTION = 0.2
# auto: one-cycle from scratch, MURA's divide-by-10-on-plateau with initial weights.
SCHEDULES = ("auto", "onecycle", "plateau", "cosine", "constant")
# body-part: MURA's (each part's own abnormal/normal share); global: one share over all
# training views (keeps the parts' different prevalences as a prior); none: plain BCE.
LOSS_WEIGHTS = ("body-part", "global", "none")
# Which weights a run keeps as best.pt: best-valid (the epoch with the best validation
# AUROC; MURA kept its models by the lowest validation loss), last (the last epoch's), ema
# (an exponential moving average of the weights over training, time constant one epoch),
# average (the mean of the last --average-last epochs' weights).
CHECKPOINT_RULES = ("best-valid", "last", "ema", "average")
# auto: AdamW from scratch, Adam (MURA's) with initial weights.
OPTIMIZERS = ("auto", "adam", "adamw")
# Settings a resumed run must share with the run it continues (epochs may grow).
_RESUME_KEYS = ("data", "image_size", "batch_size", "lr", "weights", "seed", "rotation",
                "flip", "head", "dropout", "batch_norm", "init", "resize", "freeze",
                "schedule", "threshold", "loss_weights", "test", "checkpoint",
                "average_last", "optimizer", "candidates", "zoom", "shift", "gamma")
_RESUME_DEFAULTS = {"loss_weights": "body-part", "test": None, "checkpoint": "best-valid",
                    "average_last": 3, "optimizer": "auto", "candidates": False,
                    "zoom": 0.0, "shift": 0.0, "gamma": 0.0}


class TrainError(BonexrayError, ValueError):
    """Training cannot start with the given data or configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and paths of one training run."""

    data: str
    out: str
    epochs: int = 8
    image_size: int = DEFAULT["image_size"]
    batch_size: int = DEFAULT["batch_size"]
    lr: float | None = DEFAULT["lr"]  # None: 5e-4 peak from scratch, 1e-4 with weights
    weights: str | None = None  # None, "imagenet" or a state dict path
    seed: int = 0
    workers: int = 2
    max_steps: int | None = None  # cap on steps per epoch (tests, smoke runs)
    rotation: float = DEFAULT["rotation"]
    zoom: float = DEFAULT["zoom"]  # random zoom by a factor within [1-zoom, 1+zoom]
    shift: float = DEFAULT["shift"]  # random shift by up to this share of the side
    gamma: float = DEFAULT["gamma"]  # random gamma within [exp(-gamma), exp(gamma)]
    device: str = "auto"
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    batch_norm: bool = False
    init: str = "default"
    resize: str = DEFAULT["resize"]
    freeze: str = "none"  # none, backbone, all-but-K (dense blocks that train)
    threshold: str = DEFAULT["threshold"]  # a number, youden, sensitivity=X (on validation)
    schedule: str = DEFAULT["schedule"]
    flip: bool = DEFAULT["flip"]
    loss_weights: str = DEFAULT["loss_weights"]
    test: str | None = None  # a folder of test studies; None: the layout's test/ split
    snapshots: int = 0  # keep the last K epochs' weights as OUT/epoch<N>.pt
    checkpoint: str = DEFAULT["checkpoint"]  # which weights become best.pt (CHECKPOINT_RULES)
    average_last: int = DEFAULT["average_last"]  # epochs averaged by checkpoint="average"
    candidates: bool = False  # also write every rule's weights to OUT/candidates/
    optimizer: str = DEFAULT["optimizer"]
    recipe: str = "custom"  # the name of the recipe the settings came from (a record)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainError(f"epochs must be >= 1, got {self.epochs}")
        if not 16 <= self.image_size <= 4096:
            raise TrainError(f"image_size {self.image_size} outside 16..4096")
        if self.batch_size < 1:
            raise TrainError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.snapshots <= self.epochs:
            raise TrainError(f"snapshots must be within 0..epochs ({self.epochs}), got "
                             f"{self.snapshots}")
        if self.checkpoint not in CHECKPOINT_RULES:
            raise TrainError(f"unknown checkpoint rule {self.checkpoint!r}; choose one of "
                             f"{', '.join(CHECKPOINT_RULES)}")
        if self.average_last < 1:
            raise TrainError(f"average_last must be >= 1, got {self.average_last}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.rotation < 0:
            raise TrainError(f"rotation must be >= 0 degrees, got {self.rotation}")
        if not 0.0 <= self.zoom < 1.0:
            raise TrainError(f"zoom must be within [0, 1), got {self.zoom}")
        if not 0.0 <= self.shift <= 0.5:
            raise TrainError(f"shift must be within [0, 0.5] of the side, got {self.shift}")
        if not 0.0 <= self.gamma <= 2.0:
            raise TrainError(f"gamma must be within [0, 2], got {self.gamma}")
        if self.init not in INITS:
            raise TrainError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.resize not in RESIZE_RULES:
            raise TrainError(
                f"unknown resize {self.resize!r}; choose one of {', '.join(RESIZE_RULES)}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise TrainError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        if self.schedule not in SCHEDULES:
            raise TrainError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.loss_weights not in LOSS_WEIGHTS:
            raise TrainError(f"unknown loss weights {self.loss_weights!r}; choose one of "
                             f"{', '.join(LOSS_WEIGHTS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"dropout {self.dropout} outside [0, 1)")
        if any(w < 1 for w in self.head):
            raise TrainError(f"head layer widths must be >= 1, got {list(self.head)}")
        if self.batch_norm and not self.head:
            raise TrainError("--batch-norm normalises the head's hidden layers: it needs "
                             "--head (e.g. --head 512,256); without one it would do nothing")
        if self.dropout > 0 and not self.head:
            log.warning("--dropout %g without --head: one dropout layer before the logit "
                        "(the follow-up paper's variants put it after hidden layers: "
                        "--head)", self.dropout)
        try:
            parse_freeze(self.freeze)
            choose_threshold([0, 1], [0.2, 0.8], self.threshold)  # the rule's form only
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        if self.freeze != "none" and self.weights is None:
            log.warning("freezing %s of a network that starts from random weights",
                        self.freeze)


def recipe_config(recipe: str, **given: Any) -> TrainConfig:
    """A TrainConfig from a named recipe, with the settings in `given` (not None) on top."""
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    chosen = {**RECIPES[recipe], **{k: v for k, v in given.items() if v is not None}}
    if recipe == "mura" and chosen.get("weights") is None:
        log.warning("recipe mura: MURA fine-tuned ImageNet weights; this run starts from "
                    "random weights (pass --weights imagenet or a state dict file)")
    return TrainConfig(**chosen, recipe=recipe)


class WeightEMA:
    """An exponential moving average of a model's parameters and buffers (BatchNorm's
    running statistics included, as timm's ModelEmaV2 does), updated after every step.

    decay: per step; the trainer uses 1 - 1/steps_per_epoch (a time constant of one epoch),
    warmed up as (1 + t) / (10 + t) so that a short run is not dominated by its start.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.live = list(model.state_dict().values())  # shares storage with the model
        self.names = list(model.state_dict().keys())
        self.shadow = [v.detach().clone() for v in self.live]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats = [(e, v) for e, v in zip(self.shadow, self.live, strict=True)
                  if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1.0 - decay)
        for e, v in zip(self.shadow, self.live, strict=True):
            if not e.is_floating_point():
                e.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in zip(self.names, self.shadow,
                                                               strict=True)}

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name, tensor in zip(self.names, self.shadow, strict=True):
            tensor.copy_(state[name])
        self.updates = updates


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of several state dicts (floating tensors; others from the last one)."""
    out: dict[str, torch.Tensor] = {}
    for name, last in states[-1].items():
        if last.is_floating_point():
            out[name] = torch.stack([s[name].float() for s in states]).mean(0).to(last.dtype)
        else:
            out[name] = last.clone()
    return out


class Progress(Protocol):
    """What the trainer tells a progress display (the CLI's rich bar; nothing in tests)."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def advance(self, loss: float, views_per_s: float) -> None: ...

    def end_epoch(self, entry: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


@dataclass
class Split:
    """The studies each side of a run sees, and how they were chosen."""

    train: list[Study]
    valid: list[Study]
    test: list[Study]
    method: str  # "layout" (train/ valid/ folders) or "patients held out"
    shared_patients: int = 0  # patients with studies on two sides (0 when split by patient)

    def record(self, root: Path, seed: int) -> dict[str, Any]:
        """What the checkpoint keeps: the rule, counts, and the validation and test study
        folders (relative to the data folder where they lie under it)."""
        def rel(s: Study) -> str:
            path = Path(s.key)
            return path.relative_to(root).as_posix() if path.is_relative_to(root) else s.key

        return {"method": self.method, "seed": seed, "data": str(root),
                "train_studies": len(self.train), "train_patients": _patients(self.train),
                "valid": [rel(s) for s in self.valid], "test": [rel(s) for s in self.test],
                "shared_patients": self.shared_patients}


def _patient_key(s: Study) -> str:
    """A study's patient: the layout's patient folder, else the study itself."""
    return s.patient if s.patient is not None else s.key


def _patients(studies: Sequence[Study]) -> int:
    return len({_patient_key(s) for s in studies})


def split_studies(studies: Sequence[Study], seed: int,
                  test: Sequence[Study] = ()) -> Split:
    """Train, validation and test studies.

    validation: the layout's valid/ split, else 20% of patients (whole patients held out,
    seeded). test: `test` when given (e.g. from --test DIR), else the layout's test/ split;
    it is never trained or validated on. A patient on two sides of a layout's own split is
    warned about (MURA splits by patient: a leak would inflate every figure).
    """
    labelled = [s for s in studies if s.label is not None and s.views]
    skipped = len(studies) - len(labelled)
    if skipped:
        log.warning("skipping %d studies without a label or without views", skipped)
    held_test = list(test) if test else [s for s in labelled if s.split == "test"]
    valid = [s for s in labelled if s.split == "valid"]
    train = [s for s in labelled if s.split in ("train", None)]
    overlap = {s.key for s in held_test} & {s.key for s in train + valid}
    if overlap:
        raise TrainError(f"{len(overlap)} test studies are also train or validation studies "
                         f"(e.g. {sorted(overlap)[0]})")
    method = "layout"
    if not valid:
        # No valid split on disk: hold out whole patients, so no patient is on both sides.
        patients = sorted({_patient_key(s) for s in train},
                          key=lambda p: seeded_rank(seed, p))
        n_valid = max(1, round(VALID_FRACTION * len(patients))) if len(patients) > 1 else 0
        held = set(patients[:n_valid])
        log.info("no valid split under the data; holding out %d of %d patients", n_valid,
                 len(patients))
        valid = [s for s in train if _patient_key(s) in held]
        train = [s for s in train if _patient_key(s) not in held]
        method = "patients held out"
    sides = [{s.patient for s in side if s.patient is not None}
             for side in (train, valid, held_test)]
    shared = (sides[0] & sides[1]) | (sides[0] & sides[2]) | (sides[1] & sides[2])
    if shared:
        log.warning("%d patients have studies on two sides of the split (e.g. patient%s): "
                    "figures may be optimistic; split by patient", len(shared),
                    sorted(shared)[0])
    return Split(train, valid, held_test, method, len(shared))


def class_weights(dataset: ViewDataset, how: str = "body-part") -> torch.Tensor:
    """Per-study [w_neg, w_pos] for the loss.

    body-part (MURA): w1 = |N|/(|A|+|N|), w0 = |A|/(|A|+|N|) over the training views of the
    study's body part (the overall counts where a part lacks a class); global: the same
    share over all training views; none: 1 and 1.
    """
    if how not in LOSS_WEIGHTS:
        raise InvalidValueError(f"unknown loss weights {how!r}; choose one of "
                                f"{', '.join(LOSS_WEIGHTS)}")
    counts: dict[str, list[int]] = {}
    total = [0, 0]
    for (_, index), label in zip(dataset.items, dataset.labels(), strict=True):
        part = dataset.studies[index].body_part or "unknown"
        counts.setdefault(part, [0, 0])[label] += 1
        total[label] += 1

    def pair(neg: int, pos: int) -> tuple[float, float]:
        return (pos / (pos + neg), neg / (pos + neg))

    overall = pair(*total) if min(total) > 0 else (1.0, 1.0)
    if how == "none":
        overall = (1.0, 1.0)
    if how != "body-part":
        log.info("class weights (w_neg, w_pos): %s for every body part (%s)",
                 tuple(round(w, 3) for w in overall), how)
        return torch.tensor([overall] * len(dataset.studies), dtype=torch.float32)
    by_part = {p: pair(*c) if min(c) > 0 else overall for p, c in counts.items()}
    log.info("class weights (w_neg, w_pos) by body part: %s",
             {p: tuple(round(w, 3) for w in v) for p, v in sorted(by_part.items())})
    return torch.tensor([by_part.get(s.body_part or "unknown", overall)
                         for s in dataset.studies], dtype=torch.float32)


def _loader(dataset: ViewDataset, config: TrainConfig, *, shuffle: bool, batch_size: int,
            generator: torch.Generator | None = None) -> DataLoader[Any]:
    # Training workers are not persistent: each epoch's workers must see dataset.epoch.
    # A shuffled (training) loader drops its last partial batch when there is more than one
    # batch: a last batch of one view breaks BatchNorm1d in a head (and is a noisy step).
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(dataset) > batch_size,
                      num_workers=config.workers, collate_fn=collate_views,
                      generator=generator, persistent_workers=config.workers > 0 and not shuffle,
                      pin_memory=torch.cuda.is_available())


def _autocast(device: torch.device) -> Any:
    # bf16 on CUDA needs no loss scaler; on CPU autocast would only slow DenseNet down.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last everywhere: on CUDA for the tensor cores, and on this CPU too, where
    DenseNet-169 trains 1.18-1.24x faster in it (benchmarks/train_speed.py)."""
    del device
    return torch.channels_last


def train_one_epoch(model: nn.Module, loader: DataLoader[Any], weights: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                    *, max_steps: int | None, epoch: int, step_scheduler: bool,
                    progress: Progress | None = None, ema: WeightEMA | None = None) -> float:
    """One pass over the training views; the mean weighted loss."""
    model.train()
    total, seen, started = 0.0, 0, time.monotonic()
    last_log = started
    total_steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    weights = weights.to(device)
    memory = _memory_format(device)
    for step, (pixels, labels, study_idx) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if pixels.shape[0] > 0:
            pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=memory)
            labels = labels.to(device, non_blocking=True)
            # Each view's BCE weighted by its class share (MURA: within its body part).
            w = weights[study_idx.to(device)].gather(1, labels.long().unsqueeze(1)).squeeze(1)
            with _autocast(device):
                logits = model(pixels)
            loss_each = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), labels, reduction="none")
            loss = (loss_each * w).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update()
            total += float(loss.detach()) * pixels.shape[0]
            seen += pixels.shape[0]
        if step_scheduler:
            scheduler.step()  # every step, even an empty one, so one-cycle ends on time
        rate = seen / max(time.monotonic() - started, 1e-9)
        if progress is not None:
            progress.advance(total / seen if seen else float("nan"), rate)
        if time.monotonic() - last_log >= STEP_LOG_SECONDS:  # by time: a log stays alive
            last_log = time.monotonic()
            log.info("epoch %d step %d/%d loss %.4f (%.1f views/s)", epoch + 1, step + 1,
                     total_steps, total / seen if seen else float("nan"), rate)
    return total / seen if seen else float("nan")


@torch.no_grad()
def predict_studies(model: nn.Module, loader: DataLoader[Any], dataset: ViewDataset,
                    device: torch.device) -> dict[str, Any]:
    """Study scores (mean of view probabilities) with labels and body parts, and view loss."""
    model.eval()
    memory = _memory_format(device)
    probs: list[float] = []
    owners: list[int] = []
    loss_sum, n = 0.0, 0
    for pixels, labels, study_idx in loader:
        if pixels.shape[0] == 0:
            continue
        pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=memory)
        with _autocast(device):
            logits = model(pixels).float()
        loss_sum += float(nn.functional.binary_cross_entropy_with_logits(
            logits, labels.to(device), reduction="sum"))
        n += pixels.shape[0]
        probs.extend(torch.sigmoid(logits).cpu().tolist())
        owners.extend(study_idx.tolist())
    scores = study_scores(owners, probs, how="mean")
    missing = len(dataset.studies) - len(scores)
    if missing:
        log.warning("%d studies have no decodable view; left out", missing)
    ids = sorted(scores)  # type: ignore[type-var]
    studies = [dataset.studies[int(i)] for i in ids]  # type: ignore[call-overload]
    return {"labels": [int(s.label or 0) for s in studies], "scores": [scores[i] for i in ids],
            "studies": [s.key for s in studies],
            "parts": [s.body_part or "unknown" for s in studies],
            "loss": loss_sum / n if n else float("nan"), "views": n}


def evaluate(model: nn.Module, loader: DataLoader[Any], dataset: ViewDataset,
             device: torch.device, *, threshold: float | str = 0.5) -> dict[str, Any]:
    """Study-level metrics (mean of view probabilities), overall and by body part.

    `threshold` is a number or a rule (see metrics.choose_threshold) applied to these very
    scores; the threshold used is in the result.
    """
    pred = predict_studies(model, loader, dataset, device)
    if not pred["labels"]:
        raise TrainError("no validation study has a decodable view")
    try:
        value = choose_threshold(pred["labels"], pred["scores"], str(threshold))
    except ValueError as exc:  # a rule that needs both classes, on one-class data
        log.warning("threshold rule %r not applicable (%s); using 0.5", threshold, exc)
        value = 0.5
    grouped = metrics_by_group(pred["labels"], pred["scores"], pred["parts"], value)
    return {**grouped["overall"], "loss": pred["loss"], "views": pred["views"],
            "threshold": value, "by_body_part": grouped["by_group"]}


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "auroc", "kappa", "accuracy", "f1",
                   "sensitivity", "specificity", "threshold", "lr", "seconds")


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """history.json (everything), history.csv (one flat row per epoch) and curves.png."""
    (out / "history.json").write_text(json.dumps(history, indent=2, allow_nan=False))
    with (out / "history.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HISTORY_COLUMNS)
        for h in history:
            v = h["valid"]
            writer.writerow([h["epoch"], h["train_loss"], v.get("loss"), v.get("auroc"),
                             v.get("kappa"), v.get("accuracy"), v.get("f1"),
                             v.get("sensitivity"), v.get("specificity"), v.get("threshold"),
                             h["lr"], h["seconds"]])
    plot_curves(history, out / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Learning curves (losses; validation AUROC, kappa, accuracy) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no %s (pip install 'bonexray[train]')",
                    path.name)
        return

    def series(key: str, valid: bool = True) -> list[float]:
        return [float("nan") if (x := (h["valid"] if valid else h).get(key)) is None else x
                for h in history]

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(epochs, series("train_loss", valid=False), "o-", label="train (weighted)")
    left.plot(epochs, series("loss"), "o-", label="valid")
    left.set(xlabel="epoch", ylabel="BCE loss", title="loss")
    left.legend()
    for key in ("auroc", "kappa", "accuracy"):
        right.plot(epochs, series(key), "o-", label=key)
    right.set(xlabel="epoch", ylim=(min(0.0, *[x for x in series("kappa") if x == x]), 1.0),
              title="validation (study level)")
    right.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _optimizer_and_schedule(config: TrainConfig, model: nn.Module,
                            steps: int) -> tuple[torch.optim.Optimizer, Any, bool, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = config.schedule
    if schedule == "auto":
        schedule = "onecycle" if config.weights is None else "plateau"
    lr = config.lr or (SCRATCH_LR if config.weights is None else FINETUNE_LR)
    kind = config.optimizer
    if kind == "auto":
        kind = "adamw" if config.weights is None else "adam"
    if kind == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr)
    else:  # MURA: Adam with its default betas
        optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    total = max(1, steps * config.epochs)
    scheduler: Any
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
        return optimizer, scheduler, True, lr
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return optimizer, scheduler, True, lr
    if schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        return optimizer, scheduler, True, lr
    # MURA: divide by 10 each time the validation loss has not improved for an epoch
    # (patience 0: the first epoch without improvement already divides).
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=0)
    return optimizer, scheduler, False, lr


def config_as_plain_data(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (torch.load's weights_only accepts it)."""
    data = dataclasses.asdict(config)
    data["head"] = list(config.head)
    return data


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    now = config_as_plain_data(config)
    # Settings added after a checkpoint was written: it was trained with their default.
    saved = {**_RESUME_DEFAULTS, **saved}
    differ = [k for k in _RESUME_KEYS if saved.get(k, now[k]) != now[k]]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
        raise TrainError(f"cannot resume {path}: the run was trained with other settings "
                         f"({pairs})")
    schedule = config.schedule if config.schedule != "auto" else (
        "onecycle" if config.weights is None else "plateau")
    if schedule in ("onecycle", "cosine") and saved.get("epochs") != config.epochs:
        raise TrainError(f"cannot resume {path} with --epochs {config.epochs}: its {schedule} "
                         f"schedule was laid out for {saved.get('epochs')} epochs")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def train(config: TrainConfig, *, resume: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:
    """Train, validate every epoch, write last.pt / best.pt / history.* under config.out.

    resume: continue from OUT/last.pt (same settings; --epochs may grow unless the
    schedule is laid out per step), with its weights, optimizer, schedule and history.
    """
    data = Path(config.data).expanduser().resolve()
    config = dataclasses.replace(config, data=str(data))
    out = Path(config.out).expanduser().resolve()
    config = dataclasses.replace(config, out=str(out))
    if config.test is not None:  # resolved before a resume compares it with the saved one
        config = dataclasses.replace(config, test=str(Path(config.test).expanduser().resolve()))
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = pick_device(config.device)
    state: dict[str, Any] | None = None
    if resume:
        last = out / "last.pt"
        if not last.is_file():
            raise TrainError(f"cannot resume: {last} not found")
        state = torch.load(last, map_location="cpu", weights_only=True)
        _check_resumable(state.get("config") or {}, config, last)

    test_given: list[Study] = []
    if config.test is not None:
        test_root = Path(config.test)
        test_given = [s for s in find_studies(test_root) if s.label is not None and s.views]
        if not test_given:
            raise TrainError(f"--test {test_root}: no labelled study with views")
    found = find_studies(data)
    if test_given:
        layout_test = sum(1 for s in found if s.split == "test")
        if layout_test:
            log.warning("--test %s replaces the %d studies of %s/test, which are left out of "
                        "every side", config.test, layout_test, data)
    split = split_studies(found, config.seed, test_given)
    train_studies, valid_studies = split.train, split.valid
    if not train_studies or not valid_studies:
        raise TrainError(
            f"{data}: need labelled studies for training and validation, found "
            f"{len(train_studies)} and {len(valid_studies)}"
        )
    augment = TrainAugment(config.rotation, flip=config.flip, zoom=config.zoom,
                           shift=config.shift, gamma=config.gamma)
    train_set = ViewDataset(train_studies, image_size=config.image_size, resize=config.resize,
                            augment=augment, seed=config.seed)
    valid_set = ViewDataset(valid_studies, image_size=config.image_size, resize=config.resize)
    if len(train_set) == 0 or len(valid_set) == 0:
        raise TrainError(f"{data}: no readable views ({len(train_set)} train, "
                         f"{len(valid_set)} valid)")
    log.info("training on %d views of %d studies, validating on %d views of %d studies "
             "(%s), %d test studies kept for the end, %s", len(train_set), len(train_studies),
             len(valid_set), len(valid_studies), split.method, len(split.test), device)
    split_record = split.record(data, config.seed)
    weights = class_weights(train_set, config.loss_weights)
    shuffle_rng = torch.Generator()
    train_loader = _loader(train_set, config, shuffle=True, batch_size=config.batch_size,
                           generator=shuffle_rng)
    valid_loader = _loader(valid_set, config, shuffle=False, batch_size=config.batch_size * 2)

    model = BoneXRayNet(weights=None if state else config.weights, head=config.head,
                        dropout=config.dropout, batch_norm=config.batch_norm, init=config.init,
                        freeze=config.freeze).to(device)
    model = model.to(memory_format=_memory_format(device))
    steps = len(train_loader) if config.max_steps is None else min(len(train_loader),
                                                                   config.max_steps)
    optimizer, scheduler, per_step, lr = _optimizer_and_schedule(config, model, steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%d of %d parameters train (freeze %s); %s, lr %g, %s schedule",
             trainable, sum(p.numel() for p in model.parameters()), config.freeze,
             type(optimizer).__name__, lr, type(scheduler).__name__)

    config_dict = config_as_plain_data(config)
    history: list[dict[str, Any]] = []
    best_key, best_epoch, best_metrics = -math.inf, -1, {}
    first = 0
    rules = CHECKPOINT_RULES if config.candidates else (config.checkpoint,)
    snapshots = max(config.snapshots, config.average_last if "average" in rules else 0)
    if state is None:
        # A fresh run in OUT: what an earlier run kept there is not this run's.
        for stale in [out / "best.pt", *sorted((out / "candidates").glob("*.pt"))]:
            if stale.is_file():
                log.info("a new run in %s: removing the earlier run's %s", out, stale.name)
                stale.unlink()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state.get("history") or [])
        best_epoch = int(state.get("best_epoch", -1))
        best_key = state.get("best_auroc") if state.get("best_auroc") is not None else -math.inf
        best_metrics = dict(state.get("best_metrics") or {})
        first = int(state["epoch"])
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d of %d", out / "last.pt", first, config.epochs)
        if first >= config.epochs:
            log.info("nothing to do: %d epochs already trained", first)
    ema = WeightEMA(model, decay=1.0 - 1.0 / max(steps, 1)) if "ema" in rules else None
    if ema is not None and state is not None:
        if "ema" in state:
            ema.load(state["ema"], int(state.get("ema_updates", 0)))
        else:
            log.warning("%s holds no weight average: the EMA starts from epoch %d's weights",
                        out / "last.pt", first)
    if config.candidates:
        (out / "candidates").mkdir(exist_ok=True)
    # The best epoch by validation AUROC is written as it happens: as best.pt when that is
    # the rule, else (with --candidates) as candidates/best-valid.pt.
    best_valid_path: Path | None = None
    if config.checkpoint == "best-valid":
        best_valid_path = out / "best.pt"
    elif config.candidates:
        best_valid_path = out / "candidates" / "best-valid.pt"

    payload: dict[str, Any] = {}
    for epoch in range(first, config.epochs):
        started = time.monotonic()
        train_set.epoch = epoch
        shuffle_rng.manual_seed(_epoch_seed(config.seed, epoch))
        if progress is not None:
            progress.start_epoch(epoch + 1, config.epochs, steps)
        train_loss = train_one_epoch(model, train_loader, weights, optimizer, scheduler,
                                     device, max_steps=config.max_steps, epoch=epoch,
                                     step_scheduler=per_step, progress=progress, ema=ema)
        metrics = evaluate(model, valid_loader, valid_set, device, threshold=config.threshold)
        if not per_step:
            scheduler.step(metrics["loss"])
        seconds = time.monotonic() - started
        entry = json_safe({"epoch": epoch + 1, "train_loss": train_loss,
                           "seconds": round(seconds, 2),
                           "lr": optimizer.param_groups[0]["lr"], "valid": metrics})
        history.append(entry)
        if progress is not None:
            progress.end_epoch(entry)
        log.info("epoch %d/%d: train loss %.4f, valid loss %.4f, AUROC %.4f, kappa %.4f, "
                 "accuracy %.4f at threshold %.3g (%.0f s)", epoch + 1, config.epochs,
                 train_loss, metrics["loss"], metrics["auroc"], metrics["kappa"],
                 metrics["accuracy"], metrics["threshold"], seconds)
        auroc = metrics["auroc"]
        key = auroc if not math.isnan(auroc) else -math.inf
        is_best = best_epoch < 0 or key > best_key
        if is_best:
            best_key, best_epoch, best_metrics = key, epoch + 1, json_safe(metrics)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "epoch": epoch + 1,
            "config": config_dict,
            "architecture": ARCHITECTURE,
            "image_size": config.image_size,
            "resize": config.resize,
            "threshold": float(metrics["threshold"]),
            "threshold_rule": config.threshold,
            "metrics": json_safe(metrics),
            "head": dict(model.head_config),
            "history": history,
            "best_epoch": best_epoch,
            "best_auroc": None if best_key == -math.inf else best_key,
            "best_metrics": best_metrics,
            "split": split_record,
        }
        resumable = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state()}
        if ema is not None:
            resumable.update(ema=ema.state_dict(), ema_updates=ema.updates)
        _save(out / "last.pt", {**payload, **resumable})
        if epoch + 1 > config.epochs - snapshots:
            # A snapshot of the last epochs: export several of them as one ensemble, or
            # average their weights (--checkpoint average).
            _save(out / f"epoch{epoch + 1}.pt", payload)
        if is_best and best_valid_path is not None:
            _save(best_valid_path, {**payload, "kept": {"rule": "best-valid",
                                                        "epochs": [epoch + 1]}})
            log.info("epoch %d is the best so far (valid AUROC %.4f)", epoch + 1, auroc)
        write_history(out, history)

    def validate(m: nn.Module) -> dict[str, Any]:
        return evaluate(m, valid_loader, valid_set, device, threshold=config.threshold)

    kept: dict[str, Any] = {}
    done = torch.load(out / "best.pt", map_location="cpu", weights_only=True) \
        if (out / "best.pt").is_file() else None
    finished = first >= config.epochs and done is not None and \
        (done.get("kept") or {}).get("rule", "best-valid") == config.checkpoint
    if first < config.epochs or not finished:
        if state is not None and first >= config.epochs:
            # The last epoch was saved but the run stopped before it kept its weights.
            log.info("the run stopped before keeping its weights: keeping them now")
            payload = {k: v for k, v in state.items()
                       if k not in ("optimizer", "scheduler", "rng", "ema", "ema_updates")}
        if payload:
            kept = _keep_weights(model, payload, rules, config, out, ema, validate)
    elif done is not None:
        kept = {"rule": (done.get("kept") or {}).get("rule", "best-valid"),
                "epochs": (done.get("kept") or {}).get("epochs", [done.get("epoch")]),
                "metrics": done.get("metrics") or {}}
    test_metrics = None
    if split.test and (out / "best.pt").is_file() and kept.get("candidates") is not None:
        test_metrics = score_test(out / "best.pt", model, split.test, config, device)
    elif split.test and state is not None:
        log.info("nothing trained in this run: the test split is not scored again")
    kept_metrics = kept.get("metrics") or {}
    return json_safe({
        "test_metrics": test_metrics,
        "split": {k: v if not isinstance(v, list) else len(v) for k, v in split_record.items()},
        # What best.pt holds: the rule, the epochs its weights come from, its validation
        # figures and threshold; every rule's validation AUROC with --candidates.
        "kept": kept.get("rule", config.checkpoint),
        "kept_epochs": kept.get("epochs"),
        "kept_metrics": kept_metrics,
        "threshold": kept_metrics.get("threshold"),
        "candidates": kept.get("candidates"),
        # The best epoch by validation AUROC (the history's record, whatever was kept).
        "best_epoch": best_epoch,
        "best_auroc": best_metrics.get("auroc"),
        "best_metrics": best_metrics,
        "epochs": config.epochs,
        "device": str(device),
        "train_views": len(train_set),
        "valid_views": len(valid_set),
        "best": str(out / "best.pt"),
        "last": str(out / "last.pt"),
        "history": str(out / "history.json"),
        "curves": str(out / "curves.png"),
    })


def _keep_weights(model: nn.Module, payload: dict[str, Any], rules: Sequence[str],
                  config: TrainConfig, out: Path, ema: WeightEMA | None,
                  validate: Any) -> dict[str, Any]:
    """After the last epoch: the weights of each rule, validated (their own threshold);
    the configured rule's become best.pt, and with --candidates every rule's is written to
    OUT/candidates/<rule>.pt. Returns what was kept and every candidate's valid AUROC."""
    last_epoch = int(payload["epoch"])
    final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    candidates: dict[str, float | None] = {}
    kept: dict[str, Any] = {}
    for rule in rules:
        if rule == "best-valid":
            path = out / "best.pt" if config.checkpoint == rule else \
                out / "candidates" / "best-valid.pt"
            done = torch.load(path, map_location="cpu", weights_only=True)
            metrics = done.get("metrics") or {}
            epochs = (done.get("kept") or {}).get("epochs", [done.get("epoch")])
            if config.candidates and config.checkpoint == rule:
                _save(out / "candidates" / "best-valid.pt", done)
        else:
            epochs = list(range(1, last_epoch + 1))
            if rule == "last":
                weights, epochs = final, [last_epoch]
            elif rule == "ema":
                assert ema is not None
                weights = ema.state_dict()
            else:
                epochs = list(range(max(1, last_epoch - config.average_last + 1),
                                    last_epoch + 1))
                weights = average_weights([
                    torch.load(out / f"epoch{n}.pt", map_location="cpu",
                               weights_only=True)["model"] for n in epochs])
            if rule == "last":  # the last epoch's own validation
                metrics = json_safe(payload["metrics"])
            else:
                model.load_state_dict(weights)
                metrics = json_safe(validate(model))
            chosen = {**payload, "model": weights, "metrics": metrics,
                      "threshold": float(metrics["threshold"]),
                      "kept": {"rule": rule, "epochs": epochs}}
            if config.checkpoint == rule:
                _save(out / "best.pt", chosen)
            if config.candidates:
                _save(out / "candidates" / f"{rule}.pt", chosen)
        candidates[rule] = metrics.get("auroc")
        auroc = metrics.get("auroc")
        log.info("weights %s (%s): valid AUROC %s", rule,
                 f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else
                 f"epoch {epochs[0]}", "n/a" if auroc is None else f"{auroc:.4f}")
        if rule == config.checkpoint:
            kept = {"rule": rule, "epochs": epochs, "metrics": metrics}
    model.load_state_dict(final)
    return {**kept, "candidates": candidates}


def score_test(best_path: Path, model: nn.Module, studies: Sequence[Study],
               config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Score the test studies once, at the end, with the chosen epoch's weights and its
    threshold (a number fixed on validation); write them into best.pt and test.json."""
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    dataset = ViewDataset(studies, image_size=config.image_size, resize=config.resize)
    if len(dataset) == 0:
        raise TrainError(f"none of the {len(studies)} test studies has a readable view")
    loader = _loader(dataset, dataclasses.replace(config, workers=min(config.workers, 1)),
                     shuffle=False, batch_size=config.batch_size * 2)
    threshold = float(best["threshold"])
    pred = predict_studies(model, loader, dataset, device)
    grouped = metrics_by_group(pred["labels"], pred["scores"], pred["parts"], threshold)
    intervals = bootstrap_ci(pred["labels"], pred["scores"], threshold, seed=config.seed)
    metrics = json_safe({**grouped["overall"], "loss": pred["loss"], "views": pred["views"],
                         "threshold": threshold, "epoch": best["epoch"],
                         "kept": (best.get("kept") or {}).get("rule", "best-valid"),
                         "ci95": {k: list(v) for k, v in intervals.items()},
                         "by_body_part": grouped["by_group"]})
    best["test_metrics"] = metrics
    _save(best_path, best)
    (best_path.parent / "test.json").write_text(json.dumps(
        {**metrics, "scores": pred["scores"], "labels": pred["labels"],
         "studies": pred["studies"]}, indent=1,
        allow_nan=False))
    log.info("test (scored once, epoch %d, threshold %.3g): AUROC %s %s, kappa %s, accuracy "
             "%s on %d studies", best["epoch"], threshold, metrics["auroc"],
             metrics["ci95"]["auroc"], metrics["kappa"], metrics["accuracy"], metrics["n"])
    return metrics
