"""A chunk end to end: the process's cached model, the pipeline, a writer thread for results."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from bonexray.db import store
from bonexray.db.models import Model
from bonexray.db.session import session_scope
from bonexray.modelstore import local_model_path
from bonexray.results import DONE, FAILED, BatchStat, StudyResult, StudyTask
from bonexray.security import parse_data_roots
from bonexray.settings import Settings
from bonexray.worker.inference import Classifier, ModelLoadError
from bonexray.worker.pipeline import PipelineOptions, classify_studies

log = logging.getLogger(__name__)

_MAX_MODELS = 2
_lock = threading.Lock()
_classifiers: OrderedDict[tuple[int, str, str], Classifier] = OrderedDict()


@dataclass(frozen=True)
class ChunkSummary:
    studies: int
    done: int
    failed: int
    views: int
    views_failed: int
    provider: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def get_classifier(model: Model, settings: Settings) -> Classifier:
    """This process's session for a registered model, built once and sha256-checked."""
    path = local_model_path(registered_path=model.path, sha256=model.sha256,
                            store_dir=settings.model_store)
    key = (os.getpid(), model.sha256, path)
    with _lock:
        cached = _classifiers.get(key)
        if cached is not None:
            _classifiers.move_to_end(key)
            return cached
        classifier = Classifier(path, settings=settings, expected_sha256=model.sha256)
        _classifiers[key] = classifier
        while len(_classifiers) > _MAX_MODELS:
            _classifiers.popitem(last=False)
        return classifier


class ResultWriter:
    """Writes study results in a thread of its own while inference goes on.

    `put` hands over finished studies and returns at once; the thread writes whatever has
    accumulated in one transaction, then waits for more. After a failed write `put` raises
    that error (no point classifying what cannot be saved); `close` waits for the last
    write and raises the first write error, if any. The chunk is then retried whole:
    results are upserts. An in-memory SQLite database exists once per connection, so there
    the writes happen in the caller's thread instead.
    """

    _STOP = None

    def __init__(self, *, engine: Engine, job_id: int, worker: str) -> None:
        self.engine, self.job_id, self.worker = engine, job_id, worker
        self.queue: queue.SimpleQueue[list[StudyResult] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.write_ms = 0.0
        url = engine.url
        self.threaded = not (url.get_backend_name() == "sqlite"
                             and url.database in (None, "", ":memory:"))
        self.thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        if self.threaded:
            self.thread.start()

    def put(self, results: list[StudyResult]) -> None:
        if self.error is not None:
            raise self.error
        if not results:
            return
        if self.threaded:
            self.queue.put(list(results))
        else:
            self._write(list(results))
            if self.error is not None:
                raise self.error

    def _write(self, results: list[StudyResult]) -> None:
        start = time.perf_counter()
        try:
            with session_scope(self.engine) as session:
                store.save_results(session=session, job_id=self.job_id, results=results,
                                   worker=self.worker)
        except BaseException as exc:  # handed to put() / close(), in the caller's thread
            self.error = exc
            return
        self.write_ms += (time.perf_counter() - start) * 1000.0

    def _run(self) -> None:
        stop = False
        while not stop:
            pending = [self.queue.get()]
            while not self.queue.empty():  # coalesce what came in during the last write
                pending.append(self.queue.get())
            stop = pending[-1] is self._STOP
            results = [r for part in pending if part is not None for r in part]
            if results and self.error is None:  # after a failure: drain, write nothing
                self._write(results)

    def close(self, timeout: float | None = None) -> float:
        """Wait for every write (at most `timeout` s); the milliseconds spent writing.
        Raises a write's error."""
        if self.threaded:
            self.queue.put(self._STOP)
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TimeoutError(f"job {self.job_id}: the result writer did not finish "
                                   f"within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.write_ms


def pipeline_options(settings: Settings) -> PipelineOptions:
    return PipelineOptions(
        batch_size=settings.batch_size,
        decode_threads=settings.decode_threads,
        prefetch_views=settings.prefetch_views,
        max_image_pixels=settings.max_image_pixels,
        data_roots=parse_data_roots(settings.data_roots),
    )


def process_chunk(*, engine: Engine, job_id: int, model_id: int, tasks: Sequence[StudyTask],
                  settings: Settings, worker: str | None = None) -> ChunkSummary:
    """Classify a chunk of studies and write every study and view row as they finish.

    A model that cannot be loaded fails the chunk's studies with the reason (retrying would
    not heal it); database errors propagate so that the caller can retry.
    """
    worker = worker or worker_name()
    with session_scope(engine) as session:
        model = session.get(Model, model_id)
        if model is None:
            raise ModelLoadError(f"model id {model_id} is not in the registry")
        session.expunge(model)
    try:
        classifier = get_classifier(model, settings)
    except ModelLoadError as exc:
        with session_scope(engine) as session:
            store.mark_failed(session=session, study_ids=[t.id for t in tasks],
                              error=str(exc), worker=worker)
            store.finish_job_if_done(session=session, job_id=job_id)
        raise
    info = classifier.info
    # Results are written beside inference: each batch's finished studies go to the writer
    # thread while the next batch runs, so SQL time hides behind the model.
    writer = ResultWriter(engine=engine, job_id=job_id, worker=worker)
    try:
        results, stats = classify_studies(
            tasks,
            predict=classifier.predict,
            input_size=info.input_size,
            resize=info.resize,
            threshold=info.threshold,
            aggregation=info.aggregation,
            options=pipeline_options(settings),
            on_ready=writer.put,
        )
    except BaseException:
        with contextlib.suppress(BaseException):  # the pipeline's error is the one to see
            writer.close(timeout=60)
        raise
    write_ms = writer.close()
    if stats:
        # The chunk's write time (in the writer thread, beside inference, so not part of
        # the wall time) is charged to its last batch.
        last = stats[-1]
        stats[-1] = BatchStat(last.n_views, last.decode_ms, last.infer_ms, write_ms)
    try:
        with session_scope(engine) as session:
            store.save_batch_stats(session=session, job_id=job_id, worker=worker,
                                   provider=classifier.provider, stats=stats)
            store.finish_job_if_done(session=session, job_id=job_id)
    except Exception as exc:
        # Every result is saved: classifying the chunk again would not help. A job with no
        # queued study counts as finished anyway (query.job_progress), and a later chunk
        # stamps its finish time.
        log.warning("job %d: results saved, but not the batch timings and finish check: "
                    "%s", job_id, " ".join(str(exc).split())[:200])
    views = sum(len(r.views) for r in results)
    views_failed = sum(1 for r in results for v in r.views if v.error is not None)
    summary = ChunkSummary(
        studies=len(results),
        done=sum(r.status == DONE for r in results),
        failed=sum(r.status == FAILED for r in results),
        views=views,
        views_failed=views_failed,
        provider=classifier.provider,
    )
    log.info("job %d: chunk of %d studies (%d views, %d failed) done on %s",
             job_id, summary.studies, views, views_failed, summary.provider)
    return summary
