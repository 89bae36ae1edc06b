"""Submissions are rate limited per caller through Flask-Limiter; with Redis storage the count is
shared by every process, and a limiter store that is down lets submissions through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.services import REDIS_URL, require_redis
from tests.web.conftest import RecordingPublisher, bearer, make_settings

LIMITER_DB = 13


@pytest.fixture
def redis_storage() -> Iterator[str]:
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{LIMITER_DB}"
    require_redis(url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


def test_two_processes_share_one_budget_through_redis(
    redis_storage: str, db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    settings = make_settings(
        db_url, tmp_path, rate_limit="3/minute", rate_limit_storage_url=redis_storage
    )
    # Two apps stand for two gunicorn workers: separate memory, one Redis.
    first = create_app(settings, publisher=RecordingPublisher()).test_client()
    second = create_app(settings, publisher=RecordingPublisher()).test_client()
    codes = [
        client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).status_code
        for client in (first, second, first, second)
    ]
    assert codes == [202, 202, 202, 429]


def test_a_limiter_store_that_is_down_lets_submissions_through(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    settings = make_settings(
        db_url, tmp_path, rate_limit="1/minute", rate_limit_storage_url="redis://127.0.0.1:1/0"
    )
    client = create_app(settings, publisher=RecordingPublisher()).test_client()
    for _ in range(3):
        r = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
        assert r.status_code == 202


def test_a_bad_rate_limit_setting_stops_start_up(tmp_path: Path) -> None:
    from core.settings import SettingsError
    from web import create_app

    settings = make_settings(
        f"sqlite:///{tmp_path / 'unused.sqlite3'}", tmp_path, rate_limit="lots"
    )
    with pytest.raises(SettingsError, match="DQ_RATE_LIMIT='lots' is not valid"):
        create_app(settings)
