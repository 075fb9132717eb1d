"""Writes: model registry, jobs with their studies, idempotent results, failures, finishing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bonexray.db import store
from bonexray.db.tables import BatchStat as BatchStatRow
from bonexray.db.tables import Job, Model, Study, View
from bonexray.pipeline.records import BatchStat, StudyResult, ViewResult
from tests.db.conftest import make_studies

SHA_A = "a" * 64
SHA_B = "b" * 64


def _result(study_id: int, path: str, probs: tuple[float | None, ...],
            status: str = "done") -> StudyResult:
    views = tuple(
        ViewResult(f"{path}/image{i + 1}.png", p, None if p is not None else "cannot decode")
        for i, p in enumerate(probs)
    )
    scored = [p for p in probs if p is not None]
    score = sum(scored) / len(scored) if scored else None
    return StudyResult(
        study_id=study_id, key=path, status=status, score=score,
        prediction=None if score is None else ("abnormal" if score >= 0.5 else "normal"),
        views=views, error=None if scored else "no view could be scored",
    )


def _study_rows(session: Session, job_id: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Study.id, Study.key, Study.status, Study.score, Study.prediction,
               Study.error, Study.worker, Study.n_views)
        .where(Study.job_id == job_id).order_by(Study.id)
    )
    return [dict(r._mapping) for r in rows]


def _view_rows(session: Session, job_id: int) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in session.execute(
        select(View.id, View.study_id, View.source, View.prob, View.error)
        .join(Study, Study.id == View.study_id)
        .where(Study.job_id == job_id).order_by(View.id)
    )]


def _job(session: Session, model: Model, n: int, **kwargs: Any) -> Job:
    return store.create_job(session=session, root="/archive", model_id=model.id,
                            studies=make_studies(n, **kwargs), mode="embedded",
                            options={"chunk_size": 16})


def test_register_model_is_keyed_by_sha256(session: Session) -> None:
    first = store.register_model(session=session, path="/m/net.onnx", sha256=SHA_A,
                                 meta={"threshold": 0.4})
    again = store.register_model(session=session, path="/moved/net.onnx", sha256=SHA_A,
                                 meta={})
    assert again.id == first.id
    assert again.path == "/moved/net.onnx"
    assert again.meta == {"threshold": 0.4}
    assert session.scalar(select(func.count()).select_from(Model)) == 1


def test_register_model_makes_default_names_unique(session: Session) -> None:
    a = store.register_model(session=session, path="/m/net.onnx", sha256=SHA_A, meta={})
    b = store.register_model(session=session, path="/other/net.onnx", sha256=SHA_B, meta={})
    c = store.register_model(session=session, path="/third/net.onnx", sha256="c" * 64,
                             meta={})
    assert (a.name, b.name, c.name) == ("net", "net-2", "net-3")


def test_register_model_refuses_a_taken_explicit_name(session: Session) -> None:
    store.register_model(session=session, path="/m/a.onnx", sha256=SHA_A, meta={}, name="prod")
    with pytest.raises(store.ModelNameError, match="prod"):
        store.register_model(session=session, path="/m/b.onnx", sha256=SHA_B, meta={},
                             name="prod")


def test_create_job_without_studies(session: Session, model: Model) -> None:
    job = _job(session, model, 0)
    assert (job.n_studies, job.n_views, job.finished_at) == (0, 0, None)
    assert job.options == {"chunk_size": 16}
    assert store.queued_studies(session=session, job_id=job.id) == []
    assert store.finish_job_if_done(session=session, job_id=job.id)
    assert session.get(Job, job.id).finished_at is not None  # type: ignore[union-attr]


def test_create_job_with_one_study(session: Session, model: Model) -> None:
    job = _job(session, model, 1, views=3)
    assert (job.n_studies, job.n_views) == (1, 3)
    rows = _study_rows(session, job.id)
    assert [(r["status"], r["n_views"], r["error"]) for r in rows] == [("queued", 3, None)]
    assert store.queued_studies(session=session, job_id=job.id) == [(rows[0]["id"],
                                                                     rows[0]["key"])]


def test_create_job_with_many_studies_some_empty(session: Session, model: Model) -> None:
    job = _job(session, model, 500, empty=(0, 7, 499))
    assert (job.n_studies, job.n_views) == (500, 2 * 497)
    studies = session.scalars(select(Study).where(Study.job_id == job.id)).all()
    empty = [s for s in studies if s.status == "empty"]
    assert len(empty) == 3
    assert all(s.error == store.EMPTY_STUDY_ERROR and s.finished_at is not None
               and s.n_views == 0 for s in empty)
    queued = store.queued_studies(session=session, job_id=job.id)
    assert len(queued) == 497
    assert [i for i, _ in queued] == sorted(i for i, _ in queued)
    wrist = next(s for s in studies if s.status == "queued")
    assert (wrist.body_part, wrist.attempts, wrist.finished_at) == ("wrist", 0, None)
    assert wrist.label in (0, 1)


def test_save_results_twice_leaves_the_same_rows(session: Session, model: Model) -> None:
    job = _job(session, model, 4)
    queued = store.queued_studies(session=session, job_id=job.id)
    results = [_result(i, p, (0.9, None)) for i, p in queued[:3]]
    assert store.save_results(session=session, job_id=job.id, results=results,
                              worker="w1") == 3
    studies_once, views_once = _study_rows(session, job.id), _view_rows(session, job.id)
    assert store.save_results(session=session, job_id=job.id, results=results,
                              worker="w1") == 0
    assert _study_rows(session, job.id) == studies_once
    assert _view_rows(session, job.id) == views_once
    assert len(views_once) == 8  # the queued study's two views are registered, unscored
    assert [r["status"] for r in studies_once] == ["done", "done", "done", "queued"]
    assert studies_once[0]["score"] == pytest.approx(0.9)
    assert store.queued_studies(session=session, job_id=job.id) == queued[3:]


def test_a_finished_study_keeps_its_first_result(session: Session, model: Model) -> None:
    # A second delivery of the same chunk (its lease ran out meanwhile) must not overwrite
    # a result that is already in.
    job = _job(session, model, 1)
    ((study_id, path),) = store.queued_studies(session=session, job_id=job.id)
    before = _view_rows(session, job.id)
    assert [(r[3], r[4]) for r in before] == [(None, None), (None, None)]  # registered
    store.save_results(session=session, job_id=job.id,
                       results=[_result(study_id, path, (None, 0.2))], worker="w1")
    first = _view_rows(session, job.id)
    assert [r[0] for r in first] == [r[0] for r in before]  # same rows, updated in place
    assert [(r[3], r[4]) for r in first] == [(None, "cannot decode"), (0.2, None)]
    assert store.save_results(session=session, job_id=job.id,
                              results=[_result(study_id, path, (0.7, 0.8))], worker="w2") == 0
    assert _view_rows(session, job.id) == first
    study = session.get(Study, study_id)
    session.refresh(study)  # type: ignore[arg-type]
    assert study is not None and study.worker == "w1" and study.score == pytest.approx(0.2)


def test_save_results_ignores_studies_of_other_jobs(session: Session, model: Model) -> None:
    job_a, job_b = _job(session, model, 1), _job(session, model, 1)
    ((study_b, path_b),) = store.queued_studies(session=session, job_id=job_b.id)
    store.save_results(session=session, job_id=job_a.id,
                       results=[_result(study_b, path_b, (0.3, 0.3))], worker="w")
    assert [r["status"] for r in _study_rows(session, job_b.id)] == ["queued"]


def test_mark_failed_only_touches_queued_studies(session: Session, model: Model) -> None:
    job = _job(session, model, 3, empty=(2,))
    (done_id, done_path), (queued_id, _) = store.queued_studies(session=session,
                                                                job_id=job.id)
    empty_id = max(r["id"] for r in _study_rows(session, job.id))
    store.save_results(session=session, job_id=job.id,
                       results=[_result(done_id, done_path, (0.1, 0.2))], worker="w")
    store.mark_failed(session=session, study_ids=[done_id, queued_id, empty_id],
                      error="model id 9 is not in the registry", worker="w")
    rows = {r["id"]: r for r in _study_rows(session, job.id)}
    assert (rows[done_id]["status"], rows[done_id]["error"]) == ("done", None)
    assert (rows[queued_id]["status"], rows[queued_id]["error"]) == (
        "failed", "model id 9 is not in the registry")
    assert rows[empty_id]["status"] == "empty"
    assert store.queued_studies(session=session, job_id=job.id) == []


def test_save_batch_stats(session: Session, model: Model) -> None:
    job = _job(session, model, 1)
    store.save_batch_stats(session=session, job_id=job.id, worker="w", provider="CPU",
                           stats=[BatchStat(16, 10.0, 20.0), BatchStat(4, 1.0, 2.0, 3.0)])
    rows = session.execute(
        select(BatchStatRow.n_views, BatchStatRow.decode_ms, BatchStatRow.infer_ms,
               BatchStatRow.write_ms, BatchStatRow.provider)
        .where(BatchStatRow.job_id == job.id).order_by(BatchStatRow.id)
    ).all()
    assert [tuple(r) for r in rows] == [(16, 10.0, 20.0, 0.0, "CPU"), (4, 1.0, 2.0, 3.0, "CPU")]


def test_finish_job_when_no_study_is_queued(session: Session, model: Model) -> None:
    job = _job(session, model, 2)
    queued = store.queued_studies(session=session, job_id=job.id)
    store.save_results(session=session, job_id=job.id,
                       results=[_result(*queued[0], (0.5, 0.5))], worker="w")
    assert not store.finish_job_if_done(session=session, job_id=job.id)
    assert session.get(Job, job.id).finished_at is None  # type: ignore[union-attr]
    store.save_results(session=session, job_id=job.id,
                       results=[_result(*queued[1], (None, None), status="failed")],
                       worker="w")
    assert store.finish_job_if_done(session=session, job_id=job.id)
    finished_at = session.scalar(select(Job.finished_at).where(Job.id == job.id))
    last = session.scalar(select(func.max(Study.finished_at)).where(Study.job_id == job.id))
    assert finished_at == last
    assert store.finish_job_if_done(session=session, job_id=job.id)  # and stays finished
    assert not store.finish_job_if_done(session=session, job_id=10**6)
