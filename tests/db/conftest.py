"""Database fixtures: one session per test on SQLite and on Postgres, left clean after."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from bonexray.db import store
from bonexray.db.tables import Model
from bonexray.studies import Study as FoundStudy


def make_studies(n: int, *, views: int = 2, empty: tuple[int, ...] = (),
                 root: str = "/archive") -> list[FoundStudy]:
    """`n` studies under `root`, those at the indexes in `empty` without views."""
    studies = []
    for i in range(n):
        path = f"{root}/XR_WRIST/patient{i:05d}/study1_{'positive' if i % 2 else 'negative'}"
        n_views = 0 if i in empty else views
        studies.append(FoundStudy(
            key=path,
            views=tuple(f"{path}/image{j + 1}.png" for j in range(n_views)),
            body_part="wrist", patient=f"{i:05d}", label=i % 2,
        ))
    return studies


@pytest.fixture
def model(session: Session) -> Model:
    return store.register_model(session=session, path="/models/densenet.onnx",
                                sha256="0123456789abcdef" * 4, meta={"threshold": 0.5})
