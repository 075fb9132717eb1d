"""Records that travel from the pipeline to the store: tasks in, view and study results out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Study status values, as stored in SQL.
QUEUED = "queued"
DONE = "done"  # scored: at least one view decoded and classified
FAILED = "failed"  # no view could be scored, or the chunk failed every retry
EMPTY = "empty"  # the study folder holds no views
STATUSES = (QUEUED, DONE, FAILED, EMPTY)
FINISHED = (DONE, FAILED, EMPTY)


@dataclass(frozen=True)
class StudyTask:
    """A study to classify, as carried in a task message (JSON: id, path, views)."""

    id: int
    path: str
    views: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "views": list(self.views)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyTask:
        return cls(id=int(data["id"]), path=str(data["path"]),
                   views=tuple(str(v) for v in data["views"]))


@dataclass(frozen=True)
class ViewResult:
    path: str
    prob: float | None  # None when the view failed
    error: str | None = None


@dataclass(frozen=True)
class StudyResult:
    study_id: int
    path: str
    status: str
    score: float | None
    prediction: str | None  # "normal" / "abnormal" / None
    views: tuple[ViewResult, ...] = field(default_factory=tuple)
    error: str | None = None


@dataclass(frozen=True)
class BatchStat:
    """Timing of one inference batch: where a worker's time goes."""

    n_views: int
    decode_ms: float
    infer_ms: float
    write_ms: float = 0.0
