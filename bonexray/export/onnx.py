"""Export checkpoints to one self-contained ONNX file, gated on parity with torch."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from bonexray.export.quantize import make_precision, prepare_precision, set_metadata
from bonexray.metrics import json_safe
from bonexray.modelmeta import INPUT_NAME, OUTPUT_CAM, OUTPUT_PROB, PRECISIONS, build_metadata
from bonexray.trainer.model import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, BoneXRayNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_BATCHES = (1, 7, 32)
CAM_ATOL_FACTOR = 10.0  # the CAM is on the logit scale: its tolerance is 10x the probabilities'

# Config fields worth carrying in the model file (what it was trained on and how).
_TRAINING_KEYS = ("data", "epochs", "image_size", "batch_size", "lr", "weights", "seed",
                  "rotation", "max_steps", "freeze", "resize")


class ParityError(ValueError):
    """The exported graph's outputs differ from torch's beyond the tolerance."""


class EnsembleError(ValueError):
    """Checkpoints that cannot be averaged in one graph (different input size or resize)."""


@dataclass(frozen=True)
class Member:
    """One checkpoint of an export: its network (eval mode) and what it says about itself."""

    path: str
    net: BoneXRayNet
    ckpt: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.ckpt["image_size"])

    @property
    def resize(self) -> str:
        return str(self.ckpt.get("resize", "letterbox"))

    @property
    def threshold(self) -> float:
        return float(self.ckpt.get("threshold", 0.5))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.ckpt.get("config") or {})


def _head_and_cam(net: BoneXRayNet, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N] and the head applied at every position of the last feature map [N,h,w].

    torchvision's DenseNet: features -> ReLU -> global mean -> classifier. Applying the
    classifier per position (a 1x1 convolution for each Linear; BatchNorm1d and Dropout are
    per-feature in eval mode) gives MURA's class activation map for a linear head, whose
    spatial mean is then exactly the logit.
    """
    body = cast(nn.Module, net.net.features)
    head = cast(nn.Module, net.net.classifier)
    features = F.relu(body(net.preprocess(pixels)))
    _, channels, h, w = features.shape
    pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
    logits = head(pooled).squeeze(1)
    per_position = features.permute(0, 2, 3, 1).reshape(-1, int(channels))
    cam = head(per_position).reshape(-1, int(h), int(w))
    return logits, cam


class ProbabilityNet(nn.Module):
    """pixels uint8 [N,1,H,W] -> abnormal_prob float32 [N] (sigmoid inside the graph; the
    mean of the members' probabilities for an ensemble), and with `cam` also cam [N,h,w]
    (the members' mean)."""

    def __init__(self, nets: BoneXRayNet | Sequence[BoneXRayNet], *, cam: bool = False) -> None:
        super().__init__()
        members = [nets] if isinstance(nets, BoneXRayNet) else list(nets)
        if not members:
            raise ValueError("no network to export")
        self.members = nn.ModuleList(members)
        self.cam = cam

    def forward(self, pixels: torch.Tensor) -> Any:
        if not self.cam:
            probs = [torch.sigmoid(net(pixels)) for net in self.members]
            return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        pairs = [_head_and_cam(net, pixels) for net in self.members]  # type: ignore[arg-type]
        if len(pairs) == 1:
            return torch.sigmoid(pairs[0][0]), pairs[0][1]
        prob = torch.stack([torch.sigmoid(logit) for logit, _ in pairs]).mean(0)
        return prob, torch.stack([c for _, c in pairs]).mean(0)


def load_checkpoint_model(checkpoint: str | Path) -> tuple[BoneXRayNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained as, in eval mode, with its weights."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{checkpoint} is not a bonexray checkpoint (no 'model' entry)")
    if ckpt.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise ValueError(
            f"{checkpoint}: architecture {ckpt.get('architecture')!r}; "
            f"this exporter knows {ARCHITECTURE}"
        )
    if "image_size" not in ckpt:
        raise ValueError(f"{checkpoint}: no 'image_size' entry; not a bonexray checkpoint")
    head = dict(ckpt.get("head") or {})
    head.pop("freeze", None)  # frozen or not, the exported network is the same
    try:
        model = BoneXRayNet(**head)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{checkpoint}: head {head} does not rebuild the trained network: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    return model.eval(), ckpt


def load_members(checkpoints: Sequence[str | Path]) -> list[Member]:
    """The checkpoints' networks; an ensemble's members must share input size and resize."""
    members = []
    for path in checkpoints:
        net, ckpt = load_checkpoint_model(path)
        members.append(Member(str(Path(path).resolve()), net, ckpt))
    first = members[0]
    for m in members[1:]:
        if (m.image_size, m.resize) != (first.image_size, first.resize):
            raise EnsembleError(
                f"cannot average {first.path} ({first.image_size} px, {first.resize}) and "
                f"{m.path} ({m.image_size} px, {m.resize}) in one graph: input size and "
                "resize rule must agree"
            )
    return members


