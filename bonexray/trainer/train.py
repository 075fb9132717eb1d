"""Train BoneXRayNet on MURA-layout studies: epochs, study-level validation, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bonexray.imaging import DEFAULT_RESIZE, RESIZE_RULES
from bonexray.metrics import json_safe, metrics_by_group, study_scores
from bonexray.studies import Study, find_studies
from bonexray.trainer.data import TrainAugment, ViewDataset, collate_views
from bonexray.trainer.model import ARCHITECTURE, INITS, BoneXRayNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
SCRATCH_LR = 1e-3  # OneCycle peak from scratch (MEASURED.md)
FINETUNE_LR = 1e-4  # MURA's Adam rate for ImageNet-initialised weights
VALID_FRACTION = 0.2


class TrainError(ValueError):
    """Training cannot start with the given data or configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and paths of one training run."""

    data: str
    out: str
    epochs: int = 8
    image_size: int = 224
    batch_size: int = 16
    lr: float | None = None  # None: 1e-3 peak from scratch, 1e-4 with weights
    weights: str | None = None  # None, "imagenet" or a state dict path
    seed: int = 0
    workers: int = 2
    max_steps: int | None = None  # cap on steps per epoch (tests, smoke runs)
    rotation: float = 30.0
    device: str = "auto"
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    batch_norm: bool = False
    init: str = "default"
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainError(f"epochs must be >= 1, got {self.epochs}")
        if not 16 <= self.image_size <= 4096:
            raise TrainError(f"image_size {self.image_size} outside 16..4096")
        if self.batch_size < 1:
            raise TrainError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.rotation < 0:
            raise TrainError(f"rotation must be >= 0 degrees, got {self.rotation}")
        if self.init not in INITS:
            raise TrainError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.resize not in RESIZE_RULES:
            raise TrainError(
                f"unknown resize {self.resize!r}; choose one of {', '.join(RESIZE_RULES)}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise TrainError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")


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


def split_studies(studies: Sequence[Study], seed: int) -> tuple[list[Study], list[Study]]:
    """Train and validation studies: the layout's own split, else 20% of patients."""
    labelled = [s for s in studies if s.label is not None and s.views]
    skipped = len(studies) - len(labelled)
    if skipped:
        log.warning("skipping %d studies without a label or without views", skipped)
    valid = [s for s in labelled if s.split == "valid"]
    train = [s for s in labelled if s.split in ("train", None)]
    if valid:
        return train, valid
    # No valid split on disk: hold out whole patients, so no patient is on both sides.
    def patient_key(s: Study) -> str:
        return s.patient if s.patient is not None else s.path

    def rank(p: str) -> str:
        return hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()

    patients = sorted({patient_key(s) for s in train}, key=rank)
    n_valid = max(1, round(VALID_FRACTION * len(patients))) if len(patients) > 1 else 0
    held = set(patients[:n_valid])
    log.info("no valid split under the data; holding out %d of %d patients", n_valid,
             len(patients))
    return ([s for s in train if patient_key(s) not in held],
            [s for s in train if patient_key(s) in held])


def class_weights(dataset: ViewDataset) -> torch.Tensor:
    """Per-study [w_neg, w_pos] (MURA): w1 = |N|/(|A|+|N|), w0 = |A|/(|A|+|N|) over the
    training views of the study's body part; overall counts where a part lacks a class."""
    counts: dict[str, list[int]] = {}
    total = [0, 0]
    for (_, index), label in zip(dataset.items, dataset.labels(), strict=True):
        part = dataset.studies[index].body_part or "unknown"
        counts.setdefault(part, [0, 0])[label] += 1
        total[label] += 1

    def pair(neg: int, pos: int) -> tuple[float, float]:
        return (pos / (pos + neg), neg / (pos + neg))

    overall = pair(*total) if min(total) > 0 else (1.0, 1.0)
    by_part = {p: pair(*c) if min(c) > 0 else overall for p, c in counts.items()}
    log.info("class weights (w_neg, w_pos) by body part: %s",
             {p: tuple(round(w, 3) for w in v) for p, v in sorted(by_part.items())})
    return torch.tensor([by_part.get(s.body_part or "unknown", overall)
                         for s in dataset.studies], dtype=torch.float32)


def _loader(dataset: ViewDataset, config: TrainConfig, *, shuffle: bool,
            batch_size: int) -> DataLoader[Any]:
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      num_workers=config.workers, collate_fn=collate_views,
                      generator=generator, persistent_workers=config.workers > 0,
                      pin_memory=torch.cuda.is_available())


