"""fp16 and int8 (static QDQ) copies of an fp32 export, judged against it on validation studies."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from bonexray.errors import BonexrayError, InvalidValueError
from bonexray.imaging import ImageError, load_view
from bonexray.metrics import auroc, json_safe, study_scores
from bonexray.modelmeta import INPUT_NAME, OUTPUT_PROB, build_metadata, parse_metadata
from bonexray.studies import Study, find_studies

if TYPE_CHECKING:
    from bonexray.export.onnx import Member

log = logging.getLogger(__name__)

AUROC_BOUND = 0.01  # largest |AUROC change| against fp32 that an export accepts
MIN_JUDGED_STUDIES = 200  # below this many validation studies the AUROC bound only warns
# Enforced at any study count, per precision: the least share of studies whose decision
# (at the stored threshold) matches fp32's, and the largest change of a study score.
# Measured on FracAtlas models (benchmarks/RESULTS.md): fp16 agrees on 100% of 640 studies
# with scores moved by at most 0.001; int8 on 99.2% of 643 and 97.7% of 640 (largest
# change 0.064). fp16 should be all but exact; int8 moves scores near the threshold.
GATES = {"fp16": (0.99, 0.02), "int8": (0.97, 0.10)}
MIN_AGREEMENT, MAX_SCORE_CHANGE = GATES["int8"]
CALIBRATION_IMAGES = 128
CALIBRATION_BATCH = 8
CALIBRATION_SEED = 0
# Convolutions, the head's products, ReLUs between quantized ops (the quantizer folds those
# into the preceding convolution's output range) and the concatenations that feed
# convolutions are quantized, and DenseNet's pre-activation BatchNorms become depthwise 1x1
# convolutions first (see _batchnorms_as_convs), so that a dense block runs end to end in
# uint8 (NHWC) with no fp32 detour between layers. The input's scaling, the sigmoid and an
# ensemble's stacking of member outputs stay fp32, so abnormal_prob keeps its full
# resolution (quantized, it would move in 1/255 steps and clip at the calibrated range).
INT8_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Concat")
# The head's products keep fp32 outputs: a quantized logit would be clipped to the range
# seen in calibration, so every view beyond it would get the same score.
FP32_OUTPUT_OPS = ("Gemm", "MatMul")
# fp16: the sigmoid stays fp32 too, on top of onnxruntime's own list of fragile ops.
FP16_FP32_OPS = ("Sigmoid",)


class PrecisionError(BonexrayError, ValueError):
    """A lower-precision model moves validation AUROC beyond the bound, or cannot be judged."""


@dataclass
class PrecisionResult:
    """What make_precision adds to the metadata, its judgement and any warnings."""

    metadata: dict[str, Any]
    judgement: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JudgingSet:
    """Decoded validation views: pixels [V,1,S,S], the study index of each, study labels."""

    pixels: np.ndarray
    owners: np.ndarray
    labels: np.ndarray
    studies: int
    failed_views: int
    source: str


# ---------------------------------------------------------------------------- data


def _labelled(studies: Sequence[Study]) -> list[Study]:
    return [s for s in studies if s.label is not None and s.views]


def member_splits(members: Sequence[Member]) -> tuple[list[Study], list[Study], str]:
    """The first member's training and validation studies, split as the trainer split them."""
    from bonexray.trainer.train import split_studies

    config = members[0].config
    data = config.get("data")
    if not data or not Path(str(data)).is_dir():
        raise PrecisionError(
            f"{members[0].path} was trained on {data!r}, which is not a folder here; pass "
            "--validation DIR (labelled studies) and, for int8, --calibration DIR"
        )
    if any(m.config.get("data") != data for m in members[1:]):
        log.warning("ensemble members were trained on different data; int8 calibration "
                    "views come from the first member's, %s", data)
    test_dir = config.get("test")
    test = _labelled(find_studies(str(test_dir))) \
        if test_dir and Path(str(test_dir)).is_dir() else []
    found = find_studies(str(data))
    split = split_studies(found, int(config.get("seed") or 0), test)
    recorded = (members[0].ckpt.get("split") or {}).get("valid")
    if recorded is None:
        return split.train, split.valid, str(data)
    root = Path(str(data))
    wanted = {p if Path(p).is_absolute() else str((root / p).resolve()) for p in recorded}
    valid = [s for s in found if s.key in wanted and s.label is not None]
    if len(valid) != len(wanted):
        log.warning("%d of the %d validation studies the checkpoint records are not under "
                    "%s now", len(wanted) - len(valid), len(wanted), data)
    return split.train, valid, str(data)


