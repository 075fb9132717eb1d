"""Writes: register models, create jobs, save results as idempotent upserts, finish jobs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, bindparam, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from bonexray.db.tables import BatchStat as BatchStatRow
from bonexray.db.tables import Evaluation, Job, Model, Study, View, utcnow
from bonexray.errors import BonexrayError
from bonexray.pipeline.records import EMPTY, FAILED, QUEUED, BatchStat, StudyResult
from bonexray.studies import Study as FoundStudy

log = logging.getLogger(__name__)

EMPTY_STUDY_ERROR = "no views: the folder holds no .png/.jpg/.jpeg files"

# Core tables for the executemany statements (bound parameters per row, upserts).
_STUDIES = cast(Table, Study.__table__)
_VIEWS = cast(Table, View.__table__)


class ModelNameError(BonexrayError, ValueError):
    """A model name asked for explicitly is already taken by a different model file."""


def _free_name(session: Session, stem: str) -> str:
    taken = set(session.scalars(
        select(Model.name).where((Model.name == stem) | Model.name.startswith(f"{stem}-"))
    ))
    if stem not in taken:
        return stem
    n = 2
    while f"{stem}-{n}" in taken:
        n += 1
    return f"{stem}-{n}"


def register_model(*, session: Session, path: str, sha256: str, meta: dict[str, Any],
                   name: str | None = None) -> Model:
    """The model row for this file's sha256, made if new; a moved file updates its path.

    Without `name` the file's stem is used, suffixed (-2, -3, ...) if another file has it.
    """
    sha256 = sha256.lower()
    model = session.scalar(select(Model).where(Model.sha256 == sha256))
    if model is not None:
        if model.path != path:
            log.info("model %s moved: %s -> %s", model.name, model.path, path)
            model.path = path
            session.flush()
        return model
    if name is None:
        name = _free_name(session, Path(path).stem)
    else:
        other = session.scalar(select(Model.sha256).where(Model.name == name))
        if other is not None:
            raise ModelNameError(
                f"model name {name!r} is taken by another file (sha256 {other[:12]}...)"
            )
    model = Model(name=name, sha256=sha256, path=path, meta=dict(meta), created_at=utcnow())
    session.add(model)
    session.flush()
    return model


NOT_UTF8_FILE = "file name is not valid UTF-8 (shown with \\x escapes): rename the file"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8 (shown with \\x escapes): rename the folder"


def storable_path(path: str) -> tuple[str, bool]:
    """(text for SQL, True if it is the path itself). A name read from a filesystem in
    another encoding holds lone surrogates that neither PostgreSQL nor SQLite can store:
    it is kept with \\x escapes, and whoever reads it back knows it cannot be opened."""
    try:
        path.encode("utf-8")
        return path, True
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), False


def create_job(*, session: Session, root: str, model_id: int, studies: Sequence[FoundStudy],
               mode: str, options: dict[str, Any], sent: bool = False,
               queue: str | None = None) -> Job:
    """A new job with one row per study, and one per view: the ledger the workers read.

    A study is queued, or empty (and finished) without views, or failed at once when its
    folder name cannot be stored; a view whose file name cannot be stored fails at once
    with the reason, and its study goes on with the rest. `sent`: the studies' messages
    are about to be published to `queue` (the reaper counts from now).
    """
    now = utcnow()
    job = Job(root=root, model_id=model_id, mode=mode, options=dict(options), queue=queue,
              n_studies=len(studies), n_views=sum(len(s.views) for s in studies),
              created_at=now, finished_at=None)
    session.add(job)
    session.flush()
    rows = []
    views_by_key: dict[str, list[dict[str, Any]]] = {}
    for s in studies:
        key, key_ok = storable_path(s.key)
        views = []
        uids = s.view_uids or (None,) * len(s.views)
        for view, sop_uid in zip(s.views, uids, strict=True):
            text, ok = storable_path(view)
            views.append({"source": text, "sop_uid": sop_uid, "prob": None,
                          "error": None if ok else NOT_UTF8_FILE})
        if not key_ok:
            status, error = FAILED, NOT_UTF8_FOLDER
            views = []
        elif not views:
            status, error = EMPTY, EMPTY_STUDY_ERROR
        elif all(v["error"] for v in views):
            status, error = FAILED, f"no view could be scored: all {len(views)} failed: " \
                                    f"{NOT_UTF8_FILE}"
        else:
            status, error = QUEUED, None
        views_by_key[key] = views
        rows.append({
            "job_id": job.id,
            "key": key,
            "study_uid": s.study_uid,
            "accession": s.accession,
            "body_part": s.body_part,
            "patient": s.patient,
            "label": s.label,
            "n_views": len(s.views),
            "status": status,
            "error": error,
            "attempts": 0,
            "finished_at": None if status == QUEUED else now,
            "sent_at": now if sent and status == QUEUED else None,
        })
    if rows:
        # One executemany (batched multi-row VALUES), not an ORM unit of work per study.
        ids = session.execute(insert(Study).returning(Study.id, Study.key), rows).all()
        view_rows = [{"study_id": study_id, **view}
                     for study_id, key in ids for view in views_by_key[key]]
        if view_rows:
            session.execute(insert(View), view_rows)
    return job


def queued_studies(*, session: Session, job_id: int) -> list[tuple[int, str]]:
    """(id, key) of the job's studies still waiting for a result, by id."""
    rows = session.execute(
        select(Study.id, Study.key)
        .where(Study.job_id == job_id, Study.status == QUEUED)
        .order_by(Study.id)
    )
    return [(row.id, row.key) for row in rows]


