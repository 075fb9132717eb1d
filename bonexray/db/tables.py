"""The schema: registered models, jobs, studies, views and batch timings (SQLAlchemy 2.0)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false

# Named constraints and indexes: Alembic's batch mode (SQLite) can only alter what it can name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        # SQLite stores the text without an offset; keep it plain UTC there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DatabaseIdentity(Base):
    """One row, made with the schema: the id task messages carry, so that a worker never
    scores a message written for another database into its own."""

    __tablename__ = "database_identity"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Model(Base):
    """A registered ONNX model file, known by its sha256."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    # `metadata` is taken on declarative classes; the column keeps the plain name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """One run of a model over the studies found under a root folder."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root: Mapped[str] = mapped_column(Text)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    mode: Mapped[str] = mapped_column(String(16))  # "embedded" | "celery"
    # The broker queue its chunks go to (celery jobs): a worker's reaper re-sends only the
    # jobs of the queue it consumes.
    queue: Mapped[str | None] = mapped_column(String(255))
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    n_studies: Mapped[int] = mapped_column(Integer, default=0)
    n_views: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Study(Base):
    """A study of a job: its key, what is known about it, its lease while a worker holds
    it, and its result once scored.

    The key is the study folder's path for image folders, and "StudyInstanceUID/body part"
    for DICOM (a study that mixes body parts is one row per part). `patient` is the folder
    layout's patient id, or for DICOM a keyed hash of the PatientID (never the id itself).
    """

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("job_id", "key"),
        # Progress counts and the queued-studies scan go by (job, status).
        Index(None, "job_id", "status"),
        # The reaper's scan: unfinished studies of every job.
        Index(None, "status", "heartbeat_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(Text)
    # DICOM only: identifiers, never names or dates.
    study_uid: Mapped[str | None] = mapped_column(String(64))
    accession: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    patient: Mapped[str | None] = mapped_column(String(255))
    label: Mapped[int | None] = mapped_column(Integer)
    n_views: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # queued / done / failed / empty
    score: Mapped[float | None] = mapped_column(Float)
    prediction: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Times a worker claimed the study (a process retrying after a database error keeps
    # its claim and does not count again).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Scored from some of its views only (the others failed).
    partial: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The lease: who holds the study ("host:pid") and when it last said it is alive.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When a message for it was last published (enqueue, reaper, requeue).
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A study claimed again after a lost worker is decoded one view at a time, each view
    # recorded here first: a process that dies leaves the view that killed it behind.
    decoding: Mapped[str | None] = mapped_column(Text)
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class View(Base):
    """One image of a study and its abnormality probability (or why it has none). Its source
    is the file it is read from; DICOM views also keep their SOPInstanceUID."""

    __tablename__ = "views"
    # The unique (study_id, source) index also serves lookups by study_id.
    __table_args__ = (UniqueConstraint("study_id", "source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(Text)
    sop_uid: Mapped[str | None] = mapped_column(String(64))
    prob: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class Delivery(Base):
    """A study's SR sent (or being sent) to a PACS destination: one row per (study key,
    model, destination), so that nothing is sent twice for one study and model; a failed
    send keeps its reason and is tried again."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("key", "model_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text)  # the study's key (StudyInstanceUID/part)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    destination: Mapped[str] = mapped_column(String(255))  # "AET@host:port" or a STOW URL
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"),
                                               index=True)
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16))  # sent / failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sr_uid: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BatchStat(Base):
    """Timing of one inference batch on one worker; keyed by (job, chunk delivery, batch
    number) so that a redelivered chunk rewrites its rows instead of adding more."""

    __tablename__ = "batch_stats"
    __table_args__ = (UniqueConstraint("job_id", "chunk", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    worker: Mapped[str] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(64))
    n_views: Mapped[int] = mapped_column(Integer)
    decode_ms: Mapped[float] = mapped_column(Float)
    infer_ms: Mapped[float] = mapped_column(Float)
    write_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    chunk: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int | None] = mapped_column(Integer)


class Evaluation(Base):
    """Figures of one evaluation of a job against its labels: overall or for one body part.

    One `evaluate` run writes one row with body_part NULL (all labelled studies) and one
    per body part, all with the same run number (1, 2, ... per job).
    """

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("job_id", "run", "body_part"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    run: Mapped[int] = mapped_column(Integer)
    body_part: Mapped[str | None] = mapped_column(String(64))  # NULL: all body parts
    threshold: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)  # labelled and scored studies
    positives: Mapped[int] = mapped_column(Integer)
    unscored: Mapped[int] = mapped_column(Integer)  # labelled, without a score
    unlabelled: Mapped[int] = mapped_column(Integer)  # scored or not, no label: skipped
    accuracy: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    kappa: Mapped[float | None] = mapped_column(Float)
    auroc: Mapped[float | None] = mapped_column(Float)
    sensitivity: Mapped[float | None] = mapped_column(Float)
    specificity: Mapped[float | None] = mapped_column(Float)
    # {"auroc": [low, high], ...}: percentile bootstrap, `resamples` draws from `seed`.
    ci: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    resamples: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
