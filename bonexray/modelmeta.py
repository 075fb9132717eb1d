"""The model file's contract: metadata_props keys written by export and read by workers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bonexray.errors import BonexrayError
from bonexray.imaging import RESIZE_RULES

FORMAT_VERSION = "1"
INPUT_NAME = "pixels"  # uint8 [N, 1, H, W]
OUTPUT_PROB = "abnormal_prob"  # float32 [N]
OUTPUT_CAM = "cam"  # float32 [N, h, w], optional
# float32 [N]: the logit behind abnormal_prob (an ensemble: its members' mean logit). The
# parity gate compares it, as probabilities saturate at 0 and 1 where logits still differ.
OUTPUT_LOGIT = "abnormal_logit"
PRECISIONS = ("fp32", "fp16", "int8")  # fp16 for GPU workers, int8 (static QDQ) for CPU ones

# Keys every bonexray model carries; a worker refuses a model without them.
REQUIRED_KEYS = ("bonexray_format", "architecture", "input_size", "resize", "threshold")


class ModelMetadataError(BonexrayError, ValueError):
    """A model file without the metadata that says how to feed it and read its output."""


@dataclass(frozen=True)
class ModelInfo:
    """What a worker needs to know about a model, read from its metadata_props."""

    architecture: str
    input_size: int
    resize: str
    threshold: float
    aggregation: str = "mean"
    precision: str = "fp32"
    props: dict[str, str] = field(default_factory=dict, compare=False)

    def json_prop(self, key: str) -> Any:
        """A metadata value that export stored as JSON (None when absent)."""
        raw = self.props.get(key)
        return json.loads(raw) if raw else None


def build_metadata(*, architecture: str, input_size: int, resize: str, threshold: float,
                   aggregation: str = "mean", **extra: Any) -> dict[str, str]:
    """metadata_props for a model: strings only; non-string extras are stored as JSON."""
    props = {
        "bonexray_format": FORMAT_VERSION,
        "architecture": architecture,
        "input_size": str(int(input_size)),
        "resize": resize,
        "threshold": repr(float(threshold)),
        "aggregation": aggregation,
    }
    for key, value in extra.items():
        props[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    parse_metadata(props)  # refuse to write what a worker would refuse to read
    return props


def parse_metadata(props: dict[str, str], *, source: str = "model") -> ModelInfo:
    """Validate metadata_props and return the ModelInfo a worker runs by."""
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ModelMetadataError(
            f"{source} lacks bonexray metadata ({', '.join(missing)}); "
            "export it with `bonexray export`"
        )
    if props["bonexray_format"] != FORMAT_VERSION:
        raise ModelMetadataError(
            f"{source} has metadata format {props['bonexray_format']!r}; "
            f"this bonexray reads format {FORMAT_VERSION}"
        )
    try:
        size = int(props["input_size"])
        threshold = float(props["threshold"])
    except ValueError:
        raise ModelMetadataError(
            f"{source}: input_size {props['input_size']!r} or threshold "
            f"{props['threshold']!r} is not a number"
        ) from None
    if size < 16 or size > 4096:
        raise ModelMetadataError(f"{source}: input_size {size} outside 16..4096")
    if not 0.0 <= threshold <= 1.0:
        raise ModelMetadataError(f"{source}: threshold {threshold} outside 0..1")
    if props["resize"] not in RESIZE_RULES:
        raise ModelMetadataError(
            f"{source}: unknown resize rule {props['resize']!r} "
            f"(known: {', '.join(RESIZE_RULES)})"
        )
    aggregation = props.get("aggregation", "mean")
    if aggregation not in ("mean", "max"):
        raise ModelMetadataError(f"{source}: unknown aggregation {aggregation!r} (mean, max)")
    precision = props.get("precision", "fp32")  # files from before precisions were fp32
    if precision not in PRECISIONS:
        raise ModelMetadataError(
            f"{source}: unknown precision {precision!r} ({', '.join(PRECISIONS)})"
        )
    return ModelInfo(
        architecture=props["architecture"],
        input_size=size,
        resize=props["resize"],
        threshold=threshold,
        aggregation=aggregation,
        precision=precision,
        props=dict(props),
    )