def _dialect_insert(session: Session, table: Table) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are written for postgresql and sqlite, not {dialect}")


def _upsert_views(session: Session, rows: list[dict[str, Any]]) -> None:
    table = _VIEWS
    stmt: Any = _dialect_insert(session, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.study_id, table.c.source],
        set_={"prob": stmt.excluded.prob, "error": stmt.excluded.error},
    )
    session.execute(stmt, rows)


def save_results(*, session: Session, job_id: int, results: Sequence[StudyResult],
                 worker: str) -> int:
    """Write the results of studies still queued, with their views, and end their leases;
    returns how many were written. A study already finished (by another delivery of the
    same chunk) keeps its result: saving again changes nothing.

    Bulk statements: Study objects already loaded in `session` are not refreshed.
    """
    if not results:
        return 0
    table = _STUDIES
    open_ids = set(session.scalars(
        select(table.c.id)
        .where(table.c.id.in_(sorted({r.study_id for r in results})),
               table.c.job_id == job_id, table.c.status == QUEUED)
        .order_by(table.c.id)
        .with_for_update()
    ))
    results = [r for r in results if r.study_id in open_ids]
    if not results:
        return 0
    now = utcnow()
    stmt = (
        update(table)
        # Still queued: on SQLite, which takes no row locks, a second writer finds it done.
        .where(table.c.id == bindparam("b_id"), table.c.job_id == job_id,
               table.c.status == QUEUED)
        .values(
            status=bindparam("b_status"),
            score=bindparam("b_score"),
            prediction=bindparam("b_prediction"),
            error=bindparam("b_error"),
            partial=bindparam("b_partial"),
            worker=worker,
            finished_at=now,
            claimed_by=None,
            heartbeat_at=None,
            decoding=None,
        )
    )
    study_rows = [
        {"b_id": r.study_id, "b_status": r.status, "b_score": r.score,
         "b_prediction": r.prediction, "b_error": r.error, "b_partial": r.partial}
        for r in sorted(results, key=lambda r: r.study_id)
    ]
    session.execute(stmt, study_rows)
    # Keyed by (study, path), last result wins: one statement must not touch a row twice.
    views: dict[tuple[int, str], dict[str, Any]] = {}
    for r in results:
        for v in r.views:
            views[(r.study_id, v.source)] = {"study_id": r.study_id, "source": v.source,
                                           "prob": v.prob, "error": v.error}
    if views:
        _upsert_views(session, [views[k] for k in sorted(views)])
    return len(results)


