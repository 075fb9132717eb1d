"""A chunk end to end: the process's cached model, the pipeline, a writer thread for results."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from bonexray.db import ledger, store
from bonexray.db.session import open_database, session_scope
from bonexray.db.tables import Job, Model
from bonexray.errors import BonexrayError, one_line
from bonexray.modelstore import local_model_path
from bonexray.pipeline.batching import PipelineOptions, classify_studies
from bonexray.pipeline.inference import Classifier, ModelMismatchError
from bonexray.pipeline.records import DONE, FAILED, BatchStat, StudyResult, StudyTask
from bonexray.security import parse_data_roots
from bonexray.settings import Settings

log = logging.getLogger(__name__)

_MAX_MODELS = 2
_lock = threading.Lock()
_classifiers: OrderedDict[tuple[int, str, str], Classifier] = OrderedDict()


class WorkerSickError(BonexrayError, RuntimeError):
    """This worker cannot classify (the model will not load here, the provider fails): it
    must stop taking work and leave the studies to healthy workers. For `bonexray run`, a
    one-line error the user acts on (a model file gone, a provider that fails)."""


class UnknownJobError(LookupError):
    """A message names a job this database does not have."""


@dataclass(frozen=True)
class ChunkSummary:
    studies: int
    done: int
    failed: int
    views: int
    views_failed: int
    provider: str
    skipped: int = 0  # finished already or held by a live worker: not this call's work


def worker_name() -> str:
    """This process as a lease holder (host:pid:namespace.start)."""
    return ledger.process_identity()


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
        decode_budget_bytes=settings.decode_budget_bytes,
    )


def is_transient(exc: BaseException) -> bool:
    """Errors that heal by themselves: the database unreachable, restarting, or locked."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from bonexray.db.session import DatabaseError

    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError |
                  PoolTimeoutError | DatabaseError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class Heartbeat:
    """Renews the chunk's leases every third of the lease while the chunk runs."""

    def __init__(self, *, engine: Engine, study_ids: Sequence[int], worker: str,
                 lease_seconds: int) -> None:
        self.engine, self.ids, self.worker = engine, list(study_ids), worker
        self.interval = max(0.5, lease_seconds / 3)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with session_scope(self.engine) as session:
                    ledger.heartbeat(session=session, study_ids=self.ids, worker=self.worker)
            except Exception as exc:  # the chunk itself meets the same error and retries
                log.debug("heartbeat failed: %s", one_line(exc, limit=200))

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


_JOB_MODELS: OrderedDict[tuple[str, int], tuple[float, Model]] = OrderedDict()
_JOB_MODEL_TTL = 30.0


def _load_job_model(engine: Engine, job_id: int) -> Model:
    """The job's registered model, kept for a while per process (a job's model never
    changes; a moved model file's new path is read again after the TTL)."""
    key = (str(engine.url), job_id)
    with _lock:
        cached = _JOB_MODELS.get(key)
        if cached is not None and time.monotonic() - cached[0] < _JOB_MODEL_TTL:
            return cached[1]
    model = _read_job_model(engine, job_id)
    with _lock:
        _JOB_MODELS[key] = (time.monotonic(), model)
        while len(_JOB_MODELS) > 256:
            _JOB_MODELS.popitem(last=False)
    return model


def _read_job_model(engine: Engine, job_id: int) -> Model:
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UnknownJobError(f"job {job_id} is not in this database")
        model = session.get(Model, job.model_id)
        if model is None:
            raise UnknownJobError(f"job {job_id}: its model {job.model_id} is not registered")
        session.expunge(model)
    return model


