"""Fixtures for the web app: an app on each database backend (through ``engine``), a publisher
that records what it is asked to send, tokens, and helpers to pass CSRF as a browser does."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from core.db import Image, Job, JobStatus, ModelKind, ModelVersion, session_scope, utcnow
from core.runtime.settings import Settings
from core.services.tokens import create_token
from core.storage import LocalStorage


@dataclass
class RecordingPublisher:
    """A broker stand-in: records messages; ``down`` makes every call fail like a dead broker."""

    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    down: bool = False

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        if self.down:
            raise ConnectionRefusedError("broker at 127.0.0.1:6379 refused the connection")
        self.sent.append((task, queue, kwargs))

    def queue_depth(self, queue: str) -> int | None:
        if self.down:
            return None
        return sum(1 for _, q, _ in self.sent if q == queue)

    def check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("broker at 127.0.0.1:6379 refused the connection")


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "storage_url": f"file://{tmp_path / 'objects'}",
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",  # not var/ in the checkout
        "secret_key": "9c1e5a7f3b2d8e4a6c0f1b9d7e3a5c2f",
        "rate_limit": "1000/minute",
        "data_root": str(tmp_path / "datasets"),
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def app(settings: Settings, engine: Engine, publisher: RecordingPublisher) -> Any:
    from web import create_app

    return create_app(settings, publisher=publisher)


@pytest.fixture
def client(app: Any) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def storage(app: Any) -> LocalStorage:
    found = app.extensions["dq"].storage
    assert isinstance(found, LocalStorage)
    return found


def _token(engine: Engine, role: str, label: str = "") -> str:
    with session_scope(engine) as session:
        return create_token(session, role, label)[1]


@pytest.fixture
def user_token(engine: Engine) -> str:
    return _token(engine, "user", "alice")


@pytest.fixture
def other_token(engine: Engine) -> str:
    return _token(engine, "user", "bob")


@pytest.fixture
def admin_token(engine: Engine) -> str:
    return _token(engine, "admin", "ops")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csrf_token(client: FlaskClient, path: str = "/") -> str:
    """The CSRF token a browser would find in the page's form."""
    page = client.get(path)
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def add_job(
    engine: Engine,
    owner: str,
    status: JobStatus = JobStatus.QUEUED,
    *,
    prompt: str = "a red circle",
    seconds_ago: float = 0,
    latency: float | None = None,
    **values: Any,
) -> uuid.UUID:
    """A job row as a worker would leave it, without going through the API."""
    created = utcnow() - timedelta(seconds=seconds_ago)
    columns: dict[str, Any] = {
        "negative_prompt": "",
        "steps": 20,
        "guidance": 4.0,
        "sampler": "dpmpp-2m",
        "seed": 7,
        "width": 64,
        "height": 64,
        "num_images": 1,
        "progress_total": 20,
        **values,
    }
    job = Job(
        id=uuid.uuid4(), status=status, prompt=prompt, owner=owner, created_at=created, **columns
    )
    if latency is not None:
        job.started_at = created
        job.finished_at = created + timedelta(seconds=latency)
    with session_scope(engine) as session:
        session.add(job)
    return job.id


def add_image(engine: Engine, job_id: uuid.UUID, storage: LocalStorage, index: int = 0) -> str:
    key = f"images/{job_id}/{index}.png"
    storage.put(key, PNG_BYTES, "image/png")
    with session_scope(engine) as session:
        session.add(
            Image(
                job_id=job_id,
                index=index,
                storage_key=key,
                width=64,
                height=64,
                seed=7 + index,
                sha256="0" * 64,
                bytes=len(PNG_BYTES),
            )
        )
    return key


def add_version(
    engine: Engine,
    name: str,
    *,
    kind: ModelKind = ModelKind.DENOISER,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> uuid.UUID:
    version = ModelVersion(
        id=uuid.uuid4(),
        name=name,
        kind=kind,
        checkpoint_key=f"models/{name}",
        config=config or {},
        metrics=metrics or {},
        created_at=utcnow(),
    )
    with session_scope(engine) as session:
        session.add(version)
    return version.id


def _png() -> bytes:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (4, 4), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG_BYTES = _png()


@pytest.fixture
def jobs_of(engine: Engine) -> Iterator[Any]:
    """A function that lists the jobs in the database (owner, status), for 'nothing written'."""
    from sqlalchemy import select

    def read() -> list[Job]:
        with session_scope(engine) as session:
            return list(session.scalars(select(Job)))

    yield read