def _validated_on(member: Member) -> tuple[Any, ...]:
    """What a member's validation studies were: its recorded list, else how they were made."""
    config = member.config
    recorded = (member.ckpt.get("split") or {}).get("valid")
    if recorded is not None:
        return (config.get("data"), tuple(recorded))
    return (config.get("data"), config.get("seed"), config.get("test"))


def validation_studies(members: Sequence[Member],
                       validation: str | None) -> tuple[list[Study], str]:
    """Labelled studies to judge a precision on: --validation DIR (its valid/ split when it
    has one), else the checkpoint's own validation split. Members of an ensemble validated
    on different studies have no shared split that none of them trained on: --validation
    is then required."""
    if validation is None:
        if len({_validated_on(m) for m in members}) > 1:
            raise PrecisionError(
                "the ensemble's members were validated on different studies (other data or "
                "seeds), so one member may have trained on another's validation studies; pass "
                "--validation DIR with studies none of them trained on")
        _, valid, data = member_splits(members)
        return _labelled(valid), f"validation split of {data}"
    found = _labelled(find_studies(validation))
    valid = [s for s in found if s.split == "valid"]
    return (valid, f"valid/ under {validation}") if valid else (found, validation)


def calibration_views(members: Sequence[Member], calibration: str | None) -> tuple[list[str], str]:
    """View files to calibrate int8 on: every view under --calibration DIR, else the views of
    the checkpoint's training split."""
    if calibration is not None:
        return [v for s in find_studies(calibration) for v in s.views], calibration
    train, _, data = member_splits(members)
    return [v for s in train for v in s.views], f"training split of {data}"


def _decode_all(paths: Sequence[str], size: int, resize: str) -> list[np.ndarray | None]:
    def one(path: str) -> np.ndarray | None:
        try:
            return load_view(path, size, resize)
        except ImageError as exc:
            log.warning("view %s left out: %s", path, exc)
            return None

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool:
        return list(pool.map(one, paths))


