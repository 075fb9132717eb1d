"""Export checkpoints to one self-contained ONNX file, gated on parity with torch."""

from __future__ import annotations

import contextlib
import dataclasses
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

from bonexray.errors import BonexrayError, InvalidValueError, one_line
from bonexray.export.quantize import (
    JudgingSet,
    PrecisionError,
    load_judging_set,
    make_precision,
    parity_views,
    prepare_precision,
    score_studies,
    set_metadata,
    validation_studies,
)
from bonexray.metrics import binary_metrics, choose_threshold, json_safe
from bonexray.modelmeta import (
    INPUT_NAME,
    OUTPUT_CAM,
    OUTPUT_LOGIT,
    OUTPUT_PROB,
    PRECISIONS,
    build_metadata,
)
from bonexray.trainer.network import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, BoneXRayNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_BATCHES = (1, 7, 32)
# Logits and the CAM are on the logit scale (tens on saturated inputs): their tolerance
# is LOGIT_ATOL_FACTOR x the probabilities' atol plus LOGIT_RTOL of the value itself.
LOGIT_ATOL_FACTOR = 10.0
LOGIT_RTOL = 1e-4
PARITY_VIEWS = sum(PARITY_BATCHES)  # real views decoded for the gate (one of each batch)

# Config fields worth carrying in the model file (what it was trained on and how).
_TRAINING_KEYS = ("data", "epochs", "image_size", "batch_size", "lr", "weights", "seed",
                  "rotation", "max_steps", "freeze", "resize", "test")


class ParityError(BonexrayError, ValueError):
    """The exported graph's outputs differ from torch's beyond the tolerance."""


class EnsembleError(BonexrayError, ValueError):
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


def head_is_linear(net: BoneXRayNet) -> bool:
    """Whether the head has no hidden layer (one Linear, perhaps behind a Dropout)."""
    head = cast(nn.Module, net.net.classifier)
    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    return sum(isinstance(m, nn.Linear) for m in modules) == 1