def process_chunk(*, engine: Engine, job_id: int, study_ids: Sequence[int], settings: Settings,
                  worker: str | None = None, chunk: str | None = None) -> ChunkSummary:
    """Claim the chunk's studies in SQL, classify them, and write every study and view row
    as they finish.

    Only the job's unfinished studies that no live worker holds are claimed; their views
    come from SQL. Studies claimed before without finishing (their worker was lost) are
    decoded one view at a time, each view recorded first, so that a view that kills its
    process is found and failed after `max_crashes`. A model that fails its sha256 check
    fails the studies and is raised; a model that cannot be loaded here raises
    WorkerSickError, leaving the studies to others. Database errors propagate: the caller
    retries (run_chunk).
    """
    worker = worker or worker_name()
    started = time.monotonic()
    model = _load_job_model(engine, job_id)
    try:
        classifier = get_classifier(model, settings)
    except ModelMismatchError as exc:
        # Only what this worker could claim: studies of this job, unfinished, held by no
        # live worker.
        with session_scope(engine) as session:
            claim = ledger.claim_studies(
                session=session, job_id=job_id, study_ids=study_ids, worker=worker,
                lease_seconds=settings.lease_seconds, max_crashes=settings.max_crashes,
                max_attempts=settings.max_attempts)
            store.mark_failed(session=session, study_ids=[t.id for t in claim.tasks],
                              error=str(exc), worker=worker, job_id=job_id)
        with session_scope(engine) as session:
            store.finish_job_if_done(session=session, job_id=job_id)
        log.error("job %d: %s", job_id, exc)
        raise
    except Exception as exc:
        raise WorkerSickError(f"cannot load model {model.name} (sha256 {model.sha256[:12]}…) "
                              f"on this worker: {one_line(exc, limit=200)}") from exc
    with session_scope(engine) as session:
        claim = ledger.claim_studies(
            session=session, job_id=job_id, study_ids=study_ids, worker=worker,
            lease_seconds=settings.lease_seconds, max_crashes=settings.max_crashes,
            max_attempts=settings.max_attempts)
    tasks = claim.tasks
    if not tasks:
        if claim.failed:
            with session_scope(engine) as session:
                store.finish_job_if_done(session=session, job_id=job_id)
        return ChunkSummary(0, 0, claim.failed, 0, 0, classifier.provider, claim.skipped)
    by_id = {t.id: t for t in tasks}
    suspects = set(claim.suspects)
    plain = [t for t in tasks if t.id not in suspects]
    careful = [by_id[sid] for sid in claim.suspects]
    try:
        with Heartbeat(engine=engine, study_ids=[t.id for t in tasks], worker=worker,
                       lease_seconds=settings.lease_seconds):
            results, stats = _classify(engine, job_id, plain, classifier, settings, worker)
            for task in careful:
                results += _classify_carefully(engine, job_id, task, classifier, settings,
                                               worker)
    except Exception as exc:
        if isinstance(exc, InferenceError):
            raise WorkerSickError(str(exc)) from exc
        raise
    try:
        with session_scope(engine) as session:
            store.save_batch_stats(session=session, job_id=job_id, worker=worker,
                                   provider=classifier.provider, stats=stats, chunk=chunk)
            store.finish_job_if_done(session=session, job_id=job_id)
    except Exception as exc:
        # Every result is saved: classifying the chunk again would not help. A job with no
        # queued study counts as finished anyway (query.job_progress), and a later chunk
        # stamps its finish time.
        log.warning("job %d: results saved, but not the batch timings and finish check: "
                    "%s", job_id, one_line(exc, limit=200))
    views = sum(len(r.views) for r in results)
    views_failed = sum(1 for r in results for v in r.views if v.error is not None)
    summary = ChunkSummary(
        studies=len(results),
        done=sum(r.status == DONE for r in results),
        failed=sum(r.status == FAILED for r in results) + claim.failed,
        views=views,
        views_failed=views_failed,
        provider=classifier.provider,
        skipped=claim.skipped,
    )
    log.info("job %d: chunk of %d studies (%d views, %d failed, %d careful) done on %s",
             job_id, summary.studies, views, views_failed, len(careful), summary.provider,
             extra={"job": job_id, "chunk": chunk, "worker": worker,
                    "seconds": round(time.monotonic() - started, 3), "studies": summary.studies,
                    "studies_done": summary.done, "studies_failed": summary.failed,
                    "views": views, "views_failed": views_failed,
                    "provider": summary.provider})
    return summary


class InferenceError(BonexrayError, RuntimeError):
    """onnxruntime failed on a batch (out of device memory, a broken provider)."""


def _predictor(classifier: Classifier) -> Any:
    def predict(pixels: Any) -> Any:
        try:
            return classifier.predict(pixels)
        except Exception as exc:
            raise InferenceError(f"inference failed on {classifier.provider}: "
                                 f"{one_line(exc, limit=200)}") from exc
    return predict


def _classify(engine: Engine, job_id: int, tasks: Sequence[StudyTask], classifier: Classifier,
              settings: Settings, worker: str) -> tuple[list[StudyResult], list[BatchStat]]:
    """The plain path: views of all studies batched together, results written beside
    inference."""
    if not tasks:
        return [], []
    info = classifier.info
    writer = ResultWriter(engine=engine, job_id=job_id, worker=worker)
    try:
        results, stats = classify_studies(
            tasks, predict=_predictor(classifier), input_size=info.input_size,
            resize=info.resize, threshold=info.threshold, aggregation=info.aggregation,
            options=pipeline_options(settings), on_ready=writer.put)
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
    return results, stats