def _autocast(device: torch.device) -> Any:
    # bf16 on CUDA needs no loss scaler; on CPU autocast would only slow DenseNet down.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_one_epoch(model: nn.Module, loader: DataLoader[Any], weights: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                    *, max_steps: int | None, epoch: int, step_scheduler: bool) -> float:
    """One pass over the training views; the mean weighted loss."""
    model.train()
    total, seen, started = 0.0, 0, time.monotonic()
    weights = weights.to(device)
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for step, (pixels, labels, study_idx) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if pixels.shape[0] == 0:
            continue
        pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=memory)
        labels = labels.to(device, non_blocking=True)
        w = weights[study_idx.to(device)].gather(1, labels.long().unsqueeze(1)).squeeze(1)
        with _autocast(device):
            logits = model(pixels)
        loss_each = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels, reduction="none")
        loss = (loss_each * w).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler:
            scheduler.step()
        total += float(loss.detach()) * pixels.shape[0]
        seen += pixels.shape[0]
        if step % 50 == 0:
            log.info("epoch %d step %d loss %.4f (%.1f views/s)", epoch + 1, step,
                     float(loss.detach()),
                     seen / max(time.monotonic() - started, 1e-9))
    return total / seen if seen else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], dataset: ViewDataset,
             device: torch.device, *, threshold: float = 0.5) -> dict[str, Any]:
    """Study-level metrics (mean of view probabilities), overall and by body part."""
    model.eval()
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
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
        log.warning("%d validation studies have no decodable view; left out", missing)
    ids = sorted(scores)
    studies = [dataset.studies[int(i)] for i in ids]  # type: ignore[call-overload]
    labels_ = [int(s.label or 0) for s in studies]
    values = [scores[i] for i in ids]
    grouped = metrics_by_group(labels_, values, [s.body_part or "unknown" for s in studies],
                               threshold)
    return {**grouped["overall"], "loss": loss_sum / n if n else float("nan"),
            "views": n, "by_body_part": grouped["by_group"]}


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, validate every epoch, write last.pt / best.pt / history.json under config.out."""
    data = Path(config.data).expanduser().resolve()
    config = dataclasses.replace(config, data=str(data))
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = pick_device(config.device)

    train_studies, valid_studies = split_studies(find_studies(data), config.seed)
    if not train_studies or not valid_studies:
        raise TrainError(
            f"{data}: need labelled studies for training and validation, found "
            f"{len(train_studies)} and {len(valid_studies)}"
        )
    train_set = ViewDataset(train_studies, image_size=config.image_size, resize=config.resize,
                            augment=TrainAugment(config.rotation))
    valid_set = ViewDataset(valid_studies, image_size=config.image_size, resize=config.resize)
    if len(train_set) == 0 or len(valid_set) == 0:
        raise TrainError(f"{data}: no readable views ({len(train_set)} train, "
                         f"{len(valid_set)} valid)")
    log.info("training on %d views of %d studies, validating on %d views of %d studies, %s",
             len(train_set), len(train_studies), len(valid_set), len(valid_studies), device)
    weights = class_weights(train_set)
    train_loader = _loader(train_set, config, shuffle=True, batch_size=config.batch_size)
    valid_loader = _loader(valid_set, config, shuffle=False, batch_size=config.batch_size * 2)

    model = BoneXRayNet(weights=config.weights, head=config.head, dropout=config.dropout,
                        batch_norm=config.batch_norm, init=config.init).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = len(train_loader) if config.max_steps is None else min(len(train_loader),
                                                                   config.max_steps)
    scheduler: Any
    if config.weights is None:
        lr = config.lr or SCRATCH_LR
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(1, steps * config.epochs))
        per_step = True
    else:
        lr = config.lr or FINETUNE_LR
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=1)
        per_step = False

    config_dict = dataclasses.asdict(config)
    config_dict["head"] = list(config.head)
    history: list[dict[str, Any]] = []
    best_key, best_epoch, best_metrics = -math.inf, -1, {}
    for epoch in range(config.epochs):
        started = time.monotonic()
        train_loss = train_one_epoch(model, train_loader, weights, optimizer, scheduler,
                                     device, max_steps=config.max_steps, epoch=epoch,
                                     step_scheduler=per_step)
        metrics = evaluate(model, valid_loader, valid_set, device)
        if not per_step:
            scheduler.step(metrics["loss"])
        seconds = time.monotonic() - started
        entry = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": round(seconds, 2),
                 "lr": optimizer.param_groups[0]["lr"], "valid": metrics}
        history.append(json_safe(entry))
        log.info("epoch %d/%d: train loss %.4f, valid loss %.4f, AUROC %.4f, kappa %.4f, "
                 "accuracy %.4f (%.0f s)", epoch + 1, config.epochs, train_loss,
                 metrics["loss"], metrics["auroc"], metrics["kappa"], metrics["accuracy"],
                 seconds)
        auroc = metrics["auroc"]
        key = auroc if not math.isnan(auroc) else -math.inf
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "config": config_dict,
            "architecture": ARCHITECTURE,
            "image_size": config.image_size,
            "resize": config.resize,
            "threshold": 0.5,
            "metrics": json_safe(metrics),
            "head": dict(model.head_config),
        }
        _save(out / "last.pt", payload)
        if best_epoch < 0 or key > best_key:
            best_key, best_epoch, best_metrics = key, epoch + 1, metrics
            _save(out / "best.pt", payload)
            log.info("epoch %d is the best so far (valid AUROC %.4f)", epoch + 1, auroc)
        (out / "history.json").write_text(json.dumps(history, indent=2, allow_nan=False))
    return json_safe({
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
    })