def _head_and_cam(net: BoneXRayNet, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N] and the class activation map [N,h,w] whose spatial mean is the logit.

    torchvision's DenseNet: features -> ReLU -> global mean -> classifier. For a linear
    head, applying it at every position of the last feature map is MURA's CAM. A head with
    hidden ReLU layers is not linear, so the map is the head linearised at the image's
    pooled features: each ReLU keeps the on/off pattern the pooled features give it (a
    fixed 0/1 mask per image), which every position then shares. Linear, BatchNorm1d (eval)
    and Dropout (eval) are affine, so the map's mean is still exactly the logit, and for a
    linear head it is the classic CAM.
    """
    body = cast(nn.Module, net.net.features)
    head = cast(nn.Module, net.net.classifier)
    features = F.relu(body(net.preprocess(pixels)))
    n, channels, h, w = features.shape
    pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
    per_position = features.permute(0, 2, 3, 1).reshape(-1, int(h) * int(w), int(channels))
    x, y = pooled, per_position
    for module in (list(head) if isinstance(head, nn.Sequential) else [head]):
        if isinstance(module, nn.Linear):
            x, y = module(x), module(y)
        elif isinstance(module, nn.BatchNorm1d):  # [N,C] and, per position, [N,C,P]
            x, y = module(x), module(y.transpose(1, 2)).transpose(1, 2)
        elif isinstance(module, nn.ReLU):
            gate = (x > 0).to(x.dtype)
            x, y = x * gate, y * gate.unsqueeze(1)
        elif isinstance(module, nn.Dropout):
            continue  # identity in eval mode
        else:
            raise ValueError(f"cannot build a CAM through a head layer {type(module).__name__}")
    return x.squeeze(1), y.reshape(-1, int(h), int(w))


TTA_MODES = ("none", "flip")


class ProbabilityNet(nn.Module):
    """pixels uint8 [N,1,H,W] -> abnormal_prob float32 [N] (sigmoid inside the graph; the
    mean of the members' probabilities for an ensemble) and abnormal_logit [N] (the
    members' mean logit), and with `cam` also cam [N,h,w] (the members' mean).

    tta="flip": every view is also run mirrored left-right (one batch of 2N), and each
    member's probability, logit and CAM (flipped back) are the means over both.
    """

    def __init__(self, nets: BoneXRayNet | Sequence[BoneXRayNet], *, cam: bool = False,
                 tta: str = "none") -> None:
        super().__init__()
        members = [nets] if isinstance(nets, BoneXRayNet) else list(nets)
        if not members:
            raise ValueError("no network to export")
        if tta not in TTA_MODES:
            raise InvalidValueError(f"unknown test-time augmentation {tta!r}; choose one of "
                                    f"{', '.join(TTA_MODES)}")
        self.members = nn.ModuleList(members)
        self.cam = cam
        self.tta = tta

    def forward(self, pixels: torch.Tensor) -> Any:
        flip = self.tta == "flip"
        batch = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
        probs: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for net in self.members:
            if self.cam:
                logit, cam_map = _head_and_cam(net, batch)  # type: ignore[arg-type]
            else:
                logit, cam_map = net(batch), None
            prob = torch.sigmoid(logit)
            if flip:
                n = pixels.shape[0]
                prob = (prob[:n] + prob[n:]) / 2
                logit = (logit[:n] + logit[n:]) / 2
                if cam_map is not None:
                    cam_map = (cam_map[:n] + cam_map[n:].flip(-1)) / 2
            probs.append(prob)
            logits.append(logit)
            if cam_map is not None:
                maps.append(cam_map)

        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            return values[0] if len(values) == 1 else torch.stack(values).mean(0)

        if not self.cam:
            return mean(probs), mean(logits)
        return mean(probs), mean(logits), mean(maps)


def load_checkpoint_model(checkpoint: str | Path) -> tuple[BoneXRayNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained as, in eval mode, with its weights."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage, an .onnx file, a pickle of arbitrary objects
        # (torch's own message advises weights_only=False, which would run the file's code)
        raise InvalidValueError(f"{checkpoint} is not a bonexray checkpoint (a file written by "
                                f"`bonexray train`, e.g. OUT/best.pt): torch.load refused it "
                                f"({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise InvalidValueError(f"{checkpoint} is not a bonexray checkpoint (no 'model' entry)")
    if ckpt.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise InvalidValueError(
            f"{checkpoint}: architecture {ckpt.get('architecture')!r}; "
            f"this exporter knows {ARCHITECTURE}"
        )
    if "image_size" not in ckpt:
        raise InvalidValueError(f"{checkpoint}: no 'image_size' entry; not a bonexray checkpoint")
    head = dict(ckpt.get("head") or {})
    head.pop("freeze", None)  # frozen or not, the exported network is the same
    try:
        model = BoneXRayNet(**head)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as exc:
        raise InvalidValueError(f"{checkpoint}: head {head} does not rebuild the trained network: "
                                f"{one_line(exc, limit=300)}") from None
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
    # Which weights: the best epoch on validation, the last, a moving average, an average.
    summary["weights"] = dict(ckpt.get("kept") or {"rule": "best-valid",
                                                   "epochs": [ckpt.get("epoch")]})
    return json_safe(summary)


def normalisation() -> dict[str, Any]:
    """What the graph does to its uint8 input before the network (for the metadata)."""
    return {"input": "uint8 gray [N,1,H,W]", "scale": "1/255", "channels": "gray repeated x3",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _parity_inputs(image_size: int, batches: Sequence[int], seed: int,
                   views: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    """(kind, uint8 [B,1,S,S]) for every batch size: uniform noise, and real decoded views
    when given (consecutive slices, wrapping around when there are fewer)."""
    rng = np.random.default_rng(seed)
    inputs = [("noise", rng.integers(0, 256, size=(b, 1, image_size, image_size),
                                     dtype=np.uint8)) for b in batches]
    if views is not None and len(views):
        offset = 0
        for b in batches:
            index = (offset + np.arange(b)) % len(views)
            inputs.append(("views", np.ascontiguousarray(views[index])))
            offset += b
    return inputs


def check_parity(model: nn.Module, path: str | Path, *, image_size: int, atol: float | None,
                 batches: Sequence[int], seed: int = 0, cam: bool = False,
                 views: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Run ORT (CPU) and torch on the same uint8 inputs; ParityError on any failure.

    Inputs: uniform noise and, when given, real decoded views (uint8 [V,1,S,S]), at every
    batch size. Compared: the probabilities (within atol), the logits and the CAM (within
    LOGIT_ATOL_FACTOR x atol + LOGIT_RTOL x |torch's value|): a trained network saturates
    its probabilities at 0 or 1 on noise, where only the logits still tell two graphs
    apart. Every failure is reported with the largest difference. `atol` None checks only
    shapes, dtypes and finiteness and reports the differences (lower precisions are judged
    on validation studies instead).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [OUTPUT_PROB, OUTPUT_LOGIT, *([OUTPUT_CAM] if cam else [])]
    figures: list[dict[str, Any]] = []
    failures: list[str] = []
    for kind, pixels in _parity_inputs(image_size, batches, seed, views):
        batch = int(pixels.shape[0])
        got = session.run(names, {INPUT_NAME: pixels})
        with torch.no_grad():
            want = [w.numpy() for w in model(torch.from_numpy(pixels))]
        figure: dict[str, Any] = {"input": kind, "batch": batch}
        for name, g, w in zip(names, got, want, strict=True):
            key = "max_abs_diff" if name == OUTPUT_PROB else f"{name}_max_abs_diff"
            where = f"at batch {batch} of {kind}"
            if g.shape != w.shape or g.dtype != np.float32:
                failures.append(f"{name} {g.dtype}{list(g.shape)} != float32{list(w.shape)} "
                                f"{where}")
                figure[key] = None
                continue
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            figure[key] = float(np.max(diff))
            if not np.isfinite(g).all():
                failures.append(f"{name} not finite {where}")
                continue
            if atol is None:
                continue
            if name == OUTPUT_PROB:
                allowed = np.full(diff.shape, atol)
            else:
                allowed = atol * LOGIT_ATOL_FACTOR + LOGIT_RTOL * np.abs(w.astype(np.float64))
            if not (diff <= allowed).all():  # NaN fails too
                worst = int(np.argmax(diff - allowed))
                failures.append(f"{name} |diff| {diff.flat[worst]:.3g} > allowed "
                                f"{allowed.flat[worst]:.3g} {where}")
        figures.append(figure)
    if failures:
        raise ParityError("; ".join(failures))
    return figures


def _check_cam_decomposition(members: Sequence[Member], image_size: int) -> None:
    """The CAM path recomputes the network from its parts: its logit must match the
    network's own forward (or the CAM would describe some other model), and the map's
    spatial mean must be that logit."""
    pixels = torch.from_numpy(np.random.default_rng(1).integers(
        0, 256, size=(2, 1, image_size, image_size), dtype=np.uint8))
    with torch.no_grad():
        for m in members:
            logits, cam_map = _head_and_cam(m.net, pixels)
            diff = float((logits - m.net(pixels)).abs().max())
            mean_diff = float((cam_map.mean(dim=(1, 2)) - logits).abs().max())
            scale = 1.0 + float(logits.abs().max())
            if not (diff <= 1e-4 * scale and mean_diff <= 1e-4 * scale):
                raise ValueError(f"{m.path}: the network's forward is not DenseNet features -> "
                                 f"ReLU -> mean -> head (|logit diff| {diff:.2g}, |CAM mean - "
                                 f"logit| {mean_diff:.2g}); cannot export a CAM")


def _write_onnx(wrapped: nn.Module, tmp: Path, *, image_size: int, opset: int,
                cam: bool) -> None:
    dummy = torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8)
    outputs = [OUTPUT_PROB, OUTPUT_LOGIT, *([OUTPUT_CAM] if cam else [])]
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
        outputs=[OUTPUT_PROB, OUTPUT_LOGIT, *([OUTPUT_CAM] if cam_shape else [])],
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__, onnx_version=onnx.__version__,
        onnxruntime_version=ort.__version__, opset=opset,
        validated_on={"provider": "CPUExecutionProvider",
                      "check": "fp32 parity with torch", "onnxruntime": ort.__version__},
    )
    if cam_shape:
        linear = all(head_is_linear(m.net) for m in members)
        common["cam"] = {
            "shape": cam_shape, "scale": "logit (the map's spatial mean is the logit)",
            "method": "CAM: the linear head at every position of the last dense block's "
                      "feature map" if linear else
                      "the head linearised at the image's pooled features (its ReLUs keep "
                      "the on/off pattern of the pooled features at every position); not "
                      "MURA's CAM, which needs a linear head",
            "members": "mean over members" if len(members) > 1 else "one network"}
    if len(members) == 1:
        return {**common, "head": json_safe(first.ckpt.get("head") or {}),
                "training": _training_summary(first.ckpt),
                "metrics": json_safe(first.ckpt.get("metrics") or {}),
                "test_metrics": json_safe(first.ckpt.get("test_metrics") or {}),
                "threshold_source": "the checkpoint's, chosen on its validation split "
                                    f"(rule {_threshold_rule(first)})",
                "source_checkpoint": first.path}
    # Until the ensemble is scored on validation studies (export_model does so when it can),
    # its threshold is the members' mean and it has no metrics of its own.
    return {**common, "head": [json_safe(m.ckpt.get("head") or {}) for m in members],
            "training": _training_summary(first.ckpt), "metrics": {},
            "threshold_source": "mean of the members' thresholds (no validation data to "
                                "choose the ensemble's own)",
            "ensemble": {"members": len(members), "combine": "mean of probabilities",
                         "checkpoints": [m.path for m in members],
                         "thresholds": [m.threshold for m in members],
                         "training": [_training_summary(m.ckpt) for m in members],
                         "metrics": [json_safe(m.ckpt.get("metrics") or {})
                                     for m in members]},
            "source_checkpoint": [m.path for m in members]}


def _threshold_rule(member: Member) -> str:
    """The rule a member's threshold was chosen by (older checkpoints: their config's)."""
    return str(member.ckpt.get("threshold_rule") or member.config.get("threshold") or "0.5")


def ensemble_threshold(members: Sequence[Member], scores: np.ndarray,
                       labels: np.ndarray) -> tuple[float, dict[str, Any], str]:
    """The ensemble's own threshold and validation metrics from its study scores: the
    members' threshold rule (when they share one; else 0.5) applied to the ensemble."""
    rules = {_threshold_rule(m) for m in members}
    rule = rules.pop() if len(rules) == 1 else "0.5"
    try:
        value = choose_threshold(labels, scores, rule)
    except ValueError as exc:  # a rule that needs both classes, on one-class data
        log.warning("ensemble threshold rule %r not applicable (%s); using 0.5", rule, exc)
        rule, value = "0.5", 0.5
    metrics = json_safe({**binary_metrics(labels, scores, value), "threshold": value})
    return float(value), metrics, rule


