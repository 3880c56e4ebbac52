"""Job-log formats for the library's log records: ``plain`` (the message on one line that nothing wraps) or
``json`` (one JSON object per record: a run event's own object, see :mod:`easyroutine_dist.distributed.events`, or
``{"event": "log", ...}`` for other records). No dependencies: the CLI imports it before anything heavy.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Optional, TextIO

LOG_FORMATS = ("plain", "json")


class PlainFormatter(logging.Formatter):
    """The message alone (``WARNING: ...`` / ``ERROR: ...`` for those levels, unlike the CLI's own final ``error:``
    line), on one line that nothing wraps."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: an event's own object, or ``{"event": "log", "level", "logger", "message"}``."""

    def format(self, record: logging.LogRecord) -> str:
        body = getattr(record, "event", None)
        if not isinstance(body, dict):
            when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            body = {"event": "log", "time": when.isoformat(timespec="milliseconds"),
                    "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                body["traceback"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, separators=(",", ":"))


def log_handler(fmt: str = "plain", stream: Optional[TextIO] = None, stdout: bool = False) -> logging.Handler:
    """A handler writing ``easyroutine_dist`` log records as ``fmt`` (``"plain"`` or ``"json"``) to ``stream``
    (default: the current ``sys.stderr``, or ``sys.stdout`` with ``stdout=True``, looked up at each record)."""
    if fmt not in LOG_FORMATS:
        from .errors import ConfigError

        raise ConfigError(f"log format {fmt!r} is unknown; use one of {', '.join(LOG_FORMATS)}.")

    class _Handler(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            self.stream = stream if stream is not None else sys.stdout if stdout else sys.stderr
            super().emit(record)

    handler = _Handler(stream if stream is not None else sys.stdout if stdout else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    if fmt == "json":
        handler.addFilter(lambda record: not getattr(record, "plain_only", False))
    return handler


__all__ = ["LOG_FORMATS", "JsonFormatter", "PlainFormatter", "log_handler"]