def load_calibration(views: Sequence[str], *, size: int, resize: str, count: int,
                     source: str, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """uint8 [M,1,S,S]: up to `count` views drawn at random (seeded), decoded as the worker
    decodes them."""
    if not views:
        raise PrecisionError(f"no view files to calibrate int8 on in {source}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(views), size=min(count, len(views)), replace=False))
    images = [p for p in _decode_all([views[i] for i in chosen], size, resize) if p is not None]
    if not images:
        raise PrecisionError(f"none of the {len(chosen)} calibration views in {source} decodes")
    return np.stack(images)[:, None]


def parity_views(members: Sequence[Member], *, validation: str | None,
                 calibration: str | None, count: int) -> tuple[np.ndarray | None, str]:
    """Up to `count` real views (uint8 [V,1,S,S], drawn seeded) for the fp32 parity gate:
    from the validation studies (--validation, else the checkpoint's own split), else from
    --calibration; (None, why) when none can be had."""
    first = members[0]
    try:
        studies, source = validation_studies(members, validation)
        views = [v for s in studies for v in s.views]
    except PrecisionError as exc:
        if calibration is None:
            return None, str(exc)
        views, source = [v for s in find_studies(calibration) for v in s.views], calibration
    if not views:
        return None, f"no view files in {source}"
    try:
        return load_calibration(views, size=first.image_size, resize=first.resize,
                                count=count, source=source), source
    except PrecisionError as exc:
        return None, str(exc)


def load_judging_set(studies: Sequence[Study], *, size: int, resize: str,
                     source: str) -> JudgingSet:
    """Decode every view of the studies once; both models are then run on the same pixels."""
    if not studies:
        raise PrecisionError(f"no labelled studies with views to judge on in {source}")
    flat = [(i, v) for i, s in enumerate(studies) for v in s.views]
    decoded = _decode_all([v for _, v in flat], size, resize)
    keep = [k for k, p in enumerate(decoded) if p is not None]
    if not keep:
        raise PrecisionError(f"no view of the {len(studies)} studies in {source} decodes")
    owners = np.array([flat[k][0] for k in keep])
    scored = sorted(set(owners.tolist()))
    remap = {old: new for new, old in enumerate(scored)}
    return JudgingSet(
        pixels=np.stack([decoded[k] for k in keep])[:, None],  # type: ignore[misc]
        owners=np.array([remap[o] for o in owners.tolist()]),
        labels=np.array([int(studies[i].label or 0) for i in scored]),
        studies=len(scored), failed_views=len(flat) - len(keep), source=source,
    )


# ---------------------------------------------------------------------------- conversion


def set_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Replace a model file's metadata_props, check the model and save it as one file."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path), save_as_external_data=False)


def convert_fp16(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """fp16 weights and activations; the uint8 input and float32 outputs are kept."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_FP32_OPS})
    half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                    op_block_list=blocked)
    _sort_nodes(half.graph)  # the converter appends the Casts it adds at the end
    onnx.save(half, str(dst), save_as_external_data=False)
    return {"keep_io_types": True, "fp32_ops": list(FP16_FP32_OPS)}


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order a graph's nodes so that every input is made before it is used (onnx requires
    it), keeping the original order where it already holds."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near node "
                             f"{pending[0].name!r}")
        for node in ready:
            known.update(node.output)
        ordered.extend(ready)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: initializers and Constant nodes' values."""
    found = {init.name: init for init in graph.initializer}
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            found[node.output[0]] = value
    return found


def _batchnorms_as_convs(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each inference BatchNormalization over a 4-D tensor left after the
    pre-processing folded those that follow a convolution (DenseNet's norm1 in front of
    every layer's ReLU, the transitions' and norm5 see a concatenation) as the equivalent
    depthwise 1x1 Conv: y = x * a + c per channel, a = gamma / sqrt(var + eps),
    c = beta - mean * a. As a Conv it is quantized like the others (one int8 weight per
    channel, exact unless the quantizer widens its scale to fit the int32 bias), so the
    concatenation, the BatchNorm, the ReLU and the next convolution all stay in uint8;
    as a BatchNorm it forced a dequantize, an fp32 pass and a requantize (plus NHWC <-> NCHW
    transposes) in front of every layer. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*graph.value_info, *graph.input, *graph.output]
             if v.type.tensor_type.HasField("shape")}
    constants = _constants(graph)
    replaced: set[str] = set()
    rewritten = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or len(node.output) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0) or ranks.get(node.input[0]) != 4 \
                or not all(name in constants for name in node.input[1:5]):
            log.debug("int8: BatchNorm %s left as it is (input rank %s, training mode or "
                      "non-constant parameters)", node.name, ranks.get(node.input[0]))
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(constants[name]).astype(np.float64)
                                  for name in node.input[1:5])
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        channels = scale.shape[0]
        weight, bias = f"{node.output[0]}_as_conv_w", f"{node.output[0]}_as_conv_b"
        graph.initializer.extend([
            numpy_helper.from_array(scale.astype(np.float32).reshape(channels, 1, 1, 1), weight),
            numpy_helper.from_array(shift.astype(np.float32), bias),
        ])
        replaced.update(node.input[1:5])
        conv = helper.make_node("Conv", [node.input[0], weight, bias], list(node.output),
                                name=f"{node.name or node.output[0]}_as_conv",
                                group=channels, kernel_shape=[1, 1])
        graph.node[index].CopyFrom(conv)
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    used |= {v.name for v in [*graph.input, *graph.output]}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(init)  # the rewritten BatchNorms' own parameters
    return rewritten