def _ensemble_judging_set(members: Sequence[Member],
                          validation: str | None) -> JudgingSet | None:
    try:
        studies, source = validation_studies(members, validation)
        return load_judging_set(studies, size=members[0].image_size, resize=members[0].resize,
                                source=source)
    except PrecisionError as exc:
        log.warning("ensemble: its threshold is the mean of the members' and it has no "
                    "metrics of its own: %s", exc)
        return None


def export_model(checkpoint: str | Sequence[str], out: str, *, opset: int = DEFAULT_OPSET,
                 atol: float = 1e-4, parity_batches: Sequence[int] = PARITY_BATCHES,
                 precision: str = "fp32", cam: bool = False, calibration: str | None = None,
                 validation: str | None = None,
                 calibration_images: int | None = None,
                 aggregation: str = "mean", min_agreement: float | None = None,
                 max_score_change: float | None = None, tta: str = "none") -> dict[str, Any]:
    """Write `out`: the checkpoint's network (several: their mean) as ONNX, uint8 pixels ->
    abnormal_prob and abnormal_logit (and cam), with bonexray metadata.

    The fp32 graph must agree with torch (probabilities, logits, CAM) on noise and on real
    views at every parity batch size; an ensemble is scored on validation studies for its
    own threshold and metrics; fp16 and int8 are made from the fp32 graph and judged on
    validation studies (see quantize.judge_precision). The file appears only once every
    check passed.
    """
    if precision not in PRECISIONS:
        raise InvalidValueError(f"unknown precision {precision!r}"
                                f"; choose one of {', '.join(PRECISIONS)}")
    if aggregation not in ("mean", "max"):
        raise InvalidValueError(f"unknown aggregation {aggregation!r}; choose mean or max")
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not checkpoints:
        raise InvalidValueError("no checkpoint to export")
    members = load_members(checkpoints)
    image_size = members[0].image_size
    prepared = None if precision == "fp32" else prepare_precision(
        precision, members, calibration=calibration, validation=validation,
        calibration_images=calibration_images, min_agreement=min_agreement,
        max_score_change=max_score_change, aggregation=aggregation)
    judged = prepared.judged if prepared is not None else None
    if len(members) > 1 and judged is None:
        judged = _ensemble_judging_set(members, validation)
    count = sum(parity_batches)
    if judged is not None:
        views: np.ndarray | None = judged.pixels[:count]
        views_source = judged.source
    else:
        views, views_source = parity_views(members, validation=validation,
                                           calibration=calibration, count=count)
    report: dict[str, Any] = {"warnings": []}
    if views is None:
        report["warnings"].append(f"parity checked on noise only (no real views: "
                                  f"{views_source}); pass --validation DIR")
        log.warning("%s", report["warnings"][-1])
    if cam:
        _check_cam_decomposition(members, image_size)
    wrapped = ProbabilityNet([m.net for m in members], cam=cam, tta=tta).eval()
    cam_shape: list[int] | None = None
    if cam:
        with torch.no_grad():
            cam_map = wrapped(torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8))[2]
        cam_shape = [int(cam_map.shape[1]), int(cam_map.shape[2])]
    out_path = Path(out).expanduser().resolve()
    if not out_path.parent.is_dir():  # made, and said so: never a silent side effect
        out_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("created the folder %s for %s", out_path.parent, out_path.name)
    metadata_in = _metadata(members, opset=opset, precision=precision, cam_shape=cam_shape,
                             aggregation=aggregation)
    metadata_in["tta"] = tta if tta == "none" else (
        f"{tta}: every view also runs mirrored left-right; probabilities, logits and CAMs "
        "are the means over both (2x the inference work)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp",
                                    dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    fp32_tmp = tmp.with_name(tmp.name + ".fp32")
    try:
        fp32_path = tmp if precision == "fp32" else fp32_tmp
        _write_onnx(wrapped, fp32_path, image_size=image_size, opset=opset, cam=cam)
        parity = check_parity(wrapped, fp32_path, image_size=image_size, atol=atol,
                              batches=parity_batches, cam=cam, views=views)
        if len(members) > 1 and judged is not None:
            scores = score_studies(fp32_path, judged, aggregation=aggregation,
                                   providers=["CPUExecutionProvider"])
            threshold, metrics, rule = ensemble_threshold(members, scores, judged.labels)
            metadata_in.update(
                threshold=threshold, metrics=metrics,
                threshold_source=f"the ensemble's own, rule {rule} on {judged.studies} "
                                 f"studies of {judged.source}")
            log.info("ensemble: threshold %.4g (rule %s), validation AUROC %.4f on %d studies",
                     threshold, rule, metrics["auroc"] or float("nan"), judged.studies)
            if prepared is not None:
                prepared = dataclasses.replace(prepared, threshold=threshold)
        metadata_in["parity"] = {"inputs": "noise" + (f" and {len(views)} views of "
                                                      f"{views_source}" if views is not None
                                                      else " only"),
                                 "batches": list(parity_batches), "atol": atol}
        metadata = build_metadata(**{**metadata_in, "precision": "fp32"})
        set_metadata(fp32_path, metadata)
        if prepared is not None:
            check = make_precision(fp32_path, tmp, prepared)
            metadata = build_metadata(**{**metadata_in, **check.metadata})
            set_metadata(tmp, metadata)
            # Same inputs as the fp32 gate, differences reported, not bounded (see judge).
            parity = check_parity(wrapped, tmp, image_size=image_size, atol=None,
                                  batches=parity_batches, cam=cam, views=views)
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
