"""The Celery app, its settings, and the per-process resources built after fork."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from bonexray.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_CLASSIFY = "bonexray.classify_chunk"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings, chosen on purpose (see README, "Celery settings")."""
    transport = {
        # A SIGKILLed solo/main worker rejects nothing: its unacked chunk returns only after
        # this many seconds. Producers and workers must agree on it.
        "visibility_timeout": settings.visibility_timeout,
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
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
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


@worker_process_init.connect
def _open_resources(**_: Any) -> None:
    # Engines and ORT sessions must be made after fork; CUDA contexts and sockets do not
    # survive it. The engine is opened (and the schema checked) now; models load on first use.
    from bonexray.db.session import open_database

    open_database(get_settings().database_url)


@worker_process_shutdown.connect
def _close_resources(**_: Any) -> None:
    from bonexray.db.session import get_engine

    try:
        get_engine(get_settings().database_url).dispose()
    except Exception:  # shutting down: nothing useful to do with the error
        log.debug("engine dispose failed at shutdown", exc_info=True)
