"""The README's example queries (docs/queries.sql) give the expected rows on both databases."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from bonexray.db import store
from bonexray.db.tables import Job, Model, Study
from bonexray.pipeline.records import BatchStat, StudyResult, ViewResult
from bonexray.studies import Study as FoundStudy

QUERIES_FILE = Path(__file__).resolve().parents[2] / "docs" / "queries.sql"
_HEADER = re.compile(r"^-- name: (\w+)(?: \((\w+)\))?$", re.MULTILINE)


def load_queries(dialect: str) -> dict[str, str]:
    """Named queries from docs/queries.sql for this dialect (unmarked ones are for all)."""
    source = QUERIES_FILE.read_text(encoding="utf-8")
    heads = list(_HEADER.finditer(source))
    queries: dict[str, str] = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        body = source[head.end(): nxt.start() if nxt else len(source)].strip()
        name, only = head.group(1), head.group(2)
        if only is None or only == dialect:
            queries[name] = body.rstrip(";")
    return queries


def test_every_query_is_found_for_both_dialects() -> None:
    expected = {"abnormal_by_body_part", "inference_by_worker", "job_throughput",
                "latest_evaluation"}
    assert set(load_queries("sqlite")) == expected
    assert set(load_queries("postgresql")) == expected


def _job(session: Session, model: Model) -> Job:
    specs = [("/d/XR_WRIST/p1/study1_positive", "wrist", 1, 2, "done", 0.9),
             ("/d/XR_WRIST/p2/study1_positive", "wrist", 1, 1, "done", 0.7),
             ("/d/XR_WRIST/p3/study1_negative", "wrist", 0, 1, "done", 0.2),
             ("/d/XR_HAND/p4/study1_positive", "hand", 1, 1, "failed", None),
             ("/d/XR_ELBOW/p5/study1_negative", "elbow", 0, 3, "done", 0.1)]
    found = [FoundStudy(key=p, views=tuple(f"{p}/image{k}.png" for k in range(n)),
                        body_part=part, label=label) for p, part, label, n, _, _ in specs]
    job = store.create_job(session=session, root="/d", model_id=model.id, studies=found,
                           mode="embedded", options={})
    ids = {path: i for i, path in store.queued_studies(session=session, job_id=job.id)}
    results = []
    for p, _, _, n, status, score in specs:
        prediction = None if score is None else ("abnormal" if score >= 0.5 else "normal")
        views = tuple(ViewResult(f"{p}/image{k}.png", score, None if score else "bad")
                      for k in range(n))
        results.append(StudyResult(ids[p], p, status, score, prediction, views))
    store.save_results(session=session, job_id=job.id, results=results, worker="w1")
    store.save_batch_stats(session=session, job_id=job.id, worker="w1",
                           provider="CPUExecutionProvider",
                           stats=[BatchStat(4, 20.0, 100.0), BatchStat(4, 10.0, 60.0)])
    store.save_batch_stats(session=session, job_id=job.id, worker="w2",
                           provider="CUDAExecutionProvider", stats=[BatchStat(2, 5.0, 10.0)])
    # Known times: created at 00:00:00, the last study finished 16 s later.
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    session.execute(update(Job).where(Job.id == job.id).values(created_at=start))
    for k, path in enumerate(sorted(ids)):
        session.execute(update(Study).where(Study.id == ids[path])
                        .values(finished_at=start + timedelta(seconds=4 * (k + 1))))
    session.flush()
    return job


def _rows(session: Session, sql: str, job_id: int) -> list[tuple[object, ...]]:
    return [tuple(row) for row in session.execute(text(sql), {"job_id": job_id})]


def test_example_queries(session: Session, model: Model) -> None:
    job = _job(session, model)
    queries = load_queries(session.get_bind().dialect.name)

    rows = _rows(session, queries["abnormal_by_body_part"], job.id)
    assert [(r[0], r[1], r[2]) for r in rows] == [("elbow", 1, 0), ("wrist", 3, 2)]
    assert float(rows[1][3]) == pytest.approx(2 / 3)  # type: ignore[arg-type]
    assert float(rows[1][4]) == pytest.approx(0.6)  # type: ignore[arg-type]

    rows = _rows(session, queries["inference_by_worker"], job.id)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("w1", "CPUExecutionProvider", 2, 8), ("w2", "CUDAExecutionProvider", 1, 2)]
    assert float(rows[0][4]) == pytest.approx(8000 / 160)  # type: ignore[arg-type]
    assert float(rows[0][5]) == pytest.approx(0.03)  # type: ignore[arg-type]

    (row,) = _rows(session, queries["job_throughput"], job.id)
    assert (row[0], row[1], row[2]) == (job.id, 5, 8)
    assert float(row[3]) == pytest.approx(20.0)  # type: ignore[arg-type]
    assert float(row[4]) == pytest.approx(8 / 20.0)  # type: ignore[arg-type]

    assert _rows(session, queries["latest_evaluation"], job.id) == []
    for run_auroc in (0.5, 0.75):
        figures = {"n": 4, "positives": 2, "unscored": 1, "unlabelled": 0,
                   "accuracy": 1.0, "f1": 1.0, "kappa": 1.0, "auroc": run_auroc,
                   "sensitivity": 1.0, "specificity": 1.0,
                   **{f"{m}_ci": (0.1, 0.9) for m in ("accuracy", "f1", "kappa", "auroc",
                                                      "sensitivity", "specificity")}}
        store.save_evaluation(session=session, job_id=job.id,
                              groups={None: figures, "wrist": {**figures, "n": 3}},
                              threshold=0.5, resamples=10, seed=0)
    rows = _rows(session, queries["latest_evaluation"], job.id)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("overall", 4, 1, 0.75),
                                                        ("wrist", 3, 1, 0.75)]