def mark_failed(*, session: Session, study_ids: Sequence[int], error: str,
                worker: str, job_id: int | None = None) -> None:
    """Fail the studies among `study_ids` still queued (of `job_id`, when given), with
    `error`, ending their leases (results stay as they are)."""
    if not study_ids:
        return
    conditions = [Study.id.in_(sorted(study_ids)), Study.status == QUEUED]
    if job_id is not None:
        conditions.append(Study.job_id == job_id)
    session.execute(
        update(Study)
        .where(*conditions)
        .values(status=FAILED, error=error, worker=worker, finished_at=utcnow(),
                claimed_by=None, heartbeat_at=None, decoding=None)
    )


def save_batch_stats(*, session: Session, job_id: int, worker: str, provider: str,
                     stats: Sequence[BatchStat], chunk: str | None = None) -> None:
    """Record the timing of each inference batch. Rows are keyed by (job, `chunk`, batch
    number): a chunk delivered again rewrites its rows instead of adding more."""
    if not stats:
        return
    now = utcnow()
    rows = [
        {"job_id": job_id, "worker": worker, "provider": provider, "n_views": s.n_views,
         "decode_ms": s.decode_ms, "infer_ms": s.infer_ms, "write_ms": s.write_ms,
         "created_at": now, "chunk": chunk, "seq": seq if chunk is not None else None}
        for seq, s in enumerate(stats)
    ]
    if chunk is None:
        session.execute(insert(BatchStatRow), rows)
        return
    table = cast(Table, BatchStatRow.__table__)
    stmt: Any = _dialect_insert(session, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.job_id, table.c.chunk, table.c.seq],
        set_={name: stmt.excluded[name] for name in
              ("worker", "provider", "n_views", "decode_ms", "infer_ms", "write_ms",
               "created_at")},
    )
    session.execute(stmt, rows)


def finish_job_if_done(*, session: Session, job_id: int) -> bool:
    """Set the job's finish time once no study is queued; True when the job is finished.

    The finish time is the last study's, so calling this late does not move it.
    """
    # Lock the job row: two workers finishing the last chunks in parallel transactions
    # then check one after the other, and the second sees the first's committed studies.
    # FOR NO KEY UPDATE: it does not conflict with the key-share lock that inserting batch
    # timings (a foreign key to this row) takes, so two such workers cannot deadlock.
    job = session.execute(
        select(Job.id, Job.finished_at).where(Job.id == job_id).with_for_update(key_share=True)
    ).one_or_none()
    if job is None:
        return False
    if job.finished_at is not None:
        return True
    pending = session.scalar(
        select(exists().where(Study.job_id == job_id, Study.status == QUEUED))
    )
    if pending:
        return False
    last = session.scalar(select(func.max(Study.finished_at)).where(Study.job_id == job_id))
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.finished_at.is_(None))
        .values(finished_at=last or utcnow())
    )
    return True


EVALUATION_FIGURES = ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")


def _finite_or_none(value: Any) -> float | None:
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def save_evaluation(*, session: Session, job_id: int, groups: dict[str | None, dict[str, Any]],
                    threshold: float, resamples: int, seed: int) -> int:
    """Store one evaluation run of a job: a row per group (None = overall) with n,
    positives, unscored, unlabelled, EVALUATION_FIGURES and their `<name>_ci` intervals
    (undefined figures as NULL). Returns the run number (1 for a job's first)."""
    last = session.scalar(select(func.max(Evaluation.run)).where(Evaluation.job_id == job_id))
    run = (last or 0) + 1
    now = utcnow()
    for body_part, figures in groups.items():
        ci = {name: [_finite_or_none(x) for x in figures[f"{name}_ci"]]
              for name in EVALUATION_FIGURES}
        session.add(Evaluation(
            job_id=job_id, run=run, body_part=body_part, threshold=float(threshold),
            n=int(figures["n"]), positives=int(figures["positives"]),
            unscored=int(figures["unscored"]), unlabelled=int(figures.get("unlabelled", 0)),
            ci=ci, resamples=resamples, seed=seed, created_at=now,
            **{name: _finite_or_none(figures[name]) for name in EVALUATION_FIGURES},
        ))
    session.flush()
    return run
