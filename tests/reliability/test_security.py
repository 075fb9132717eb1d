"""Security: data roots confine reads, pickles are refused, model files are checked, and
neither credentials nor patient folder names reach the logs."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy.engine import make_url

from bonexray.export.cheap import write_cheap_model
from bonexray.imaging import ImageError
from bonexray.security import PathNotAllowedError, check_folder, check_view, is_within
from tests.reliability.conftest import (
    bonexray,
    png_bytes,
    study_rows,
    wait_finished,
    wait_until,
    write_study,
)

PACKAGE = Path(__file__).resolve().parents[2] / "bonexray"


def test_roots_resolve_symlinks_before_the_check(tmp_path):
    inside, outside = tmp_path / "archive", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "link-out").symlink_to(outside)
    (outside / "secret.png").write_bytes(png_bytes())
    (inside / "view.png").symlink_to(outside / "secret.png")
    roots = (str(inside),)
    assert is_within(inside / "a" / "b.png", roots)
    assert not is_within(outside, roots)
    assert not is_within(inside / "link-out", roots)
    assert not is_within(str(inside) + "-sibling", roots)  # a prefix is not a parent
    check_folder(inside, roots)
    with pytest.raises(PathNotAllowedError, match="outside BONEXRAY_DATA_ROOTS"):
        check_folder(inside / "link-out", roots)
    with pytest.raises(ImageError, match="outside BONEXRAY_DATA_ROOTS"):
        check_view(str(inside / "view.png"), roots)
    check_view(str(outside / "secret.png"), ())  # no roots: no confinement


def test_run_and_enqueue_refuse_folders_outside_the_roots(tmp_path, cheap_model, env):
    inside, outside = tmp_path / "archive", tmp_path / "elsewhere"
    write_study(inside / "p1" / "s1", 1)
    write_study(outside / "p9" / "s1", 1)
    (inside / "link-out").symlink_to(outside)
    confined = {**env, "BONEXRAY_DATA_ROOTS": f"{tmp_path / 'none'}:{inside}"}
    db = f"sqlite:///{tmp_path / 'r.db'}"
    for command in (["run", "--db", db], ["enqueue"]):
        for folder in (outside, inside / "link-out"):
            out = bonexray(command[0], str(folder), "--model", str(cheap_model), *command[1:],
                           env=confined, check=False)
            assert out.returncode != 0, out
            last = out.stderr.strip().splitlines()[-1]
            assert "PathNotAllowedError" in last and "Traceback" not in out.stderr


def test_symlinks_out_of_the_roots_are_not_followed(tmp_path, cheap_model, env):
    inside, outside = tmp_path / "archive", tmp_path / "elsewhere"
    study = write_study(inside / "p1" / "s1", 1)
    write_study(outside / "p9" / "s1", 1)
    (study / "leak.png").symlink_to(outside / "p9" / "s1" / "image1.png")
    (inside / "folder-link").symlink_to(outside / "p9")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    for roots, leak_read in ((str(inside), False), ("", True)):
        out = bonexray("run", str(inside), "--model", str(cheap_model), "--db", db, "--json",
                       env={**env, "BONEXRAY_DATA_ROOTS": roots})
        rows = study_rows(db, json.loads(out.stdout)["job"])
        assert list(rows) == [str(study)]  # the symlinked folder was not walked
        prob, error = rows[str(study)]["views"][str(study / "leak.png")]
        if leak_read:
            assert prob is not None and error is None
        else:
            assert prob is None and "outside BONEXRAY_DATA_ROOTS" in error
        assert rows[str(study)]["status"] == "done"  # the rest of the study goes on


def test_worker_refuses_pickles_and_changed_models_and_logs_no_secrets(
        tmp_path, env, pg_url, workers):
    password = f"pw{uuid.uuid4().hex[:10]}"  # trust auth ignores it; it must not be printed
    patient = f"DOE^JOHN{uuid.uuid4().hex[:6]}"
    env = {**env, "BONEXRAY_DATABASE_URL": make_url(pg_url).set(password=password)
           .render_as_string(hide_password=False)}
    root = tmp_path / "archive"
    write_study(root / f"patient {patient}" / "study1", 2)
    model = Path(write_cheap_model(tmp_path / "m.onnx", image_size=32))

    # A pickled message that would create a folder if the worker ever unpickled it.
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    with Connection(env["BONEXRAY_BROKER_URL"]) as conn:
        conn.Producer().publish(
            {"job": Exploit()}, routing_key=env["BONEXRAY_QUEUE"], serializer="pickle",
            headers={"task": "bonexray.classify_chunk", "id": str(uuid.uuid4()),
                     "lang": "py", "argsrepr": "", "kwargsrepr": ""})

    first = bonexray("enqueue", str(root), "--model", str(model), "--json", env=env)
    job = json.loads(first.stdout)["job"]
    write_cheap_model(model, image_size=32, threshold=0.25)  # changed after registration
    worker = workers(env, tmp_path / "worker.log")
    p = wait_finished(pg_url, job)
    assert p["failed"] == 1
    (row,) = study_rows(pg_url, job).values()
    assert "sha256 mismatch" in row["error"]
    assert len(row["views"]) == 2 and set(row["views"].values()) == {(None, None)}  # unread

    wait_until(lambda: "pickle" in worker.log(), 30, "the pickled message to be refused")
    assert not marker.exists()
    assert re.search(r"(?i)refusing to deserialize untrusted content of type pickle",
                     worker.log())
    assert worker.proc.poll() is None
    logs = worker.log() + first.stderr
    assert password not in logs
    assert patient not in logs  # INFO logs carry job and study ids, not folder names


def test_sql_is_built_from_bound_parameters_only():
    # No SQL text assembled from values: SQLAlchemy expressions and bound parameters only.
    # CREATE/DROP DATABASE of a generated name is the exception: identifiers cannot be bound.
    pattern = re.compile(r"(text|exec_driver_sql|execute)\(\s*f[\"']")
    offenders = [f"{p.relative_to(PACKAGE)}:{n}"
                 for p in PACKAGE.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and not re.search(r"(CREATE|DROP) DATABASE", line)]
    assert offenders == []
