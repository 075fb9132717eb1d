"""One pool process per GPU: parsing --gpus and pinning each process to its device."""

from __future__ import annotations

import pytest

from bonexray.settings import get_settings
from bonexray.worker import inference
from bonexray.worker.app import pin_process_gpu
from bonexray.worker.inference import (
    CUDA,
    ProviderError,
    device_for_process,
    parse_gpus,
    session_providers,
)


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
