"""The `bonexray` command: thin click commands that parse, call one function, and print."""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from bonexray.settings import get_settings

log = logging.getLogger("bonexray")

F = TypeVar("F", bound=Callable[..., Any])

# Domain errors whose message is for the user: printed as one line, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, OSError)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Broker errors are user-facing too (wrong URL, Redis down); kombu is only imported by
    # the commands that talk to a broker, so only look for it once it is loaded.
    if "kombu.exceptions" in sys.modules:
        return (*_USER_ERRORS, sys.modules["kombu.exceptions"].KombuError)
    return _USER_ERRORS


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Schema checks run on every command; their chatter is not news.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.root.level))


def _apply_overrides(**values: str | int | None) -> None:
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
                        help="Database URL (default: BONEXRAY_DATABASE_URL, else "
                             "sqlite:///bonexray.db in the working directory).")(func)


def broker_option(func: F) -> F:
    return click.option("--broker", "broker_url", metavar="URL",
                        help="Broker URL (default: BONEXRAY_BROKER_URL, else "
                             "redis://127.0.0.1:6379/0).")(func)


def user_errors(func: F) -> F:
    """Turn domain errors into a one-line message and exit status 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            if not isinstance(exc, _user_error_types()):
                raise
            if log.isEnabledFor(logging.DEBUG):
                log.debug("traceback", exc_info=True)
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise click.ClickException(f"{type(exc).__name__}: {message}") from None

    return wrapper  # type: ignore[return-value]


def _engine() -> Any:
    from bonexray.db.session import open_database

    return open_database(get_settings().database_url)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="Logging level (default BONEXRAY_LOG_LEVEL, INFO).")
@click.version_option(package_name="bonexray")
def cli(log_level: str | None) -> None:
    """bonexray: classify musculoskeletal radiograph studies as normal or abnormal."""
    _apply_overrides(log_level=log_level)
    _setup_logging(get_settings().log_level)


def main() -> None:
    cli(prog_name="bonexray")


# ---------------------------------------------------------------------------- data


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--studies", default=140, show_default=True, help="Number of studies.")
@click.option("--seed", default=0, show_default=True)
@click.option("--image-size", default=256, show_default=True, help="Typical image side, px.")
@click.option("--valid-fraction", default=0.2, show_default=True)
@user_errors
def synth(out: str, studies: int, seed: int, image_size: int, valid_fraction: float) -> None:
    """Write a synthetic MURA-style tree of radiograph-like studies with known labels."""
    from bonexray.synth import write_synthetic_mura

    summary = write_synthetic_mura(out, studies=studies, seed=seed, image_size=image_size,
                                   valid_fraction=valid_fraction)
    click.echo(f"wrote {summary.studies} studies ({summary.views} views, {summary.abnormal} "
               f"abnormal; {summary.by_split}) to {summary.root}")


# ---------------------------------------------------------------------------- train / export


@cli.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--epochs", default=8, show_default=True)
@click.option("--image-size", default=224, show_default=True,
              help="Input side in px (MURA used 320, the follow-up paper 224).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: recipe's).")
@click.option("--weights", default="none", show_default=True,
              help="none (from scratch), imagenet (torchvision's, from TORCH_HOME), or a "
                   "path to a local DenseNet-169 state dict.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True, help="DataLoader workers.")
@click.option("--max-steps", type=int, default=None, help="Cap on steps per epoch (quick runs).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def train(data: str, out: str, epochs: int, image_size: int, batch_size: int, lr: float | None,
          weights: str, seed: int, workers: int, max_steps: int | None, device: str,
          as_json: bool) -> None:
    """Train DenseNet-169 on MURA-layout data; writes OUT/best.pt, last.pt, history.json."""
    from bonexray.trainer.train import TrainConfig
    from bonexray.trainer.train import train as run_training

    config = TrainConfig(
        data=data, out=out, epochs=epochs, image_size=image_size, batch_size=batch_size,
        lr=lr, weights=None if weights == "none" else weights, seed=seed, workers=workers,
        max_steps=max_steps, device=device,
    )
    summary = run_training(config)
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    best = summary.get("best_metrics") or {}
    click.echo(f"best epoch {summary['best_epoch']}: valid AUROC {_fmt(best.get('auroc'))}, "
               f"kappa {_fmt(best.get('kappa'))}, accuracy {_fmt(best.get('accuracy'))}, "
               f"F1 {_fmt(best.get('f1'))} on {best.get('n')} studies; "
               f"checkpoint {summary['best']}")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.onnx path.")
@click.option("--opset", default=17, show_default=True)
@click.option("--atol", default=1e-4, show_default=True,
              help="Parity tolerance on probabilities against PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def export(checkpoint: str, out: str, opset: int, atol: float, as_json: bool) -> None:
    """Export a checkpoint to ONNX (uint8 input, metadata), gated by parity with PyTorch."""
    from bonexray.export.onnx import export_model

    report = export_model(checkpoint, out, opset=opset, atol=atol)
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    worst = max(p["max_abs_diff"] for p in report["parity"])
    meta = report["metadata"]
    click.echo(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, sha256 "
               f"{report['sha256'][:12]}…): {meta['architecture']}, {meta['input_size']} px, "
               f"threshold {meta['threshold']}; parity max |diff| {worst:.1e} <= atol {atol:g} "
               f"at batch {', '.join(str(p['batch']) for p in report['parity'])}")


# ---------------------------------------------------------------------------- jobs


def _with_progress(total: int, label: str, work: Callable[[Callable[[int], None]], Any]) -> Any:
    """Run work(advance) under a progress bar on stderr (stdout stays for results/JSON)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=_stderr_console()) as progress:
        task = progress.add_task(label, total=total)
        return work(lambda n: progress.advance(task, n))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--chunk-size", type=int, default=None, help="Studies per chunk (default 16).")
