"""Shared fixtures: a fresh Postgres database per test session, SQLite files, a Redis db,
and a database session on both SQLite and Postgres."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bonexray.db.session import open_database

# Both `root` and `postgres` are trust-authenticated superusers on the development box.
PG_ADMIN_URL = os.environ.get(
    "BONEXRAY_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BONEXRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _admin_engine() -> Engine:
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def create_pg_database(prefix: str = "bonexray_test") -> str:
    """Create an empty database on the test server and return its URL."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop a database made by create_pg_database, ending whatever is still connected."""
    from bonexray.db import session as db_session

    name = make_url(url).database
    for (engine_url, _pid), engine in list(db_session._engines.items()):
        if make_url(engine_url).database == name:
            engine.dispose()
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a database made for this test session on the local Postgres, dropped after."""
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    """An engine on a database of its own, migrated to head once, for the `session`
    fixture whose every write is rolled back: tests that commit (workers, CLI runs) use
    `pg_url`, and their rows must not show up in these tests' queries."""
    url = create_pg_database("bonexray_rollback")
    try:
        yield open_database(url)
    finally:
        drop_pg_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """URL of an empty, unmigrated Postgres database for this test alone."""
    url = create_pg_database("bonexray_fresh")
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file (not yet made) in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'bonexray.db'}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database emptied before and after the session; Redis must be up."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()  # fails loudly (ConnectionError) when Redis is not running
        yield REDIS_URL
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def session(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Session]:
    """A session on a migrated database: a fresh SQLite file, or Postgres rolled back after."""
    if request.param == "sqlite":
        engine = open_database(sqlite_url)
        with Session(engine, expire_on_commit=False) as s:
            yield s
        engine.dispose()
        return
    pg_engine: Engine = request.getfixturevalue("pg_engine")
    with pg_engine.connect() as conn:
        trans = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint",
                     expire_on_commit=False) as s:
            yield s
        trans.rollback()
