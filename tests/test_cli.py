"""Exit statuses of the CLI: what scripts and schedulers branch on."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bonexray.cli import cli
from bonexray.db import store
from bonexray.db.session import open_database, session_scope
from bonexray.studies import Study


def make_queued_job(url: str) -> int:
    with session_scope(open_database(url)) as session:
        model = store.register_model(session=session, path="/models/m.onnx", sha256="a" * 64,
                                     meta={"architecture": "test"})
        job = store.create_job(session=session, root="/data", model_id=model.id,
                               studies=[Study(key="/data/s1", views=("/data/s1/v.png",))],
                               mode="celery", options={})
        session.flush()
        return int(job.id)


def test_status_exit_codes(sqlite_url):
    job = make_queued_job(sqlite_url)
    runner = CliRunner()
    running = runner.invoke(cli, ["status", str(job), "--db", sqlite_url])
    assert running.exit_code == 0 and "running" in running.output
    timed_out = runner.invoke(cli, ["status", str(job), "--db", sqlite_url, "--wait",
                                    "--timeout", "0.2", "--interval", "0.1"])
    assert timed_out.exit_code == 3
    missing = runner.invoke(cli, ["status", "999", "--db", sqlite_url])
    assert missing.exit_code == 2 and "no job 999" in missing.output
    with session_scope(open_database(sqlite_url)) as session:
        ids = [sid for sid, _ in store.queued_studies(session=session, job_id=job)]
        store.mark_failed(session=session, study_ids=ids, error="test", worker="w")
        store.finish_job_if_done(session=session, job_id=job)
    failed = runner.invoke(cli, ["status", str(job), "--db", sqlite_url])
    assert failed.exit_code == 1 and "1 failed" in failed.output


def test_bad_provider_settings_stop_run_before_a_job_is_registered(sqlite_url, tmp_path,
                                                                    monkeypatch):
    from sqlalchemy import func, select

    from bonexray.db.tables import Job
    from bonexray.settings import get_settings

    (tmp_path / "s1").mkdir()
    runner = CliRunner()
    for name, value, says in (("BONEXRAY_IO_BINDING", "maybe", "choose one of auto, on, off"),
                              ("BONEXRAY_CUDA_OPTIONS", "HEURISTIC", "not key=value")):
        monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            result = runner.invoke(cli, ["run", str(tmp_path), "--model", "m.onnx",
                                         "--db", sqlite_url])
        finally:
            monkeypatch.delenv(name)
            get_settings.cache_clear()
        assert result.exit_code == 2 and says in result.output
        assert "Traceback" not in result.output
    with session_scope(open_database(sqlite_url)) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_no_database_file_is_made_by_a_read_only_command_or_a_missing_model(tmp_path):
    db = tmp_path / "typo.db"
    url = f"sqlite:///{db}"
    runner = CliRunner()
    for args in (["results"], ["jobs"], ["status"], ["evaluate"], ["models", "list"],
                 ["export-predictions", "1", str(tmp_path / "p.csv")],
                 ["export-dicom", "--out", str(tmp_path / "sr")]):
        result = runner.invoke(cli, [*args, "--db", url])
        assert result.exit_code == 2, (args, result.output)
        assert f"no database at {db}" in result.output, args
    (tmp_path / "s1").mkdir()
    result = runner.invoke(cli, ["run", str(tmp_path), "--model", str(tmp_path / "nope.onnx"),
                                 "--db", url])
    assert result.exit_code == 2 and "no such file" in result.output
    assert not db.exists()


def test_a_folder_without_any_study_is_an_error_not_an_empty_success(tmp_path, sqlite_url):
    from bonexray.export.cheap import write_cheap_model

    model = write_cheap_model(tmp_path / "cheap.onnx", image_size=32)
    (tmp_path / "nothing" / "here").mkdir(parents=True)
    (tmp_path / "nothing" / "notes.txt").write_text("no images")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nothing"), "--model", str(model),
                                      "--db", sqlite_url])
    assert result.exit_code == 2 and "no view image under" in result.output, result.output


def test_a_registered_model_whose_file_is_gone_is_one_line_and_leaves_no_job(sqlite_url,
                                                                           tmp_path):
    import numpy as np
    from PIL import Image
    from sqlalchemy import func, select

    from bonexray.db.tables import Job
    from bonexray.export.cheap import write_cheap_model

    study = tmp_path / "data" / "patient1" / "study1"
    study.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(study / "image1.png")
    model = Path(write_cheap_model(tmp_path / "cheap.onnx"))
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(tmp_path / "data"), "--model", str(model),
                                "--db", sqlite_url])
    assert first.exit_code == 0, first.output
    model.unlink()
    from bonexray.pipeline import chunks

    chunks._classifiers.clear()  # as in a new process: the session is not cached yet
    again = runner.invoke(cli, ["run", str(tmp_path / "data"), "--model", "cheap",
                                "--db", sqlite_url])
    assert again.exit_code == 2, again.output
    assert "Traceback" not in again.output and "cheap" in again.stderr
    with session_scope(open_database(sqlite_url)) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
