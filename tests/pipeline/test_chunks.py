"""A chunk end to end against Postgres: results are written while inference goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from bonexray.db.session import open_database, session_scope
from bonexray.db.tables import BatchStat as BatchStatRow
from bonexray.db.tables import Study
from bonexray.export.cheap import write_cheap_model
from bonexray.jobs import prepare_job
from bonexray.modelstore import resolve_model
from bonexray.pipeline import chunks as process
from bonexray.pipeline.records import QUEUED
from bonexray.settings import Settings


def make_studies(root: Path, studies: int, views: int = 1) -> Path:
    for i in range(studies):
        folder = root / f"study{i:02d}"
        folder.mkdir(parents=True)
        for k in range(views):
            Image.fromarray(np.full((24, 30), 40 + 20 * i, dtype=np.uint8)).save(
                folder / f"v{k}.png")
    return root


def written(engine: Engine, job_id: int) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Study).where(
            Study.job_id == job_id, Study.status != QUEUED)) or 0)


@pytest.fixture
def pg_engine(fresh_pg_url: str) -> Iterator[Engine]:
    """A database of this test's own (the shared one keeps other tests' expectations)."""
    engine = open_database(fresh_pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def job(tmp_path: Path, pg_engine: Engine) -> Any:
    root = make_studies(tmp_path / "data", studies=6)
    model = resolve_model(engine=pg_engine, ref=write_cheap_model(tmp_path / "cheap.onnx",
                                                                  image_size=16))
    return prepare_job(engine=pg_engine, root=str(root), model=model, mode="embedded")


def test_results_are_written_while_the_next_batch_runs(job, pg_engine, monkeypatch):
    # Batches of one view: when the model is asked for batch k, the studies of batches
    # 1..k-1 must reach Postgres while that call is still running (here: it waits for
    # them). A chunk written only at its end would leave every call waiting in vain.
    seen_during_calls: list[int] = []
    real = process.classify_studies

    def instrumented(tasks, *, predict, **kwargs):
        def predict_and_watch(pixels):
            calls = len(seen_during_calls)
            deadline = time.monotonic() + 20
            while written(pg_engine, job.job_id) < calls and time.monotonic() < deadline:
                time.sleep(0.02)
            seen_during_calls.append(written(pg_engine, job.job_id))
            return predict(pixels)
        return real(tasks, predict=predict_and_watch, **kwargs)

    monkeypatch.setattr(process, "classify_studies", instrumented)
    settings = Settings(database_url="unused://", batch_size=1, decode_threads=1)
    summary = process.process_chunk(engine=pg_engine, job_id=job.job_id,
                                    study_ids=job.study_ids,
                                    settings=settings)
    assert summary.done == 6
    assert seen_during_calls == [0, 1, 2, 3, 4, 5]
    assert written(pg_engine, job.job_id) == 6
    with session_scope(pg_engine) as session:
        stats = session.scalars(select(BatchStatRow).where(
            BatchStatRow.job_id == job.job_id)).all()
    assert [s.n_views for s in stats] == [1] * 6
    assert stats[-1].write_ms is not None and stats[-1].write_ms > 0


def test_a_failed_write_fails_the_chunk_for_a_retry(job, pg_engine, monkeypatch):
    calls = {"n": 0}
    real = process.store.save_results

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("UPDATE studies", {}, Exception("connection reset"))
        return real(**kwargs)

    monkeypatch.setattr(process.store, "save_results", flaky)
    settings = Settings(database_url="unused://", batch_size=2, decode_threads=1)
    with pytest.raises(OperationalError, match="connection reset"):
        process.process_chunk(engine=pg_engine, job_id=job.job_id, study_ids=job.study_ids,
                              settings=settings)
    # The retry (Celery's, here by hand) writes everything; the upserts make it safe.
    summary = process.process_chunk(engine=pg_engine, job_id=job.job_id,
                                    study_ids=job.study_ids, settings=settings)
    assert summary.done == 6 and written(pg_engine, job.job_id) == 6


def test_inference_stops_at_the_first_failed_write(job, pg_engine, monkeypatch):
    def broken(**kwargs):
        raise OperationalError("UPDATE studies", {}, Exception("server closed the connection"))

    first_write_over = threading.Event()
    real_write = process.ResultWriter._write

    def write_and_signal(self, results):
        real_write(self, results)
        first_write_over.set()

    batches = {"n": 0}
    real = process.classify_studies

    def counting(tasks, *, predict, **kwargs):
        def predict_and_count(pixels):
            batches["n"] += 1
            if batches["n"] == 2:  # let the first study's write fail before going on
                assert first_write_over.wait(20)
            return predict(pixels)
        return real(tasks, predict=predict_and_count, **kwargs)

    monkeypatch.setattr(process.store, "save_results", broken)
    monkeypatch.setattr(process.ResultWriter, "_write", write_and_signal)
    monkeypatch.setattr(process, "classify_studies", counting)
    settings = Settings(database_url="unused://", batch_size=1, decode_threads=1)
    with pytest.raises(OperationalError, match="server closed"):
        process.process_chunk(engine=pg_engine, job_id=job.job_id, study_ids=job.study_ids,
                              settings=settings)
    assert batches["n"] == 2  # the chunk gave up at the next hand-over, not after 6 batches
    assert written(pg_engine, job.job_id) == 0


def test_in_memory_sqlite_is_written_in_the_callers_thread(tmp_path):
    engine = open_database("sqlite://")
    root = make_studies(tmp_path / "data", studies=3, views=2)
    model = resolve_model(engine=engine, ref=write_cheap_model(tmp_path / "c.onnx",
                                                               image_size=16))
    job = prepare_job(engine=engine, root=str(root), model=model, mode="embedded")
    summary = process.process_chunk(engine=engine, job_id=job.job_id, study_ids=job.study_ids,
                                    settings=Settings(batch_size=2))
    assert summary.done == 3 and written(engine, job.job_id) == 3


def test_run_chunk_rides_out_database_errors_for_as_long_as_they_last(job, pg_engine,
                                                                       fresh_pg_url,
                                                                       monkeypatch):
    real = process.process_chunk
    failures = {"left": 5}

    def flaky(**kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("SELECT 1", {}, Exception("could not connect to server"))
        return real(**kwargs)

    slept: list[float] = []
    monkeypatch.setattr(process, "process_chunk", flaky)
    summary = process.run_chunk(database_url=fresh_pg_url, job_id=job.job_id,
                                study_ids=job.study_ids, settings=Settings(),
                                sleep=slept.append)
    assert summary.done == 6 and len(slept) == 5
    assert all(0 < d <= 30 for d in slept) and slept[-1] > slept[0] / 2  # backing off
    assert written(pg_engine, job.job_id) == 6


def test_a_bug_fails_what_the_chunk_holds_with_the_reason(job, pg_engine, fresh_pg_url,
                                                          monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(process, "classify_studies", broken)
    with pytest.raises(KeyError):
        process.run_chunk(database_url=fresh_pg_url, job_id=job.job_id,
                          study_ids=job.study_ids, settings=Settings(), worker="w:1")
    with session_scope(pg_engine) as session:
        rows = session.execute(select(Study.status, Study.error, Study.claimed_by)
                               .where(Study.job_id == job.job_id)).all()
    assert {(r.status, r.claimed_by) for r in rows} == {("failed", None)}
    assert all("worker error: KeyError" in r.error for r in rows)


def test_a_missing_model_file_makes_the_worker_sick_not_the_studies(tmp_path, pg_engine):
    root = make_studies(tmp_path / "data", studies=2)
    model_path = write_cheap_model(tmp_path / "gone.onnx", image_size=16)
    model = resolve_model(engine=pg_engine, ref=model_path)
    job = prepare_job(engine=pg_engine, root=str(root), model=model, mode="celery")
    Path(model_path).unlink()  # not mounted on this node
    process._classifiers.clear()
    with pytest.raises(process.WorkerSickError, match="cannot load model"):
        process.process_chunk(engine=pg_engine, job_id=job.job_id, study_ids=job.study_ids,
                              settings=Settings(), worker="w:1")
    with session_scope(pg_engine) as session:
        rows = session.execute(select(Study.status, Study.claimed_by, Study.attempts)
                               .where(Study.job_id == job.job_id)).all()
    assert {tuple(r) for r in rows} == {("queued", None, 0)}  # left for a healthy worker


def test_a_changed_model_file_fails_its_studies(tmp_path, pg_engine):
    root = make_studies(tmp_path / "data", studies=2)
    model_path = write_cheap_model(tmp_path / "m.onnx", image_size=16)
    model = resolve_model(engine=pg_engine, ref=model_path)
    job = prepare_job(engine=pg_engine, root=str(root), model=model, mode="celery")
    write_cheap_model(model_path, image_size=16, threshold=0.2)
    process._classifiers.clear()
    with pytest.raises(process.ModelMismatchError, match="sha256 mismatch"):
        process.process_chunk(engine=pg_engine, job_id=job.job_id, study_ids=job.study_ids,
                              settings=Settings(), worker="w:1")
    with session_scope(pg_engine) as session:
        errors = session.scalars(select(Study.error).where(Study.job_id == job.job_id)).all()
    assert all("sha256 mismatch" in e for e in errors)


def test_a_study_whose_worker_was_lost_is_decoded_one_view_at_a_time(job, pg_engine,
                                                                    monkeypatch):
    from datetime import timedelta

    from bonexray.db import ledger
    from bonexray.db.tables import utcnow

    first, *rest = job.study_ids
    with session_scope(pg_engine) as session:  # an earlier holder died, long ago
        ledger.claim_studies(session=session, job_id=job.job_id, study_ids=[first],
                             worker="elsewhere:1", lease_seconds=30, max_crashes=3,
                             max_attempts=8, now=utcnow() - timedelta(seconds=300))
    marks: list[str | None] = []
    real_mark = process.ledger.mark_decoding

    def recording(*, view, **kwargs):
        marks.append(view)
        real_mark(view=view, **kwargs)

    monkeypatch.setattr(process.ledger, "mark_decoding", recording)
    summary = process.process_chunk(engine=pg_engine, job_id=job.job_id,
                                    study_ids=job.study_ids, settings=Settings(), worker="w:1")
    assert summary.done == 6
    assert len(marks) == 2 and marks[0].endswith("v0.png") and marks[1] is None
    with session_scope(pg_engine) as session:
        study = session.get(Study, first)
        assert study is not None
        assert (study.attempts, study.decoding, study.claimed_by) == (2, None, None)
