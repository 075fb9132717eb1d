"""Export on a tiny trained model: CAM, fp16, int8 with calibration, ensembles, the AUROC gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from bonexray.cli import cli
from bonexray.export.onnx import EnsembleError, export_model, load_checkpoint_model
from bonexray.export.quantize import (
    AUROC_BOUND,
    MIN_JUDGED_STUDIES,
    PrecisionError,
    _batchnorms_as_convs,
    convert_int8,
    judge_precision,
    quantize_int8,
)
from bonexray.metrics import auroc
from bonexray.modelmeta import INPUT_NAME, OUTPUT_CAM, OUTPUT_LOGIT, OUTPUT_PROB, parse_metadata
from bonexray.pipeline.inference import Classifier
from bonexray.settings import Settings
from bonexray.trainer.network import BoneXRayNet
from tests.export.conftest import QUADRANTS, SIZE, draw_sign_view


def session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def props(path: str | Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def fresh_views(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n abnormal views (uint8 [n,1,S,S]) not seen in training, and their sign quadrants."""
    rng = np.random.default_rng(seed)
    quadrants = rng.integers(0, QUADRANTS, size=n)
    return np.stack([draw_sign_view(rng, int(q)) for q in quadrants])[:, None], quadrants


def write_checkpoint(path: Path, *, image_size: int, data: str, seed: int = 0) -> Path:
    """A checkpoint as train() writes it (untrained weights), with a deeper head."""
    torch.manual_seed(seed)
    model = BoneXRayNet(head=(8,), batch_norm=True, dropout=0.2).eval()
    torch.save({
        "format": 1, "model": model.state_dict(), "epoch": 1,
        "config": {"data": data, "seed": 0, "image_size": image_size},
        "architecture": "densenet169", "image_size": image_size, "resize": "letterbox",
        "threshold": 0.5, "metrics": {"auroc": 0.5},
        "head": {"layers": [8], "dropout": 0.2, "batch_norm": True, "init": "default"},
    }, path)
    return path


