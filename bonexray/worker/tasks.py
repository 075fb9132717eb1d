"""Celery tasks; thin: parse the JSON message, delegate to process_chunk, retry what can heal."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from bonexray.db.session import DatabaseError, open_database, session_scope
from bonexray.results import StudyTask
from bonexray.settings import get_settings
from bonexray.worker.app import TASK_CLASSIFY, app
from bonexray.worker.inference import ModelLoadError
from bonexray.worker.process import process_chunk, worker_name

log = logging.getLogger(__name__)


def retry_countdown(retries: int, visibility_timeout: int) -> int:
    """Exponential backoff (2, 4, 8 ... s, at most 60), always well below the visibility
    timeout, or Redis would hand the same message to a second worker meanwhile."""
    return int(max(1, min(2 ** (retries + 1), 60, visibility_timeout // 4)))


def is_transient(exc: BaseException) -> bool:
    """Errors that heal by themselves: the database unreachable, restarting, or locked."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError |
                  PoolTimeoutError | DatabaseError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True)
def classify_chunk(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Classify one chunk: {"job": id, "model": id, "studies": [{"id", "path", "views"}]}."""
    settings = get_settings()
    job_id = int(payload["job"])
    model_id = int(payload["model"])
    tasks = [StudyTask.from_json(s) for s in payload["studies"]]
    try:
        engine = open_database(settings.database_url)
        summary = process_chunk(engine=engine, job_id=job_id, model_id=model_id, tasks=tasks,
                                settings=settings, worker=worker_name())
    except ModelLoadError as exc:
        # Not transient (a changed or missing model file): fail the chunk's studies with the
        # reason; retrying would not heal it. mark_failed only touches studies still queued.
        log.error("job %d: chunk failed: %s", job_id, exc)
        _fail_chunk(job_id, tasks, str(exc))
        return {"job": job_id, "studies": len(tasks), "error": str(exc)}
    except Exception as exc:
        if not is_transient(exc):
            # A bug or a broken model output: account for the studies, then let Celery log
            # the traceback. A bad image never lands here (it fails its view in the pipeline).
            _fail_chunk(job_id, tasks, f"worker error: {type(exc).__name__}: {_one_line(exc)}")
            raise
        if self.request.retries >= settings.max_retries:
            _fail_chunk(job_id, tasks, f"database error after {settings.max_retries} "
                        f"retries: {type(exc).__name__}: {_one_line(exc)}")
            raise
        countdown = retry_countdown(self.request.retries, settings.visibility_timeout)
        log.warning("job %d: database unavailable (%s); retry %d/%d in %d s", job_id,
                    type(exc).__name__, self.request.retries + 1, settings.max_retries, countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=settings.max_retries) from exc
    return {"job": job_id, "studies": summary.studies, "done": summary.done,
            "failed": summary.failed, "views": summary.views, "provider": summary.provider}


def _fail_chunk(job_id: int, tasks: list[StudyTask], error: str) -> None:
    from bonexray.db import store

    try:
        engine = open_database(get_settings().database_url)
        with session_scope(engine) as session:
            store.mark_failed(session=session, study_ids=[t.id for t in tasks], error=error,
                              worker=worker_name())
    except Exception as exc:
        log.error("job %d: could not record the failed chunk (%s); its studies stay queued: "
                  "`bonexray requeue %d` sends them again", job_id, _one_line(exc), job_id)
        return
    try:
        # Separately: the job row may be what is locked; the failures above are recorded.
        with session_scope(engine) as session:
            store.finish_job_if_done(session=session, job_id=job_id)
    except Exception as exc:
        log.warning("job %d: could not stamp the job's finish time: %s", job_id, _one_line(exc))
