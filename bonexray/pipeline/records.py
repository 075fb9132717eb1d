"""Records that travel from the pipeline to the store: tasks in, view and study results out."""

from __future__ import annotations

from dataclasses import dataclass, field

# Study status values, as stored in SQL.
QUEUED = "queued"
DONE = "done"  # scored: at least one view decoded and classified
FAILED = "failed"  # no view could be scored, or the study could not be processed
EMPTY = "empty"  # the study has no views
STATUSES = (QUEUED, DONE, FAILED, EMPTY)
FINISHED = (DONE, FAILED, EMPTY)


@dataclass(frozen=True)
class StudyTask:
    """A study to classify, as read from SQL: the views to decode, and the views that
    already failed (a file name that is not UTF-8, a view that crashed its worker) with
    their reasons, which count towards the study's result without being read again."""

    id: int
    key: str
    views: tuple[str, ...]  # sources
    failed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ViewResult:
    source: str
    prob: float | None  # None when the view failed
    error: str | None = None


@dataclass(frozen=True)
class StudyResult:
    study_id: int
    key: str
    status: str
    score: float | None
    prediction: str | None  # "normal" / "abnormal" / None
    views: tuple[ViewResult, ...] = field(default_factory=tuple)
    error: str | None = None
    partial: bool = False  # scored, but some of its views failed


@dataclass(frozen=True)
class BatchStat:
    """Timing of one inference batch: where a worker's time goes."""

    n_views: int
    decode_ms: float
    infer_ms: float
    write_ms: float = 0.0
