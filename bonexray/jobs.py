"""Job lifecycle shared by `run` and `enqueue`: resolve the model, register studies, process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from bonexray.db import query, store
from bonexray.db.models import Model
from bonexray.db.session import session_scope
from bonexray.results import StudyTask
from bonexray.settings import Settings
from bonexray.studies import Study, find_studies

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class ModelNotFoundError(ValueError):
    """--model names neither a registered model nor an existing file."""


@dataclass(frozen=True)
class PreparedJob:
    job_id: int
    model_id: int
    studies: int
    views: int
    empty: int
    tasks: tuple[StudyTask, ...]  # the studies to classify (empty ones are already final)


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


def prepare_job(*, engine: Engine, root: str, model: Model, mode: str,
                options: dict[str, Any] | None = None,
                studies: Sequence[Study] | None = None) -> PreparedJob:
    """Find the studies under `root`, register the job and its studies in SQL."""
    found = list(studies) if studies is not None else find_studies(root)
    root_abs = str(Path(root).expanduser().resolve())
    by_path = {s.path: s for s in found}
    with session_scope(engine) as session:
        job = store.create_job(session=session, root=root_abs, model_id=model.id,
                               studies=found, mode=mode, options=dict(options or {}))
        session.flush()
        job_id = job.id
        queued = store.queued_studies(session=session, job_id=job_id)
    tasks = tuple(StudyTask(id=sid, path=path, views=by_path[path].views)
                  for sid, path in queued)
    n_views = sum(len(s.views) for s in found)
    log.info("job %d: %d studies (%d views, %d empty) under %s", job_id, len(found), n_views,
             len(found) - len(tasks), root_abs)
    return PreparedJob(job_id=job_id, model_id=model.id, studies=len(found), views=n_views,
                       empty=len(found) - len(tasks), tasks=tasks)


def chunked(tasks: Sequence[StudyTask], size: int) -> Iterator[list[StudyTask]]:
    size = max(1, size)
    for start in range(0, len(tasks), size):
        yield list(tasks[start : start + size])


def chunk_message(job: PreparedJob, chunk: Sequence[StudyTask]) -> dict[str, Any]:
    """The task message: JSON only, ids and paths, never results."""
    return {"job": job.job_id, "model": job.model_id, "studies": [t.to_json() for t in chunk]}


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
            app.send_task(TASK_CLASSIFY, args=[chunk_message(job, chunk)],
                          queue=settings.queue, producer=producer)
            sent += 1
            if progress:
                progress(len(chunk))
    return sent