@click.option("--batch-size", type=int, default=None, help="Views per inference batch.")
@user_errors
def run(folder: str, model_ref: str, database_url: str | None, as_json: bool,
        chunk_size: int | None, batch_size: int | None) -> None:
    """Classify every study under FOLDER in this process (no broker): the embedded default."""
    from bonexray.jobs import prepare_job, resolve_model, run_embedded

    _apply_overrides(database_url=database_url, chunk_size=chunk_size, batch_size=batch_size)
    settings = get_settings()
    engine = _engine()
    model = resolve_model(engine=engine, ref=model_ref)
    job = prepare_job(engine=engine, root=folder, model=model, mode="embedded",
                      options={"chunk_size": settings.chunk_size,
                               "batch_size": settings.batch_size})
    start = time.perf_counter()
    _with_progress(len(job.tasks), f"job {job.job_id}",
                   lambda advance: run_embedded(engine=engine, job=job, settings=settings,
                                                progress=advance))
    elapsed = time.perf_counter() - start
    _print_job_summary(job.job_id, job.studies, job.views, elapsed, as_json)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--chunk-size", type=int, default=None, help="Studies per task (default 16).")
@user_errors
def enqueue(folder: str, model_ref: str, database_url: str | None, broker_url: str | None,
            as_json: bool, chunk_size: int | None) -> None:
    """Register a job for every study under FOLDER and send its chunks to the workers."""
    from bonexray.jobs import check_broker, prepare_job, resolve_model, send_job

    _apply_overrides(database_url=database_url, broker_url=broker_url, chunk_size=chunk_size)
    settings = get_settings()
    check_broker(settings)
    engine = _engine()
    model = resolve_model(engine=engine, ref=model_ref)
    job = prepare_job(engine=engine, root=folder, model=model, mode="celery",
                      options={"chunk_size": settings.chunk_size})
    sent = _with_progress(len(job.tasks), f"enqueue job {job.job_id}",
                          lambda advance: send_job(job=job, settings=settings, progress=advance))
    if as_json:
        click.echo(json.dumps({"job": job.job_id, "studies": job.studies, "views": job.views}))
    else:
        click.echo(f"job {job.job_id}: {job.studies} studies ({job.views} views, {job.empty} "
                   f"empty) sent as {sent} chunks; follow with `bonexray status {job.job_id} "
                   "--wait`")


def _print_job_summary(job_id: int, studies: int, views: int, elapsed: float,
                       as_json: bool) -> None:
    from bonexray.db.query import job_progress
    from bonexray.db.session import session_scope

    if as_json:
        click.echo(json.dumps({"job": job_id, "studies": studies, "views": views}))
        return
    with session_scope(_engine()) as session:
        p = job_progress(session=session, job_id=job_id)
    click.echo(f"job {job_id}: {p['done']} done, {p['failed']} failed, {p['empty']} empty of "
               f"{p['studies']} studies; {p['views_scored']} views scored, {p['views_failed']} "
               f"failed; {elapsed:.1f} s. See `bonexray results {job_id}`.")


@cli.command()
@db_option
@broker_option
@click.option("--concurrency", "-c", type=int, default=1, show_default=True,
              help="Worker processes (one per GPU is usual).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork",
              show_default=True)
