"""Reads: models by reference, jobs, a job's progress and its results as plain dicts."""

from __future__ import annotations

import string
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from bonexray.db.ledger import any_live_lease
from bonexray.db.tables import Evaluation, Job, Model, Study, View, utcnow
from bonexray.errors import InvalidValueError, JobNotFoundError
from bonexray.pipeline.records import DONE, EMPTY, FAILED, QUEUED, STATUSES

PREDICTIONS = ("normal", "abnormal")
ORDERS = ("study", "score", "-score")
MIN_SHA_PREFIX = 8
_MAX_ID = 2**31 - 1


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _bytewise(session: Session, column: Any) -> Any:
    # Byte order on Postgres too, whatever the database's collation: the same order as
    # SQLite and as Python's sorted().
    if session.get_bind().dialect.name == "postgresql":
        return column.collate("C")
    return column


def get_model(*, session: Session, ref: str) -> Model | None:
    """A registered model by name, by id, or by sha256 (whole, or a unique prefix of 8+)."""
    ref = ref.strip()
    if not ref:
        return None
    model = session.scalar(select(Model).where(Model.name == ref))
    if model is not None:
        return model
    if ref.isdigit() and int(ref) <= _MAX_ID:
        model = session.get(Model, int(ref))
        if model is not None:
            return model
    prefix = ref.lower()
    if len(prefix) >= MIN_SHA_PREFIX and all(c in string.hexdigits for c in prefix):
        matches = session.scalars(
            select(Model).where(Model.sha256.startswith(prefix)).limit(2)
        ).all()
        if len(matches) == 1:
            return matches[0]
    return None


def get_job(*, session: Session, job_id: int) -> Job | None:
    """The job with this id, if any."""
    return session.get(Job, job_id)


def latest_job(*, session: Session) -> Job | None:
    """The most recently created job, if any."""
    return session.scalar(select(Job).order_by(Job.id.desc()).limit(1))


