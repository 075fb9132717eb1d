"""Engines made once per process, the schema brought to head once, and session scopes."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from bonexray.errors import BonexrayError
from bonexray.settings import get_settings, mask_url, resolve_database_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Key of the Postgres advisory lock held while migrating ("bonexray" in ASCII, < 2**63).
MIGRATION_LOCK_KEY = 0x626F6E6578726179

_engines: dict[tuple[str, int], Engine] = {}
_ready: weakref.WeakSet[Engine] = weakref.WeakSet()
_lock = threading.Lock()
# Alembic's `context` and `op` are process-wide proxies: one migration at a time per process.
_alembic_lock = threading.Lock()


class DatabaseError(BonexrayError, RuntimeError):
    """The database cannot be reached, or its schema cannot be brought to this version."""


def _normalise_url(raw: str) -> URL:
    try:
        url = make_url(resolve_database_url(raw))
    except sa_exc.ArgumentError:
        # The message of ArgumentError repeats the URL, password included.
        raise DatabaseError("the database URL cannot be parsed (see BONEXRAY_DATABASE_URL)") \
            from None
    # psycopg 3 is the driver we ship; SQLAlchemy's default for postgresql:// is psycopg2.
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _use_wal(cursor: Any) -> None:
    # WAL: readers (status, results) do not block the writer, nor it them. The mode is kept
    # in the file; switching needs a lock for which SQLite may answer "database is locked"
    # at once, without waiting, when other processes open a new file at the same moment.
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
        _use_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _create_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            # hide_parameters: an error's message (logged by Celery on retry) would otherwise
            # carry bound values, study and view paths among them, which can name patients.
            engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
            event.listen(engine, "connect", _set_sqlite_pragmas)
            return engine
        connect_args: dict[str, Any] = {}
        if backend == "postgresql":
            connect_args = postgres_connect_args(url)
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args,
                             hide_parameters=True)
    except (sa_exc.NoSuchModuleError, ImportError) as exc:
        raise DatabaseError(f"no driver for {mask_url(url)}: {exc}") from None


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """libpq settings that turn a hung server or a lock held for ever into an error that
    the workers' retry loop handles: connect timeout, TCP keepalives, and server-side lock
    and statement timeouts (BONEXRAY_DB_*_TIMEOUT_MS). The URL's own query wins."""
    settings = get_settings()
    args: dict[str, Any] = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                            "keepalives_interval": 10, "keepalives_count": 3}
    options = []
    if settings.db_lock_timeout_ms > 0:
        options.append(f"-c lock_timeout={settings.db_lock_timeout_ms}")
    if settings.db_statement_timeout_ms > 0:
        options.append(f"-c statement_timeout={settings.db_statement_timeout_ms}")
    if options:
        args["options"] = " ".join(options)
    return {key: value for key, value in args.items() if key not in url.query}


def get_engine(url: str | None = None) -> Engine:
    """This process's engine for `url` (default: the settings' database URL)."""
    parsed = _normalise_url(url or get_settings().database_url)
    # The pid is part of the key: a forked worker child must make its own connections.
    key = (parsed.render_as_string(hide_password=False), os.getpid())
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create_engine(parsed)
    return engine


def _after_fork_in_child() -> None:
    global _lock, _alembic_lock
    _lock = threading.Lock()
    _alembic_lock = threading.Lock()
    pid = os.getpid()
    for key in [k for k in _engines if k[1] != pid]:
        # Leave the parent's connections open (they are the parent's), just forget them.
        _engines.pop(key).dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def alembic_config() -> Config:
    """An Alembic configuration for the migrations shipped inside the package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


@cache
def _script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str | None:
    """The newest schema revision this code knows."""
    return _script_directory().get_current_head()


def _knows_revision(revision: str) -> bool:
    try:
        return _script_directory().get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(conn: Connection) -> str | None:
    """The schema revision the database is at (None when it has none yet)."""
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the database's migration lock on `conn`; other processes wait for it."""
    backend = conn.dialect.name
    if backend == "postgresql":
        # A session-level lock: it outlives the migration's transaction on this connection.
        conn.execute(select(func.pg_advisory_lock(MIGRATION_LOCK_KEY)))
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.rollback()
                conn.execute(select(func.pg_advisory_unlock(MIGRATION_LOCK_KEY)))
                conn.commit()
            except sa_exc.DBAPIError:
                # Closing the connection releases the lock too; never pool a locked one.
                conn.invalidate()
    elif backend == "sqlite":
        # Foreign keys off while migrating: batch mode's DROP TABLE would otherwise cascade.
        # The pragma only takes effect outside a transaction, hence before BEGIN.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        # BEGIN IMMEDIATE takes SQLite's write lock now: concurrent migrators wait
        # (busy_timeout), and the schema DDL runs in this one transaction.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()
    else:
        yield


def upgrade_schema(engine: Engine) -> None:
    """Bring the database's schema to head; safe when many processes start at once."""
    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return
    with _alembic_lock, engine.connect() as conn, _migration_lock(conn):
        # Another process may have migrated while this one waited for the lock.
        current = current_revision(conn)
        if current == head:
            return
        if current is not None and not _knows_revision(current):
            raise DatabaseError(
                f"the database at {mask_url(engine.url)} is at schema revision {current!r}, "
                f"unknown to this bonexray (head {head!r}): was it migrated by a newer one?"
            )
        log.info("migrating %s from %s to %s", mask_url(engine.url), current or "nothing",
                 head)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


def _one_line(exc: BaseException, url: URL) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def open_database(url: str | None = None) -> Engine:
    """The engine for `url`, its schema at head (checked once per process).

    Raises DatabaseError, with a one-line message naming the URL (password hidden), when
    the database cannot be reached.
    """
    engine = get_engine(url)
    if engine in _ready:
        return engine
    try:
        upgrade_schema(engine)
    except sa_exc.DBAPIError as exc:
        reason = _one_line(exc.orig if exc.orig is not None else exc, engine.url)
        raise DatabaseError(
            f"cannot use the database at {mask_url(engine.url)}: {reason}"
        ) from exc
    _ready.add(engine)
    return engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits when the block ends, rolls back on error, and always closes."""
    session = Session(engine if engine is not None else open_database(),
                      expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
