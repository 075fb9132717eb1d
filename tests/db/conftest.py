"""Database fixtures: one session per test on SQLite and on Postgres, left clean after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bonexray.db import store
from bonexray.db.models import Model
from bonexray.db.session import open_database
from bonexray.studies import Study as FoundStudy


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


def make_studies(n: int, *, views: int = 2, empty: tuple[int, ...] = (),
                 root: str = "/archive") -> list[FoundStudy]:
    """`n` studies under `root`, those at the indexes in `empty` without views."""
    studies = []
    for i in range(n):
        path = f"{root}/XR_WRIST/patient{i:05d}/study1_{'positive' if i % 2 else 'negative'}"
        n_views = 0 if i in empty else views
        studies.append(FoundStudy(
            path=path,
            views=tuple(f"{path}/image{j + 1}.png" for j in range(n_views)),
            body_part="wrist", patient=f"{i:05d}", label=i % 2,
        ))
    return studies


@pytest.fixture
def model(session: Session) -> Model:
    return store.register_model(session=session, path="/models/densenet.onnx",
                                sha256="0123456789abcdef" * 4, meta={"threshold": 0.5})
