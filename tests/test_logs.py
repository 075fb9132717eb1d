"""Logs: text for a terminal, JSON lines (with structured fields) for a fleet."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from bonexray.logs import JsonFormatter, formatter, use_format


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    record = logging.LogRecord("bonexray.pipeline.chunks", logging.INFO, __file__, 1,
                               "job %d: chunk done", (7,), None)
    record.job, record.chunk, record.seconds, record.provider = 7, "c-1", 0.25, "CPU"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "job 7: chunk done" and entry["level"] == "info"
    assert entry["logger"] == "bonexray.pipeline.chunks" and entry["time"].endswith("Z")
    assert (entry["job"], entry["chunk"], entry["seconds"], entry["provider"]) == \
        (7, "c-1", 0.25, "CPU")
    assert "args" not in entry and "msg" not in entry  # the record's own attributes stay out
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(record))["traceback"]


def test_use_format_gives_celery_handlers_the_format() -> None:
    logger = logging.getLogger("test.celery.like")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        use_format(logger, "json")
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        logger.removeHandler(handler)
    with pytest.raises(ValueError, match="choose one of text, json"):
        formatter("xml")


def test_worker_log_setup_signal_applies_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from bonexray.settings import get_settings
    from bonexray.worker.app import _log_format

    logger = logging.getLogger("test.worker.signal")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    monkeypatch.setenv("BONEXRAY_LOG_FORMAT", "json")
    get_settings.cache_clear()
    try:
        _log_format(logger=logger)
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        logger.removeHandler(handler)
        get_settings.cache_clear()


@pytest.mark.parametrize("how", ["option", "variable"])
def test_a_command_logs_json_lines(tmp_path, how: str) -> None:
    env = dict(os.environ)
    args = [sys.executable, "-m", "bonexray.cli", "--log-level", "debug"]
    if how == "option":
        args += ["--log-format", "json"]
    else:
        env["BONEXRAY_LOG_FORMAT"] = "json"
    result = subprocess.run([*args, "synth", str(tmp_path / "s"), "--studies", "2",
                             "--image-size", "32"], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    assert any(e["logger"] == "bonexray.synth" and "wrote 2 synthetic studies" in e["message"]
               for e in entries), lines
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert result.stdout.startswith("wrote 2 studies")  # the command's own output stays text