@click.option("--queue", "-Q", default=None, help="Queue to consume (default bonexray).")
@click.option("--hostname", "-n", default=None, help="Worker node name (Celery's -n).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def worker(database_url: str | None, broker_url: str | None, concurrency: int, pool: str,
           queue: str | None, hostname: str | None, loglevel: str,
           celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker that classifies chunks (extra args go to `celery worker`)."""
    processes = 1 if pool in ("solo", "threads") else concurrency
    _apply_overrides(database_url=database_url, broker_url=broker_url, queue=queue,
                     worker_processes=processes)
    settings = get_settings()
    from bonexray.db.session import open_database

    open_database(settings.database_url)  # fail fast, and migrate once before forking
    from bonexray.worker.app import create_app

    app = create_app(settings)
    argv = ["worker", f"--loglevel={loglevel}", f"--pool={pool}",
            f"--concurrency={concurrency}", f"--queues={settings.queue}"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv=[*argv, *celery_args])


@cli.command()
@click.argument("job", type=int, required=False)
@db_option
@click.option("--wait", is_flag=True, help="Follow the job until no study is queued.")
@click.option("--json", "as_json", is_flag=True, help="Print the progress as JSON.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between polls.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this long.")
@user_errors
def status(job: int | None, database_url: str | None, wait: bool, as_json: bool,
           interval: float, timeout: float | None) -> None:
    """Progress of a job (the latest when JOB is omitted); exit 1 if it ended with failures."""
    from bonexray.db.query import job_progress
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url)
    engine = _engine()
    job_id = _job_id(engine, job)

    def read() -> dict[str, Any]:
        with session_scope(engine) as session:
            return job_progress(session=session, job_id=job_id)

    p = read()
    if wait and not p["finished"]:
        p = _follow(read, p, interval, timeout)
    if as_json:
        click.echo(json.dumps(p, default=str))
    else:
        rate = f"{p['images_per_s']:.1f} images/s" if p["images_per_s"] else "-"
        click.echo(f"job {job_id}: {'finished' if p['finished'] else 'running'}; "
                   f"{p['done']} done, {p['failed']} failed, {p['empty']} empty, {p['queued']} "
                   f"queued of {p['studies']} studies; views {p['views_scored']} scored, "
                   f"{p['views_failed']} failed; {rate}")
    if wait and not p["finished"]:
        raise click.ClickException(f"job {job_id} still has {p['queued']} queued studies "
                                   f"after {timeout} s")
    if p["finished"] and p["failed"]:
        sys.exit(1)


def _follow(read: Callable[[], dict[str, Any]], p: dict[str, Any], interval: float,
            timeout: float | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), "{task.fields[info]}",
                  console=_stderr_console()) as progress:
        task = progress.add_task(f"job {p['job']}", total=p["studies"], info="")
        while True:
            finished = p["studies"] - p["queued"]
            rate = p["images_per_s"]
            progress.update(task, completed=finished,
                            info=f"failed {p['failed']}"
                                 + (f" · {rate:.1f} img/s" if rate else ""))
            if p["finished"] or (deadline is not None and time.monotonic() > deadline):
                return p
            time.sleep(interval)
            p = read()


def _job_id(engine: Any, job: int | None) -> int:
    from bonexray.db.query import get_job, latest_job
    from bonexray.db.session import session_scope

    with session_scope(engine) as session:
        found = latest_job(session=session) if job is None else get_job(session=session,
                                                                         job_id=job)
        if found is None:
            raise click.ClickException("no jobs in the database yet" if job is None
                                       else f"no job {job} in the database")
        return int(found.id)


@cli.command()
@click.argument("job", type=int, required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--body-part", default=None, help="Only this body part (e.g. wrist).")
@click.option("--prediction", type=click.Choice(["normal", "abnormal"]), default=None)
@click.option("--status", "study_status", type=click.Choice(["queued", "done", "failed",
                                                             "empty"]), default=None)
@click.option("--limit", type=int, default=None)
@user_errors
def results(job: int | None, database_url: str | None, fmt: str, body_part: str | None,
            prediction: str | None, study_status: str | None, limit: int | None) -> None:
    """Study results of a job (the latest when JOB is omitted)."""
    from bonexray.db.query import get_job, job_results
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url)
    engine = _engine()
    job_id = _job_id(engine, job)
    with session_scope(engine) as session:
        rows = job_results(session=session, job_id=job_id, body_part=body_part,
                           prediction=prediction, status=study_status, limit=limit)
    if fmt == "json":
        click.echo(json.dumps(rows))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["study", "body_part", "label", "score", "prediction", "status",
                         "views", "views_failed", "error"])
        for r in rows:
            writer.writerow([r["study"], r["body_part"] or "", _blank(r["label"]),
                             _blank(r["score"]), r["prediction"] or "", r["status"],
                             len(r["views"]), sum(v["error"] is not None for v in r["views"]),
                             r["error"] or ""])
    else:
        with session_scope(engine) as session:
            job_row = get_job(session=session, job_id=job_id)
            root = job_row.root if job_row is not None else "/"
        _print_table(job_id, root, rows)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _print_table(job_id: int, root: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"job {job_id}: {len(rows)} studies under {root}")
    for name in ("study", "part", "label", "score", "prediction", "status", "views", "error"):
        table.add_column(name, overflow="fold")
    for r in rows:
        failed = sum(v["error"] is not None for v in r["views"])
        views = f"{len(r['views'])}" + (f" ({failed} failed)" if failed else "")
        table.add_row(os.path.relpath(r["study"], root), r["body_part"] or "", _text(r["label"]),
                      "" if r["score"] is None else f"{r['score']:.3f}",
                      r["prediction"] or "", r["status"], views, r["error"] or "")
    Console().print(table)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------- db


@cli.group()
def db() -> None:
    """Database operations."""


@db.command("upgrade")
@db_option
@user_errors
def db_upgrade(database_url: str | None) -> None:
    """Bring the schema to the newest migration (also done by every command on its own)."""
    from bonexray.db.session import open_database

    _apply_overrides(database_url=database_url)
    url = get_settings().database_url
    engine = open_database(url)
    click.echo(f"schema at head on {engine.url.render_as_string(hide_password=True)}")


if __name__ == "__main__":
    main()
