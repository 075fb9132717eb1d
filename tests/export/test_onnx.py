"""Export: ONNX file with the contract and metadata, parity gate, the cheap model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bonexray.export import onnx as export_onnx
from bonexray.export.cheap import write_cheap_model
from bonexray.export.onnx import ParityError, export_model
from bonexray.modelmeta import INPUT_NAME, OUTPUT_LOGIT, OUTPUT_PROB, parse_metadata
from bonexray.trainer.network import BoneXRayNet
from bonexray.trainer.train import TrainConfig, train
from tests.trainer.test_train import make_mura

SIZE = 64


def session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def props(path: str | Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as train() writes it, without spending time training."""
    torch.manual_seed(0)
    model = BoneXRayNet(head=(8,), batch_norm=True).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({
        "format": 1, "model": model.state_dict(), "optimizer": {}, "scheduler": {},
        "epoch": 3, "config": {"data": "/data/mura", "epochs": 8, "image_size": SIZE},
        "architecture": "densenet169", "image_size": SIZE, "resize": "letterbox",
        "threshold": 0.4, "metrics": {"auroc": 0.75, "kappa": None},
        "head": {"layers": [8], "dropout": 0.0, "batch_norm": True, "init": "default"},
    }, path)
    return path


def test_export_writes_one_file_with_contract(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "model.onnx"
    result = export_model(str(checkpoint), str(out), parity_batches=(1, 3))
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no .onnx.data
    # /data/mura is not here: no real views, the gate ran on noise and says so.
    assert [(f["input"], f["batch"]) for f in result["parity"]] == [("noise", 1), ("noise", 3)]
    assert all(f["max_abs_diff"] <= 1e-4 for f in result["parity"])
    assert any("parity checked on noise only" in w for w in result["warnings"])

    info = parse_metadata(props(out))
    assert (info.architecture, info.input_size, info.resize, info.threshold) == \
        ("densenet169", SIZE, "letterbox", 0.4)
    assert info.aggregation == "mean"  # MURA's, unless asked otherwise
    assert info.json_prop("metrics") == {"auroc": 0.75, "kappa": None}
    assert info.json_prop("training")["epoch"] == 3
    assert info.json_prop("head")["layers"] == [8]
    assert {"exported_at", "torch_version", "onnx_version"} <= set(info.props)
    assert info.json_prop("validated_on")["provider"] == "CPUExecutionProvider"
    assert info.json_prop("parity")["inputs"] == "noise only"

    sess = session(out)
    (inp,) = sess.get_inputs()
    assert inp.name == INPUT_NAME and inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [1, SIZE, SIZE] and isinstance(inp.shape[0], str)
    assert [o.name for o in sess.get_outputs()] == [OUTPUT_PROB, OUTPUT_LOGIT]
    for batch in (1, 5):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 1, SIZE, SIZE),
                                                       dtype=np.uint8)
        prob, logit = sess.run(None, {INPUT_NAME: pixels})
        assert prob.shape == logit.shape == (batch,) and prob.dtype == np.float32
        assert ((prob >= 0) & (prob <= 1)).all()
        np.testing.assert_allclose(1 / (1 + np.exp(-logit)), prob, atol=1e-6)


def test_broken_parity_raises_and_leaves_no_file(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.onnx"
    real_forward = export_onnx.ProbabilityNet.forward

    def drifted(self: export_onnx.ProbabilityNet, pixels: torch.Tensor) -> tuple:
        # Export traces the true graph; afterwards torch's probability drifts by 0.01.
        prob, logit = real_forward(self, pixels)
        return prob + (0.0 if torch.jit.is_tracing() else 0.01), logit

    monkeypatch.setattr(export_onnx.ProbabilityNet, "forward", drifted)
    with pytest.raises(ParityError) as err:
        export_model(str(checkpoint), str(out), parity_batches=(1, 7))
    message = str(err.value)
    assert "allowed 0.0001 at batch 1 of noise" in message  # every failure is listed
    assert "at batch 7 of noise" in message
    assert "abnormal_prob |diff| 0.01 >" in message and OUTPUT_LOGIT not in message
    assert list(tmp_path.iterdir()) == []


def test_train_then_export(tmp_path: Path) -> None:
    data = make_mura(tmp_path / "data", patients=1)
    summary = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1,
                                image_size=SIZE, batch_size=4, max_steps=1, workers=0))
    result = export_model(summary["best"], str(tmp_path / "model.onnx"), parity_batches=(2,))
    info = parse_metadata(result["metadata"])
    assert info.input_size == SIZE
    assert info.json_prop("training")["data"] == str(data.resolve())


def test_cheap_model_runs_with_contract(tmp_path: Path) -> None:
    path = write_cheap_model(tmp_path / "cheap.onnx", image_size=32, threshold=0.3)
    info = parse_metadata(props(path))
    assert (info.architecture, info.input_size, info.threshold) == ("mean-intensity", 32, 0.3)
    sess = session(path)
    pixels = np.stack([np.full((1, 32, 32), v, dtype=np.uint8) for v in (0, 128, 255)])
    (prob,) = sess.run([OUTPUT_PROB], {INPUT_NAME: pixels})
    assert prob.dtype == np.float32 and prob.shape == (3,)
    want = 1 / (1 + np.exp(-10 * (np.array([0, 128, 255]) / 255 - 0.5)))
    np.testing.assert_allclose(prob, want, rtol=1e-5)
    (one,) = sess.run([OUTPUT_PROB], {INPUT_NAME: pixels[:1]})
    assert one.shape == (1,)


def test_aggregation_travels_in_the_metadata(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "max.onnx"
    export_model(str(checkpoint), str(out), parity_batches=(1,), aggregation="max")
    assert parse_metadata(props(out)).aggregation == "max"
    with pytest.raises(ValueError, match="mean or max"):
        export_model(str(checkpoint), str(tmp_path / "x.onnx"), aggregation="median")


@pytest.mark.parametrize("content", [b"garbage\n", b"\x08\x07\x12\x04onnx-like bytes"])
def test_export_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path,
                                                                content: bytes) -> None:
    from click.testing import CliRunner

    from bonexray.cli import cli

    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    result = CliRunner().invoke(cli, ["export", str(bad), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "is not a bonexray checkpoint" in result.output
    assert "Traceback" not in result.output and "weights_only=False" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
