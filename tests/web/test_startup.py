"""The app starts without torch or the worker package, from the environment, under gunicorn
(``dq web``) and under ``flask --app web``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def env_for(tmp_path: Path, db_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env.update(
        DQ_DATABASE_URL=db_url or f"sqlite:///{tmp_path / 'dq.sqlite3'}",
        DQ_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        DQ_STORAGE_URL=f"file://{tmp_path / 'objects'}",
        # Long and random: outside SQLite, the app refuses short or placeholder keys.
        DQ_SECRET_KEY="f3b9c2d47a1e8f6b0c5d9e2a7b4f1c8d",
    )
    return env


SERVE_ONE_REQUEST = """
import sys
import web
from core.db import Base, get_engine
from core.runtime.settings import Settings

Base.metadata.create_all(get_engine(Settings.from_env()))
app = web.create_app()  # no arguments: the settings come from DQ_* variables
client = app.test_client()
assert client.get("/").status_code == 200, "form"
assert client.get("/api/v1/openapi.json").status_code == 200, "openapi"
assert client.post("/api/v1/jobs", json={"prompt": "x"}).status_code == 401, "api"
for path in ("/jobs", "/metrics", "/readyz", "/admin/login", "/api/v1/docs"):
    assert client.get(path).status_code < 500, path
heavy = ("torch", "numpy", "PIL", "safetensors", "worker")
print(" ".join(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("core.diff")))
print("torch" in sys.modules)
"""


def test_importing_web_and_serving_requests_leaves_torch_and_the_model_code_unimported(
    tmp_path: Path,
) -> None:
    r = subprocess.run(
        [sys.executable, "-c", SERVE_ONE_REQUEST],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_for(tmp_path),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    imported, torch_loaded = r.stdout.splitlines()
    assert torch_loaded == "False"
    # Nor numpy, safetensors, the model code or the worker (the web image has none), nor Pillow,
    # which checks images sent to edit and loads with the first.
    assert imported == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[str], seconds: float = 60) -> bytes:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _out, err = process.communicate()
            pytest.fail(f"the server exited with {process.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bytes(response.read())
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_dq_web_refuses_an_old_schema_and_serves_once_migrated(db_url: str, tmp_path: Path) -> None:
    env = env_for(tmp_path, db_url)
    dq = [sys.executable, "-m", "core.cli"]
    # Web replicas never migrate: that is `dq db upgrade`'s job (the migrate Job in k8s).
    refused = subprocess.run(
        [*dq, "web", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "run `dq db upgrade` first" in refused.stderr
    upgrade = subprocess.run(
        [*dq, "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert upgrade.returncode == 0, upgrade.stderr

    port = free_port()
    process = subprocess.Popen(
        [*dq, "web", "--port", str(port), "--workers", "2"],
        cwd=tmp_path,  # not the checkout: `web` must import all the same
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz", process) == b'{"status":"ok"}\n'
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert b"Generate an image" in r.read()
    finally:
        stop(process)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "is not set"),
        ("short-but-random-9f8e", "is 21 characters"),
        ("CHANGE-ME-python-c-import-secrets-print-secrets-token-hex-32", "placeholder"),
    ],
)
def test_dq_web_outside_sqlite_refuses_a_weak_secret_key(
    tmp_path: Path, key: str, reason: str
) -> None:
    env = env_for(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none")
    env["DQ_SECRET_KEY"] = key
    r = subprocess.run(
        [sys.executable, "-m", "core.cli", "web", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("dq: error: DQ_SECRET_KEY ") and reason in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_flask_finds_the_app_factory(tmp_path: Path) -> None:
    flask = Path(sys.executable).parent / "flask"
    r = subprocess.run(
        [str(flask), "--app", "web", "routes"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_for(tmp_path),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for endpoint in ("api.submit_job_view", "pages.index", "admin.runs", "ops.readyz"):
        assert endpoint in r.stdout


def test_dq_web_with_json_logs_writes_one_object_per_request_with_its_id(
    tmp_path: Path,
) -> None:
    import json

    env = {**env_for(tmp_path), "DQ_LOG_FORMAT": "json"}
    dq = [sys.executable, "-m", "core.cli"]
    subprocess.run([*dq, "db", "upgrade"], cwd=tmp_path, env=env, check=True, timeout=120)
    port = free_port()
    process = subprocess.Popen(
        [*dq, "web", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", process)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/jobs/00000000-0000-4000-8000-000000000000",
            headers={"X-Request-ID": "trace-77"},
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code == 401
        assert json.loads(answer.value.read())["request_id"] == "trace-77"
    finally:
        stop(process)
    out, err = process.communicate()
    lines = [json.loads(line) for line in (out + err).splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "gunicorn.access"]
    mine = [line for line in access if line.get("request_id") == "trace-77"]
    assert len(mine) == 1, access
    assert (
        mine[0]["status"] == 401
        and mine[0]["path"] == "/api/v1/jobs/00000000-0000-4000-8000-000000000000"
    )
    assert mine[0]["method"] == "GET" and mine[0]["duration_ms"] >= 0
    # gunicorn's own lines (booting a worker) are JSON too.
    assert any(line.get("logger") == "gunicorn.error" for line in lines), lines
