"""Logging for commands and workers: plain text for a terminal, or JSON lines for a fleet
(BONEXRAY_LOG_FORMAT=json or --log-format json), one object per record with UTC time,
level, logger, message, process, and the structured fields a call passes in `extra`
(job, chunk, worker, provider, studies, views, seconds, ...)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from bonexray.errors import InvalidValueError

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, str, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise InvalidValueError(f"unknown log format {fmt!r}"
                                f"; choose one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, fmt: str = "text") -> None:
    """The root logger writes to stderr at `level`, as text or JSON lines. As with
    logging.basicConfig, a root logger that someone else already gave handlers is left as
    it is (a test harness's, an embedding program's); one this function set up is redone."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_bonexray", False)]
    if root.handlers and not ours:
        return
    for old in ours:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler._bonexray = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Schema checks run on every command; their chatter is not news.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # highdicom says at INFO which modules it copies into every SR it builds.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
    # pydicom's warnings about damaged files quote header values (patient data).
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, root.level))
    # dicomweb-client logs the UIDs it searches and retrieves, at INFO.
    logging.getLogger("dicomweb_client").setLevel(max(logging.WARNING, root.level))


def use_format(logger: logging.Logger, fmt: str) -> None:
    """Give every handler of `logger` the format (Celery's own loggers, once it set them up)."""
    for handler in logger.handlers:
        handler.setFormatter(formatter(fmt))
