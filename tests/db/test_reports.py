"""Reads and writes for reporting: result filters and order, job timings, evaluations."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bonexray.db import query, store
from bonexray.db.tables import Evaluation, Job, Model, Study
from bonexray.pipeline.records import StudyResult, ViewResult
from bonexray.studies import Study as FoundStudy

# path, body part, label, score (None: failed)
SPECS = [("/r/XR_HAND/p_1/study1_positive", "hand", 1, 0.80),
         ("/r/XR_HAND/p%2/study1_negative", "hand", 0, 0.35),
         ("/r/XR_WRIST/p3/study1_positive", "wrist", 1, 0.55),
         ("/r/XR_WRIST/p4/study1_negative", "wrist", 0, None),
         ("/r/XR_WRIST/p5/study1_negative", "wrist", None, 0.10),
         ("/r/XR_ELBOW/px1/study2_positive", "elbow", 1, 0.35)]


def _job(session: Session, model: Model) -> Job:
    found = [FoundStudy(key=p, views=(f"{p}/image1.png",), body_part=part, label=label)
             for p, part, label, _ in SPECS]
    job = store.create_job(session=session, root="/r", model_id=model.id, studies=found,
                           mode="embedded", options={})
    ids = {path: i for i, path in store.queued_studies(session=session, job_id=job.id)}
    results = []
    for p, _, _, score in SPECS:
        view = ViewResult(f"{p}/image1.png", score, None if score is not None else "bad")
        if score is None:
            results.append(StudyResult(ids[p], p, "failed", None, None, (view,), "no view"))
        else:
            results.append(StudyResult(ids[p], p, "done", score,
                                       "abnormal" if score >= 0.5 else "normal", (view,)))
    store.save_results(session=session, job_id=job.id, results=results, worker="w")
    return job


def _paths(session: Session, job: Job, **filters: object) -> list[str]:
    return [r["study"] for r in query.job_results(session=session, job_id=job.id,
                                                  **filters)]  # type: ignore[arg-type]


def test_score_range_filters(session: Session, model: Model) -> None:
    job = _job(session, model)
    assert _paths(session, job, min_score=0.35, max_score=0.55) == [
        "/r/XR_ELBOW/px1/study2_positive", "/r/XR_HAND/p%2/study1_negative",
        "/r/XR_WRIST/p3/study1_positive"]  # bounds inclusive; the failed study has no score
    assert _paths(session, job, min_score=0.9) == []
    assert _paths(session, job, max_score=0.1) == ["/r/XR_WRIST/p5/study1_negative"]


def test_key_pattern(session: Session, model: Model) -> None:
    job = _job(session, model)
    assert _paths(session, job, study="xr_wrist") == [p for p, *_ in SPECS if "WRIST" in p]
    assert _paths(session, job, study="*positive") == [
        "/r/XR_ELBOW/px1/study2_positive", "/r/XR_HAND/p_1/study1_positive",
        "/r/XR_WRIST/p3/study1_positive"]
    assert _paths(session, job, study="/p?/study1_neg") == [
        "/r/XR_WRIST/p4/study1_negative", "/r/XR_WRIST/p5/study1_negative"]
    # `_` and `%` in a pattern are literal characters, not LIKE wildcards.
    assert _paths(session, job, study="p_1") == ["/r/XR_HAND/p_1/study1_positive"]
    assert _paths(session, job, study="p%2") == ["/r/XR_HAND/p%2/study1_negative"]
    assert _paths(session, job, study="hand/*study2") == []
    assert query.key_pattern("a_b%c*d?") == "%a\\_b\\%c%d_%"


def test_order_by_score(session: Session, model: Model) -> None:
    job = _job(session, model)
    by_score = [(r["score"], r["study"]) for r in query.job_results(
        session=session, job_id=job.id, order="-score")]
    assert by_score == [(0.80, SPECS[0][0]), (0.55, SPECS[2][0]),
                        (0.35, SPECS[5][0]), (0.35, SPECS[1][0]),  # ties by path
                        (0.10, SPECS[4][0]), (None, SPECS[3][0])]  # unscored last
    ascending = [r["score"] for r in query.job_results(session=session, job_id=job.id,
                                                       order="score")]
    assert ascending == [0.10, 0.35, 0.35, 0.55, 0.80, None]
    top = query.job_results(session=session, job_id=job.id, order="-score", limit=2)
    assert [r["score"] for r in top] == [0.80, 0.55]
    assert [len(r["views"]) for r in top] == [1, 1]
    with pytest.raises(ValueError, match="study, score, -score"):
        query.job_results(session=session, job_id=job.id, order="label")


def test_job_timings(session: Session, model: Model) -> None:
    job = _job(session, model)
    empty = store.create_job(session=session, root="/e", model_id=model.id, studies=[],
                             mode="embedded", options={})
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    session.execute(update(Job).where(Job.id == job.id).values(created_at=start))
    session.execute(update(Study).where(Study.job_id == job.id)
                    .values(finished_at=start + timedelta(seconds=3)))
    session.flush()
    timings = query.job_timings(session=session, job_ids=[job.id, empty.id])
    assert timings[job.id]["duration_s"] == pytest.approx(3.0)
    assert timings[job.id]["images_per_s"] == pytest.approx(6 / 3.0)
    assert timings[empty.id] == {"duration_s": None, "images_per_s": None}
    store.finish_job_if_done(session=session, job_id=job.id)
    assert query.job_timings(session=session, job_ids=[job.id])[job.id]["duration_s"] == (
        pytest.approx(3.0))
    assert query.job_timings(session=session, job_ids=[]) == {}


def test_study_outcomes(session: Session, model: Model) -> None:
    job = _job(session, model)
    outcomes = query.study_outcomes(session=session, job_id=job.id)
    assert [o["study"] for o in outcomes] == sorted(p for p, *_ in SPECS)
    first = outcomes[0]
    assert first == {"study": "/r/XR_ELBOW/px1/study2_positive", "body_part": "elbow",
                     "label": 1, "score": 0.35, "status": "done", "partial": False}


def test_save_and_read_evaluations(session: Session, model: Model) -> None:
    job = _job(session, model)
    assert query.latest_evaluation(session=session, job_id=job.id) == []
    nan = float("nan")
    overall = {"n": 4, "positives": 3, "unscored": 1, "unlabelled": 1, "accuracy": 0.5,
               "f1": 0.5, "kappa": 0.0, "auroc": 0.75, "sensitivity": 1 / 3,
               "specificity": 1.0, "accuracy_ci": (0.0, 1.0), "f1_ci": (0.0, 1.0),
               "kappa_ci": (-1.0, 1.0), "auroc_ci": (0.25, 1.0),
               "sensitivity_ci": (0.0, 1.0), "specificity_ci": (1.0, 1.0)}
    elbow = {**overall, "n": 1, "positives": 1, "unscored": 0, "unlabelled": 0,
             "auroc": nan, "kappa": nan, "auroc_ci": (nan, nan), "kappa_ci": (nan, nan)}
    assert store.save_evaluation(session=session, job_id=job.id,
                                 groups={None: overall, "elbow": elbow}, threshold=0.5,
                                 resamples=100, seed=3) == 1
    assert store.save_evaluation(session=session, job_id=job.id,
                                 groups={None: {**overall, "auroc": 0.8}}, threshold=0.4,
                                 resamples=100, seed=3) == 2
    (latest,) = query.latest_evaluation(session=session, job_id=job.id)
    assert (latest.run, latest.body_part, latest.auroc, latest.threshold) == (2, None, 0.8, 0.4)
    rows = session.scalars(select(Evaluation).where(Evaluation.run == 1,
                                                    Evaluation.job_id == job.id)
                           .order_by(Evaluation.body_part.is_not(None))).all()
    assert [r.body_part for r in rows] == [None, "elbow"]
    assert rows[1].auroc is None and rows[1].kappa is None  # NaN stored as NULL
    assert rows[1].ci["auroc"] == [None, None]
    assert rows[0].ci["auroc"] == [0.25, 1.0]
    assert (rows[0].n, rows[0].unscored, rows[0].unlabelled, rows[0].seed) == (4, 1, 1, 3)
    assert math.isclose(rows[0].sensitivity or 0, 1 / 3)
