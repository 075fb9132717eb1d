"""One Settings object, read once from the environment (BONEXRAY_*); defaults run embedded."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from bonexray.errors import BonexrayError

# Largest image accepted, in pixels: Pillow's own decompression-bomb limit. A bigger image
# fails its view (bonexray.imaging checks it from the header, before decoding).
MAX_IMAGE_PIXELS = 89_478_485

ENV_PREFIX = "BONEXRAY_"


class SettingsError(BonexrayError, ValueError):
    """A BONEXRAY_* variable holds a value that cannot be used."""


def resolve_database_url(url: str) -> str:
    """Make a relative SQLite file URL absolute, once, so that every process agrees on it."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    rest = url[len(prefix) :]
    if rest in ("", ":memory:") or rest.startswith("/") or rest.startswith("file:"):
        return url
    path, sep, query = rest.partition("?")
    return prefix + str(Path(path).resolve()) + sep + query


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Every field can be set as BONEXRAY_<FIELD NAME IN CAPITALS>."""

    database_url: str = "sqlite:///bonexray.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "bonexray"
    # Studies per Celery task: one call batches the views of many studies into full batches.
    chunk_size: int = 16
    # Largest batch handed to onnxruntime.
    batch_size: int = 16
    # Threads decoding images ahead of inference.
    decode_threads: int = 2
    # Views decoded ahead of inference, at most (bounds memory).
    prefetch_views: int = 64
    # onnxruntime intra-op threads; 0 = cores / worker processes.
    intra_op_threads: int = 0
    # Worker processes sharing this machine's cores (set by `bonexray worker --concurrency`).
    worker_processes: int = 1
    # "auto" = CUDA when it really loads, else CPU; or a comma list of ORT provider names.
    providers: str = "auto"
    require_gpu: bool = False
    # Options of onnxruntime's CUDA provider as "key=value,key=value", e.g.
    # "cudnn_conv_algo_search=HEURISTIC,gpu_mem_limit=8589934592" (device_id: cuda_device).
    cuda_options: str = ""
    # onnxruntime IO binding: "auto" (on with CUDA: the input goes to a reused device
    # buffer), "on" or "off".
    io_binding: str = "auto"
    # GPUs of this host for `bonexray worker --gpus`: "" (no pinning), "all", or "0,1,3";
    # one worker process per GPU, each pinned to its own device.
    gpus: str = ""
    # The CUDA device this process's sessions run on (set per process from `gpus`).
    cuda_device: int = 0
    # Where registered model files are kept by sha256 (shared storage, same on every node);
    # "" keeps the path the model was registered from.
    model_store: str = ""
    # Seconds before Redis hands an unacknowledged task to another worker. The SQL lease,
    # not this, decides who works on a study: a second delivery of a leased or finished
    # study changes nothing, and the reaper brings back a dead worker's studies sooner.
    visibility_timeout: int = 300
    # A worker's claim on a study lasts this long without a heartbeat (heartbeats every
    # third of it); then the reaper sends the study again.
    lease_seconds: int = 30
    # Seconds between two reaper passes of each worker (jittered).
    reaper_interval: int = 10
    # A view during whose decoding the worker process died this many times fails with that
    # reason; the rest of its study and its chunk-mates are scored.
    max_crashes: int = 3
    # A study claimed this many times without finishing fails (a last resort against loops).
    max_attempts: int = 8
    # `status` calls a job stalled when it has unfinished studies, no live lease and no
    # progress for this many seconds.
    stall_seconds: int = 300
    # Memory one decode may use, in bytes (estimated from the header before decoding); a
    # view that would need more fails with that reason instead of killing its process.
    decode_budget_bytes: int = 1 << 30
    # PostgreSQL: a statement waits at most this long for a lock, and runs at most this
    # long, in milliseconds (0: no limit). Both count as transient: the chunk is retried.
    db_lock_timeout_ms: int = 10_000
    db_statement_timeout_ms: int = 120_000
    # Largest image accepted, in pixels (a decompression bomb fails its view).
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Folders (separated by ":") that jobs may read; empty = no confinement. Paths outside
    # them, and symlinks leading out of them, are refused (bonexray.security).
    data_roots: str = ""
    # The secret key of the keyed hash (HMAC-SHA256) under which a DICOM PatientID is
    # stored (studies.patient); empty: the patient is not stored at all. Keep it out of the
    # database, and the same wherever jobs are enqueued, so that a patient's studies match.
    patient_key: str = dataclasses.field(default="", repr=False)
    # `bonexray listen`: the DICOM C-STORE SCP's AE title, address and port; the calling AE
    # titles it accepts (comma-separated; empty = any); where it spools instances (one
    # folder per study; workers must see it at the same path); and how long a study must
    # receive nothing new before it is classified.
    listen_ae_title: str = "BONEXRAY"
    listen_host: str = "0.0.0.0"
    listen_port: int = 11112
    listen_allow: str = ""
    spool_dir: str = "spool"
    stable_seconds: int = 10
    # Where results go back as DICOM SR: "AET@host:port" (C-STORE) or a DICOMweb root URL
    # (STOW-RS); empty: not sent. `listen --send-to` and `send-results --to` set it too.
    send_to: str = ""
    log_level: str = "INFO"
    # "text" for a terminal, "json" for JSON lines (one object per record) for a fleet.
    log_format: str = "text"

    def __post_init__(self) -> None:
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}={value!r}: must be an integer "
                                    f">= {low}")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if str(value).lower() not in allowed:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}={value!r}: choose one of "
                                    f"{', '.join(allowed)}")
        for name in ("database_url", "broker_url", "queue"):
            if not str(getattr(self, name)).strip():
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} is empty")

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# The smallest value each integer setting takes (checked when Settings are made, so a bad
# variable or option is one line naming it, before any work starts).
_AT_LEAST = {
    "chunk_size": 1, "batch_size": 1, "decode_threads": 1, "prefetch_views": 1,
    "intra_op_threads": 0, "worker_processes": 1, "cuda_device": 0, "visibility_timeout": 1,
    "lease_seconds": 1, "reaper_interval": 1, "max_crashes": 1, "max_attempts": 1,
    "stall_seconds": 1, "decode_budget_bytes": 1, "db_lock_timeout_ms": 0,
    "db_statement_timeout_ms": 0, "max_image_pixels": 1, "listen_port": 1, "stable_seconds": 1,
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_CHOICES = {"io_binding": ("auto", "on", "off"), "log_level": LOG_LEVELS,
            "log_format": ("text", "json")}


def _convert(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r}: not a boolean (use 1 or 0, "
                            "true or false, yes or no, on or off)")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(
                f"{ENV_PREFIX}{name.upper()}={raw!r}: not an integer"
            ) from None
    return raw


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping (os.environ by default)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    types = {"str": str, "int": int, "bool": bool}
    for f in dataclasses.fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = _convert(f.name, env[key], types[str(f.type)])
    settings = Settings(**values)  # type: ignore[arg-type]
    return settings.replace(database_url=resolve_database_url(settings.database_url))


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def mask_url(url: object) -> str:
    """A database or broker URL as text with its password replaced by ***, fit for logs and
    messages (a SQLAlchemy URL object or a string)."""
    from urllib.parse import urlsplit, urlunsplit

    text = url.render_as_string(hide_password=True) if hasattr(url, "render_as_string") \
        else str(url)
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return text
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
