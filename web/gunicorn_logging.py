"""gunicorn's logger with JSON lines (``dq web`` uses it when DQ_LOG_FORMAT=json).

The access line becomes an object with the request's method, path, status, size, duration,
client and request id (the ``X-Request-ID`` response header that problem bodies also name).
gunicorn's own messages (worker boot, timeouts) become JSON lines too.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from gunicorn.glogging import Logger

from core.runtime.logs import JsonFormatter


class JsonLogger(Logger):  # type: ignore[misc]
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())
        for handler in self.access_log.handlers:  # access() below writes whole JSON lines
            handler.setFormatter(logging.Formatter("%(message)s"))

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        headers = dict((k.lower(), v) for k, v in (resp.headers or []))
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "INFO",
            "logger": "gunicorn.access",
            "message": atoms.get("r", ""),
            "method": atoms.get("m"),
            "path": atoms.get("U"),
            "query": atoms.get("q") or None,
            "status": resp.status_code if hasattr(resp, "status_code") else atoms.get("s"),
            "bytes": atoms.get("B"),
            "duration_ms": round(request_time.total_seconds() * 1000, 1),
            "client": atoms.get("h"),
            "user_agent": atoms.get("a"),
            "request_id": headers.get("x-request-id"),
        }
        self.access_log.info(json.dumps(line, default=str, ensure_ascii=False))
