"""A cheap but real bonexray model (mean intensity -> probability), built without torch."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from bonexray.modelmeta import INPUT_NAME, OUTPUT_PROB, build_metadata

ARCHITECTURE = "mean-intensity"
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime this project supports
STEEPNESS = 10.0


def write_cheap_model(path: str | Path, *, image_size: int = 64, threshold: float = 0.5) -> str:
    """Write an ONNX model with the bonexray contract: pixels uint8 [N,1,S,S] ->
    abnormal_prob float32 [N] = sigmoid(10 * (mean(pixels) / 255 - 0.5)). Returns the path."""
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "inv255"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "k"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_PROB]),
    ]
    consts = [
        helper.make_tensor("inv255", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("k", TensorProto.FLOAT, [], [STEEPNESS]),
    ]
    graph = helper.make_graph(
        nodes, "bonexray_mean_intensity",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                       ["N", 1, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT_PROB, TensorProto.FLOAT, ["N"])],
        initializer=consts,
    )
    model = helper.make_model(graph, producer_name="bonexray",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    metadata = build_metadata(
        architecture=ARCHITECTURE, input_size=image_size, resize="letterbox",
        threshold=threshold,
        training={"note": "not trained: sigmoid of mean intensity, for tests and benchmarks"},
        metrics={}, exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        onnx_version=onnx.__version__,
    )
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return str(out)
