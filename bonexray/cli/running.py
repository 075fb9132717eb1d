"""Job commands: `run` classifies a folder in this process, `enqueue` sends it to the
workers, `worker` starts one, `status` follows a job and `requeue` sends its stragglers
again."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from bonexray.cli import base
from bonexray.cli.base import (
    EXIT_FAILURES,
    EXIT_SICK,
    apply_overrides,
    broker_option,
    cli,
    db_option,
    user_errors,
)
from bonexray.cli.render import console, emit, output_format
from bonexray.settings import get_settings


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
                  console=console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        return work(lambda n: progress.advance(task, n))


@cli.command(short_help="Classify a folder of studies in this process.")
@click.argument("folder", type=click.Path(exists=True))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per chunk [env: BONEXRAY_CHUNK_SIZE; default: 16].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Views per inference batch [env: BONEXRAY_BATCH_SIZE; default: 16].")
@output_format
@user_errors
def run(folder: str, model_ref: str, database_url: str | None, fmt: str,
        chunk_size: int | None, batch_size: int | None) -> None:
    """Classify every study under FOLDER in this process (no broker): the embedded default.

    FOLDER holds image folders or DICOM files (or is a DICOMDIR)."""
    from bonexray.jobs import prepare_job, run_embedded
    from bonexray.modelstore import resolve_model
    from bonexray.pipeline.chunks import get_classifier
    from bonexray.pipeline.inference import check_provider_settings

    apply_overrides(database_url=database_url, chunk_size=chunk_size, batch_size=batch_size)
    settings = get_settings()
    check_provider_settings(settings)  # before a job is registered
    db = base.engine(model_ref=model_ref)
    model = resolve_model(engine=db, ref=model_ref)
    # Load it now (the pipeline reuses this session): a registered model whose file is gone
    # or will not load is one line, exit 2, and no job is left behind unfinished.
    get_classifier(model, settings)
    job = prepare_job(engine=db, root=folder, model=model, mode="embedded",
                      options={"chunk_size": settings.chunk_size,
                               "batch_size": settings.batch_size})
    if job.left_out:
        click.echo(f"note: {job.left_out}", err=True)
    start = time.perf_counter()
    _with_progress(len(job.study_ids), f"job {job.job_id}",
                   lambda advance: run_embedded(engine=db, job=job, settings=settings,
                                                progress=advance))
    elapsed = time.perf_counter() - start
    _print_job_summary(job.job_id, elapsed, fmt)


@cli.command(short_help="Send a folder of studies to the workers.")
@click.argument("folder", type=click.Path(exists=True))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@broker_option
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per task [env: BONEXRAY_CHUNK_SIZE; default: 16].")
@click.option("--force", is_flag=True,
              help="Also send studies an earlier job already scored with this model.")
@output_format
@user_errors
def enqueue(folder: str, model_ref: str, database_url: str | None, broker_url: str | None,
            fmt: str, chunk_size: int | None, force: bool) -> None:
    """Register a job for every study under FOLDER and send its chunks to the workers.

    FOLDER holds image folders or DICOM files (or is a DICOMDIR)."""
    from bonexray.jobs import NothingToSend, check_broker, prepare_job, send_job
    from bonexray.modelstore import resolve_model

    apply_overrides(database_url=database_url, broker_url=broker_url, chunk_size=chunk_size)
    settings = get_settings()
    check_broker(settings)
    db = base.engine(model_ref=model_ref)
    model = resolve_model(engine=db, ref=model_ref)
    try:
        job = prepare_job(engine=db, root=folder, model=model, mode="celery",
                          options={"chunk_size": settings.chunk_size, "force": force},
                          skip_done=not force)
    except NothingToSend as nothing:  # not an error: the folder is done; no empty job
        message = str(nothing)
        emit({"job": None, "studies": 0, "views": 0, "empty": 0, "chunks": 0,
              "skipped": nothing.skipped}, fmt, lambda: click.echo(message))
        return
    if job.left_out:
        click.echo(f"note: {job.left_out}", err=True)
    sent = _with_progress(len(job.study_ids), f"enqueue job {job.job_id}",
                          lambda advance: send_job(engine=db, job=job, settings=settings,
                                                   progress=advance))
    skipped = (f"; {job.skipped} already scored with this model skipped (--force sends "
               "them)" if job.skipped else "")
    emit({"job": job.job_id, "studies": job.studies, "views": job.views, "empty": job.empty,
          "chunks": sent, "skipped": job.skipped}, fmt, lambda: click.echo(
        f"job {job.job_id}: {job.studies} studies ({job.views} views, {job.empty} "
        f"empty) sent as {sent} chunks{skipped}; follow with `bonexray status "
        f"{job.job_id} --wait`"))


@cli.command(short_help="Send a job's unfinished studies again.")
@click.argument("job", type=int)
@db_option
@broker_option
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per task [env: BONEXRAY_CHUNK_SIZE; default: 16].")
@output_format
@user_errors
def requeue(job: int, database_url: str | None, broker_url: str | None, fmt: str,
            chunk_size: int | None) -> None:
    """Send again what JOB has unfinished, unleased and not waiting (safe to repeat).

    Workers' reapers do this by themselves within a lease or so; this is the manual tool."""
    from bonexray.jobs import check_broker, requeue_job

    apply_overrides(database_url=database_url, broker_url=broker_url, chunk_size=chunk_size)
    settings = get_settings()
    check_broker(settings)
    db = base.engine()
    done = requeue_job(engine=db, job_id=base.job_id(db, job), settings=settings)
    emit({"job": done.job_id, "studies": done.studies, "chunks": done.chunks,
          "leased": done.leased, "waiting": done.waiting}, fmt, lambda: click.echo(
        f"job {done.job_id}: {done.studies} unfinished studies sent again as "
        f"{done.chunks} chunks; not sent: {done.leased} held by a live worker, "
        f"{done.waiting} still waiting in the queue"))