def _concats_kept_fp32(graph: onnx.GraphProto) -> list[str]:
    """Names of the Concat nodes that do not only feed convolutions (naming unnamed Concats,
    with names not yet in the graph): an ensemble stacks its members' probabilities and
    CAMs with a Concat, and those must not pass through uint8."""
    names = {node.name for node in graph.node}
    for index, node in enumerate(graph.node):
        if node.op_type == "Concat" and not node.name:
            name = f"bonexray_concat_{index}"
            while name in names:
                name += "_"
            node.name = name
            names.add(name)
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in graph.output}
    return [node.name for node in graph.node if node.op_type == "Concat" and (
        node.output[0] in outputs
        or set(consumers.get(node.output[0], [])) != {"Conv"})]


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array of uint8 images."""

    def __init__(self, images: np.ndarray, batch: int) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._batches, None)
        return None if chunk is None else {INPUT_NAME: chunk}


def convert_int8(src: str | Path, dst: str | Path, *, images: np.ndarray,
                 batch: int = CALIBRATION_BATCH) -> dict[str, Any]:
    """Static QDQ quantization: int8 per-channel weights, uint8 activations whose ranges
    (MinMax) come from `images`. Dynamic quantization is 4x slower for CNNs: never used.

    Weights use 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2 only: AMD Zen 2 and
    3, Intel before Cascade Lake, like the machine of benchmarks/RESULTS.md) onnxruntime's
    uint8 x int8 kernels add pairs of products in saturating int16, and full-range weights
    against activations near 255 overflow it (an error of 18% of the largest output in
    tests/export/test_precision.py). The model must be right on every worker, not only on
    the machine that exported it."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="bonexray-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph folding (BatchNorm into the preceding Conv) first, as
        # onnxruntime recommends, so that the folded convolutions are what gets quantized.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        proto = onnx.load(str(prepared))
        as_convs = _batchnorms_as_convs(proto)
        kept_fp32 = _concats_kept_fp32(proto.graph)
        onnx.save(proto, str(prepared), save_as_external_data=False)
        quantize_static(
            str(prepared), str(dst), _Batches(images, batch),  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(INT8_OPS), nodes_to_exclude=kept_fp32,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": list(FP32_OUTPUT_OPS)},
        )
    return {"format": "QDQ", "per_channel": True, "weights": "int8", "reduce_range": True,
            "activations": "uint8",
            "calibration_method": "MinMax", "ops": list(INT8_OPS),
            "fp32_outputs": list(FP32_OUTPUT_OPS),
            "batchnorms_as_convs": as_convs}


# ---------------------------------------------------------------------------- judging