def _training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    config = ckpt.get("config") or {}
    summary = {k: config[k] for k in _TRAINING_KEYS if k in config}
    summary["epoch"] = ckpt.get("epoch")
    return json_safe(summary)


def normalisation() -> dict[str, Any]:
    """What the graph does to its uint8 input before the network (for the metadata)."""
    return {"input": "uint8 gray [N,1,H,W]", "scale": "1/255", "channels": "gray repeated x3",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def check_parity(model: nn.Module, path: str | Path, *, image_size: int, atol: float | None,
                 batches: Sequence[int], seed: int = 0,
                 cam: bool = False) -> list[dict[str, Any]]:
    """Run ORT (CPU) and torch on the same random uint8 inputs; ParityError on any failure.

    All batch sizes are tried and every failure is reported, with the largest difference.
    `atol` None checks only shapes, dtypes and finiteness and reports the differences
    (lower precisions are judged on validation studies instead). The CAM, on the logit
    scale, is held to CAM_ATOL_FACTOR x atol.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [OUTPUT_PROB, OUTPUT_CAM] if cam else [OUTPUT_PROB]
    tolerances = {OUTPUT_PROB: atol,
                  OUTPUT_CAM: None if atol is None else atol * CAM_ATOL_FACTOR}
    rng = np.random.default_rng(seed)
    figures: list[dict[str, Any]] = []
    failures: list[str] = []
    for batch in batches:
        pixels = rng.integers(0, 256, size=(batch, 1, image_size, image_size), dtype=np.uint8)
        got = session.run(names, {INPUT_NAME: pixels})
        with torch.no_grad():
            want = model(torch.from_numpy(pixels))
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        figure: dict[str, Any] = {"batch": batch}
        for name, g, w in zip(names, got, want, strict=True):
            key = "max_abs_diff" if name == OUTPUT_PROB else f"{name}_max_abs_diff"
            if g.shape != w.shape or g.dtype != np.float32:
                failures.append(f"{name} {g.dtype}{list(g.shape)} != float32{list(w.shape)} "
                                f"at batch {batch}")
                figure[key] = None
                continue
            diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
            figure[key] = diff
            tol = tolerances[name]
            if not np.isfinite(g).all():
                failures.append(f"{name} not finite at batch {batch}")
            elif tol is not None and not diff <= tol:  # NaN fails too
                label = "max |diff|" if name == OUTPUT_PROB else f"{name} max |diff|"
                failures.append(f"{label} {diff:.2g} > atol {tol:.2g} at batch {batch}")
        figures.append(figure)
    if failures:
        raise ParityError("; ".join(failures))
    return figures


def _check_cam_decomposition(members: Sequence[Member], image_size: int) -> None:
    """The CAM path recomputes the network from its parts; it must match the network's own
    forward, or the CAM would describe some other model."""
    pixels = torch.from_numpy(np.random.default_rng(1).integers(
        0, 256, size=(2, 1, image_size, image_size), dtype=np.uint8))
    with torch.no_grad():
        for m in members:
            logits, _ = _head_and_cam(m.net, pixels)
            diff = float((logits - m.net(pixels)).abs().max())
            if not diff <= 1e-4:
                raise ValueError(f"{m.path}: the network's forward is not DenseNet features -> "
                                 f"ReLU -> mean -> head (|diff| {diff:.2g}); cannot export a CAM")


def _write_onnx(wrapped: nn.Module, tmp: Path, *, image_size: int, opset: int,
                cam: bool) -> None:
    dummy = torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8)
    outputs = [OUTPUT_PROB, OUTPUT_CAM] if cam else [OUTPUT_PROB]
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated; it is chosen on purpose (one
        # self-contained file, no onnxscript, ~1 s).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # The CAM's reshape uses the feature map's size as a constant: the input size is
        # fixed by the model file, only the batch axis varies (and stays dynamic).
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped, (dummy,), str(tmp), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={name: {0: "N"} for name in [INPUT_NAME, *outputs]},
            do_constant_folding=True,
        )


def _metadata(members: Sequence[Member], *, opset: int, precision: str,
              cam_shape: list[int] | None, aggregation: str = "mean") -> dict[str, Any]:
    first = members[0]
    common: dict[str, Any] = dict(
        architecture=ARCHITECTURE, input_size=first.image_size, resize=first.resize,
        threshold=float(np.mean([m.threshold for m in members])), aggregation=aggregation,
        normalization=normalisation(), precision=precision,
        outputs=[OUTPUT_PROB, OUTPUT_CAM] if cam_shape else [OUTPUT_PROB],
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__, onnx_version=onnx.__version__,
        onnxruntime_version=ort.__version__, opset=opset,
    )
    if cam_shape:
        common["cam"] = {"shape": cam_shape, "scale": "logit: the head at each position of "
                         "the last dense block's feature map (mean over members)"}
    if len(members) == 1:
        return {**common, "head": json_safe(first.ckpt.get("head") or {}),
                "training": _training_summary(first.ckpt),
                "metrics": json_safe(first.ckpt.get("metrics") or {}),
                "source_checkpoint": first.path}
    # An ensemble's own validation metrics are not in any checkpoint: each member's are.
    return {**common, "head": [json_safe(m.ckpt.get("head") or {}) for m in members],
            "training": _training_summary(first.ckpt), "metrics": {},
            "ensemble": {"members": len(members), "combine": "mean of probabilities",
                         "checkpoints": [m.path for m in members],
                         "thresholds": [m.threshold for m in members],
                         "training": [_training_summary(m.ckpt) for m in members],
                         "metrics": [json_safe(m.ckpt.get("metrics") or {})
                                     for m in members]},
            "source_checkpoint": [m.path for m in members]}


def export_model(checkpoint: str | Sequence[str], out: str, *, opset: int = DEFAULT_OPSET,
                 atol: float = 1e-4, parity_batches: Sequence[int] = PARITY_BATCHES,
                 precision: str = "fp32", cam: bool = False, calibration: str | None = None,
                 validation: str | None = None,
                 calibration_images: int | None = None,
                 aggregation: str = "mean") -> dict[str, Any]:
    """Write `out`: the checkpoint's network (several: their mean) as ONNX, uint8 pixels ->
    abnormal_prob (and cam), with bonexray metadata.

    The fp32 graph must agree with torch within atol at every parity batch size; fp16 and
    int8 are made from it and judged on validation studies (see quantize.judge_precision).
    The file appears only once every check passed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if aggregation not in ("mean", "max"):
        raise ValueError(f"unknown aggregation {aggregation!r}; choose mean or max")
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not checkpoints:
        raise ValueError("no checkpoint to export")
    members = load_members(checkpoints)
    if len(members) > 1 and len({m.threshold for m in members}) > 1:
        log.warning("ensemble members have thresholds %s; the model uses their mean",
                    [m.threshold for m in members])
    image_size = members[0].image_size
    prepared = None if precision == "fp32" else prepare_precision(
        precision, members, calibration=calibration, validation=validation,
        calibration_images=calibration_images)
    if cam:
        _check_cam_decomposition(members, image_size)
    wrapped = ProbabilityNet([m.net for m in members], cam=cam).eval()
    cam_shape: list[int] | None = None
    if cam:
        with torch.no_grad():
            _, cam_map = wrapped(torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8))
        cam_shape = [int(cam_map.shape[1]), int(cam_map.shape[2])]
    out_path = Path(out).expanduser().resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata_in = _metadata(members, opset=opset, precision=precision, cam_shape=cam_shape,
                             aggregation=aggregation)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp",
                                    dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    fp32_tmp = tmp.with_name(tmp.name + ".fp32")
    report: dict[str, Any] = {"warnings": []}
    try:
        fp32_path = tmp if precision == "fp32" else fp32_tmp
        _write_onnx(wrapped, fp32_path, image_size=image_size, opset=opset, cam=cam)
        metadata = build_metadata(**{**metadata_in, "precision": "fp32"})
        set_metadata(fp32_path, metadata)
        parity = check_parity(wrapped, fp32_path, image_size=image_size, atol=atol,
                              batches=parity_batches, cam=cam)
        if prepared is not None:
            check = make_precision(fp32_path, tmp, prepared)
            metadata = build_metadata(**{**metadata_in, **check.metadata})
            set_metadata(tmp, metadata)
            # Same inputs as the fp32 gate, differences reported, not bounded (see judge).
            parity = check_parity(wrapped, tmp, image_size=image_size, atol=None,
                                  batches=parity_batches, cam=cam)
            report["precision_check"] = check.judgement
            report["warnings"].extend(check.warnings)
        tmp.replace(out_path)
    except BaseException:
        for leftover in (tmp, fp32_tmp):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    with contextlib.suppress(FileNotFoundError):
        fp32_tmp.unlink()
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    log.info("exported %s (%s, %d bytes, sha256 %s); parity %s", out_path, precision,
             out_path.stat().st_size, digest[:12], parity)
    return {**report, "path": str(out_path), "sha256": digest,
            "bytes": out_path.stat().st_size, "opset": opset, "atol": atol,
            "precision": precision, "members": len(members), "cam": cam_shape,
            "parity": parity, "metadata": metadata}