def _print_job_summary(job: int, elapsed: float, fmt: str) -> None:
    from bonexray.db.query import job_progress
    from bonexray.db.session import session_scope

    with session_scope(base.engine()) as session:
        p = job_progress(session=session, job_id=job)
    summary = {key: p[key] for key in ("job", "studies", "views", "done", "partial", "failed",
                                       "empty", "views_scored", "views_failed")}
    summary["elapsed_s"] = round(elapsed, 3)
    emit(summary, fmt, lambda: click.echo(
        f"job {job}: {p['done']} done, {p['failed']} failed, {p['empty']} empty of "
        f"{p['studies']} studies; {p['views_scored']} views scored, {p['views_failed']} "
        f"failed; {elapsed:.1f} s. See `bonexray results {job}`."))


@cli.command(short_help="Start a Celery worker that classifies studies.")
@db_option
@broker_option
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (one per GPU is usual).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork",
              show_default=True,
              help="Celery's pool: prefork (processes; one per GPU), solo (this process), "
                   "threads.")
@click.option("--queue", "-Q", default=None,
              help="Queue to consume [env: BONEXRAY_QUEUE; default: bonexray].")
@click.option("--hostname", "-n", default=None, help="Worker node name (Celery's -n).")
@click.option("--log-level", "--loglevel", "-l", "loglevel", default=None,
              help="Celery's log level [env: BONEXRAY_LOG_LEVEL; default: info]; "
                   "--loglevel is Celery's spelling.")
