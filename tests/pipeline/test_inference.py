"""The ORT classifier: contract checks, sha256 gate, providers and threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bonexray.export.cheap import write_cheap_model
from bonexray.modelstore import sha256_file
from bonexray.pipeline import inference
from bonexray.pipeline.inference import (
    CPU,
    CUDA,
    Classifier,
    ModelLoadError,
    ProviderError,
    cuda_provider_options,
    intra_op_threads,
    requested_providers,
    session_providers,
    use_io_binding,
)
from bonexray.settings import Settings, SettingsError


@pytest.fixture
def cheap(tmp_path: Path) -> str:
    return write_cheap_model(tmp_path / "cheap.onnx", image_size=32, threshold=0.4)


def test_classifier_reads_metadata_and_predicts_any_batch(cheap):
    clf = Classifier(cheap, settings=Settings())
    assert clf.info.input_size == 32 and clf.info.threshold == pytest.approx(0.4)
    assert clf.provider == CPU  # no GPU on this machine: the session says so
    for n in (1, 5):
        pixels = np.full((n, 1, 32, 32), 255, dtype=np.uint8)
        probs = clf.predict(pixels)
        assert probs.shape == (n,) and probs.dtype == np.float32
        assert np.allclose(probs, 1 / (1 + np.exp(-5.0)), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        clf.predict(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_sha256_mismatch_is_refused(cheap):
    good = sha256_file(cheap)
    Classifier(cheap, settings=Settings(), expected_sha256=good)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        Classifier(cheap, settings=Settings(), expected_sha256="0" * 64)


def test_model_without_metadata_is_refused(cheap, tmp_path):
    model = onnx.load(cheap)
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ModelLoadError, match="lacks bonexray metadata"):
        Classifier(bare, settings=Settings())


def test_not_a_model_and_missing_file(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        Classifier(junk, settings=Settings())
    with pytest.raises(ModelLoadError, match="cannot read model"):
        Classifier(tmp_path / "missing.onnx", settings=Settings())


def test_provider_fallback_is_judged_by_the_session(cheap, monkeypatch):
    # Pretend an NVIDIA device exists: CUDA is asked for, cannot load here, and the
    # classifier reports the provider the session really uses.
    monkeypatch.setattr(inference, "nvidia_device_present", lambda: True)
    assert requested_providers(Settings())[0] == CUDA
    clf = Classifier(cheap, settings=Settings())
    assert clf.provider == CPU
    with pytest.raises(ProviderError, match="REQUIRE_GPU"):
        Classifier(cheap, settings=Settings(require_gpu=True))


def test_explicit_providers_and_unknown_names(cheap):
    assert requested_providers(Settings(providers="CPUExecutionProvider")) == [CPU]
    with pytest.raises(ProviderError, match="unknown onnxruntime provider"):
        requested_providers(Settings(providers="TPUExecutionProvider"))


def test_intra_op_threads_split_cores_among_processes(monkeypatch):
    monkeypatch.setattr(inference, "available_cores", lambda: 16)
    assert intra_op_threads(Settings(worker_processes=4)) == 4
    assert intra_op_threads(Settings(worker_processes=32)) == 1
    assert intra_op_threads(Settings(intra_op_threads=3, worker_processes=4)) == 3


def test_io_binding_gives_the_same_probabilities_for_every_batch_shape(cheap):
    plain = Classifier(cheap, settings=Settings(io_binding="off"))
    bound = Classifier(cheap, settings=Settings(io_binding="on"))
    assert not plain.io_binding and bound.io_binding
    rng = np.random.default_rng(0)
    for n in (4, 1, 4, 3, 7, 2, 5, 6, 8, 9, 4):  # more shapes than buffers are kept
        pixels = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
        assert np.array_equal(bound.predict(pixels), plain.predict(pixels))
    # A view of a bigger array (not contiguous) is bound correctly too.
    big = rng.integers(0, 256, (6, 2, 32, 32), dtype=np.uint8)
    assert np.array_equal(bound.predict(big[:, :1]), plain.predict(big[:, :1].copy()))


def test_io_binding_is_on_with_cuda_only_by_default():
    assert use_io_binding(Settings(), CUDA) and not use_io_binding(Settings(), CPU)
    assert not use_io_binding(Settings(io_binding="off"), CUDA)
    assert use_io_binding(Settings(io_binding="on"), CPU)
    # A value outside the choices never reaches it: Settings refuse it when made.
    with pytest.raises(SettingsError, match="choose one of auto, on, off"):
        Settings(io_binding="yes")


def test_cuda_provider_options_come_from_settings():
    settings = Settings(cuda_device=2, cuda_options=(
        "cudnn_conv_algo_search=HEURISTIC, gpu_mem_limit=8589934592"))
    assert cuda_provider_options(settings) == {
        "cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": "8589934592", "device_id": 2}
    assert session_providers([CUDA, CPU], settings) == [
        (CUDA, cuda_provider_options(settings)), CPU]
    with pytest.raises(ProviderError, match="not key=value"):
        cuda_provider_options(Settings(cuda_options="HEURISTIC"))
    with pytest.raises(ProviderError, match="BONEXRAY_CUDA_DEVICE"):
        cuda_provider_options(Settings(cuda_options="device_id=1"))


def test_precision_that_does_not_suit_the_provider_is_logged(cheap, tmp_path, caplog):
    model = onnx.load(cheap)
    for prop in model.metadata_props:
        if prop.key == "precision":
            prop.value = "fp16"
            break
    else:
        model.metadata_props.add(key="precision", value="fp16")
    fp16 = tmp_path / "fp16.onnx"
    onnx.save(model, str(fp16))
    with caplog.at_level("WARNING", logger="bonexray.pipeline.inference"):
        Classifier(fp16, settings=Settings())
    assert "fp16 but runs on CPUExecutionProvider" in caplog.text
