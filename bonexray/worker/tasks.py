"""Celery tasks; thin: check the JSON message, delegate to run_chunk, stop a sick worker."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Task
from celery.exceptions import Reject

from bonexray.db.ledger import ForeignMessageError
from bonexray.db.session import open_database
from bonexray.jobs import ChunkMessage
from bonexray.pipeline.chunks import (
    UnknownJobError,
    WorkerSickError,
    release_claimed,
    run_chunk,
    worker_name,
)
from bonexray.pipeline.inference import ModelMismatchError
from bonexray.settings import get_settings
from bonexray.worker.app import TASK_CLASSIFY, app

log = logging.getLogger(__name__)

# Set by `bonexray worker` for its pool processes: whom to stop, and where to say why.
MAIN_PID_ENV = "BONEXRAY_WORKER_MAIN_PID"
SICK_FILE_ENV = "BONEXRAY_WORKER_SICK_FILE"


@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True)
def classify_chunk(self: Task, payload: Any) -> dict[str, Any]:
    """Classify one chunk: {"job": id, "db": database id, "studies": [id, ...]}."""
    try:
        message = ChunkMessage.from_json(payload)
    except ValueError as exc:
        log.error("refusing a task message: %s", exc)
        return {"refused": str(exc)}
    settings = get_settings()
    worker = worker_name()
    try:
        summary = run_chunk(database_url=settings.database_url, job_id=message.job,
                            study_ids=message.studies, settings=settings, worker=worker,
                            chunk=self.request.id, database=message.database)
    except (ForeignMessageError, UnknownJobError) as exc:
        # Acknowledged and dropped: scoring it here would write into the wrong database.
        # The producer's job shows as stalled (`bonexray status`).
        log.error("job %d: REFUSED a chunk of %d studies: %s", message.job,
                  len(message.studies), exc)
        return {"job": message.job, "refused": str(exc)}
    except ModelMismatchError as exc:
        # The model itself is bad (not the file registered): its studies were failed with
        # the reason; every worker would say the same.
        return {"job": message.job, "failed": len(message.studies), "error": str(exc)}
    except WorkerSickError as exc:
        release_claimed(engine=open_database(settings.database_url),
                        study_ids=message.studies, worker=worker)
        stop_sick_worker(str(exc))
        raise Reject(str(exc), requeue=True) from None
    return {"job": message.job, "studies": summary.studies, "done": summary.done,
            "failed": summary.failed, "skipped": summary.skipped, "views": summary.views,
            "provider": summary.provider}


def stop_sick_worker(reason: str) -> None:
    """Say why in the log and the sick file, and ask the worker's main process for a warm
    shutdown: it takes no more chunks, and `bonexray worker` exits with EXIT_SICK."""
    log.critical("this worker cannot classify and stops taking work: %s", reason)
    path = os.environ.get(SICK_FILE_ENV)
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(reason)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
    main_pid = os.environ.get(MAIN_PID_ENV)
    if not main_pid:
        # Not started by `bonexray worker`: which process is the main one is unknown here
        # (a signal to this pool process would kill it before its chunk is given back).
        log.critical("start workers with `bonexray worker` so that a sick one can stop itself")
        return
    try:
        os.kill(int(main_pid), signal.SIGTERM)
    except ProcessLookupError:
        log.error("worker main process %s is gone", main_pid)
