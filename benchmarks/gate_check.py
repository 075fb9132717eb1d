"""The export gates on a trained checkpoint and real labelled studies: fp32 parity, what
a graph with its input-scaling constant x1.5 does to scores (on noise and on the views)
and whether the parity gate refuses it, and the fp16 and int8 judgements.

    python benchmarks/gate_check.py CKPT VALID_DIR OUT_DIR

Writes fp32/fp16/int8/mutated .onnx files under OUT_DIR; prints one JSON object.
"""

import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bonexray.export.onnx import (
    ParityError,
    ProbabilityNet,
    check_parity,
    export_model,
    load_checkpoint_model,
)
from bonexray.export.quantize import load_calibration
from bonexray.studies import find_studies

SCALE = 1.0 / (255.0 * np.array([0.229, 0.224, 0.225]))  # the graph's input scaling
JUDGED = ("studies", "auroc_fp32", "auroc", "auroc_delta", "decision_agreement",
          "decisions_flipped", "max_abs_score_diff", "provider")


def mutate_scale(src: str, dst: str, factor: float) -> None:
    """Copy an exported graph with its input-scaling constant multiplied by `factor`."""
    model = onnx.load(src)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                value = numpy_helper.to_array(attr.t)
                if value.size == 3 and np.allclose(value.reshape(-1), SCALE, rtol=1e-5):
                    attr.t.CopyFrom(numpy_helper.from_array(value * factor, attr.t.name))
    onnx.save(model, dst)


def run(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [session.run(["abnormal_prob", "abnormal_logit"], {"pixels": pixels[i:i + 64]})
             for i in range(0, len(pixels), 64)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    ckpt, valid, out = sys.argv[1], sys.argv[2], sys.argv[3]
    report: dict[str, object] = {}
    started = time.monotonic()
    result = export_model(ckpt, f"{out}/fp32.onnx", validation=valid)
    report["fp32_export_s"] = round(time.monotonic() - started, 1)
    report["fp32_parity"] = result["parity"]
    net, meta = load_checkpoint_model(ckpt)
    size, resize = int(meta["image_size"]), str(meta.get("resize", "letterbox"))
    mutate_scale(f"{out}/fp32.onnx", f"{out}/mutated.onnx", 1.5)
    views = load_calibration([v for s in find_studies(valid) for v in s.views], size=size,
                             resize=resize, count=10**6, source=valid)
    good = ort.InferenceSession(f"{out}/fp32.onnx", providers=["CPUExecutionProvider"])
    bad = ort.InferenceSession(f"{out}/mutated.onnx", providers=["CPUExecutionProvider"])
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 1, size, size), dtype=np.uint8)
    (p_good, l_good), (p_bad, l_bad) = run(good, noise), run(bad, noise)
    report["noise_logits"] = [round(float(l_good.min()), 2), round(float(l_good.max()), 2)]
    report["noise_prob_diff_mutated"] = float(np.abs(p_good - p_bad).max())
    report["noise_logit_diff_mutated"] = float(np.abs(l_good - l_bad).max())
    (p_good, _), (p_bad, _) = run(good, views), run(bad, views)
    threshold = float(meta["threshold"])
    report["views"] = len(views)
    report["views_prob_diff_mutated"] = float(np.abs(p_good - p_bad).max())
    report["views_decisions_flipped"] = int(((p_good >= threshold) != (p_bad >= threshold)).sum())
    try:
        check_parity(ProbabilityNet(net).eval(), f"{out}/mutated.onnx", image_size=size,
                     atol=1e-4, batches=(1, 7, 32), views=views[:40])
        report["gate_on_mutated"] = "passed (the gate is vacuous)"
    except ParityError as exc:
        report["gate_on_mutated"] = "refused: " + str(exc)[:300]
    for precision in ("fp16", "int8"):
        started = time.monotonic()
        try:
            result = export_model(ckpt, f"{out}/{precision}.onnx", precision=precision,
                                  validation=valid, parity_batches=(1,))
            report[precision] = {k: result["precision_check"][k] for k in JUDGED}
        except Exception as exc:  # a refusal is a figure here
            report[precision] = "refused: " + str(exc)[:400]
        report[f"{precision}_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