def test_cam_has_the_map_shape_and_highlights_the_sign(trained_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "cam.onnx"
    result = export_model(str(trained_checkpoint), str(out), cam=True)
    # The default gate: noise and the checkpoint's own validation views, batches 1, 7, 32.
    assert [(f["input"], f["batch"]) for f in result["parity"]] == [
        ("noise", 1), ("noise", 7), ("noise", 32), ("views", 1), ("views", 7), ("views", 32)]
    assert all(f["cam_max_abs_diff"] <= 1e-3 for f in result["parity"])
    info = parse_metadata(props(out))
    assert info.json_prop("outputs") == [OUTPUT_PROB, OUTPUT_LOGIT, OUTPUT_CAM]
    assert info.json_prop("cam")["shape"] == [2, 2]
    assert info.json_prop("cam")["method"].startswith("CAM: the linear head")
    assert "40 views of validation split of" in info.json_prop("parity")["inputs"]
    assert info.json_prop("normalization")["std"] == [0.229, 0.224, 0.225]

    sess = session(out)
    assert [o.name for o in sess.get_outputs()] == [OUTPUT_PROB, OUTPUT_LOGIT, OUTPUT_CAM]
    pixels, quadrants = fresh_views(32, seed=99)
    prob, cam = sess.run([OUTPUT_PROB, OUTPUT_CAM], {INPUT_NAME: pixels})
    assert cam.shape == (32, 2, 2) and cam.dtype == np.float32
    # A linear head: the map's mean is the logit, exactly MURA's CAM.
    np.testing.assert_allclose(1 / (1 + np.exp(-cam.mean(axis=(1, 2)))), prob, atol=1e-5)
    flat = cam.reshape(len(cam), -1)
    at_sign = flat[np.arange(len(flat)), quadrants]
    background = (flat.sum(axis=1) - at_sign) / (QUADRANTS - 1)
    assert (at_sign > background).mean() >= 0.9
    # Cell by cell: a cell is higher when the sign lies in it than when it lies elsewhere.
    for q in range(QUADRANTS):
        assert flat[quadrants == q, q].mean() > flat[quadrants != q, q].mean()


def test_fp16_keeps_the_contract_and_agrees_with_fp32(trained_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "half.onnx"
    result = export_model(str(trained_checkpoint), str(out), precision="fp16",
                          parity_batches=(1,))
    info = parse_metadata(props(out))
    assert info.precision == "fp16"
    check = info.json_prop("precision_check")
    assert check == result["precision_check"]
    assert check["studies"] == 40 and check["reference"] == "fp32" and not check["enforced"]
    assert check["decision_agreement"] >= 0.95
    assert abs(check["auroc_delta"]) <= AUROC_BOUND
    assert any("only 40 validation studies" in w for w in result["warnings"])
    graph = onnx.load(str(out)).graph
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)

    clf = Classifier(out, settings=Settings())  # what a worker does with it
    assert clf.info.precision == "fp16"
    pixels, _ = fresh_views(3, seed=5)
    probs = clf.predict(pixels)
    assert probs.dtype == np.float32 and probs.shape == (3,)
    (want,) = session(out).run([OUTPUT_PROB], {INPUT_NAME: pixels})
    np.testing.assert_allclose(probs, want)


def test_int8_is_static_qdq_calibrated_on_training_views(trained_checkpoint: Path,
                                                         sign_data: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    result = export_model(str(trained_checkpoint), str(out), precision="int8",
                          parity_batches=(1,), calibration_images=16)
    info = parse_metadata(props(out))
    assert info.precision == "int8"
    calibration = info.json_prop("calibration")
    assert calibration["source"] == f"training split of {sign_data.resolve()}"
    assert calibration["images"] == 16
    quantization = info.json_prop("quantization")
    assert quantization["format"] == "QDQ" and quantization["reduce_range"] is True
    graph = onnx.load(str(out)).graph
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) > 100  # 7-bit weights: no int16 saturation on AVX2 CPUs
    assert all(w.min() >= -64 and w.max() <= 64 for w in weights)
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    # The sigmoid is not quantized: abnormal_prob is not stuck on a 1/255 grid.
    (last,) = [n for n in graph.node if OUTPUT_PROB in n.output]
    assert last.op_type == "Sigmoid"
    check = result["precision_check"]
    assert check["provider"] == "CPUExecutionProvider" and check["studies"] == 40
    assert check["decision_agreement"] >= 0.9
    assert check["auroc"] is not None and abs(check["auroc_delta"]) <= AUROC_BOUND
    assert all(f["max_abs_diff"] < 0.1 for f in result["parity"])  # reported, against torch

    net, _ = load_checkpoint_model(trained_checkpoint)
    pixels, _ = fresh_views(7, seed=6)
    (p8,) = session(out).run([OUTPUT_PROB], {INPUT_NAME: pixels})
    with torch.no_grad():
        p32 = torch.sigmoid(net(torch.from_numpy(pixels))).numpy()
    assert p8.dtype == np.float32 and p8.shape == (7,)
    assert np.abs(p8 - p32).max() < 0.1


def optimized_ops(path: str | Path, tmp_path: Path) -> list[str]:
    """The node types of the graph onnxruntime's CPU provider actually runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_int8_dense_blocks_run_in_uint8(trained_checkpoint: Path, tmp_path: Path) -> None:
    """No fp32 detour between layers: onnxruntime fuses the whole feature extractor into
    QLinear kernels (the BatchNorms rewritten as depthwise convolutions, the concatenations
    quantized), instead of a dequantize - BatchNorm - quantize - transpose round trip in
    front of every layer."""
    out = tmp_path / "int8.onnx"
    export_model(str(trained_checkpoint), str(out), precision="int8", parity_batches=(1,),
                 calibration_images=16)
    quantization = parse_metadata(props(out)).json_prop("quantization")
    assert quantization["batchnorms_as_convs"] == 86  # 82 layers, 3 transitions, norm5
    ops = optimized_ops(out, tmp_path)
    assert "BatchNormalization" not in ops
    assert ops.count("QLinearConcat") == 86 and "Concat" not in ops
    assert ops.count("QLinearConv") == 168 + 86 and "Conv" not in ops
    assert ops.count("DequantizeLinear") <= 4 and ops.count("Transpose") <= 4


def test_batchnorm_rewrite_keeps_the_outputs(tmp_path: Path) -> None:
    """Every 4-D inference BatchNorm that is left becomes a depthwise 1x1 Conv computing the
    same function (checked with random statistics); the head's 1-D BatchNorm is left alone."""
    path = write_checkpoint(tmp_path / "net.pt", image_size=SIZE, data=str(tmp_path))
    checkpoint = torch.load(path, weights_only=False)
    rng = torch.Generator().manual_seed(3)
    for key, value in checkpoint["model"].items():
        if key.endswith(("running_mean", "bias")) and value.dtype == torch.float32:
            checkpoint["model"][key] = torch.randn(value.shape, generator=rng) * 0.2
        elif key.endswith(("running_var", "weight")) and value.dim() == 1:
            checkpoint["model"][key] = torch.rand(value.shape, generator=rng) + 0.5
    for key in [k for k in checkpoint["model"] if k.endswith("running_var")]:
        # Channels whose variance is as small as epsilon, with gamma to match: their scale is
        # gamma / sqrt(var + eps) = 0.71 where dropping epsilon would make it 1.
        checkpoint["model"][key][::16] = 1e-5
        checkpoint["model"][key.replace("running_var", "weight")][::16] = 1e-5 ** 0.5
    torch.save(checkpoint, path)
    fp32 = tmp_path / "fp32.onnx"
    export_model(str(path), str(fp32), parity_batches=(1,))
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(fp32)))
    before = [n.op_type for n in proto.graph.node].count("BatchNormalization")
    assert _batchnorms_as_convs(proto) == before - 1  # all but the head's BatchNorm1d
    (kept,) = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert "classifier" in kept.name
    onnx.checker.check_model(proto)
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(proto, str(rewritten))
    pixels, _ = fresh_views(5, seed=9)
    (want,) = session(fp32).run([OUTPUT_PROB], {INPUT_NAME: pixels})
    (got,) = session(rewritten).run([OUTPUT_PROB], {INPUT_NAME: pixels})
    assert np.abs(want - 0.5).max() > 1e-3  # the random statistics reach the output
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_int8_stays_close_on_hard_cases(tmp_path: Path) -> None:
    """Two traps of int8 on the CPU. A trained BatchNorm can scale a channel by ~0 and shift
    it by a lot: as a depthwise conv its weight scale is then tiny and the int32 bias
    (shift / (input scale x weight scale)) would overflow unless the quantizer widens that
    scale. And activations near 255 against full-range int8 weights overflow the saturating
    int16 pair sums of onnxruntime's AVX2 kernels (without reduce_range: error 1.45 of 8.3
    on a machine without VNNI)."""
    from onnx import TensorProto, helper, numpy_helper

    channels = 8
    gamma = np.linspace(0.5, 2.0, channels).astype(np.float32)
    gamma[3] = 1e-9  # the dead channel
    beta = np.linspace(-0.5, 1.5, channels).astype(np.float32)
    beta[3] = 2.0
    rng = np.random.default_rng(0)
    conv_w = rng.normal(0, 0.3, (4, channels, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (gamma, "g"), (beta, "b"), (np.zeros(channels, np.float32), "m"),
        (np.ones(channels, np.float32), "v"), (conv_w, "w")]]
    graph = helper.make_graph([
        helper.make_node("Concat", ["pixels", "pixels"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["act"]),
        helper.make_node("Conv", ["act", "w"], ["out"]),
    ], "deadchannel", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                     ["n", channels // 2, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(fp32))
    images = rng.uniform(0, 3, (32, channels // 2, 6, 6)).astype(np.float32)
    assert convert_int8(fp32, int8, images=images)["batchnorms_as_convs"] == 1
    (want,) = session(fp32).run(["out"], {INPUT_NAME: images[:4]})
    (got,) = session(int8).run(["out"], {INPUT_NAME: images[:4]})
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_int8_from_the_cli_with_a_calibration_folder(trained_checkpoint: Path, sign_data: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    calib = sign_data / "valid"
    result = CliRunner().invoke(cli, [
        "export", str(trained_checkpoint), "--out", str(out), "--precision", "int8",
        "--calibration", str(calib), "--calibration-images", "10",
    ])
    assert result.exit_code == 0, result.output
    assert "int8 vs fp32 on 40 validation studies" in result.stdout
    assert "not enforced on so few" in result.stdout
    assert "at batch 1, 7, 32" in result.stdout  # the default parity batches
    info = parse_metadata(props(out))
    assert info.precision == "int8"
    assert info.json_prop("calibration") == {"source": str(calib), "images": 10, "seed": 0}


def test_quantize_int8_of_an_exported_file(trained_checkpoint: Path, sign_data: Path,
                                           tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.onnx"
    export_model(str(trained_checkpoint), str(fp32), parity_batches=(1,))
    done = quantize_int8(fp32, tmp_path / "q.onnx", calibration_dir=str(sign_data / "train"),
                         calibration_images=8)
    info = parse_metadata(props(done["path"]))
    assert info.precision == "int8" and info.input_size == SIZE
    assert info.json_prop("calibration")["images"] == 8
    assert info.json_prop("training") == parse_metadata(props(fp32)).json_prop("training")
    with pytest.raises(PrecisionError, match="is int8; int8 is made from fp32"):
        quantize_int8(done["path"], tmp_path / "qq.onnx", calibration_dir=str(sign_data))


def test_ensemble_averages_member_probabilities(trained_checkpoint: Path,
                                                tmp_path: Path) -> None:
    # The second member has a deeper head (Linear, BatchNorm1d, ReLU, Dropout, Linear): the
    # parity gate compares its CAM per position with torch's as well.
    other = write_checkpoint(tmp_path / "other.pt", image_size=SIZE, data=str(tmp_path))
    out = tmp_path / "ensemble.onnx"
    result = export_model([str(trained_checkpoint), str(other)], str(out), cam=True,
                          parity_batches=(1, 7))
    assert result["members"] == 2
    info = parse_metadata(props(out))
    ensemble = info.json_prop("ensemble")
    assert ensemble["members"] == 2 and len(ensemble["metrics"]) == 2
    # Validated on different data: no shared split to tune on, so the mean, said so.
    assert info.props["threshold_source"].startswith("mean of the members' thresholds")
    assert info.json_prop("metrics") == {}
    assert [h["layers"] for h in info.json_prop("head")] == [[], [8]]
    pixels, _ = fresh_views(5, seed=7)
    mean, cam = session(out).run([OUTPUT_PROB, OUTPUT_CAM], {INPUT_NAME: pixels})
    with torch.no_grad():
        members = [load_checkpoint_model(c)[0] for c in (trained_checkpoint, other)]
        want = np.mean([torch.sigmoid(m(torch.from_numpy(pixels))).numpy() for m in members],
                       axis=0)
    np.testing.assert_allclose(mean, want, atol=1e-5)
    assert cam.shape == (5, 2, 2)

    bigger = write_checkpoint(tmp_path / "big.pt", image_size=96, data=str(tmp_path))
    with pytest.raises(EnsembleError, match="96 px"):
        export_model([str(trained_checkpoint), str(bigger)], str(tmp_path / "bad.onnx"))
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_ensemble_keeps_the_mean_in_fp32(trained_checkpoint: Path, sign_data: Path,
                                             tmp_path: Path) -> None:
    """The members' probabilities and CAMs are stacked with a Concat; only Concats that feed
    convolutions are quantized, so the ensemble mean is neither stepped nor clipped to the
    calibrated range."""
    other = write_checkpoint(tmp_path / "other.pt", image_size=SIZE, data=str(tmp_path))
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    members = [str(trained_checkpoint), str(other)]
    export_model(members, str(fp32), cam=True, parity_batches=(1,))
    # The members were validated on different data: judging needs studies named outright.
    with pytest.raises(PrecisionError, match="members were validated on different studies"):
        export_model(members, str(int8), precision="int8", parity_batches=(1,))
    result = export_model(members, str(int8), cam=True, precision="int8",
                          parity_batches=(1,), calibration_images=16,
                          validation=str(sign_data / "valid"))
    assert parse_metadata(props(int8)).json_prop("quantization")["batchnorms_as_convs"] == 172
    graph = onnx.load(str(int8)).graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    concats = [n for n in graph.node if n.op_type == "Concat"]
    stacks = [n for n in concats if n.output[0] not in quantized]
    assert len(concats) == 2 * 86 + 3 and len(stacks) == 3  # probabilities, logits, CAMs
    rng = np.random.default_rng(11)
    pixels = np.concatenate([fresh_views(6, seed=12)[0],  # and noise, off the calibration
                             rng.integers(0, 256, (6, 1, SIZE, SIZE), dtype=np.uint8)])
    want = session(fp32).run([OUTPUT_PROB, OUTPUT_CAM], {INPUT_NAME: pixels})
    got = session(int8).run([OUTPUT_PROB, OUTPUT_CAM], {INPUT_NAME: pixels})
    assert np.abs(got[0] - want[0]).max() < 0.05
    assert len(np.unique(got[0])) == len(pixels)
    assert abs(result["precision_check"]["auroc_delta"]) <= AUROC_BOUND


def test_lower_precision_without_validation_data_is_refused(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "c.pt", image_size=SIZE, data="/nonexistent/mura")
    with pytest.raises(PrecisionError, match="pass --validation DIR"):
        export_model(str(ckpt), str(tmp_path / "m.onnx"), precision="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no file, no leftovers


def test_auroc_gate_refuses_beyond_the_bound_on_enough_studies() -> None:
    rng = np.random.default_rng(0)
    n = MIN_JUDGED_STUDIES + 50
    labels = np.arange(n) % 2
    reference = np.clip(labels * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
    candidate = reference.copy()
    flip = rng.choice(n, size=n // 5, replace=False)  # a fifth of the scores scrambled
    candidate[flip] = rng.uniform(0, 1, len(flip))
    loose = {"min_agreement": 0.0, "max_score_change": 1.0}  # the AUROC bound alone
    with pytest.raises(PrecisionError) as err:
        judge_precision(precision="int8", labels=labels, reference=reference,
                        candidate=candidate, threshold=0.5, **loose)
    message = str(err.value)
    delta = auroc(labels, candidate) - auroc(labels, reference)
    assert delta < -AUROC_BOUND
    assert f"changes validation AUROC by {delta:+.4f}" in message
    assert f"on {n} studies, beyond the bound of {AUROC_BOUND}" in message

    few = slice(0, MIN_JUDGED_STUDIES - 20)
    judgement, warnings = judge_precision(precision="int8", labels=labels[few],
                                          reference=reference[few], candidate=candidate[few],
                                          threshold=0.5, **loose)
    assert not judgement["enforced"] and judgement["auroc_delta"] < -AUROC_BOUND
    assert warnings and "reported, not enforced" in warnings[0]

    same, none = judge_precision(precision="fp16", labels=labels, reference=reference,
                                 candidate=reference + 1e-4, threshold=0.5)
    assert same["auroc_delta"] == 0 and none == [] and same["enforced"]



def test_decisions_and_scores_are_gated_at_any_study_count() -> None:
    """Decision agreement and the largest score change are enforced even on a handful of
    studies, where the AUROC bound only warns."""
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    reference = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.45, 0.55, 0.05, 0.95])
    near = reference + 0.01
    judgement, _ = judge_precision(precision="fp16", labels=labels, reference=reference,
                                   candidate=near, threshold=0.5)
    assert judgement["decision_agreement"] == 1.0 and not judgement["enforced"]
    flipped = reference.copy()
    flipped[6] = 0.52  # one decision of ten flips: 90% agreement, score moved by 0.07
    with pytest.raises(PrecisionError, match=r"agree on 90.0% of 10 studies \(< 97.0%\)"):
        judge_precision(precision="int8", labels=labels, reference=reference,
                        candidate=flipped, threshold=0.5)  # int8's default bounds
    with pytest.raises(PrecisionError, match=r"a study score moves by 0.07 \(> 0.05\)"):
        judge_precision(precision="int8", labels=labels, reference=reference,
                        candidate=flipped, threshold=0.5, min_agreement=0.5,
                        max_score_change=0.05)
    passed, _ = judge_precision(precision="int8", labels=labels, reference=reference,
                                candidate=flipped, threshold=0.5, min_agreement=0.9,
                                max_score_change=0.08)
    assert passed["decisions_flipped"] == 1 and passed["decision_agreement"] == 0.9
    # The bounds of each precision when none is given: fp16 all but exact, int8 looser.
    from bonexray.export.quantize import GATES
    assert GATES["fp16"] == (0.99, 0.02) and GATES["int8"] == (0.97, 0.10)


def _scale_constant(model: onnx.ModelProto) -> onnx.TensorProto:
    """The graph's input-scaling constant: 1 / (255 x ImageNet std), one per channel."""
    from onnx import numpy_helper

    want = 1.0 / (255.0 * np.array([0.229, 0.224, 0.225]))
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "value")]
    for tensor in tensors:
        value = numpy_helper.to_array(tensor)
        if value.size == 3 and np.allclose(value.reshape(-1), want, rtol=1e-5):
            return tensor
    raise AssertionError("no input-scaling constant in the graph")


def test_parity_gate_refuses_a_graph_whose_input_scale_is_off(trained_checkpoint: Path,
                                                              sign_data: Path,
                                                              tmp_path: Path) -> None:
    """The regression the gate exists for: the exported graph's input-scaling constant
    multiplied by 1.5. The gate compares logits (and probabilities) on noise and on the
    checkpoint's validation views, and refuses it."""
    from onnx import numpy_helper

    from bonexray.export.onnx import ParityError, ProbabilityNet, check_parity
    from bonexray.export.quantize import parity_views

    good = tmp_path / "good.onnx"
    export_model(str(trained_checkpoint), str(good), parity_batches=(1,))
    model = onnx.load(str(good))
    constant = _scale_constant(model)
    constant.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(constant) * 1.5,
                                              constant.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    net, ckpt = load_checkpoint_model(trained_checkpoint)
    wrapped = ProbabilityNet(net).eval()
    members = [type("M", (), {"image_size": SIZE, "resize": "letterbox", "config":
                              ckpt["config"], "ckpt": ckpt, "path": str(trained_checkpoint)})()]
    views, source = parity_views(members, validation=str(sign_data / "valid"), calibration=None,
                                 count=40)
    assert views is not None and views.shape == (40, 1, SIZE, SIZE)
    figures = check_parity(wrapped, good, image_size=SIZE, atol=1e-4, batches=(1, 7, 32),
                           views=views)
    assert {f["input"] for f in figures} == {"noise", "views"}
    with pytest.raises(ParityError) as err:
        check_parity(wrapped, bad, image_size=SIZE, atol=1e-4, batches=(1, 7, 32),
                     views=views)
    message = str(err.value)
    assert "abnormal_logit |diff|" in message and "of views" in message
    # And through export_model: a graph writer that got the scale wrong leaves no file.
    import bonexray.export.onnx as export_onnx

    real_write = export_onnx._write_onnx

    def off_scale(wrapped_net, tmp, **kwargs):  # type: ignore[no-untyped-def]
        real_write(wrapped_net, tmp, **kwargs)
        proto = onnx.load(str(tmp))
        c = _scale_constant(proto)
        c.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(c) * 1.5, c.name))
        onnx.save(proto, str(tmp))

    export_onnx._write_onnx = off_scale
    try:
        with pytest.raises(ParityError, match="abnormal_logit"):
            export_model(str(trained_checkpoint), str(tmp_path / "never.onnx"))
    finally:
        export_onnx._write_onnx = real_write
    assert not (tmp_path / "never.onnx").exists()


def test_cam_of_a_hidden_relu_head_still_averages_to_the_logit(sign_data: Path,
                                                               tmp_path: Path) -> None:
    """A head with hidden ReLU layers is not linear: applying it per position gives a map
    whose mean is not the logit. The export linearises the head at the pooled features, so
    the map still sums to the logit, and says which map it is."""
    ckpt = write_checkpoint(tmp_path / "deep.pt", image_size=SIZE, data=str(sign_data))
    out = tmp_path / "deep.onnx"
    export_model(str(ckpt), str(out), cam=True, parity_batches=(1, 7))
    pixels, _ = fresh_views(16, seed=3)
    logit, cam = session(out).run([OUTPUT_LOGIT, OUTPUT_CAM], {INPUT_NAME: pixels})
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), logit, rtol=1e-4, atol=1e-5)
    assert "linearised" in parse_metadata(props(out)).json_prop("cam")["method"]
    # The naive per-position head (what the export used to do) does not average to it.
    net, _ = load_checkpoint_model(ckpt)
    with torch.no_grad():
        features = torch.relu(net.net.features(net.preprocess(torch.from_numpy(pixels))))
        cells = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        naive = net.net.classifier(cells).reshape(len(pixels), -1)
    assert not np.allclose(naive.mean(dim=1).numpy(), logit, atol=1e-3)


def test_ensemble_gets_its_own_threshold_and_metrics(trained_checkpoint: Path,
                                                     sign_data: Path, tmp_path: Path) -> None:
    """Two members whose thresholds (youden on validation) differ: the ensemble's threshold
    is the rule applied to the ensemble's own validation scores, not the members' mean."""
    from bonexray.metrics import choose_threshold
    from bonexray.studies import find_studies

    members = []
    for k, (threshold, seed) in enumerate(((0.2, 1), (0.8, 2))):
        ckpt = torch.load(trained_checkpoint, weights_only=True)
        torch.manual_seed(seed)
        other = BoneXRayNet()
        state = {n: (v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v)
                 for n, v in ckpt["model"].items()}
        other.load_state_dict(state)
        ckpt.update(model=other.state_dict(), threshold=threshold, threshold_rule="youden")
        members.append(tmp_path / f"m{k}.pt")
        torch.save(ckpt, members[-1])
    out = tmp_path / "ens.onnx"
    export_model([str(m) for m in members], str(out), parity_batches=(1,))
    info = parse_metadata(props(out))
    studies = [s for s in find_studies(sign_data / "valid")]
    from PIL import Image
    pixels = np.stack([np.asarray(Image.open(s.views[0]).convert("L")) for s in studies])[:, None]
    (scores,) = session(out).run([OUTPUT_PROB], {INPUT_NAME: pixels})
    labels = [s.label for s in studies]
    want = choose_threshold(labels, scores.astype(np.float64), "youden")
    assert info.threshold == pytest.approx(want, abs=1e-6) and info.threshold != 0.5
    metrics = info.json_prop("metrics")
    assert metrics["n"] == 40 and metrics["auroc"] == pytest.approx(auroc(labels, scores),
                                                                    abs=1e-6)
    assert info.props["threshold_source"].startswith("the ensemble's own, rule youden")


def test_flip_tta_averages_each_view_and_its_mirror(trained_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """--tta flip: the graph's probability is the mean of the view's and its mirror's,
    the CAM the mean of the view's and the mirror's flipped back; parity still holds."""
    out = tmp_path / "tta.onnx"
    result = export_model(str(trained_checkpoint), str(out), cam=True, tta="flip",
                          parity_batches=(1, 7))
    assert {f["input"] for f in result["parity"]} == {"noise", "views"}
    assert parse_metadata(props(out)).props["tta"].startswith("flip:")
    pixels, _ = fresh_views(6, seed=21)
    prob, logit, cam = session(out).run([OUTPUT_PROB, OUTPUT_LOGIT, OUTPUT_CAM],
                                        {INPUT_NAME: pixels})
    net, _ = load_checkpoint_model(trained_checkpoint)
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        plain, mirrored = net(x), net(x.flip(-1))
    want = (torch.sigmoid(plain) + torch.sigmoid(mirrored)).numpy() / 2
    np.testing.assert_allclose(prob, want, atol=1e-5)
    np.testing.assert_allclose(logit, ((plain + mirrored) / 2).numpy(), atol=1e-4)
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), logit, rtol=1e-4, atol=1e-5)
    # It did something: the logits (these abnormal views saturate the probabilities) moved.
    assert not np.allclose(logit, plain.numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rot'"):
        export_model(str(trained_checkpoint), str(tmp_path / "x.onnx"), tta="rot")
    assert not (tmp_path / "x.onnx").exists()