def _classify_carefully(engine: Engine, job_id: int, task: StudyTask, classifier: Classifier,
                        settings: Settings, worker: str) -> list[StudyResult]:
    """One study whose worker was lost before: each view is recorded in SQL before it is
    decoded, one at a time, so that a view that kills the process is known next time."""
    def mark(view: str | None) -> None:
        with session_scope(engine) as session:
            ledger.mark_decoding(session=session, study_id=task.id, worker=worker, view=view)

    predict = _predictor(classifier)

    def predict_after_decoding(pixels: Any) -> Any:
        mark(None)  # decoding is over: a crash from here on is not a view's fault
        return predict(pixels)

    info = classifier.info
    # One decode at a time; batches no larger than usual (a study of hundreds of views
    # must not become one batch that runs the device out of memory).
    options = dataclasses.replace(pipeline_options(settings), decode_threads=1,
                                  prefetch_views=1,
                                  batch_size=max(1, min(len(task.views), settings.batch_size)))
    results, _ = classify_studies(
        [task], predict=predict_after_decoding, input_size=info.input_size,
        resize=info.resize, threshold=info.threshold, aggregation=info.aggregation,
        options=options, before_decode=mark)
    with session_scope(engine) as session:
        store.save_results(session=session, job_id=job_id, results=results, worker=worker)
    log.info("job %d: study %d decoded carefully after a lost worker", job_id, task.id)
    return results


def fail_claimed(*, engine: Engine, job_id: int, study_ids: Sequence[int], worker: str,
                 error: str) -> None:
    """Fail what this worker still holds of a chunk (a bug, not a fault that heals)."""
    from sqlalchemy import select

    from bonexray.db.tables import Study

    try:
        with session_scope(engine) as session:
            held = list(session.scalars(select(Study.id).where(
                Study.id.in_(sorted(study_ids)), Study.claimed_by == worker)))
            store.mark_failed(session=session, study_ids=held, error=error, worker=worker,
                              job_id=job_id)
        with session_scope(engine) as session:
            store.finish_job_if_done(session=session, job_id=job_id)
    except Exception as exc:
        log.error("job %d: could not record the failed chunk (%s); its leases run out and "
                  "the reaper sends it again", job_id, one_line(exc, limit=200))


def release_claimed(*, engine: Engine, study_ids: Sequence[int], worker: str) -> None:
    """Give the chunk's leases back (best effort: else they run out by themselves)."""
    try:
        with session_scope(engine) as session:
            ledger.release(session=session, study_ids=study_ids, worker=worker)
    except Exception as exc:
        log.warning("could not release the chunk's leases (%s); they run out in time",
                    one_line(exc, limit=200))


def backoff_delays(base: float = 0.5, cap: float = 30.0) -> Iterator[float]:
    """Exponential backoff with full jitter: 0..0.5, 0..1, 0..2 ... s, at most `cap`."""
    step = base
    while True:
        yield random.uniform(step / 2, step)
        step = min(cap, step * 2)


def run_chunk(*, database_url: str, job_id: int, study_ids: Sequence[int], settings: Settings,
              worker: str | None = None, chunk: str | None = None,
              database: str | None = None, sleep: Any = time.sleep) -> ChunkSummary:
    """process_chunk, riding out database outages: while the database is unreachable (or a
    lock or statement times out) the chunk is kept and tried again with jittered backoff,
    for as long as the outage lasts; the caller takes no new work meanwhile.

    `database`: the identity the message was written for; another database's message
    raises ForeignMessageError before anything is read. A bug fails what the chunk still
    holds, with the reason, and is raised.
    """
    worker = worker or worker_name()
    delays = backoff_delays()
    outage_since: float | None = None
    while True:
        try:
            engine = open_database(database_url)
            if database is not None and database != ledger.database_id(engine):
                raise ledger.ForeignMessageError(
                    f"the message is for database {database[:8]}…, this worker's is "
                    f"{ledger.database_id(engine)[:8]}… (producer and worker have different "
                    "BONEXRAY_DATABASE_URL)")
            summary = process_chunk(engine=engine, job_id=job_id, study_ids=study_ids,
                                    settings=settings, worker=worker, chunk=chunk)
            if outage_since is not None:
                log.info("job %d: database back after %.0f s; chunk done", job_id,
                         time.monotonic() - outage_since)
            return summary
        except (WorkerSickError, UnknownJobError, ledger.ForeignMessageError,
                ModelMismatchError):
            raise
        except Exception as exc:
            if not is_transient(exc):
                fail_claimed(engine=open_database(database_url), job_id=job_id,
                             study_ids=study_ids, worker=worker,
                             error=f"worker error: {one_line(exc, typed=True, limit=200)}")
                raise
            now = time.monotonic()
            outage_since = outage_since if outage_since is not None else now
            delay = next(delays)
            log.warning("job %d: database unavailable (%s: %s); keeping the chunk, retry in "
                        "%.1f s (%.0f s so far)", job_id, type(exc).__name__,
                        one_line(exc, limit=80),
                        delay, now - outage_since)
            sleep(delay)
