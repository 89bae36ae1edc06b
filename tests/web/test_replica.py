"""DQ_DATABASE_REPLICA_URL: polls, lists and pages read from a real PostgreSQL streaming replica
(a throwaway primary made with initdb and a standby made from it with pg_basebackup -R, both on
free ports of this machine), and fall back to the primary for what the replica lacks yet or
cannot answer.

Outside CI, a machine without PostgreSQL's server binaries skips these tests; in CI they fail.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from core.db import migrate, session_scope
from core.services.tokens import create_token
from tests.services import unavailable
from tests.web.conftest import RecordingPublisher, bearer, csrf_token, make_settings
from tests.web.test_pages import FORM

JOB = {"prompt": "a red circle", "steps": 2}


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None or not Path(initdb).with_name("pg_basebackup").exists():
        unavailable("PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup)", "not found")
    return Path(initdb).parent


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """A primary and its streaming replica, each a postgres server of its own, run as the
    postgres user when the tests run as root (initdb refuses root)."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.primary_port, self.replica_port = _free_port(), _free_port()
        self.primary_dir, self.replica_dir = root / "primary", root / "replica"
        self.primary_url = self._url(self.primary_port)
        self.replica_url = self._url(self.replica_port)
        self._admin: dict[str, Engine] = {}

    @staticmethod
    def _url(port: int) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.root,
        )

    def start(self) -> None:
        self.run("initdb", "-D", str(self.primary_dir), "-U", "postgres", "-A", "trust", "-N")
        settings = {
            "port": self.primary_port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "wal_level": "replica",
            "max_wal_senders": 4,
            "shared_buffers": "'16MB'",
            "max_connections": 40,
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
        }
        with (self.primary_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        with (self.primary_dir / "pg_hba.conf").open("a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        self._pg_ctl(self.primary_dir, "start")
        self.run(
            "pg_basebackup",
            "-R",
            "-D",
            str(self.replica_dir),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary_port),
            "-U",
            "postgres",
            "--checkpoint=fast",
            "--no-sync",
        )
        # The copy carries the primary's settings; the last line of a setting wins.
        with (self.replica_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.replica_port}\n")
        self.start_replica()

    def _pg_ctl(self, data: Path, action: str) -> None:
        log = self.root / f"{data.name}.log"
        self.run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-m", "fast", action)

    def start_replica(self) -> None:
        self._pg_ctl(self.replica_dir, "start")

    def stop_replica(self) -> None:
        self.admin(self.replica_url).dispose()
        self._pg_ctl(self.replica_dir, "stop")

    def stop(self) -> None:
        for engine in self._admin.values():
            engine.dispose()
        for data in (self.replica_dir, self.primary_dir):
            if (data / "postmaster.pid").exists():
                self._pg_ctl(data, "stop")

    def admin(self, url: str) -> Engine:
        if url not in self._admin:
            self._admin[url] = create_engine(url, isolation_level="AUTOCOMMIT")
        return self._admin[url]

    def sql(self, url: str, statement: str) -> Any:
        with self.admin(url).connect() as conn:
            return conn.execute(text(statement)).scalar()

    def pause_replay(self, timeout: float = 10.0) -> None:
        """Stop the replica replaying what the primary writes, until :meth:`resume_replay`."""
        self.sql(self.replica_url, "SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.sql(self.replica_url, "SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "the replica's replay did not pause"
            time.sleep(0.02)

    def resume_replay(self) -> None:
        self.sql(self.replica_url, "SELECT pg_wal_replay_resume()")
        self.wait_replayed()

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Until the replica has replayed everything the primary has written so far."""
        target = self.sql(self.primary_url, "SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = self.sql(
                self.replica_url,
                f"SELECT pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn()) > 0",
            )
            if not behind:
                return
            time.sleep(0.02)
        raise AssertionError(f"the replica did not replay up to {target} in {timeout} s")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A primary migrated by `dq db upgrade` and a replica that has followed it: started once
    for the module, stopped and removed after it."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="dq-replica-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    found = Cluster(bindir, root)
    try:
        found.start()
        migrate.upgrade(found.primary_url)
        found.wait_replayed()
        yield found
    except subprocess.CalledProcessError as e:
        pytest.fail(f"{e.cmd[-1]}: {e.stderr.decode(errors='replace')}", pytrace=False)
    finally:
        found.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def app(cluster: Cluster, tmp_path: Path) -> Iterator[Any]:
    from core.db import dispose_engines
    from web import create_app

    settings = make_settings(
        cluster.primary_url,
        tmp_path,
        database_replica_url=cluster.replica_url,
        max_active_jobs_per_owner=1000,
    )
    yield create_app(settings, publisher=RecordingPublisher())
    dispose_engines()


@pytest.fixture
def client(app: Any) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def token(cluster: Cluster) -> str:
    with session_scope(cluster.admin(cluster.primary_url)) as session:
        return create_token(session, "user", f"replica-{uuid.uuid4().hex[:6]}")[1]


def submit(client: FlaskClient, token: str) -> str:
    answer = client.post("/api/v1/jobs", json=JOB, headers=bearer(token))
    assert answer.status_code == 202, answer.get_json()
    job_id: str = answer.get_json()["id"]
    return job_id


def listed(client: FlaskClient, token: str) -> set[str]:
    answer = client.get("/api/v1/jobs", headers=bearer(token))
    assert answer.status_code == 200
    return {job["id"] for job in answer.get_json()["jobs"]}


def test_the_replica_follows_the_migrations_of_the_primary(cluster: Cluster) -> None:
    assert migrate.current_revision(cluster.replica_url) == migrate.head_revision()
    assert cluster.sql(cluster.replica_url, "SELECT pg_is_in_recovery()") is True


def test_polls_and_lists_read_the_replica_and_the_primary_has_what_it_lacks(
    cluster: Cluster, client: FlaskClient, token: str
) -> None:
    seen = submit(client, token)
    cluster.wait_replayed()
    cluster.pause_replay()
    try:
        unseen = submit(client, token)
        canceled = client.post(f"/api/v1/jobs/{seen}/cancel", headers=bearer(token))
        assert canceled.get_json()["status"] == "canceled"

        # The list is the replica's: the job it has not replayed yet is not in it, and the
        # cancel is not either.
        assert listed(client, token) == {seen}
        stale = client.get(f"/api/v1/jobs/{seen}", headers=bearer(token))
        assert stale.get_json()["status"] == "queued"
        # A job the replica lacks is read from the primary, not answered 404.
        poll = client.get(f"/api/v1/jobs/{unseen}", headers=bearer(token))
        assert poll.status_code == 200
        assert (poll.get_json()["id"], poll.get_json()["status"]) == (unseen, "queued")
        # One that exists nowhere is still 404.
        missing = client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=bearer(token))
        assert missing.status_code == 404
    finally:
        cluster.resume_replay()
    assert listed(client, token) == {seen, unseen}
    poll = client.get(f"/api/v1/jobs/{seen}", headers=bearer(token))
    assert poll.get_json()["status"] == "canceled"


def test_pages_and_batches_fall_back_to_the_primary_for_what_the_replica_lacks(
    cluster: Cluster, client: FlaskClient, token: str
) -> None:
    cluster.pause_replay()
    try:
        batch = client.post(
            "/api/v1/batches", json={"prompts": ["a", "b"], "steps": 2}, headers=bearer(token)
        )
        assert batch.status_code == 202
        batch_id = batch.get_json()["id"]
        # The batch list is the replica's; the batch itself is read from the primary.
        batches = client.get("/api/v1/batches", headers=bearer(token)).get_json()["batches"]
        assert batch_id not in {b["id"] for b in batches}
        polled = client.get(f"/api/v1/batches/{batch_id}", headers=bearer(token))
        assert polled.status_code == 200 and len(polled.get_json()["jobs"]) == 2

        # An anonymous browser's job, just queued from the form, has its page and its JSON.
        form = {**FORM, "csrf_token": csrf_token(client), "prompt": "a blue square"}
        posted = client.post("/", data=form)
        assert posted.status_code == 303, posted.get_data(as_text=True)[:500]
        job_path = posted.headers["Location"]
        assert client.get(job_path).status_code == 200
        assert client.get(f"{job_path}.json").get_json()["status"] == "queued"
        assert "a blue square" not in client.get("/jobs").get_data(as_text=True)
        assert client.get(f"/batches/{uuid.uuid4()}").status_code == 404
    finally:
        cluster.resume_replay()
    # Replayed is not yet visible to a new snapshot on a hot standby the instant the LSNs
    # match: the list shows the job within moments.
    deadline = time.monotonic() + 10
    while "a blue square" not in client.get("/jobs").get_data(as_text=True):
        assert time.monotonic() < deadline, "the replica never showed the job"
        time.sleep(0.05)


def test_a_job_just_submitted_never_reads_as_missing(client: FlaskClient, token: str) -> None:
    for _ in range(40):
        job_id = submit(client, token)
        poll = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token))
        assert poll.status_code == 200, poll.get_json()
        assert poll.get_json()["id"] == job_id


def test_with_the_replica_down_reads_go_to_the_primary_and_it_is_logged_once(
    cluster: Cluster,
    app: Any,
    client: FlaskClient,
    token: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = submit(client, token)
    cluster.wait_replayed()
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token)).status_code == 200
    cluster.stop_replica()
    try:
        with caplog.at_level(logging.WARNING, logger="web.db"):
            for _ in range(5):
                poll = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token))
                assert poll.status_code == 200
                assert poll.get_json()["id"] == job_id
                assert listed(client, token) == {job_id}
                assert client.get(f"/jobs/{job_id}.json").status_code == 404  # not its owner
        warnings = [r for r in caplog.records if "replica failed" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        cluster.start_replica()
    # Once the wait is over, reads try the replica again and find it back.
    replica = app.extensions["dq"].replica
    monkeypatch.setattr(replica, "skip_until", 0.0)
    cluster.wait_replayed()
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token)).status_code == 200
    assert replica.skip_until == 0.0
