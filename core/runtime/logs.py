"""Log lines as text or as JSON (DQ_LOG_FORMAT), for every process: web, worker, reaper.

JSON lines carry ``time``, ``level``, ``logger``, ``message``, and where known ``request_id``
(web requests), ``job_id``/``run_id`` (set with ``extra=``) and ``exc`` (a traceback). A log
shipper can then match a user's problem body (which names its request id) to the log lines of
that request. Framework-free: the web app and the worker pass in how to find the request id.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
CONTEXT_FIELDS = ("request_id", "job_id", "run_id", "task_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, "", "-"):
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ContextFilter(logging.Filter):
    """Sets ``request_id`` (or another field) on each record from a callable."""

    def __init__(self, field: str, get: Callable[[], str | None]):
        super().__init__()
        self.field = field
        self.get = get

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self.field, None) is None:
            setattr(record, self.field, self.get() or "-")
        return True


def make_formatter(log_format: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(text_format)
    raise ValueError(f"unknown log format {log_format!r}: use text or json")


class _OurHandler(logging.StreamHandler):
    """Marks the handler this module installed, so configuring twice replaces it."""


def configure(
    log_format: str,
    *,
    level: int = logging.INFO,
    text_format: str = TEXT_FORMAT,
    filters: tuple[logging.Filter, ...] = (),
    only_if_unconfigured: bool = False,
) -> None:
    """Send the root logger's records to stderr in ``log_format`` ("text" or "json").

    ``only_if_unconfigured``: leave alone a root logger that something else already gave a
    handler (a test runner, an embedding application)."""
    root = logging.getLogger()
    others = [h for h in root.handlers if not isinstance(h, _OurHandler)]
    if only_if_unconfigured and others:
        return
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format, text_format))
    for f in filters:
        handler.addFilter(f)
    root.addHandler(handler)
    root.setLevel(level)


def restyle_handlers(
    logger: logging.Logger, log_format: str, filters: tuple[logging.Filter, ...] = ()
) -> None:
    """Give the handlers another library set up (Celery's, gunicorn's) our format."""
    if log_format != "json":
        return
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
        for f in filters:
            handler.addFilter(f)
