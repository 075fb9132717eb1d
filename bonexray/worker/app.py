"""The Celery app, its settings, and the per-process resources built after fork."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from bonexray.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_CLASSIFY = "bonexray.classify_chunk"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings, chosen on purpose (see README, "Celery settings")."""
    transport = {
        # A SIGKILLed solo/main worker rejects nothing: its unacked chunk returns only after
        # this many seconds (the reaper sends its studies again sooner, once their leases
        # run out; a late second delivery finds them finished or leased and changes nothing).
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for such messages only every interval x throttle seconds (10 x 10 by
        # default): 100 s on top of the timeout. Sweep every interval, a fraction of it.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 6)),
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],  # never pickle
        "result_serializer": "json",
        "task_ignore_result": True,  # results live in SQL
        "result_backend": None,
        "task_default_queue": settings.queue,
        # A chunk is acknowledged after it ran, and a chunk whose pool process died is put
        # back: nothing is lost, and upserts make a second run change nothing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A chunk that raised (a bug: its studies are failed with the reason first) is
        # acknowledged, not redelivered forever. Database outages never raise: the task
        # waits them out, holding its chunk, and so takes no new one.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # On a lost broker connection running chunks finish and write their results; their
        # messages come back after the visibility timeout and find them finished.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Publishing (enqueue, requeue, retries) rides out a short broker restart.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 10, "interval_start": 0.5,
                                      "interval_step": 1.0, "interval_max": 5.0},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("bonexray")
    app.conf.update(celery_config(settings))
    app.conf.imports = ("bonexray.worker.tasks",)
    return app


app = create_app()


def pin_process_gpu(process_index: int) -> int | None:
    """Pin this pool process to its GPU (one process per GPU of BONEXRAY_GPUS)."""
    from bonexray.pipeline.inference import device_for_process, parse_gpus

    gpus = parse_gpus(get_settings().gpus)
    if not gpus:
        return None
    device = device_for_process(gpus, process_index)
    os.environ["BONEXRAY_CUDA_DEVICE"] = str(device)
    get_settings.cache_clear()
    log.info("pool process %d pinned to GPU %d", process_index, device)
    return device


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery sets up its own log handlers; give them BONEXRAY_LOG_FORMAT (json: one JSON
    object a line, with the job, chunk and worker fields of the worker's records)."""
    from bonexray.logs import use_format

    fmt = get_settings().log_format
    if fmt != "text":
        use_format(logger, fmt)


@worker_process_init.connect
def _open_resources(**_: Any) -> None:
    # Engines and ORT sessions must be made after fork; CUDA contexts and sockets do not
    # survive it. The engine is opened (and the schema checked) now; models load on first use.
    from celery.utils.log import current_process_index

    from bonexray.db.session import DatabaseError, open_database

    pin_process_gpu(current_process_index() or 0)
    try:
        open_database(get_settings().database_url)
    except DatabaseError as exc:
        # Not fatal here: each chunk opens the database again and retries while it is down.
        log.warning("database not reachable at process start: %s", exc)


@worker_process_shutdown.connect
def _close_resources(**_: Any) -> None:
    from bonexray.db.session import get_engine

    try:
        get_engine(get_settings().database_url).dispose()
    except Exception:  # shutting down: nothing useful to do with the error
        log.debug("engine dispose failed at shutdown", exc_info=True)


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    # In the main process of every worker: no leader to elect, SKIP LOCKED keeps reapers
    # of different workers off each other's rows.
    from bonexray.worker.reaper import start_reaper

    start_reaper(app=sender.app if sender is not None else app, settings=get_settings())


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    from bonexray.worker.reaper import stop_reaper

    stop_reaper()