def _session(path: str | Path, providers: Sequence[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def score_studies(path: str | Path, judged: JudgingSet, *, aggregation: str,
                  providers: Sequence[str], batch: int = 32) -> np.ndarray:
    """Study scores [studies] of a model on the judging set, aggregated as the worker does."""
    session = _session(path, providers)
    probs = np.concatenate([
        session.run([OUTPUT_PROB], {INPUT_NAME: judged.pixels[i : i + batch]})[0]
        for i in range(0, len(judged.pixels), batch)
    ])
    scores = study_scores(judged.owners.tolist(), probs, how=aggregation)
    return np.array([scores[i] for i in range(judged.studies)], dtype=np.float64)


def judge_precision(*, precision: str, labels: np.ndarray, reference: np.ndarray,
                    candidate: np.ndarray, threshold: float, bound: float = AUROC_BOUND,
                    min_studies: int = MIN_JUDGED_STUDIES,
                    min_agreement: float = MIN_AGREEMENT,
                    max_score_change: float = MAX_SCORE_CHANGE,
                    ) -> tuple[dict[str, Any], list[str]]:
    """Compare study scores of a lower precision with fp32's. PrecisionError when the
    decisions at `threshold` agree on fewer than `min_agreement` of the studies or a study
    score moves by more than `max_score_change` (whatever the study count), or when
    |AUROC change| > bound on at least min_studies studies (on fewer, a warning)."""
    n = int(len(labels))
    ref_auc, cand_auc = auroc(labels, reference), auroc(labels, candidate)
    delta = cand_auc - ref_auc
    agreement = float(np.mean((reference >= threshold) == (candidate >= threshold)))
    largest = float(np.max(np.abs(candidate - reference)))
    flipped = int(np.sum((reference >= threshold) != (candidate >= threshold)))
    judgement = json_safe({
        "precision": precision, "reference": "fp32", "studies": n,
        "auroc_fp32": ref_auc, "auroc": cand_auc, "auroc_delta": delta,
        "decision_agreement": agreement, "decisions_flipped": flipped, "threshold": threshold,
        "max_abs_score_diff": largest,
        "bound": bound, "min_studies": min_studies, "enforced": n >= min_studies,
        "min_agreement": min_agreement, "max_score_change": max_score_change,
    })
    refused = []
    if not agreement >= min_agreement:
        refused.append(f"decisions at threshold {threshold:.3g} agree on {agreement:.1%} of "
                       f"{n} studies (< {min_agreement:.1%})")
    if not largest <= max_score_change:  # NaN is refused too
        refused.append(f"a study score moves by {largest:.3g} (> {max_score_change:g})")
    if refused:
        raise PrecisionError(f"{precision} against fp32 on validation studies: "
                             f"{'; '.join(refused)}; not written")
    warnings: list[str] = []
    if math.isnan(delta):
        warnings.append(f"{precision}: AUROC undefined on {n} validation studies (one class "
                        f"only); decisions agree on {agreement:.1%} of studies")
    elif abs(delta) > bound and n >= min_studies:
        raise PrecisionError(
            f"{precision} changes validation AUROC by {delta:+.4f} ({ref_auc:.4f} -> "
            f"{cand_auc:.4f}) on {n} studies, beyond the bound of {bound}; decisions agree "
            f"on {agreement:.1%}; not written"
        )
    elif n < min_studies:
        warnings.append(f"{precision}: only {n} validation studies (< {min_studies}); AUROC "
                        f"change {delta:+.4f} reported, not enforced")
    return judgement, warnings


@dataclass(frozen=True)
class PrecisionData:
    """What a lower precision is made and judged with, read before any export work."""

    precision: str
    judged: JudgingSet
    threshold: float
    calibration: np.ndarray | None = None
    calibration_source: str | None = None
    min_agreement: float = MIN_AGREEMENT
    max_score_change: float = MAX_SCORE_CHANGE
    aggregation: str = "mean"  # how workers combine a study's views (the model's metadata)


def prepare_precision(precision: str, members: Sequence[Member], *, calibration: str | None,
                      validation: str | None,
                      calibration_images: int | None = None,
                      min_agreement: float | None = None,
                      max_score_change: float | None = None,
                      aggregation: str = "mean") -> PrecisionData:
    """Decode the validation studies (and, for int8, calibration views) first: an export
    that cannot be judged stops before the slow part."""
    if precision not in GATES:
        raise InvalidValueError(f"no lower precision called {precision!r} (fp16, int8)")
    if min_agreement is None:
        min_agreement = GATES[precision][0]
    if max_score_change is None:
        max_score_change = GATES[precision][1]
    first = members[0]
    size, resize = first.image_size, first.resize
    studies, source = validation_studies(members, validation)
    judged = load_judging_set(studies, size=size, resize=resize, source=source)
    threshold = float(np.mean([m.threshold for m in members]))
    if precision == "fp16":
        return PrecisionData(precision, judged, threshold, min_agreement=min_agreement,
                             max_score_change=max_score_change, aggregation=aggregation)
    views, calib_source = calibration_views(members, calibration)
    images = load_calibration(views, size=size, resize=resize,
                              count=calibration_images or CALIBRATION_IMAGES,
                              source=calib_source)
    return PrecisionData(precision, judged, threshold, images, calib_source,
                         min_agreement=min_agreement, max_score_change=max_score_change,
                         aggregation=aggregation)


def make_precision(fp32_path: str | Path, dst: str | Path,
                   data: PrecisionData) -> PrecisionResult:
    """Write the fp16 or int8 copy of the fp32 model at `dst` and judge it on the
    validation studies (PrecisionError when it fails the bound)."""
    from bonexray.pipeline.inference import CPU, requested_providers

    precision, judged = data.precision, data.judged
    extra: dict[str, Any] = {"precision": precision}
    if data.calibration is None:
        extra["fp16"] = convert_fp16(fp32_path, dst)
        from bonexray.settings import get_settings

        providers = requested_providers(get_settings())  # CUDA where a GPU is, as a worker
    else:
        log.info("int8: calibrating on %d views from %s", len(data.calibration),
                 data.calibration_source)
        extra["quantization"] = convert_int8(fp32_path, dst, images=data.calibration)
        extra["calibration"] = {"source": data.calibration_source,
                                "images": int(len(data.calibration)), "seed": CALIBRATION_SEED}
        providers = [CPU]  # int8 QDQ is meant for CPU workers
    log.info("%s: judging against fp32 on %d views of %d studies (%s), %s aggregation, "
             "asking for %s", precision, len(judged.pixels), judged.studies, judged.source,
             data.aggregation, providers[0])
    reference = score_studies(fp32_path, judged, aggregation=data.aggregation,
                              providers=providers)
    candidate = score_studies(dst, judged, aggregation=data.aggregation, providers=providers)
    # What onnxruntime ran on, not what was asked for: it falls back to the CPU silently.
    provider = _session(dst, providers).get_providers()[0]
    judgement, warnings = judge_precision(precision=precision, labels=judged.labels,
                                          reference=reference, candidate=candidate,
                                          threshold=data.threshold,
                                          min_agreement=data.min_agreement,
                                          max_score_change=data.max_score_change)
    judgement.update(source=judged.source, views=int(len(judged.pixels)),
                     failed_views=judged.failed_views, provider=provider)
    for line in warnings:
        log.warning("%s", line)
    log.info("%s: validation AUROC %s -> %s (%s) on %d studies; decisions agree on %.1f%%",
             precision, judgement["auroc_fp32"], judgement["auroc"], judgement["auroc_delta"],
             judged.studies, 100 * judgement["decision_agreement"])
    extra["precision_check"] = judgement
    extra["validated_on"] = {"provider": provider, "check": f"{precision} vs fp32 on "
                             f"{judged.studies} validation studies", "onnxruntime": ort.__version__}
    return PrecisionResult(metadata=extra, judgement=judgement, warnings=warnings)


def quantize_int8(src: str | Path, dst: str | Path, *, calibration_dir: str,
                  calibration_images: int = CALIBRATION_IMAGES) -> dict[str, Any]:
    """int8 copy of an exported fp32 bonexray model, calibrated on the views under
    `calibration_dir`, with the source's metadata. Not judged on validation studies (that
    is `bonexray export --precision int8`): for benchmarks and experiments."""
    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    info = parse_metadata(props, source=f"model {src}")
    if info.precision != "fp32":
        raise PrecisionError(f"model {src} is {info.precision}; int8 is made from fp32")
    views = [v for s in find_studies(calibration_dir) for v in s.views]
    images = load_calibration(views, size=info.input_size, resize=info.resize,
                              count=calibration_images, source=calibration_dir)
    quantization = convert_int8(src, dst, images=images)
    metadata = build_metadata(**{
        **props, "architecture": info.architecture, "input_size": info.input_size,
        "resize": info.resize, "threshold": info.threshold, "aggregation": info.aggregation,
        "precision": "int8", "quantization": quantization,
        "calibration": {"source": calibration_dir, "images": int(len(images)),
                        "seed": CALIBRATION_SEED},
        "onnxruntime_version": ort.__version__,
    })
    set_metadata(dst, metadata)
    return {"path": str(dst), "calibration_images": int(len(images)), "metadata": metadata}
