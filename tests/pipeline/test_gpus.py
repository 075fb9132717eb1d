"""One pool process per GPU: parsing --gpus and pinning each process to its device."""

from __future__ import annotations

import pytest

from bonexray.pipeline import inference
from bonexray.pipeline.inference import (
    CUDA,
    ProviderError,
    device_for_process,
    parse_gpus,
    session_providers,
)
from bonexray.settings import get_settings
from bonexray.worker.app import pin_process_gpu


def test_parse_gpus(monkeypatch):
    assert parse_gpus("") == []
    assert parse_gpus("0,2, 3") == [0, 2, 3]
    monkeypatch.setattr(inference, "nvidia_device_ids", lambda: [0, 1])
    assert parse_gpus("all") == [0, 1]
    monkeypatch.setattr(inference, "nvidia_device_ids", lambda: [])
    with pytest.raises(ProviderError, match="no NVIDIA device"):
        parse_gpus("all")
    for bad in ("a,b", "1,1", "-1"):
        with pytest.raises(ProviderError):
            parse_gpus(bad)


def test_each_pool_process_gets_its_own_device(monkeypatch):
    assert [device_for_process([4, 6], i) for i in range(4)] == [4, 6, 4, 6]
    monkeypatch.setenv("BONEXRAY_GPUS", "2,3")
    monkeypatch.delenv("BONEXRAY_CUDA_DEVICE", raising=False)
    get_settings.cache_clear()
    try:
        assert pin_process_gpu(1) == 3
        assert get_settings().cuda_device == 3
        providers = session_providers([CUDA, "CPUExecutionProvider"], get_settings())
        assert providers[0] == (CUDA, {"device_id": 3})
        assert providers[1] == "CPUExecutionProvider"
    finally:
        monkeypatch.delenv("BONEXRAY_GPUS")
        monkeypatch.delenv("BONEXRAY_CUDA_DEVICE", raising=False)
        get_settings.cache_clear()
    assert pin_process_gpu(0) is None  # no --gpus: no pinning


def test_worker_that_requires_a_gpu_refuses_to_start_without_one(tmp_path):
    """BONEXRAY_REQUIRE_GPU: a node whose GPU does not start takes no chunks at all."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "BONEXRAY_REQUIRE_GPU": "1",
           "BONEXRAY_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    result = subprocess.run([sys.executable, "-m", "bonexray.cli", "worker", "--pool", "solo"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ProviderError:") and "refusing to start" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("visible, ids", [
    ("2,3", [0, 1]),  # a container or a shell given the host's GPUs 2 and 3: CUDA's 0 and 1
    ("GPU-8f3c1e2a-aaaa-bbbb-cccc-000000000001,GPU-8f3c1e2a-aaaa-bbbb-cccc-000000000002",
     [0, 1]),
    ("MIG-4b1f0c4e-1111-2222-3333-444444444444", [0]),
    ("0,-1,2", [0]),  # CUDA stops at the first entry that is not a device
    ("-1", []),
    ("", []),
])
def test_gpus_are_counted_as_cuda_numbers_them(monkeypatch: pytest.MonkeyPatch, visible: str,
                                                ids: list[int]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert inference.nvidia_device_ids() == ids
    if ids:
        assert inference.parse_gpus("all") == ids
    else:
        with pytest.raises(inference.ProviderError, match="no NVIDIA device visible"):
            inference.parse_gpus("all")


def test_without_cuda_visible_devices_the_device_files_are_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(inference, "_nvml_count", lambda: None)
    monkeypatch.setattr(inference.os, "listdir",
                        lambda path: ["nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm", "null"])
    assert inference.nvidia_device_ids() == [0, 1]  # /dev/nvidia2 and 3 are CUDA's 0 and 1
    monkeypatch.setattr(inference, "_nvml_count", lambda: 4)
    assert inference.nvidia_device_ids() == [0, 1, 2, 3]