def _status_counts(session: Session, *conditions: ColumnElement[bool]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    rows = session.execute(
        select(Study.job_id, Study.status, func.count())
        .where(*conditions)
        .group_by(Study.job_id, Study.status)
    )
    for job_id, status, n in rows:
        counts.setdefault(job_id, dict.fromkeys(STATUSES, 0))[status] = n
    return counts


def list_jobs(*, session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The newest jobs first, each with its model's name and its studies counted by status."""
    rows = session.execute(
        select(Job, Model.name)
        .join(Model, Model.id == Job.model_id)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    if not rows:
        return []
    counts = _status_counts(session, Study.job_id.in_([job.id for job, _ in rows]))
    jobs = []
    for job, model_name in rows:
        by_status = counts.get(job.id, dict.fromkeys(STATUSES, 0))
        jobs.append({
            "job": job.id,
            "root": job.root,
            "model_id": job.model_id,
            "model": model_name,
            "mode": job.mode,
            "created_at": _iso(job.created_at),
            "finished_at": _iso(job.finished_at),
            "studies": job.n_studies,
            "views": job.n_views,
            **by_status,
            "finished": by_status[QUEUED] == 0,
        })
    return jobs


def count_jobs(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job)) or 0)


RUNNING, FINISHED_STATE, STALLED = "running", "finished", "stalled"


def job_progress(*, session: Session, job_id: int, lease_seconds: int = 30,
                 stall_seconds: int = 300, now: datetime | None = None) -> dict[str, Any]:
    """Where a job stands: studies by status (`queued` counts every unfinished study,
    `in_flight` those of them a live lease holds, `partial` the done ones scored from some
    of their views), views scored and failed, throughput, and its state.

    state: finished (no study queued); stalled (studies queued, none leased, no study
    finished nor heartbeat seen for `stall_seconds`, and no live lease on any study of
    the database: no worker is getting anywhere); else running. images_per_s counts
    scored and failed views over the time from the job's creation to its last scored or
    failed study; None before any.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job with id {job_id}")
    now = now or utcnow()
    counts = dict.fromkeys(STATUSES, 0)
    last_by_status: dict[str, datetime | None] = {}
    for status, n, last in session.execute(
        select(Study.status, func.count(), func.max(Study.finished_at))
        .where(Study.job_id == job_id)
        .group_by(Study.status)
    ):
        counts[status] = n
        last_by_status[status] = last
    n_views, n_scored, n_failed = session.execute(
        select(func.count(View.id), func.count(View.prob), func.count(View.error))
        .join(Study, Study.id == View.study_id)
        .where(Study.job_id == job_id)
    ).one()
    partial = in_flight = 0
    last_heartbeat = None
    if counts[DONE]:
        partial = int(session.scalar(select(func.count()).select_from(Study).where(
            Study.job_id == job_id, Study.status == DONE, Study.partial.is_(True))) or 0)
    if counts[QUEUED]:
        expired = now - timedelta(seconds=lease_seconds)
        in_flight, last_heartbeat = session.execute(
            select(func.count(Study.heartbeat_at).filter(Study.heartbeat_at >= expired),
                   func.max(Study.heartbeat_at))
            .where(Study.job_id == job_id, Study.status == QUEUED)
        ).one()

    worked = [t for s in (DONE, FAILED) if (t := last_by_status.get(s)) is not None]
    last_worked = max(worked) if worked else None
    images_per_s = None
    if last_worked is not None and n_views:
        elapsed = (last_worked - job.created_at).total_seconds()
        if elapsed > 0:
            images_per_s = (n_scored + n_failed) / elapsed

    finished = counts[QUEUED] == 0
    finished_at = job.finished_at
    if finished and finished_at is None:
        # Not yet stamped by finish_job_if_done: the last study's time, else creation.
        ends = [t for t in last_by_status.values() if t is not None]
        finished_at = max(ends) if ends else job.created_at
    moments = [t for t in (job.created_at, last_worked, last_heartbeat) if t is not None]
    last_progress = max(moments)
    idle = (now - last_progress).total_seconds()
    if finished:
        state = FINISHED_STATE
    elif (not in_flight and idle > stall_seconds
          and not any_live_lease(session=session, lease_seconds=lease_seconds, now=now)):
        # No worker holds anything anywhere: nobody is getting to this job. (Workers busy
        # with other jobs of the database mean it waits its turn.)
        state = STALLED
    else:
        state = RUNNING
    return {
        "job": job.id,
        "state": state,
        "studies": sum(counts.values()),
        QUEUED: counts[QUEUED],
        "in_flight": int(in_flight or 0),
        DONE: counts[DONE],
        "partial": partial,
        FAILED: counts[FAILED],
        EMPTY: counts[EMPTY],
        "views": job.n_views,
        "views_scored": n_scored,
        "views_failed": n_failed,
        "finished": finished,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(finished_at),
        "last_progress": _iso(last_progress),
        "images_per_s": images_per_s,
    }


def key_pattern(pattern: str) -> str:
    """A LIKE pattern for a study-key filter: `*` any run of characters, `?` one; matched
    anywhere in the key (a pattern without wildcards is a substring)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%" + escaped.replace("*", "%").replace("?", "_") + "%"


def _result_conditions(*, job_id: int, body_part: str | None, prediction: str | None,
                       status: str | None, min_score: float | None, max_score: float | None,
                       study: str | None) -> list[ColumnElement[bool]]:
    if prediction is not None and prediction not in PREDICTIONS:
        raise InvalidValueError(f"prediction {prediction!r} is not one of "
                                f"{', '.join(PREDICTIONS)}")
    if status is not None and status not in STATUSES:
        raise InvalidValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    conditions: list[ColumnElement[bool]] = [Study.job_id == job_id]
    if body_part is not None:
        conditions.append(func.lower(Study.body_part) == body_part.lower())
    if prediction is not None:
        conditions.append(Study.prediction == prediction)
    if status is not None:
        conditions.append(Study.status == status)
    if min_score is not None:
        conditions.append(Study.score >= min_score)
    if max_score is not None:
        conditions.append(Study.score <= max_score)
    if study is not None:
        conditions.append(Study.key.ilike(key_pattern(study), escape="\\"))
    return conditions


def count_job_results(*, session: Session, job_id: int, body_part: str | None = None,
                      prediction: str | None = None, status: str | None = None,
                      min_score: float | None = None, max_score: float | None = None,
                      study: str | None = None) -> int:
    """How many studies job_results would return with these filters and no limit."""
    conditions = _result_conditions(job_id=job_id, body_part=body_part, prediction=prediction,
                                    status=status, min_score=min_score, max_score=max_score,
                                    study=study)
    return int(session.scalar(select(func.count()).select_from(Study).where(*conditions))
               or 0)


def job_results(*, session: Session, job_id: int, body_part: str | None = None,
                prediction: str | None = None, status: str | None = None,
                limit: int | None = None, min_score: float | None = None,
                max_score: float | None = None, study: str | None = None,
                order: str = "study") -> list[dict[str, Any]]:
    """A job's studies with their views, optionally filtered, by study key (or by score,
    `score` ascending or `-score` descending, unscored studies last); views by source.

    Score bounds are inclusive and leave out unscored studies; `study` is a case-insensitive
    pattern on the key (see key_pattern). Two queries however many studies: the studies, then the
    views of those studies.
    """
    if order not in ORDERS:
        raise InvalidValueError(f"order {order!r} is not one of {', '.join(ORDERS)}")
    conditions = _result_conditions(job_id=job_id, body_part=body_part, prediction=prediction,
                                    status=status, min_score=min_score, max_score=max_score,
                                    study=study)
    ordering: list[Any] = [_bytewise(session, Study.key)]
    if order != "study":
        ordering = [Study.score.is_(None),
                    Study.score.desc() if order == "-score" else Study.score, *ordering]

    studies = session.execute(
        select(Study.id, Study.key, Study.body_part, Study.label, Study.score,
               Study.prediction, Study.status, Study.partial, Study.error)
        .where(*conditions)
        .order_by(*ordering)
        .limit(limit)
    ).all()
    if not studies:
        return []

    # The same selection as a subquery, not a list of ids: no bound-parameter limit.
    chosen = select(Study.id).where(*conditions)
    if limit is not None:
        chosen = chosen.order_by(*ordering).limit(limit)
    views: dict[int, list[dict[str, Any]]] = {}
    for study_id, source, prob, error in session.execute(
        select(View.study_id, View.source, View.prob, View.error)
        .where(View.study_id.in_(chosen))
        .order_by(View.study_id, _bytewise(session, View.source))
    ):
        views.setdefault(study_id, []).append({"source": source, "prob": prob, "error": error})

    return [
        {
            "study": s.key,
            "body_part": s.body_part,
            "label": s.label,
            "score": s.score,
            "prediction": s.prediction,
            "status": s.status,
            "partial": bool(s.partial),
            "error": s.error,
            "views": views.get(s.id, []),
        }
        for s in studies
    ]


def job_timings(*, session: Session, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """For each job: seconds from creation to its finish (or to its last finished study
    while running; None before any) and views handled per second over that time."""
    if not job_ids:
        return {}
    last_done = dict(session.execute(
        select(Study.job_id, func.max(Study.finished_at))
        .where(Study.job_id.in_(job_ids), Study.status.in_((DONE, FAILED)))
        .group_by(Study.job_id)
    ).all())
    handled = dict(session.execute(
        select(Study.job_id, func.count(View.id))
        .join(View, View.study_id == Study.id)
        .where(Study.job_id.in_(job_ids))
        .group_by(Study.job_id)
    ).all())
    timings: dict[int, dict[str, Any]] = {}
    for job in session.scalars(select(Job).where(Job.id.in_(job_ids))):
        end = job.finished_at or last_done.get(job.id)
        duration = (end - job.created_at).total_seconds() if end is not None else None
        views = handled.get(job.id, 0)
        rate = views / duration if duration and duration > 0 and views else None
        timings[job.id] = {"duration_s": duration, "images_per_s": rate}
    return timings


def study_outcomes(*, session: Session, job_id: int) -> list[dict[str, Any]]:
    """Every study of a job as {study (its key), body_part, label, score, status, partial}, by key:
    what an evaluation compares."""
    rows = session.execute(
        select(Study.key.label("study"), Study.body_part, Study.label, Study.score, Study.status,
               Study.partial)
        .where(Study.job_id == job_id)
        .order_by(_bytewise(session, Study.key))
    )
    return [dict(row._mapping) for row in rows]


def latest_evaluation(*, session: Session, job_id: int) -> list[Evaluation]:
    """The rows of a job's latest evaluation run: overall (body_part None) first, then by
    body part; empty when the job was never evaluated."""
    run = session.scalar(select(func.max(Evaluation.run)).where(Evaluation.job_id == job_id))
    if run is None:
        return []
    return list(session.scalars(
        select(Evaluation)
        .where(Evaluation.job_id == job_id, Evaluation.run == run)
        .order_by(Evaluation.body_part.is_not(None), Evaluation.body_part)
    ))


def list_models(*, session: Session) -> list[dict[str, Any]]:
    """Every registered model, oldest first: its name (`model`), id, sha256, path, created_at
    and metadata."""
    return [
        {"model": m.name, "id": m.id, "sha256": m.sha256, "path": m.path,
         "created_at": _iso(m.created_at), "metadata": dict(m.meta or {})}
        for m in session.scalars(select(Model).order_by(Model.id))
    ]
