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
from bonexray.db.models import Job, Model
from bonexray.db.models import Study as StudyRow
from bonexray.db.session import session_scope
from bonexray.results import DONE, StudyTask
from bonexray.security import check_folder
from bonexray.settings import Settings
from bonexray.studies import Study, StudyError, find_studies

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class ModelNotFoundError(ValueError):
    """--model names neither a registered model nor an existing file."""


class JobNotFoundError(ValueError):
    """No job has the id asked for."""


@dataclass(frozen=True)
class PreparedJob:
    job_id: int
    model_id: int
    studies: int
    views: int
    empty: int
    tasks: tuple[StudyTask, ...]  # the studies to classify (empty ones are already final)
    skipped: int = 0  # studies left out: already scored with this model by an earlier job


def read_model_metadata(path: str) -> dict[str, str]:
    """metadata_props of an ONNX file, read through onnxruntime (the worker has no onnx)."""
    import onnxruntime as ort

    from bonexray.worker.inference import ModelLoadError

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(path, sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are untyped
        first = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"model {path} is not a loadable ONNX model: {first}") from None
    return dict(session.get_modelmeta().custom_metadata_map)


def resolve_model(*, engine: Engine, ref: str, name: str | None = None) -> Model:
    """A registered model by name / sha256 / id, or a model file registered on first use."""
    from bonexray.modelmeta import parse_metadata
    from bonexray.modelstore import store_model_file
    from bonexray.settings import get_settings
    from bonexray.worker.inference import ModelLoadError, sha256_file

    path = Path(ref).expanduser()
    if path.is_file():
        resolved = str(path.resolve())
        sha = sha256_file(resolved)
        try:
            meta = read_model_metadata(resolved)
            parse_metadata(meta, source=f"model {resolved}")
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        store_dir = get_settings().model_store
        if store_dir:
            resolved = store_model_file(resolved, sha256=sha, store_dir=store_dir)
        with session_scope(engine) as session:
            model = store.register_model(session=session, path=resolved, sha256=sha,
                                         meta=meta, name=name)
            session.flush()
            session.expunge(model)
        return model
    with session_scope(engine) as session:
        found = query.get_model(session=session, ref=ref)
        if found is None:
            raise ModelNotFoundError(
                f"--model {ref!r}: no such file and no registered model by that name or sha256"
            )
        session.expunge(found)
    return found


def done_with_model(*, session: Session, model_id: int, paths: Sequence[str]) -> set[str]:
    """Those of `paths` that an earlier job already scored (status done) with this model."""
    wanted = sorted(set(paths))
    done: set[str] = set()
    # Asked in slices of the folder's own paths: the registry may hold millions of studies
    # scored with this model, and only these matter.
    for start in range(0, len(wanted), 500):
        done.update(session.scalars(
            select(StudyRow.path).distinct()
            .join(Job, Job.id == StudyRow.job_id)
            .where(Job.model_id == model_id, StudyRow.status == DONE,
                   StudyRow.path.in_(wanted[start : start + 500]))
        ))
    return done


def prepare_job(*, engine: Engine, root: str, model: Model, mode: str,
                options: dict[str, Any] | None = None,
                studies: Sequence[Study] | None = None,
                skip_done: bool = False) -> PreparedJob:
    """Find the studies under `root`, register the job and its studies in SQL.

    With `skip_done`, studies already scored with this model by an earlier job are left
    out (failed and empty ones are tried again); `PreparedJob.skipped` counts them.
    """
    check_folder(root)  # BONEXRAY_DATA_ROOTS, symlinks resolved
    found = list(studies) if studies is not None else find_studies(root)
    root_abs = str(Path(root).expanduser().resolve())
    skipped = 0
    if skip_done:
        with session_scope(engine) as session:
            done = done_with_model(session=session, model_id=model.id,
                                   paths=[s.path for s in found])
        skipped = len(done)
        found = [s for s in found if s.path not in done]
    by_path = {s.path: s for s in found}
    with session_scope(engine) as session:
        job = store.create_job(session=session, root=root_abs, model_id=model.id,
                               studies=found, mode=mode,
                               options={**(options or {}), "skipped": skipped})
        session.flush()
        job_id = job.id
        queued = store.queued_studies(session=session, job_id=job_id)
        if not queued:
            store.finish_job_if_done(session=session, job_id=job_id)
    tasks = tuple(StudyTask(id=sid, path=path, views=by_path[path].views)
                  for sid, path in queued)
    n_views = sum(len(s.views) for s in found)
    # Folder names can identify patients: INFO logs carry ids and counts, the root only at DEBUG.
    log.info("job %d: %d studies (%d views, %d empty, %d skipped as already done)", job_id,
             len(found), n_views, len(found) - len(tasks), skipped)
    log.debug("job %d: root %s", job_id, root_abs)
    return PreparedJob(job_id=job_id, model_id=model.id, studies=len(found), views=n_views,
                       empty=len(found) - len(tasks), tasks=tasks, skipped=skipped)


