"""DQ_LOG_FORMAT=json: one JSON object per line, with the request id where there is one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from core.runtime.logs import ContextFilter, JsonFormatter, make_formatter
from tests.conftest import tmp_env

REPO = Path(__file__).resolve().parents[2]


def test_json_lines_carry_level_logger_message_context_and_traceback() -> None:
    record = logging.LogRecord(
        "web.api", logging.ERROR, __file__, 1, "job %s failed", ("j1",), None
    )
    ContextFilter("request_id", lambda: "rid-42").filter(record)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "web.api"
    assert out["message"] == "job j1 failed" and out["request_id"] == "rid-42"
    assert "RuntimeError: boom" in out["exc"] and out["time"].endswith("+00:00")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        make_formatter("yaml")


SERVE_AND_LOG = """
import logging, web
from core.db import Base, get_engine
from core.runtime.settings import Settings
Base.metadata.create_all(get_engine(Settings.from_env()))
app = web.create_app()

@app.get("/boom")
def boom():
    logging.getLogger("web.test").warning("about to answer")
    return "ok"

r = app.test_client().get("/boom", headers={"X-Request-ID": "abc-123"})
assert r.headers["X-Request-ID"] == "abc-123"
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_web_app_logs_in_the_chosen_format_with_the_request_id(
    tmp_path: Path, fmt: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dq.sqlite3'}",
        "DQ_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        "DQ_STORAGE_URL": f"file://{tmp_path / 'objects'}",
        "DQ_LOG_FORMAT": fmt,
        "DQ_SECRET_KEY": tmp_env(tmp_path)["DQ_SECRET_KEY"],
    }
    r = subprocess.run(
        [sys.executable, "-c", SERVE_AND_LOG],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stderr.splitlines() if "about to answer" in line)
    if fmt == "json":
        out = json.loads(line)
        assert out["request_id"] == "abc-123" and out["logger"] == "web.test"
    else:
        assert "rid=abc-123" in line and "WARNING web.test" in line
