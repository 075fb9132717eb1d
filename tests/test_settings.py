"""Settings: one object from BONEXRAY_* variables, typed, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonexray.settings import Settings, SettingsError, load_settings, resolve_database_url


def test_defaults_run_embedded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert s.database_url == f"sqlite:///{tmp_path / 'bonexray.db'}"
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.chunk_size == 16 and s.require_gpu is False


def test_environment_overrides_with_types():
    s = load_settings({"BONEXRAY_CHUNK_SIZE": "4", "BONEXRAY_REQUIRE_GPU": "1",
                       "BONEXRAY_DATABASE_URL": "postgresql+psycopg://u@h/db",
                       "BONEXRAY_VISIBILITY_TIMEOUT": "120", "UNRELATED": "x"})
    assert s.chunk_size == 4 and s.require_gpu is True and s.visibility_timeout == 120
    assert s.database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("env, message", [
    ({"BONEXRAY_CHUNK_SIZE": "many"}, "BONEXRAY_CHUNK_SIZE='many': not an integer"),
    ({"BONEXRAY_REQUIRE_GPU": "maybe"}, "BONEXRAY_REQUIRE_GPU='maybe': not a boolean"),
    ({"BONEXRAY_CHUNK_SIZE": "-5"}, "BONEXRAY_CHUNK_SIZE=-5: must be an integer >= 1"),
    ({"BONEXRAY_BATCH_SIZE": "0"}, "BONEXRAY_BATCH_SIZE=0: must be an integer >= 1"),
    ({"BONEXRAY_INTRA_OP_THREADS": "-1"}, "BONEXRAY_INTRA_OP_THREADS=-1: must be .* >= 0"),
    ({"BONEXRAY_IO_BINDING": "sometimes"},
     "BONEXRAY_IO_BINDING='sometimes': choose one of auto, on, off"),
    ({"BONEXRAY_LOG_LEVEL": "bogus"}, "BONEXRAY_LOG_LEVEL='bogus': choose one of debug, info"),
    ({"BONEXRAY_QUEUE": " "}, "BONEXRAY_QUEUE is empty"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_sqlite_paths_become_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_database_url("sqlite:///x/r.db") == f"sqlite:///{Path(tmp_path) / 'x/r.db'}"
    assert resolve_database_url("sqlite:////abs/r.db") == "sqlite:////abs/r.db"
    assert resolve_database_url("sqlite:///:memory:") == "sqlite:///:memory:"
    assert resolve_database_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert Settings().replace(chunk_size=3).chunk_size == 3


@pytest.mark.parametrize("env, args, message", [
    ({"BONEXRAY_CHUNK_SIZE": "abc"}, ["models", "list"], "BONEXRAY_CHUNK_SIZE='abc'"),
    ({"BONEXRAY_REQUIRE_GPU": "maybe"}, ["jobs"], "BONEXRAY_REQUIRE_GPU='maybe'"),
    ({}, ["--log-level", "bogus", "jobs"], "'bogus' is not one of"),
    ({"BONEXRAY_LOG_LEVEL": "loud"}, ["jobs"], "BONEXRAY_LOG_LEVEL='loud'"),
])
def test_cli_names_a_bad_setting_in_one_line(monkeypatch, tmp_path, env, args, message):
    """A bad variable or option: one line naming it, exit 2, no traceback, nothing created."""
    from click.testing import CliRunner

    from bonexray.cli import cli
    from bonexray.settings import get_settings

    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 4
    assert not list(tmp_path.iterdir())  # no database made on the way
