"""The embedded topology as a user meets it: ``dq serve`` in an empty directory, with the shipped
model; jobs through the REST API and through the browser form; SIGTERM, restart, and a job that
was queued before the stop completes after it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import in_ci

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "e2e"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A ``dq serve`` process in its own directory, with its log."""

    def __init__(self, cwd: Path, port: int):
        self.cwd, self.port = cwd, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
        # A job whose worker was killed at the stop goes back to the queue 10 s later.
        self.env |= {"PYTHONPATH": str(ROOT), "DQ_JOB_LEASE_SECONDS": "10"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.cwd / f"serve-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "serve", "--port", str(self.port),
             "--no-train-worker"],
            cwd=self.cwd, env=self.env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while "diffusion-queue is serving at" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dq serve did not come up:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def children(self) -> set[int]:
        assert self.proc is not None
        out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
        rows = [tuple(map(int, line.split())) for line in out.splitlines()[1:] if line.strip()]
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in rows if ppid in frontier} - found
            found |= frontier
        return found

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=90)

    def dq(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "core.cli", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def api(self, method: str, path: str, token: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_job(self, job_id: str, token: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.api("GET", f"/api/v1/jobs/{job_id}", token)
            if job["status"] in ("succeeded", "failed", "canceled"):
                return dict(job)
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish:\n{self.log_tail()}")

    def log_tail(self) -> str:
        lines = [
            ln for ln in self.log.read_text(errors="replace").splitlines() if '"GET ' not in ln
        ]
        return "\n".join(lines[-60:])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, free_port())
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.stop(signal.SIGKILL)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        return bytes(response.read())


def test_dq_serve_runs_jobs_from_the_api_and_the_browser_and_survives_a_restart(
    served: Served,
) -> None:
    served.start()
    assert (served.cwd / "var" / "dq.sqlite3").is_file()  # state lives under ./var
    token = served.dq("token", "create", "--role", "user", "--label", "e2e")

    # The REST API, with the shipped model.
    body = {"prompt": "a large red circle in the center", "seed": 7, "num_images": 2}
    job = served.api("POST", "/api/v1/jobs", token, body)
    done = served.wait_job(job["id"], token)
    assert done["status"] == "succeeded", done["error"]
    assert [im["seed"] for im in done["images"]] == [7, 8]
    for image in done["images"]:
        assert fetch(served.url + image["url"]).startswith(b"\x89PNG")

    # The browser form.
    browser_submits_and_sees_the_image(served)

    # A job waits behind a long one; the server stops with SIGTERM, and starts again.
    long = served.api("POST", "/api/v1/jobs", token,
                      {"prompt": "a small blue square in the top left", "steps": 100,
                       "sampler": "ddpm", "num_images": 2, "seed": 1})  # fmt: skip
    deadline = time.monotonic() + 60
    while served.api("GET", f"/api/v1/jobs/{long['id']}", token)["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    waiting = served.api("POST", "/api/v1/jobs", token,
                         {"prompt": "a small green triangle in the center", "seed": 2})  # fmt: skip
    assert served.api("GET", f"/api/v1/jobs/{waiting['id']}", token)["status"] == "queued"
    children = served.children()
    assert len(children) >= 4  # web (and its workers), a generation worker, the reaper
    assert served.stop() == 0
    time.sleep(0.5)
    alive = {p for p in children if _alive(p)}
    assert alive == set(), f"orphaned processes: {alive}"
    assert re.search(r"^serve +\| stopped$", served.log.read_text(), re.M)

    served.start()
    for job_id in (waiting["id"], long["id"]):
        done = served.wait_job(job_id, token)
        assert done["status"] == "succeeded", done["error"]
    assert served.stop(signal.SIGINT) == 0  # Ctrl-C stops it too


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie no one has reaped yet is not running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def browser_submits_and_sees_the_image(served: Served) -> None:
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(served.url + "/")
        page.fill(
            "textarea[name=prompt], input[name=prompt]", "a large yellow square in the center"
        )
        page.fill("input[name=steps]", "150")
        page.fill("input[name=seed]", "5")
        page.click("button[type=submit], input[type=submit]")
        page.wait_for_url("**/jobs/*")
        # The page updates itself, with no reload: progress while it runs, then the image.
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while not page.query_selector("#images img"):
            assert time.monotonic() < deadline, f"no image; statuses seen: {seen}"
            status = page.inner_text("#status").strip().lower()
            if status == "running" and page.is_visible("#progress"):
                step = int(page.get_attribute("#progress", "value") or 0)
                if step > 0 and "running" not in seen:
                    assert page.inner_text("#progress-text").endswith("of 150")
                    page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)
                seen.add("running" if step > 0 else "starting")
            seen.add(status)
            time.sleep(0.1)
        assert "running" in seen, seen
        assert page.inner_text("#status").strip().lower() == "succeeded"
        # It followed the job's event stream (SSE) to its end, not the polling fallback.
        assert page.get_attribute("#job", "data-live") == "done"
        assert page.inner_text("#seed").strip() == "5"
        src = page.get_attribute("#images img", "src")
        assert src and "/files/images/" in src
        assert fetch(served.url + src if src.startswith("/") else src).startswith(b"\x89PNG")
        page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

        # Edit that image: the form previews the file chosen, and the slider sets the strength.
        made = ARTIFACTS / "made.png"
        made.write_bytes(fetch(served.url + src if src.startswith("/") else src))
        page.goto(served.url + "/")
        page.fill("textarea[name=prompt]", "a large blue square in the center")
        page.fill("input[name=steps]", "10")
        assert not page.is_visible("#init-preview")
        page.set_input_files("input[name=init_image]", str(made))
        page.wait_for_selector("#init-preview", state="visible")
        page.fill("#strength", "0.6")
        assert page.inner_text("#strength-value").strip() == "0.6"
        page.click("button[type=submit]")
        page.wait_for_url("**/jobs/*")
        assert page.is_visible("img[alt='the image this job edits']")
        page.wait_for_selector("#images img", timeout=120_000)
        assert page.inner_text("#status").strip().lower() == "succeeded"
        assert "strength 0.6" in page.inner_text(".edit-inputs")
        # A random seed past 2**53 is shown to the digit under the image (not rounded by JS).
        seed = page.inner_text("#seed").strip()
        assert page.inner_text("#images figcaption").startswith(f"seed {seed} ")
        page.screenshot(path=str(ARTIFACTS / "edit-page.png"), full_page=True)
        browser.close()
