"""Submissions are rate limited per caller (a token, or the client's address) and for everyone
together through Flask-Limiter; with Redis storage the count is shared by every process. Caps
bound the jobs one caller may have active and the queue as a whole. A limiter store that is down
lets token holders through and refuses anonymous submissions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.fake_redis import FakeRedis
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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_processes_share_one_budget_through_fakeredis(
    fake_redis: FakeRedis, db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    """The fast twin of test_two_processes_share_one_budget_through_redis: the same limiter
    storage over redis://, on fakeredis, with the moving windows it counts in."""
    from web import create_app

    settings = make_settings(
        db_url, tmp_path, rate_limit="3/minute", rate_limit_storage_url=fake_redis.url
    )
    first = create_app(settings, publisher=RecordingPublisher()).test_client()
    second = create_app(settings, publisher=RecordingPublisher()).test_client()
    codes = [
        client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).status_code
        for client in (first, second, first, second)
    ]
    assert codes == [202, 202, 202, 429]

    # One window for the caller and one for everyone, each a list of the hits it let through:
    # the refused submission costs neither budget anything.
    def hits(pattern: str) -> list[int]:
        return [fake_redis.client.llen(key) for key in fake_redis.client.keys(pattern)]

    assert hits("LIMITS:LIMITER/dq/token:*/api.submit_job_view/3/1/minute") == [3]
    assert hits("LIMITS:LIMITER/dq/all-callers/api.submit_job_view:global/*") == [3]
    assert len(fake_redis.client.keys("LIMITS:*")) == 2


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
    from core.runtime.settings import SettingsError
    from web import create_app

    settings = make_settings(
        f"sqlite:///{tmp_path / 'unused.sqlite3'}", tmp_path, rate_limit="lots"
    )
    with pytest.raises(SettingsError, match="DQ_RATE_LIMIT='lots' is not valid"):
        create_app(settings)


def _anonymous_post(app: object, prompt: str) -> int:
    """A form post as a client without cookies makes it: a new session for every request."""
    from tests.web.conftest import csrf_token
    from tests.web.test_pages import FORM

    client = app.test_client()  # type: ignore[attr-defined]
    token = csrf_token(client)
    return int(client.post("/", data={**FORM, "prompt": prompt, "csrf_token": token}).status_code)


def test_an_anonymous_flood_from_one_address_is_limited_and_the_queue_stays_capped(
    redis_storage: str, db_url: str, tmp_path: Path, engine: Engine
) -> None:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from core.db import Job
    from web import create_app

    settings = make_settings(
        db_url,
        tmp_path,
        rate_limit="5/minute",
        rate_limit_storage_url=redis_storage,
        max_queued_jobs=4,
    )
    app = create_app(settings, publisher=RecordingPublisher())
    codes = [_anonymous_post(app, f"a red circle {i}") for i in range(200)]
    # A new session each time changes nothing: the limit counts the address.
    assert codes[:4] == [303] * 4  # accepted, shown their job page
    assert codes[4] == 503  # the fifth fits the rate but not the queue cap
    assert set(codes[5:]) == {429}
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_anonymous_flood_is_limited_on_fakeredis_and_the_queue_stays_capped(
    fake_redis: FakeRedis, db_url: str, tmp_path: Path, engine: Engine
) -> None:
    """The fast twin of
    test_an_anonymous_flood_from_one_address_is_limited_and_the_queue_stays_capped, its limiter
    storage on fakeredis."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from core.db import Job
    from web import create_app

    settings = make_settings(
        db_url,
        tmp_path,
        rate_limit="5/minute",
        rate_limit_storage_url=fake_redis.url,
        max_queued_jobs=4,
    )
    app = create_app(settings, publisher=RecordingPublisher())
    codes = [_anonymous_post(app, f"a red circle {i}") for i in range(200)]
    assert codes[:4] == [303] * 4
    assert codes[4] == 503
    assert set(codes[5:]) == {429}
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4
    # The address's window holds the five submissions the rate let through, not the flood.
    (window,) = fake_redis.client.keys("LIMITS:LIMITER/dq/addr:*/pages.index/5/1/minute")
    assert fake_redis.client.llen(window) == 5


def test_the_per_caller_cap_gives_429_and_the_queue_cap_503_with_retry_after(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str, admin_token: str
) -> None:
    from web import create_app

    settings = make_settings(db_url, tmp_path, max_active_jobs_per_owner=2, max_queued_jobs=3)
    client = create_app(settings, publisher=RecordingPublisher()).test_client()

    def post(token: str) -> object:
        return client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(token))

    assert [post(user_token).status_code for _ in range(2)] == [202, 202]  # type: ignore[attr-defined]
    over = post(user_token)
    assert over.status_code == 429  # type: ignore[attr-defined]
    body = over.get_json()  # type: ignore[attr-defined]
    assert "DQ_MAX_ACTIVE_JOBS_PER_OWNER" in body["detail"] and "2 jobs" in body["detail"]
    assert over.headers["Retry-After"] == "30"  # type: ignore[attr-defined]
    assert post(admin_token).status_code == 202  # type: ignore[attr-defined]  # 3 queued now
    full = post(admin_token)
    assert full.status_code == 503  # type: ignore[attr-defined]
    assert "DQ_MAX_QUEUED_JOBS" in full.get_json()["detail"]  # type: ignore[attr-defined]
    assert full.headers["Retry-After"] == "30"  # type: ignore[attr-defined]


def test_anonymous_submissions_fail_closed_when_the_limiter_store_is_down(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    settings = make_settings(
        db_url, tmp_path, rate_limit="1/minute", rate_limit_storage_url="redis://127.0.0.1:1/0"
    )
    app = create_app(settings, publisher=RecordingPublisher())
    assert _anonymous_post(app, "a red circle") == 503
    # A token holder is named and capped per owner: let through.
    r = app.test_client().post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
    assert r.status_code == 202


def test_a_bad_global_rate_limit_stops_start_up(tmp_path: Path) -> None:
    from core.runtime.settings import SettingsError
    from web import create_app

    settings = make_settings(
        f"sqlite:///{tmp_path / 'unused.sqlite3'}", tmp_path, global_rate_limit="lots"
    )
    with pytest.raises(SettingsError, match="DQ_GLOBAL_RATE_LIMIT='lots' is not valid"):
        create_app(settings)
