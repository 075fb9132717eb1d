"""Alembic environment: migrate the connection handed over by bonexray, else a URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from bonexray.db.tables import Base
from bonexray.settings import get_settings, resolve_database_url

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    return resolve_database_url(url)


def _run(connection: Connection) -> None:
    # Batch mode: SQLite can only ALTER a table by copying it.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    # A connection already in a transaction (bonexray's) is committed by its owner.
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, render_as_batch=True,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
