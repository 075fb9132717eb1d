"""The command line's one voice: --format everywhere, the same JSON keys, tables that read
at 80 columns, and the error rule (a user's mistake: one line, exit 2; a bug: traceback, 1)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bonexray.cli import cli
from bonexray.db import query
from bonexray.db.session import open_database, session_scope
from bonexray.settings import get_settings
from tests.test_evaluate import SPECS, make_job

# A failed view whose reason must reach the user.
VIEW_ERROR = "ImageError: truncated JPEG at byte 4096"


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    value = (request.getfixturevalue("sqlite_url") if request.param == "sqlite"
             else request.getfixturevalue("fresh_pg_url"))
    monkeypatch.setenv("BONEXRAY_DATABASE_URL", value)
    monkeypatch.setenv("COLUMNS", "80")
    get_settings.cache_clear()
    yield value
    get_settings.cache_clear()


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def a_job(tmp: str = "") -> int:
    engine = open_database(get_settings().database_url)
    with session_scope(engine) as session:
        job = make_job(session, model_path="/models/a-rather-long-model-name-for-the-table.onnx",
                       sha256=(tmp or "cd") * 32)
    # One scored study also had a view that failed: its reason must be visible.
    with session_scope(engine) as session:
        from sqlalchemy import select

        from bonexray.db.tables import Study, View

        study = session.scalars(select(Study).where(Study.job_id == job, Study.status == "done")
                                .order_by(Study.key)).first()
        assert study is not None
        session.add(View(study_id=study.id, source=f"{study.key}/image2.png", error=VIEW_ERROR))
        study.partial = True
    return job


def test_every_data_command_speaks_table_json_and_csv_with_the_same_keys(url: str) -> None:
    job = a_job()
    for args in (["jobs"], ["status", str(job)], ["results", str(job)],
                 ["evaluate", str(job), "--no-save", "--resamples", "20"], ["models", "list"]):
        code, as_json, err = invoke(*args, "--format", "json")
        assert code in (0, 1), err  # status: 1 = finished with failed studies
        code, alias, _ = invoke(*args, "--json")
        assert json.loads(alias) == json.loads(as_json), args
        code, as_csv, err = invoke(*args, "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(as_csv)))
        assert rows, (args, as_csv, err)
        code, table, err = invoke(*args)
        assert table.strip() and not table.lstrip().startswith(("{", "[")), args

    jobs = json.loads(invoke("jobs", "--json")[1])
    status = json.loads(invoke("status", str(job), "--json")[1])
    models = json.loads(invoke("models", "list", "--json")[1])
    evaluation = json.loads(invoke("evaluate", str(job), "--json", "--no-save",
                                   "--resamples", "20")[1])
    # One name for one thing: `job` is a job's id, `model` a model's name, times in UTC.
    assert jobs[0]["job"] == status["job"] == evaluation["job"] == job
    assert jobs[0]["model"] == models[0]["model"] == "a-rather-long-model-name-for-the-table"
    assert jobs[0]["created_at"] == status["created_at"]
    assert status["created_at"].endswith("+00:00")
    assert evaluation["evaluation"] is None  # --no-save stored nothing
    csv_results = list(csv.DictReader(io.StringIO(invoke("results", str(job), "--format",
                                                         "csv")[1])))
    partial = [r for r in csv_results if r["partial"] == "1"]
    assert len(partial) == 1 and VIEW_ERROR in partial[0]["view_errors"]


def test_tables_fit_80_columns_and_say_what_they_leave_out(url: str) -> None:
    job = a_job()
    outputs = {name: invoke(*args)[1] for name, args in {
        "jobs": ["jobs"], "results": ["results", str(job)],
        "limited": ["results", str(job), "--limit", "8"],
        "evaluate": ["evaluate", str(job), "--no-save", "--resamples", "20"],
        "models": ["models", "list"]}.items()}
    for name, out in outputs.items():
        too_wide = [line for line in out.splitlines() if len(line) > 80]
        assert not too_wide, (name, too_wide)
        # Numbers are never cut: no ellipsis touches a digit.
        assert not re.search(r"\d…|…\d", out.replace("/", " ")) or name in ("results",
                                                                              "limited"), name
    total = len(SPECS) + 0
    assert f"{total} studies" in outputs["results"]
    assert f"8 of {total} studies" in outputs["limited"]
    n_jobs = len(json.loads(invoke("jobs", "--json")[1]))
    assert "times in UTC" in outputs["jobs"] and f"{n_jobs} jobs" in outputs["jobs"]
    if n_jobs > 1:
        assert f"1 of {n_jobs} jobs" in invoke("jobs", "--limit", "1")[1]
    # Per-view reasons are shown, not hidden behind a count.
    assert VIEW_ERROR in outputs["results"] and "image2.png" in outputs["results"]
    assert "no view could be scored" in outputs["results"]
    # The evaluation's figures are whole, on the row of their group.
    overall = json.loads(invoke("evaluate", str(job), "--json", "--no-save", "--resamples",
                                "20")[1])["overall"]
    row = next(line for line in outputs["evaluate"].splitlines() if line.startswith("overall"))
    assert row.split()[1:] == [str(overall["n"]), str(overall["positives"]),
                               str(overall["unscored"]),
                               *(f"{overall[m]:.3f}" for m in ("accuracy", "f1", "kappa",
                                                               "auroc", "sensitivity",
                                                               "specificity"))]


def test_count_job_results_matches_the_filtered_listing(url: str) -> None:
    job = a_job()
    engine = open_database(get_settings().database_url)
    with session_scope(engine) as session:
        for filters in ({}, {"body_part": "hand"}, {"status": "failed"},
                        {"min_score": 0.5}, {"study": "*XR_WRIST*"}):
            rows = query.job_results(session=session, job_id=job, **filters)
            assert query.count_job_results(session=session, job_id=job, **filters) \
                == len(rows), filters


def test_user_mistakes_are_one_line_exit_2_and_bugs_keep_their_traceback(
        url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a_job()
    # Mistakes: a job that does not exist, a value out of range, a file that is no model.
    for args in (["results", "4242"], ["status", "4242"], ["evaluate", "4242"],
                 ["results", "--limit", "0"], ["jobs", "--format", "xml"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert "Traceback" not in result.output and len(errors) == 1, (args, result.stderr)
    not_a_checkpoint = tmp_path / "model.pt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["export", str(not_a_checkpoint), "--out",
                                      str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not a bonexray checkpoint" in result.stderr

    # A bug (an error no user could cause) is not dressed up as a user's mistake.
    def broken(**_: object) -> None:
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(query, "list_jobs", broken)
    result = CliRunner().invoke(cli, ["jobs"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)
    assert "an internal inconsistency" in str(result.exception)


def test_help_lists_the_flow_in_order_without_cut_summaries() -> None:
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = re.findall(r"^  ([a-z-]+)\s{2,}(.+)$", result.output.split("Commands:")[1],
                        re.MULTILINE)
    names = [name for name, _ in listed]
    assert names[:4] == ["synth", "import", "train", "export"] and names[-1] == "bench"
    assert not [summary for _, summary in listed if summary.endswith("...")]
    # Every option of every command says what it does.
    for name in names:
        command = cli.commands[name]
        subcommands = getattr(command, "commands", {"": command})
        for sub in subcommands.values():
            for param in sub.params:
                if param.param_type_name == "option":
                    assert getattr(param, "help", None), (name, sub.name, param.name)


def test_csv_keeps_nested_values_as_json_and_wide_tables_never_cut_numbers(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    a_job()
    rows = list(csv.DictReader(io.StringIO(invoke("models", "list", "--format", "csv")[1])))
    assert json.loads(rows[0]["metadata"])["threshold"] == "0.5"

    from bonexray.cli import render

    # Eleven numeric columns and a long row name need more than 80 characters: the table
    # grows rather than cut a figure.
    out = render.table("wide", [("group", "text"),
                                *((f"m{i}", "num") for i in range(10))])
    out.add_row("multiscan=False and more", *("-0.123\n-.12–-.02" for _ in range(10)))
    render.print_table(out)
    printed = capsys.readouterr().out
    assert printed.count("-.12–-.02") == 10 and printed.count("-0.123") == 10


def test_resource_failures_of_training_are_advice_not_tracebacks() -> None:
    from bonexray.cli.training import resource_error

    assert "--batch-size" in resource_error(RuntimeError("CUDA out of memory. Tried to"))
    assert "shm-size" in resource_error(RuntimeError(
        "DataLoader worker (pid 12) is killed by signal: Bus error."))
    assert resource_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert any("--batch" in p.opts for p in cli.commands["bench"].params)  # the old name