@click.option("--gpus", default=None,
              help="One pool process per GPU, each pinned to its device: all, or 0,1,3 "
                   "(default BONEXRAY_GPUS; sets the pool to prefork and the concurrency).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def worker(database_url: str | None, broker_url: str | None, concurrency: int, pool: str,
           queue: str | None, hostname: str | None, loglevel: str | None, gpus: str | None,
           celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker that classifies chunks (extra args go to `celery worker`)."""
    from bonexray.pipeline.inference import parse_gpus

    apply_overrides(gpus=gpus)
    gpu_ids = parse_gpus(get_settings().gpus)
    if gpu_ids:
        pool, concurrency = "prefork", len(gpu_ids)
        apply_overrides(gpus=",".join(map(str, gpu_ids)))
    processes = 1 if pool in ("solo", "threads") else concurrency
    apply_overrides(database_url=database_url, broker_url=broker_url, queue=queue,
                     worker_processes=processes)
    settings = get_settings()
    from bonexray.db.session import open_database
    from bonexray.pipeline.inference import check_required_gpu

    check_required_gpu(settings)  # a GPU node without a working GPU takes no chunks
    open_database(settings.database_url)  # fail fast, and migrate once before forking
    import tempfile

    from bonexray.worker.app import create_app
    from bonexray.worker.tasks import MAIN_PID_ENV, SICK_FILE_ENV

    app = create_app(settings)
    argv = ["worker", f"--loglevel={loglevel or settings.log_level}", f"--pool={pool}",
            f"--concurrency={concurrency}", f"--queues={settings.queue}"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    # A pool process that cannot classify (model missing here, provider broken) writes why
    # into this file and asks this process to stop: the exit status says so.
    fd, sick_file = tempfile.mkstemp(prefix="bonexray-worker-", suffix=".sick")
    os.close(fd)
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    os.environ[SICK_FILE_ENV] = sick_file
    try:
        try:
            app.worker_main(argv=[*argv, *celery_args])
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        with open(sick_file, encoding="utf-8") as fh:
            reason = fh.read().strip()
    finally:
        os.unlink(sick_file)
    if reason:
        click.echo(f"bonexray worker stopped: it cannot classify here: {reason}", err=True)
        sys.exit(EXIT_SICK)
    sys.exit(code)


@cli.command(short_help="Receive studies from a PACS (DICOM C-STORE) and classify them.")
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@broker_option
@click.option("--ae-title", default=None,
              help="This node's AE title [env: BONEXRAY_LISTEN_AE_TITLE; default: BONEXRAY].")
@click.option("--host", default=None,
              help="Address to listen on [env: BONEXRAY_LISTEN_HOST; default: 0.0.0.0].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="DICOM port [env: BONEXRAY_LISTEN_PORT; default: 11112].")
@click.option("--allow", default=None, metavar="AET,AET",
              help="Calling AE titles accepted; others are refused [env: "
                   "BONEXRAY_LISTEN_ALLOW; default: any].")
@click.option("--spool", "spool_dir", default=None, type=click.Path(file_okay=False),
              help="Where instances are kept, a folder per study [env: BONEXRAY_SPOOL_DIR; "
                   "default: spool].")
@click.option("--stable-seconds", type=click.IntRange(min=1), default=None,
              help="A study is complete when nothing came for this long [env: "
                   "BONEXRAY_STABLE_SECONDS; default: 10].")
@click.option("--embedded", is_flag=True,
              help="Classify each study in this process (no broker), as `run` does; by "
                   "default its job goes to the workers, as `enqueue` does.")
@click.option("--send-to", default=None, metavar="AET@HOST:PORT|URL",
              help="Send each finished study's SR there (C-STORE, or STOW-RS to a DICOMweb "
                   "root), retrying failures every tick [env: BONEXRAY_SEND_TO].")
@user_errors
def listen(model_ref: str, database_url: str | None, broker_url: str | None,
           ae_title: str | None, host: str | None, port: int | None, allow: str | None,
           spool_dir: str | None, stable_seconds: int | None, embedded: bool,
           send_to: str | None) -> None:
    """A DICOM C-STORE SCP for a PACS to route studies to: CR and DX For Presentation
    instances are spooled (acknowledged once on disk), and each study is classified once
    nothing new came for --stable-seconds; a later instance re-opens it. Answers C-ECHO.
    Stop with Ctrl-C or SIGTERM; a restart resumes what was spooled."""
    import signal
    import threading

    from bonexray.listener import serve

    apply_overrides(database_url=database_url, broker_url=broker_url,
                    listen_ae_title=ae_title, listen_host=host, listen_port=port,
                    listen_allow=allow, spool_dir=spool_dir, stable_seconds=stable_seconds,
                    send_to=send_to)
    settings = get_settings()
    from bonexray.delivery import parse_destination

    destination = parse_destination(settings.send_to) if settings.send_to else None
    db, model, spool = _spool_setup(model_ref, settings, embedded=embedded)
    submit = _spool_submitter(db, model, settings, embedded=embedded, source="listen")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    allowed = tuple(a.strip() for a in settings.listen_allow.split(",") if a.strip())
    def deliver(job_id: int) -> bool | None:
        """Send a finished job's SRs: True once nothing is left that a retry could send,
        False to try again later, None when the destination is away."""
        from bonexray.db.query import job_progress
        from bonexray.db.session import session_scope
        from bonexray.delivery import DeliveryError, deliver_job

        assert destination is not None
        with session_scope(db) as session:
            if not job_progress(session=session, job_id=job_id)["finished"]:
                return False
        try:
            done = deliver_job(engine=db, job_id=job_id, destination=destination,
                               calling_aet=settings.listen_ae_title)
        except DeliveryError as exc:
            click.echo(f"note: job {job_id}: results not sent yet: {exc}", err=True)
            return None
        if done.sent:
            click.echo(f"job {job_id}: {done.sent} SR sent to {destination.text}", err=True)
        return set(done.failed) <= done.permanent

    stats = serve(spool=spool, submit=submit, ae_title=settings.listen_ae_title,
                  host=settings.listen_host, port=settings.listen_port, allow=allowed,
                  stable_seconds=settings.stable_seconds, stop=stop,
                  deliver=deliver if destination is not None else None,
                  on_ready=lambda: click.echo(
                      f"listening as {settings.listen_ae_title} on {settings.listen_host}:"
                      f"{settings.listen_port}; spool {spool.root}", err=True))
    click.echo(f"stopped: {stats.received} instances received, {stats.jobs} jobs", err=True)


def _spool_setup(model_ref: str, settings: Any, *, embedded: bool) -> tuple[Any, Any, Any]:
    """The database, the model and the spool of `listen` and `pull`: the broker checked
    (workers' mode) or the model loaded (embedded) before anything is received."""
    from bonexray.jobs import check_broker
    from bonexray.listener import Spool
    from bonexray.modelstore import resolve_model
    from bonexray.pipeline.chunks import get_classifier

    if not embedded:
        check_broker(settings)
    db = base.engine(model_ref=model_ref)
    model = resolve_model(engine=db, ref=model_ref)
    if embedded:
        get_classifier(model, settings)
    return db, model, Spool(settings.spool_dir)


def _spool_submitter(db: Any, model: Any, settings: Any, *, embedded: bool,
                     source: str) -> Callable[[Any], int | None]:
    """A spooled study's folder -> a job, through `run`'s or `enqueue`'s code path."""
    from bonexray.jobs import NothingToSend, prepare_job, run_embedded, send_job
    from bonexray.studies import StudyError

    mode = "embedded" if embedded else "celery"

    def submit(pending: Any) -> int | None:
        try:
            job = prepare_job(engine=db, root=str(pending.folder), model=model, mode=mode,
                              options={"source": source, "instances": pending.instances},
                              skip_done=not pending.reopened)
        except NothingToSend:
            return None
        except StudyError:  # nothing classifiable in it: recorded, not retried
            click.echo("note: a spooled study holds nothing to classify (left in the spool)",
                       err=True)
            return None
        if embedded:
            run_embedded(engine=db, job=job, settings=settings)
        else:
            send_job(engine=db, job=job, settings=settings)
        click.echo(f"job {job.job_id}: {job.studies} studies ({job.views} views) from the "
                   f"spool{' (re-opened)' if pending.reopened else ''}", err=True)
        return job.job_id

    return submit


@cli.command(short_help="Pull studies from a DICOMweb server and classify them.")
@click.argument("url")
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@broker_option
@click.option("--since", default=None, metavar="YYYY-MM-DD", help="Studies from this date.")
@click.option("--until", default=None, metavar="YYYY-MM-DD", help="Studies up to this date.")
@click.option("--modality", "modalities", default="CR,DX", show_default=True,
              help="Series modalities to retrieve (comma-separated).")
@click.option("--body-part", default=None,
              help="Only series whose BodyPartExamined or description names this part "
                   "(series that name none are kept; the headers decide the study's part).")
@click.option("--accession", default=None, help="Only this AccessionNumber.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many studies from the search.")
@click.option("--spool", "spool_dir", default=None, type=click.Path(file_okay=False),
              help="Where instances are kept [env: BONEXRAY_SPOOL_DIR; default: spool].")
@click.option("--embedded", is_flag=True,
              help="Classify in this process (no broker), as `run` does.")
@click.option("--force", is_flag=True,
              help="Also pull studies already scored with this model.")
@click.option("--send-to", default=None, metavar="AET@HOST:PORT|URL",
              help="With --embedded: send each study's SR there once scored (C-STORE or "
                   "STOW-RS) [env: BONEXRAY_SEND_TO]. Without it, a `listen --send-to` "
                   "on the same spool sends them once the workers are done.")
@output_format
@user_errors
def pull(url: str, model_ref: str, database_url: str | None, broker_url: str | None,
         since: str | None, until: str | None, modalities: str, body_part: str | None,
         accession: str | None, limit: int | None, spool_dir: str | None, embedded: bool,
         force: bool, send_to: str | None, fmt: str) -> None:
    """Search the DICOMweb server at URL (QIDO-RS), retrieve the matching CR/DX series
    (WADO-RS) into the spool, and classify each study as `enqueue` (or `run`, with
    --embedded) does. Instances already spooled are not retrieved again; studies already
    scored with this model are skipped."""
    from dicomweb_client.api import DICOMwebClient

    from bonexray.delivery import DeliveryError, deliver_job, parse_destination
    from bonexray.pull import date_range
    from bonexray.pull import pull as run_pull

    apply_overrides(database_url=database_url, broker_url=broker_url, spool_dir=spool_dir,
                    send_to=send_to)
    settings = get_settings()
    dates = date_range(since, until)
    destination = parse_destination(settings.send_to) if settings.send_to and embedded \
        else None
    db, model, spool = _spool_setup(model_ref, settings, embedded=embedded)
    done = run_pull(client=DICOMwebClient(url=url.rstrip("/")), engine=db, model=model,
                    spool=spool,
                    submit=_spool_submitter(db, model, settings, embedded=embedded,
                                            source="pull"),
                    dates=dates, modalities=[m.strip() for m in modalities.split(",")
                                             if m.strip()],
                    accession=accession, body_part=body_part.lower() if body_part else None,
                    limit=limit, force=force)
    sent, unsent = 0, 0
    if destination is not None:
        for job_id in done.jobs:
            try:
                report = deliver_job(engine=db, job_id=job_id, destination=destination,
                                     calling_aet=settings.listen_ae_title)
            except DeliveryError as exc:
                click.echo(f"note: job {job_id}: results not sent: {exc}", err=True)
                unsent += 1
                continue
            sent += report.sent
            unsent += len(report.failed)
            if not report.failed:
                spool.mark_delivered(done.folders[job_id])
    record = {"studies": done.studies_found, "skipped": done.skipped_done,
              "retrieved": done.instances_retrieved, "present": done.instances_present,
              "jobs": done.jobs, "failed": done.failed, "sr_sent": sent,
              "sr_failed": unsent}
    emit(record, fmt, lambda: click.echo(
        f"pull: {done.studies_found} studies found, {done.skipped_done} already scored with "
        f"this model, {done.instances_retrieved} instances retrieved "
        f"({done.instances_present} already spooled), jobs {done.jobs or 'none'}"
        + "".join(f"\n  {uid}: {reason}" for uid, reason in done.failed.items())))
    if done.failed or unsent:
        sys.exit(1)


@cli.command(short_help="Follow a job's progress.")
@click.argument("job", type=int, required=False)
@db_option
@click.option("--wait", is_flag=True,
              help="Follow the job until it is finished (or stalled).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between polls.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this long.")
@click.option("--stall-after", type=click.IntRange(min=1), default=None,
              help="Seconds without progress and without a live lease after which the job "
                   "is stalled [env: BONEXRAY_STALL_SECONDS; default: 300].")
@output_format
@user_errors
def status(job: int | None, database_url: str | None, wait: bool, fmt: str,
           interval: float, timeout: float | None, stall_after: int | None) -> None:
    """Progress of a job (the latest when JOB is omitted).

    Exit status: 0 finished (or running, without --wait) with no failed study; 1 finished
    with failed studies; 2 a user error (no such job, database unreachable); 3 --wait gave
    up after --timeout; 4 stalled: studies unfinished, no worker holds any, and nothing
    happened for --stall-after seconds."""
    from bonexray.db.query import STALLED, job_progress
    from bonexray.db.session import session_scope

    apply_overrides(database_url=database_url, stall_seconds=stall_after)
    settings = get_settings()
    db = base.engine(read_only=True)
    job_id = base.job_id(db, job)

    def read() -> dict[str, Any]:
        from bonexray.delivery import delivery_counts

        with session_scope(db) as session:
            progress = job_progress(session=session, job_id=job_id,
                                    lease_seconds=settings.lease_seconds,
                                    stall_seconds=settings.stall_seconds)
            progress["deliveries"] = delivery_counts(session, job_id)
            return progress

    p = read()
    if wait and p["state"] == "running":
        p = _follow(read, p, interval, timeout)
    rate = f"{p['images_per_s']:.1f} images/s" if p["images_per_s"] else "-"
    partial = f" ({p['partial']} partial)" if p["partial"] else ""
    emit(p, fmt, lambda: click.echo(
        f"job {job_id}: {p['state']}; {p['done']} done{partial}, {p['failed']} failed, "
        f"{p['empty']} empty, {p['queued']} queued ({p['in_flight']} in flight) of "
        f"{p['studies']} studies; views {p['views_scored']} scored, {p['views_failed']} "
        f"failed; {rate}" + _deliveries_line(p["deliveries"])))
    if p["state"] == STALLED:
        click.echo(f"job {job_id} is stalled: {p['queued']} studies unfinished, no worker "
                   f"holds any, no progress since {p['last_progress']} (are workers running "
                   "on this database and queue? see their logs)", err=True)
        sys.exit(4)
    if wait and not p["finished"]:
        click.echo(f"job {job_id} still has {p['queued']} queued studies after {timeout} s",
                   err=True)
        sys.exit(3)
    if p["finished"] and p["failed"]:
        sys.exit(EXIT_FAILURES)


def _deliveries_line(d: dict[str, Any]) -> str:
    if not d["sent"] and not d["failed"]:
        return ""
    failed = f", {d['failed']} failed (last: {d['last_error']})" if d["failed"] else ""
    return f"\nresults sent to the PACS: {d['sent']} SR{failed}"


def _follow(read: Callable[[], dict[str, Any]], p: dict[str, Any], interval: float,
            timeout: float | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), "{task.fields[info]}",
                  console=console(stderr=True)) as progress:
        task = progress.add_task(f"job {p['job']}", total=p["studies"], info="")
        while True:
            progress.update(task, completed=p["studies"] - p["queued"],
                            info=progress_line(p))
            if p["state"] != "running" or (deadline is not None
                                           and time.monotonic() > deadline):
                return p
            time.sleep(interval)
            p = read()


def progress_line(p: dict[str, Any]) -> str:
    """done / failed / queued, images/s and the time left at that rate, for the live bar."""
    rate = p["images_per_s"]
    left = p["views"] - p["views_scored"] - p["views_failed"]
    if p["finished"] or left <= 0:
        eta = "0:00:00"
    elif rate:
        minutes, seconds = divmod(int(left / rate + 0.5), 60)
        eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    else:
        eta = "-:--:--"
    speed = f"{rate:.1f} img/s" if rate else "- img/s"
    return (f"done {p['done']} · failed {p['failed']} · queued {p['queued']} "
            f"({p['in_flight']} in flight) · {speed} · ETA {eta}")
