"""Engines, migrations to head (also many at once), and errors for unusable databases."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from bonexray.db import session as db_session
from bonexray.db.session import (
    DatabaseError,
    current_revision,
    get_engine,
    head_revision,
    open_database,
    session_scope,
    upgrade_schema,
)
from bonexray.db.tables import Base

TABLES = {"models", "jobs", "studies", "views", "batch_stats", "evaluations", "deliveries",
          "database_identity", "alembic_version"}


def _check_schema(engine: Engine) -> None:
    insp = inspect(engine)
    assert set(insp.get_table_names()) == TABLES
    assert {c["name"] for c in insp.get_columns("models")} == {
        "id", "name", "sha256", "path", "metadata", "created_at"}
    uniques = {u["name"] for u in insp.get_unique_constraints("studies")}
    assert "uq_studies_job_id_key" in uniques
    assert "uq_views_study_id_source" in {u["name"] for u in insp.get_unique_constraints("views")}
    assert "ix_studies_job_id_status" in {i["name"] for i in insp.get_indexes("studies")}
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()


def _migrated_engine(request: pytest.FixtureRequest, backend: str) -> Engine:
    if backend == "postgres":
        return open_database(request.getfixturevalue("fresh_pg_url"))
    return open_database(request.getfixturevalue("sqlite_url"))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_creates_every_table(request: pytest.FixtureRequest, backend: str) -> None:
    engine = _migrated_engine(request, backend)
    _check_schema(engine)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_again_is_a_no_op(request: pytest.FixtureRequest, backend: str) -> None:
    engine = _migrated_engine(request, backend)
    with session_scope(engine) as s:
        s.execute(text("INSERT INTO models (name, sha256, path, metadata, created_at) "
                       "VALUES ('m', 'abc', '/m.onnx', '{}', CURRENT_TIMESTAMP)"))
    upgrade_schema(engine)
    upgrade_schema(engine)
    assert open_database(engine.url.render_as_string(hide_password=False)) is engine
    _check_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM models")).scalar_one() == 1


def test_sqlite_connections_keep_foreign_keys_and_wal(sqlite_url: str) -> None:
    engine = open_database(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30000


def _upgrade_from_threads(url: str, n: int = 4) -> None:
    engines = [create_engine(url) for _ in range(n)]  # each thread its own connections
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            barrier.wait()
            upgrade_schema(engine)
        except BaseException as exc:  # collected, then asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for e in engines:
        e.dispose()
    assert errors == []


def test_concurrent_upgrade_on_fresh_postgres(fresh_pg_url: str) -> None:
    _upgrade_from_threads(fresh_pg_url)
    engine = create_engine(fresh_pg_url)
    try:
        _check_schema(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        engine.dispose()


def test_concurrent_upgrade_on_fresh_sqlite(sqlite_url: str) -> None:
    _upgrade_from_threads(sqlite_url)
    _check_schema(get_engine(sqlite_url))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_open_from_forked_processes(request: pytest.FixtureRequest,
                                               backend: str) -> None:
    """Worker children all opening a fresh database at once: one migrates, all succeed."""
    url = request.getfixturevalue("fresh_pg_url" if backend == "postgres" else "sqlite_url")
    parent = get_engine(url)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)

    def child() -> None:
        barrier.wait()
        engine = open_database(url)
        # The parent's engine was forgotten at fork; this one is the child's own.
        ok = engine is not parent and all(pid == os.getpid() for _, pid in db_session._engines)
        os._exit(0 if ok else 3)

    procs = [ctx.Process(target=child) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _check_schema(parent)


def test_engine_is_cached_per_url(sqlite_url: str) -> None:
    assert get_engine(sqlite_url) is get_engine(sqlite_url)


def test_relative_sqlite_url_is_made_absolute(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = open_database("sqlite:///relative.db")
    assert engine.url.database == str(tmp_path / "relative.db")
    assert (tmp_path / "relative.db").exists()
    engine.dispose()


def test_plain_postgresql_url_uses_psycopg() -> None:
    engine = get_engine("postgresql://someone@127.0.0.1:1/none")
    assert engine.url.drivername == "postgresql+psycopg"


def test_unreachable_database_is_one_line_without_password() -> None:
    url = "postgresql+psycopg://reader:s3cr3t-pw@127.0.0.1:1/bonexray"
    with pytest.raises(DatabaseError) as info:
        open_database(url)
    message = str(info.value)
    assert "\n" not in message
    assert "s3cr3t-pw" not in message
    assert "reader:***@127.0.0.1:1/bonexray" in message


def test_sqlite_in_missing_folder_is_a_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no/such/folder"):
        open_database(f"sqlite:///{tmp_path}/no/such/folder/x.db")


def test_unparseable_url_is_a_database_error() -> None:
    with pytest.raises(DatabaseError, match="cannot be parsed"):
        get_engine("not a url with pw:secret")


def test_session_scope_commits_and_rolls_back(sqlite_url: str) -> None:
    engine = open_database(sqlite_url)
    insert = text("INSERT INTO models (name, sha256, path, metadata, created_at) "
                  "VALUES (:n, :n, '/m.onnx', '{}', CURRENT_TIMESTAMP)")
    with session_scope(engine) as s:
        s.execute(insert, {"n": "kept"})
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        s.execute(insert, {"n": "dropped"})
        raise RuntimeError("boom")
    with engine.connect() as conn:
        names = conn.execute(text("SELECT name FROM models")).scalars().all()
    assert names == ["kept"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_match_the_models(request: pytest.FixtureRequest, backend: str) -> None:
    engine = _migrated_engine(request, backend)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_database_from_a_newer_bonexray_is_refused(sqlite_url: str) -> None:
    with open_database(sqlite_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(DatabaseError, match="'ffff9999'.*newer"):
        upgrade_schema(create_engine(sqlite_url))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_study_paths_become_keys_and_sources_and_back(request: pytest.FixtureRequest,
                                                      backend: str, tmp_path: Path) -> None:
    """0004 renames studies.path to key and views.path to source, keeping rows and their
    unique constraints; the downgrade gives the paths back."""
    from alembic import command

    url = (request.getfixturevalue("fresh_pg_url") if backend == "postgres"
           else f"sqlite:///{tmp_path / 'old.db'}")
    engine = create_engine(url)
    cfg = db_session.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(text("INSERT INTO models (id, name, sha256, path, metadata, created_at) "
                          "VALUES (1, 'm', :sha, '/m.onnx', '{}', CURRENT_TIMESTAMP)"),
                     {"sha": "a" * 64})
        conn.execute(text("INSERT INTO jobs (id, root, model_id, created_at, mode, options, "
                          "n_studies, n_views) VALUES (1, '/r', 1, CURRENT_TIMESTAMP, "
                          "'embedded', '{}', 1, 1)"))
        conn.execute(text("INSERT INTO studies (id, job_id, path, n_views, status, attempts) "
                          "VALUES (1, 1, '/r/s1', 1, 'queued', 0)"))
        conn.execute(text("INSERT INTO views (id, study_id, path) VALUES (1, 1, '/r/s1/a.png')"))
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT key, study_uid FROM studies")).all() == [("/r/s1", None)]
        assert conn.execute(text("SELECT source, sop_uid FROM views")).all() == [
            ("/r/s1/a.png", None)]
    insp = inspect(engine)
    assert "uq_studies_job_id_key" in {u["name"] for u in insp.get_unique_constraints("studies")}
    with pytest.raises(Exception, match="(?i)unique"), engine.begin() as conn:
        conn.execute(text("INSERT INTO views (study_id, source) VALUES (1, '/r/s1/a.png')"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT path FROM views")).scalars().all() == ["/r/s1/a.png"]
    engine.dispose()
