"""The `bonexray` group and what every command shares: options, settings, the database,
and the rule for errors (a user's mistake: one line, exit status 2; a bug: traceback, 1)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bonexray.errors import BonexrayError, JobNotFoundError, one_line
from bonexray.settings import get_settings

log = logging.getLogger("bonexray")

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses. 1 is also what Python gives an uncaught exception (a bug, with its
# traceback); `status` uses it for "finished with failed studies".
EXIT_FAILURES = 1
EXIT_USER_ERROR = 2
# `bonexray worker`'s exit status when it stopped because it cannot classify (EX_TEMPFAIL).
EXIT_SICK = 75


class UserError(click.ClickException):
    """A one-line message for the user; exit status 2 (1 is `status`'s "ended with failures")."""

    exit_code = EXIT_USER_ERROR


def _environment_error_types() -> tuple[type[BaseException], ...]:
    """Errors from outside the program that the user acts on: the operating system refusing
    a path (OSError), a broker or a database that cannot be reached. kombu and SQLAlchemy
    are looked for only once a command has loaded them."""
    found: list[type[BaseException]] = [OSError]
    if "kombu.exceptions" in sys.modules:
        found.append(sys.modules["kombu.exceptions"].OperationalError)
    if "sqlalchemy.exc" in sys.modules:
        found.append(sys.modules["sqlalchemy.exc"].OperationalError)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """True for a mistake or a condition the user can act on; False for a bug."""
    return isinstance(exc, (BonexrayError, click.ClickException, *_environment_error_types()))


def user_errors(func: F) -> F:
    """A user's mistake becomes one line on stderr and exit status 2, never a traceback;
    anything else is a bug and keeps its traceback (exit status 1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:
            if not is_user_error(exc):
                raise
            if log.isEnabledFor(logging.DEBUG):
                log.debug("traceback", exc_info=True)
            raise UserError(one_line(exc, typed=True)) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str, fmt: str = "text") -> None:
    from bonexray.logs import setup_logging as setup

    setup(level, fmt)


def apply_overrides(**values: str | int | None) -> None:
    """Command-line options win over BONEXRAY_* variables, in this process and its children."""
    changed = False
    for key, value in values.items():
        if value is not None:
            os.environ[f"BONEXRAY_{key.upper()}"] = str(value)
            changed = True
    if changed:
        get_settings.cache_clear()


def db_option(func: F) -> F:
    return click.option("--db", "database_url", metavar="URL",
                        help="Database URL [env: BONEXRAY_DATABASE_URL; default: "
                             "sqlite:///bonexray.db in the working directory].")(func)


def broker_option(func: F) -> F:
    return click.option("--broker", "broker_url", metavar="URL",
                        help="Broker URL [env: BONEXRAY_BROKER_URL; default: "
                             "redis://127.0.0.1:6379/0].")(func)


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when it does not exist yet (else None)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def engine(*, read_only: bool = False, model_ref: str | None = None) -> Any:
    """The database, schema at head. A SQLite file that does not exist yet is created only
    by a command that writes: a read-only command (results, status, ...) given a mistyped
    path says so instead, and run/enqueue check first that a model file they would be
    given exists (a new database holds no registered model to find by name)."""
    from bonexray.db.session import open_database

    url = get_settings().database_url
    missing = _missing_sqlite_file(url)
    if missing is not None and read_only:
        raise UserError(f"no database at {missing}: nothing has run there yet (check --db or "
                        "BONEXRAY_DATABASE_URL)")
    if missing is not None and model_ref is not None and not Path(model_ref).is_file():
        from bonexray.modelstore import ModelNotFoundError

        raise ModelNotFoundError(f"--model {model_ref!r}: no such file (and {missing} does "
                                 "not exist yet, so no model is registered there)")
    return open_database(url)


def job_id(db: Any, job: int | None) -> int:
    """JOB as given, checked to exist, or the newest job when it is None."""
    from bonexray.db.query import get_job, latest_job
    from bonexray.db.session import session_scope

    with session_scope(db) as session:
        found = latest_job(session=session) if job is None else get_job(session=session,
                                                                         job_id=job)
        if found is None:
            raise JobNotFoundError("no jobs in the database yet" if job is None
                                   else f"no job {job} in the database")
        return int(found.id)


# The order `bonexray --help` lists commands in: the flow of the work, operators' tools last.
FLOW = ("synth", "import", "train", "export", "models", "run", "enqueue", "listen", "pull",
        "worker",
        "status", "requeue", "results", "jobs", "evaluate", "export-predictions",
        "export-dicom", "send-results", "db", "bench")


class FlowGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: (FLOW.index(n) if n in FLOW else len(FLOW), n))


@click.group(cls=FlowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error", "critical"],
                                case_sensitive=False),
              help="Logging level [env: BONEXRAY_LOG_LEVEL; default: info].")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log records as text or JSON lines [env: BONEXRAY_LOG_FORMAT; default: "
                   "text]; workers started by this command inherit it.")
@click.version_option(package_name="bonexray")
def cli(log_level: str | None, log_format: str | None) -> None:
    """bonexray: classify musculoskeletal radiograph studies as normal or abnormal.

    \b
    Everyday flow:   import/synth -> train -> export -> run (or enqueue + worker)
                     -> status -> results -> evaluate
    Exit status:     0 done; 1 a job finished with failed studies (status), or a bug
                     (with its traceback); 2 a mistake to fix (one line on stderr);
                     3 status --wait timed out; 4 a job is stalled; 75 a worker that
                     cannot classify on this machine stopped.
    """
    from bonexray.settings import SettingsError

    try:  # every BONEXRAY_* variable is checked here, once, before any command runs
        apply_overrides(log_level=log_level, log_format=log_format)
        settings = get_settings()
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    setup_logging(settings.log_level, settings.log_format)
