"""Decode -> batch -> infer -> aggregate for a chunk of studies; pure (no broker, no SQL)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bonexray.errors import BonexrayError
from bonexray.imaging import DEFAULT_DECODE_BUDGET, ImageError, load_view
from bonexray.metrics import aggregate
from bonexray.pipeline.records import (
    DONE,
    EMPTY,
    FAILED,
    BatchStat,
    StudyResult,
    StudyTask,
    ViewResult,
)
from bonexray.security import check_view
from bonexray.settings import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


class ModelOutputError(BonexrayError, RuntimeError):
    """The model gave something other than one finite probability per view."""


@dataclass(frozen=True)
class PipelineOptions:
    batch_size: int = 16
    decode_threads: int = 2
    prefetch_views: int = 64
    max_image_pixels: int = MAX_IMAGE_PIXELS
    aggregation: str | None = None  # None: the model's own (metadata), else "mean" / "max"
    # Real paths of BONEXRAY_DATA_ROOTS; a view outside them (or linking out) fails unread.
    data_roots: tuple[str, ...] = ()
    # Memory one decode may use (estimated from the header); more fails the view.
    decode_budget_bytes: int = DEFAULT_DECODE_BUDGET


def study_result(task: StudyTask, views: tuple[ViewResult, ...], *, threshold: float,
                 how: str) -> StudyResult:
    """A study's result from its settled views: scored from those that have a probability
    (partial when others failed), failed when none has, empty without views."""
    if not views:
        return StudyResult(task.id, task.key, EMPTY, None, None, (),
                           "no views: the folder holds no .png/.jpg/.jpeg files")
    scored = [v.prob for v in views if v.prob is not None]
    if not scored:
        reasons = sorted({v.error for v in views if v.error})
        detail = f": {reasons[0]}" if len(reasons) == 1 else ""
        return StudyResult(task.id, task.key, FAILED, None, None, views,
                           f"no view could be scored: all {len(views)} failed{detail}")
    score = aggregate(scored, how)
    prediction = "abnormal" if score >= threshold else "normal"
    return StudyResult(task.id, task.key, DONE, score, prediction, views,
                       partial=len(scored) < len(views))


def _decode_ahead(views: Sequence[str], decode: Callable[[str], np.ndarray],
                  threads: int, prefetch: int) -> Iterator[tuple[int, Future[np.ndarray]]]:
    """Yield (index, future) in order while keeping up to `prefetch` decodes in flight."""
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode") as pool:
        pending: deque[tuple[int, Future[np.ndarray]]] = deque()
        next_index = 0
        while pending or next_index < len(views):
            while next_index < len(views) and len(pending) < max(1, prefetch):
                pending.append((next_index, pool.submit(decode, views[next_index])))
                next_index += 1
            yield pending.popleft()


def classify_studies(
    tasks: Sequence[StudyTask],
    *,
    predict: Callable[[np.ndarray], np.ndarray],
    input_size: int,
    resize: str,
    threshold: float,
    aggregation: str = "mean",
    options: PipelineOptions | None = None,
    on_ready: Callable[[list[StudyResult]], None] | None = None,
    before_decode: Callable[[str], None] | None = None,
) -> tuple[list[StudyResult], list[BatchStat]]:
    """Classify every study of a chunk.

    Views of all studies are decoded in a thread pool that runs ahead of inference and are
    packed into full batches across study boundaries. A view that fails to decode gets its
    error and the study goes on with the rest; a study with no scorable view fails.

    `on_ready`, when given, receives the studies whose every view is settled as soon as
    they are (after each batch), in order, so that a caller can write them while the next
    batch runs; every study is passed exactly once. All results are also returned.
    `before_decode(path)`, when given, runs in the decoding thread before each view is read.
    """
    opts = options or PipelineOptions()
    how = opts.aggregation or aggregation
    # Every view of the chunk in order; ends[t]: one past the index of study t's last view.
    views = [path for task in tasks for path in task.views]
    ends: list[int] = []
    for task in tasks:
        ends.append((ends[-1] if ends else 0) + len(task.views))
    view_probs: dict[int, float] = {}
    view_errors: dict[int, str] = {}
    stats: list[BatchStat] = []
    results: list[StudyResult] = []

    def finish(t: int) -> StudyResult:
        task, first = tasks[t], ends[t] - len(tasks[t].views)
        view_results = tuple(ViewResult(source=path, prob=view_probs.get(first + k),
                                        error=view_errors.get(first + k))
                             for k, path in enumerate(task.views))
        view_results += tuple(ViewResult(source=path, prob=None, error=error)
                              for path, error in task.failed)
        return study_result(task, view_results, threshold=threshold, how=how)

    def release(settled: int) -> None:
        """Finish (and hand over) every study whose views all lie below index `settled`."""
        start = len(results)
        while len(results) < len(tasks) and ends[len(results)] <= settled:
            results.append(finish(len(results)))
        if on_ready is not None and len(results) > start:
            on_ready(results[start:])

    def decode(path: str) -> np.ndarray:
        if before_decode is not None:
            before_decode(path)
        check_view(path, opts.data_roots)
        return load_view(path, input_size, resize, max_pixels=opts.max_image_pixels,
                         budget_bytes=opts.decode_budget_bytes)

    batch = np.empty((max(1, opts.batch_size), 1, input_size, input_size), dtype=np.uint8)
    batch_ids: list[int] = []
    wait_ms = 0.0

    def run_batch() -> None:
        nonlocal wait_ms
        if not batch_ids:
            return
        start = time.perf_counter()
        probs = predict(batch[: len(batch_ids)])
        infer_ms = (time.perf_counter() - start) * 1000.0
        if probs.shape != (len(batch_ids),) or not np.all(np.isfinite(probs)):
            raise ModelOutputError(
                f"model returned {probs.shape} (finite: {bool(np.all(np.isfinite(probs)))}) "
                f"for a batch of {len(batch_ids)}"
            )
        for i, p in zip(batch_ids, probs.tolist(), strict=True):
            view_probs[i] = float(p)
        stats.append(BatchStat(n_views=len(batch_ids), decode_ms=wait_ms, infer_ms=infer_ms))
        batch_ids.clear()
        wait_ms = 0.0

    release(0)  # leading studies without views
    for index, future in _decode_ahead(views, decode, opts.decode_threads, opts.prefetch_views):
        start = time.perf_counter()
        try:
            pixels = future.result()
        except ImageError as exc:
            view_errors[index] = str(exc)
            log.debug("view %d failed: %s", index, exc)
            if not batch_ids:  # nothing pending before it: its study may be settled
                release(index + 1)
            continue
        finally:
            wait_ms += (time.perf_counter() - start) * 1000.0
        batch[len(batch_ids), 0] = pixels
        batch_ids.append(index)
        if len(batch_ids) == len(batch):
            run_batch()
            release(index + 1)
    run_batch()
    release(len(views))
    return results, stats
