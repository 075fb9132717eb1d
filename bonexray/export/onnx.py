"""Export a training checkpoint to one self-contained ONNX file, gated on parity with torch."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bonexray.metrics import json_safe
from bonexray.modelmeta import INPUT_NAME, OUTPUT_PROB, build_metadata
from bonexray.trainer.model import ARCHITECTURE, BoneXRayNet

log = logging.getLogger(__name__)

# Config fields worth carrying in the model file (what it was trained on and how).
_TRAINING_KEYS = ("data", "epochs", "image_size", "batch_size", "lr", "weights", "seed",
                  "rotation", "max_steps")


class ParityError(ValueError):
    """The exported graph's outputs differ from torch's beyond the tolerance."""


class ProbabilityNet(nn.Module):
    """pixels uint8 [N,1,H,W] -> abnormal_prob float32 [N]: sigmoid inside the graph."""

    def __init__(self, net: BoneXRayNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(pixels))


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
    head = ckpt.get("head") or {}
    model = BoneXRayNet(head=tuple(head.get("layers", ())), dropout=head.get("dropout", 0.0),
                        batch_norm=head.get("batch_norm", False),
                        init=head.get("init", "default"))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def _training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    config = ckpt.get("config") or {}
    summary = {k: config[k] for k in _TRAINING_KEYS if k in config}
    summary["epoch"] = ckpt.get("epoch")
    return json_safe(summary)


def check_parity(model: nn.Module, path: str | Path, *, image_size: int, atol: float,
                 batches: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Run ORT (CPU) and torch on the same random uint8 inputs; ParityError on any failure.

    All batch sizes are tried and every failure is reported, with the largest difference.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    figures: list[dict[str, Any]] = []
    failures: list[str] = []
    for batch in batches:
        pixels = rng.integers(0, 256, size=(batch, 1, image_size, image_size), dtype=np.uint8)
        (got,) = session.run([OUTPUT_PROB], {INPUT_NAME: pixels})
        with torch.no_grad():
            want = model(torch.from_numpy(pixels)).numpy()
        if got.shape != want.shape or got.dtype != np.float32:
            failures.append(f"output {got.dtype}{list(got.shape)} != float32{list(want.shape)} "
                            f"at batch {batch}")
            figures.append({"batch": batch, "max_abs_diff": None})
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        figures.append({"batch": batch, "max_abs_diff": diff})
        if not diff <= atol:  # NaN fails too
            failures.append(f"max |diff| {diff:.2g} > atol {atol:.2g} at batch {batch}")
    if failures:
        raise ParityError("; ".join(failures))
    return figures


def export_model(checkpoint: str, out: str, *, opset: int = 17, atol: float = 1e-4,
                 parity_batches: Sequence[int] = (1, 7)) -> dict[str, Any]:
    """Write `out`: the checkpoint's network as ONNX (uint8 pixels -> abnormal_prob) with
    bonexray metadata. The file appears only once torch and onnxruntime agree within atol."""
    model, ckpt = load_checkpoint_model(checkpoint)
    image_size = int(ckpt["image_size"])
    resize = str(ckpt.get("resize", "letterbox"))
    threshold = float(ckpt.get("threshold", 0.5))
    wrapped = ProbabilityNet(model).eval()
    out_path = Path(out).expanduser().resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = build_metadata(
        architecture=ARCHITECTURE, input_size=image_size, resize=resize, threshold=threshold,
        head=json_safe(ckpt.get("head") or {}), training=_training_summary(ckpt),
        metrics=json_safe(ckpt.get("metrics") or {}),
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__, onnx_version=onnx.__version__,
        opset=opset, source_checkpoint=str(Path(checkpoint).resolve()),
    )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp",
                                    dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        dummy = torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8)
        with warnings.catch_warnings():
            # The legacy exporter warns that it is deprecated; it is chosen on purpose (one
            # self-contained file, no onnxscript, ~1 s).
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                wrapped, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_PROB],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_PROB: {0: "N"}},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        parity = check_parity(wrapped, tmp, image_size=image_size, atol=atol,
                              batches=parity_batches)
        tmp.replace(out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    log.info("exported %s (%d bytes, sha256 %s); parity %s", out_path, out_path.stat().st_size,
             digest[:12], parity)
    return {"path": str(out_path), "sha256": digest, "bytes": out_path.stat().st_size,
            "opset": opset, "atol": atol, "parity": parity, "metadata": metadata}
