"""Job lifecycle shared by `run` and `enqueue`: resolve the model, register studies, process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bonexray.db import query, store
from bonexray.db.session import session_scope
from bonexray.db.tables import Job, Model
from bonexray.db.tables import Study as StudyRow
from bonexray.errors import BonexrayError, InvalidValueError, JobNotFoundError, one_line
from bonexray.pipeline.records import DONE
from bonexray.security import check_folder
from bonexray.settings import Settings, get_settings, mask_url
from bonexray.studies import Scan, Study, StudyError, scan_studies

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class NothingToSend(Exception):
    """Every study under the folder was already scored with this model: no job is made."""

    def __init__(self, root: str, skipped: int) -> None:
        super().__init__(f"all {skipped} studies under {root} were already scored with this "
                         "model; nothing sent (--force sends them again)")
        self.root, self.skipped = root, skipped


@dataclass(frozen=True)
class PreparedJob:
    job_id: int
    model_id: int
    studies: int
    views: int
    empty: int  # studies final at registration: no views, or names that cannot be stored
    study_ids: tuple[int, ...]  # the studies to classify
    skipped: int = 0  # studies left out: already scored with this model by an earlier job
    left_out: str | None = None  # one line on the DICOM objects left out (not radiographs)


def done_with_model(*, session: Session, model_id: int, keys: Sequence[str]) -> set[str]:
    """Those of the study `keys` that an earlier job already scored (done) with this model."""
    wanted = sorted(set(keys))
    done: set[str] = set()
    # Asked in slices of the folder's own paths: the registry may hold millions of studies
    # scored with this model, and only these matter.
    for start in range(0, len(wanted), 500):
        done.update(session.scalars(
            select(StudyRow.key).distinct()
            .join(Job, Job.id == StudyRow.job_id)
            .where(Job.model_id == model_id, StudyRow.status == DONE,
                   StudyRow.key.in_(wanted[start : start + 500]))
        ))
    return done


def prepare_job(*, engine: Engine, root: str, model: Model, mode: str,
                options: dict[str, Any] | None = None,
                studies: Sequence[Study] | None = None,
                skip_done: bool = False, queue: str | None = None) -> PreparedJob:
    """Find the studies under `root`, register the job and its studies in SQL; a celery
    job records the queue its chunks go to (default: the settings' queue).

    With `skip_done`, studies already scored with this model by an earlier job are left
    out (failed and empty ones are tried again); `PreparedJob.skipped` counts them.
    """
    check_folder(root)  # BONEXRAY_DATA_ROOTS, symlinks resolved
    scan = Scan(list(studies)) if studies is not None else scan_studies(root)
    found = scan.studies
    root_abs = str(Path(root).expanduser().resolve())
    if not any(s.views for s in found):
        left_out = f"; {scan.left_out}" if scan.left_out else ""
        raise StudyError(f"no view image under {root} ({len(found)} folders without one"
                         f"{left_out}): a study is a folder of view images (.png, .jpg, ...),"
                         " e.g. XR_WRIST/patient1/study1/image1.png, or DICOM CR/DX files")
    if scan.dicom is not None:
        options = {**(options or {}), "dicom_left_out": {
            "not_radiographs": dict(scan.dicom.not_radiographs),
            "duplicates": scan.dicom.duplicates, "unreadable": scan.dicom.unreadable}}
    skipped = 0
    if skip_done:
        with session_scope(engine) as session:
            done = done_with_model(session=session, model_id=model.id,
                                   keys=[s.key for s in found])
        skipped = len(done)
        found = [s for s in found if s.key not in done]
        if not found:
            raise NothingToSend(root, skipped)
    with session_scope(engine) as session:
        job = store.create_job(session=session, root=root_abs, model_id=model.id,
                               studies=found, mode=mode,
                               options={**(options or {}), "skipped": skipped},
                               sent=mode == "celery",
                               queue=(queue or get_settings().queue) if mode == "celery"
                               else None)
        session.flush()
        job_id = job.id
        queued = [sid for sid, _ in store.queued_studies(session=session, job_id=job_id)]
        if not queued:
            store.finish_job_if_done(session=session, job_id=job_id)
    n_views = sum(len(s.views) for s in found)
    # Folder names can identify patients: INFO logs carry ids and counts, the root only at DEBUG.
    log.info("job %d: %d studies (%d views, %d final at registration, %d skipped as already "
             "done)", job_id, len(found), n_views, len(found) - len(queued), skipped)
    log.debug("job %d: root %s", job_id, root_abs)
    return PreparedJob(job_id=job_id, model_id=model.id, studies=len(found), views=n_views,
                       empty=len(found) - len(queued), study_ids=tuple(queued),
                       skipped=skipped, left_out=scan.left_out)


def chunked(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    size = max(1, size)
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def chunk_message(*, job_id: int, database: str, study_ids: Sequence[int]) -> dict[str, Any]:
    """The task message: JSON, ids only (job, studies) and the identity of the database
    they belong to. Workers read everything else from SQL."""
    return {"job": job_id, "db": database, "studies": [int(i) for i in study_ids]}


@dataclass(frozen=True)
class ChunkMessage:
    job: int
    database: str
    studies: tuple[int, ...]

    @classmethod
    def from_json(cls, payload: Any) -> ChunkMessage:
        """Parse a message, refusing (ValueError) anything but the shape chunk_message makes."""
        if not isinstance(payload, dict) or set(payload) != {"job", "db", "studies"}:
            keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"not a chunk message (keys {keys}; expected db, job, studies)")
        job, database, studies = payload["job"], payload["db"], payload["studies"]
        if not (isinstance(job, int) and isinstance(database, str) and isinstance(studies, list)
                and studies and all(isinstance(i, int) for i in studies)):
            raise ValueError("chunk message fields have the wrong types")
        return cls(job=job, database=database, studies=tuple(studies))


def run_embedded(*, engine: Engine, job: PreparedJob, settings: Settings,
                 progress: Progress | None = None) -> None:
    """Classify the job in this process, chunk by chunk, with the worker's own code path
    (leases, careful decoding, riding out database errors)."""
    from bonexray.pipeline.chunks import run_chunk, worker_name

    url = engine.url.render_as_string(hide_password=False)
    worker = worker_name()
    for n, chunk in enumerate(chunked(job.study_ids, settings.chunk_size)):
        run_chunk(database_url=url, job_id=job.job_id, study_ids=chunk, settings=settings,
                  worker=worker, chunk=f"embedded-{job.job_id}-{n}")
        if progress:
            progress(len(chunk))
    with session_scope(engine) as session:
        store.finish_job_if_done(session=session, job_id=job.job_id)


class BrokerError(BonexrayError, RuntimeError):
    """The broker cannot be reached."""


def check_broker(settings: Settings) -> None:
    """Fail fast, before a job is registered, when the broker is not reachable."""
    from bonexray.worker.app import create_app

    app = create_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)
    except Exception as exc:  # kombu wraps every transport error differently
        raise BrokerError(f"broker {mask_url(settings.broker_url)} unreachable: "
                          f"{one_line(exc, limit=200)}") from None


def send_chunks(*, app: Any, settings: Settings, database: str,
                chunks: Sequence[tuple[int, Sequence[int]]],
                progress: Progress | None = None) -> int:
    """Publish (job id, study ids) chunks; returns the number of messages sent."""
    from bonexray.worker.app import TASK_CLASSIFY

    sent = 0
    with app.producer_or_acquire() as producer:
        for job_id, ids in chunks:
            app.send_task(TASK_CLASSIFY,
                          args=[chunk_message(job_id=job_id, database=database, study_ids=ids)],
                          queue=settings.queue, producer=producer,
                          argsrepr=f"(job={job_id}, studies={len(ids)} [{min(ids)}..{max(ids)}])",
                          kwargsrepr="{}")
            sent += 1
            if progress:
                progress(len(ids))
    return sent


def send_job(*, engine: Engine, job: PreparedJob, settings: Settings,
             progress: Progress | None = None) -> int:
    """Send the job's chunks to the broker; returns the number of messages sent. A chunk
    whose publishing fails is sent again by a worker's reaper."""
    from bonexray.db.ledger import database_id
    from bonexray.worker.app import create_app

    chunks = [(job.job_id, ids) for ids in chunked(job.study_ids, settings.chunk_size)]
    return send_chunks(app=create_app(settings), settings=settings,
                       database=database_id(engine), chunks=chunks, progress=progress)


@dataclass(frozen=True)
class Requeued:
    job_id: int
    studies: int  # sent again
    chunks: int
    leased: int  # unfinished, held by a live worker: not sent
    waiting: int  # unfinished, their message still waits in the queue: not sent


def requeue_job(*, engine: Engine, job_id: int, settings: Settings) -> Requeued:
    """Send again, from SQL, every unfinished study of the job that no live worker holds
    and whose message is not waiting in the queue. Safe to repeat, and while the job runs."""
    from bonexray.db.ledger import count_leased
    from bonexray.worker.app import create_app
    from bonexray.worker.reaper import resend_unfinished

    with session_scope(engine) as session:
        job = query.get_job(session=session, job_id=job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id} in the database")
        if job.mode != "celery":
            raise InvalidValueError(f"job {job_id} ran embedded (`bonexray run`): nothing to "
                                    "requeue on the broker; run the folder again")
        leased = count_leased(session=session, job_id=job_id,
                              lease_seconds=settings.lease_seconds)
    done = resend_unfinished(engine=engine, app=create_app(settings), settings=settings,
                             job_id=job_id, grace_seconds=0)
    log.info("job %d: requeued %d studies in %d chunks (%d leased, %d waiting)", job_id,
             done.studies, done.chunks, leased, done.waiting)
    return Requeued(job_id=job_id, studies=done.studies, chunks=done.chunks, leased=leased,
                    waiting=done.waiting)
