"""Exit statuses of the CLI: what scripts and schedulers branch on."""

from __future__ import annotations

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
                               studies=[Study(path="/data/s1", views=("/data/s1/v.png",))],
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