def chunked(tasks: Sequence[StudyTask], size: int) -> Iterator[list[StudyTask]]:
    size = max(1, size)
    for start in range(0, len(tasks), size):
        yield list(tasks[start : start + size])


def chunk_message(job: PreparedJob, chunk: Sequence[StudyTask]) -> dict[str, Any]:
    """The task message: JSON only, ids and paths, never results."""
    return {"job": job.job_id, "model": job.model_id, "studies": [t.to_json() for t in chunk]}


def chunk_summary(job_id: int, chunk: Sequence[StudyTask]) -> str:
    """What monitoring shows of a chunk: ids and counts, no paths."""
    ids = [t.id for t in chunk]
    return (f"(job={job_id}, studies={len(ids)} [{min(ids)}..{max(ids)}], "
            f"views={sum(len(t.views) for t in chunk)})")


def run_embedded(*, engine: Engine, job: PreparedJob, settings: Settings,
                 progress: Progress | None = None) -> None:
    """Classify the job in this process, chunk by chunk, with the worker's own code path."""
    from bonexray.worker.process import process_chunk

    for chunk in chunked(job.tasks, settings.chunk_size):
        process_chunk(engine=engine, job_id=job.job_id, model_id=job.model_id, tasks=chunk,
                      settings=settings)
        if progress:
            progress(len(chunk))
    with session_scope(engine) as session:
        store.finish_job_if_done(session=session, job_id=job.job_id)


class BrokerError(RuntimeError):
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
                          f"{' '.join(str(exc).split())[:200]}") from None


def mask_url(url: str) -> str:
    """A URL with its password replaced, fit for logs and messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def send_job(*, job: PreparedJob, settings: Settings, progress: Progress | None = None) -> int:
    """Send the job's chunks to the broker; returns the number of messages sent."""
    from bonexray.worker.app import TASK_CLASSIFY, create_app

    app = create_app(settings)
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunked(job.tasks, settings.chunk_size):
            # Monitors (Flower, events) show argsrepr, not the paths: patient folder names
            # stay in the message the task needs and out of dashboards.
            app.send_task(TASK_CLASSIFY, args=[chunk_message(job, chunk)],
                          queue=settings.queue, producer=producer,
                          argsrepr=chunk_summary(job.job_id, chunk), kwargsrepr="{}")
            sent += 1
            if progress:
                progress(len(chunk))
    return sent


@dataclass(frozen=True)
class Requeued:
    job_id: int
    studies: int  # studies sent again
    chunks: int
    missing: int  # study folders gone since enqueue: failed with the reason, not sent


def requeue_job(*, engine: Engine, job_id: int, settings: Settings,
                progress: Progress | None = None) -> Requeued:
    """Send again, from SQL, every study of the job that has no result yet.

    Views are not stored before their results arrive, so the job's root is searched again
    with the same discovery as enqueue (MURA CSVs included) and each queued study is sent
    with the views its folder holds now. Safe to repeat: results are upserts, and a study
    already finished is not sent.
    """
    with session_scope(engine) as session:
        job = query.get_job(session=session, job_id=job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id} in the database")
        root, model_id = job.root, job.model_id
        queued = store.queued_studies(session=session, job_id=job_id)
    if not queued:
        return Requeued(job_id=job_id, studies=0, chunks=0, missing=0)
    check_folder(root)
    try:
        found = {s.path: s for s in find_studies(root)}
    except StudyError:
        found = {}  # the whole root is gone: every queued study fails as missing below
    tasks = tuple(StudyTask(id=sid, path=path, views=found[path].views)
                  for sid, path in queued if path in found)
    missing = [sid for sid, path in queued if path not in found]
    if missing:
        with session_scope(engine) as session:
            store.mark_failed(session=session, study_ids=missing, worker="requeue",
                              error="study folder not found when the job was requeued")
            store.finish_job_if_done(session=session, job_id=job_id)
    job_view = PreparedJob(job_id=job_id, model_id=model_id, studies=len(tasks),
                           views=sum(len(t.views) for t in tasks), empty=0, tasks=tasks)
    chunks = send_job(job=job_view, settings=settings, progress=progress) if tasks else 0
    log.info("job %d: requeued %d studies in %d chunks (%d missing folders failed)", job_id,
             len(tasks), chunks, len(missing))
    return Requeued(job_id=job_id, studies=len(tasks), chunks=chunks, missing=len(missing))
