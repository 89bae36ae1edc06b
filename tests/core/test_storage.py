"""Object storage on a local directory and on S3 (boto3 against moto's server over HTTP)."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from core.runtime.settings import Settings
from core.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    make_storage,
    validate_key,
)
from tests.conftest import tmp_env

BAD_KEYS = [
    "",
    ".",
    "..",
    "../secret",
    "a/../../etc/passwd",
    "a/./b",
    "/etc/passwd",
    "//server/share",
    "a//b",
    "a/",
    "a\\..\\b",
    "C:\\windows",
    "a\x00b",
    "line\nbreak",
    "%2e%2e/x",
    "~/x",
    " x",
    "x" * 600,
]
GOOD_KEYS = ["images/3f2a/0.png", "previews/job.png", "models/v1/model.safetensors", "a"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_server_built_keys_pass(key: str) -> None:
    assert validate_key(key) == key


def s3_bucket(endpoint: str) -> str:
    bucket = f"dq-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "objects", secret="test-secret")
    endpoint = request.getfixturevalue("moto_endpoint")
    return S3Storage(s3_bucket(endpoint), "prod/v1", endpoint_url=endpoint)


def test_put_get_exists_list_delete(store: Storage) -> None:
    assert not store.exists("images/j1/0.png")
    store.put("images/j1/0.png", b"\x89PNG one", "image/png")
    store.put("images/j1/1.png", b"\x89PNG two", "image/png")
    store.put("images/j2/0.png", b"other", "image/png")
    store.put("datasets/d/metadata.jsonl", b"{}\n")
    assert store.get("images/j1/0.png") == b"\x89PNG one"
    assert store.exists("images/j1/1.png")
    assert list(store.list("images/j1/")) == ["images/j1/0.png", "images/j1/1.png"]
    assert list(store.list("images/")) == ["images/j1/0.png", "images/j1/1.png", "images/j2/0.png"]
    assert len(list(store.list())) == 4
    store.put("images/j1/0.png", b"retry overwrites", "image/png")
    assert store.get("images/j1/0.png") == b"retry overwrites"
    store.delete("images/j1/0.png")
    store.delete("images/j1/0.png")  # deleting twice is fine
    assert not store.exists("images/j1/0.png")
    with pytest.raises(ObjectNotFound):
        store.get("images/j1/0.png")
    store.check()


@pytest.mark.parametrize("key", ["../escape.png", "/tmp/abs.png", "a/../../b.png", "..\\x"])
def test_every_operation_refuses_unsafe_keys_and_writes_nothing(
    store: Storage, key: str, tmp_path: Path
) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
        lambda: list(store.list(key)),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/abs.png").exists()
    assert list(store.list()) == []


def test_local_storage_refuses_a_symlink_out_of_the_store(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "objects", secret="s")
    (tmp_path / "objects").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "objects" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidKey, match="outside the store"):
        store.put("link/x.png", b"x")
    assert not (tmp_path / "outside" / "x.png").exists()


def test_local_urls_are_signed_and_expire(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, secret="s1", base_url="/files")
    url = store.url("images/j/0.png", expires=60)
    parts = urlsplit(url)
    assert parts.path == "/files/images/j/0.png"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert store.verify_url("images/j/0.png", q["expires"], q["sig"])
    assert not store.verify_url("images/j/1.png", q["expires"], q["sig"])  # another key
    assert not store.verify_url("images/j/0.png", str(int(q["expires"]) + 1), q["sig"])
    assert not store.verify_url("images/j/0.png", q["expires"], None)
    other_secret = LocalStorage(tmp_path, secret="s2")
    assert not other_secret.verify_url("images/j/0.png", q["expires"], q["sig"])
    expired = store.url("images/j/0.png", expires=-1)
    q = {k: v[0] for k, v in parse_qs(urlsplit(expired).query).items()}
    assert not store.verify_url("images/j/0.png", q["expires"], q["sig"])


def test_s3_presigned_url_serves_the_object_over_http(moto_endpoint: str) -> None:
    store = S3Storage(s3_bucket(moto_endpoint), "p", endpoint_url=moto_endpoint)
    store.put("images/j/0.png", b"\x89PNG bytes", "image/png")
    url = store.url("images/j/0.png", expires=300)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG bytes"
        assert response.headers["Content-Type"] == "image/png"


def test_presigned_urls_name_the_public_endpoint_that_browsers_reach(moto_endpoint: str) -> None:
    """The app reaches S3 under one host name (here 127.0.0.1, like http://minio:9000 inside
    Compose); browsers under another (localhost, like the published port). URLs are signed for
    the second, and a browser fetching one gets the image with a useful file name."""
    public = moto_endpoint.replace("127.0.0.1", "localhost")
    assert public != moto_endpoint
    bucket = s3_bucket(moto_endpoint)
    store = make_storage(
        Settings.from_env(
            {
                "DQ_STORAGE_URL": f"s3://{bucket}/p",
                "DQ_S3_ENDPOINT_URL": moto_endpoint,
                "DQ_S3_PUBLIC_ENDPOINT_URL": public,
            }
        )
    )
    store.put("images/0f1e/1/2.png", b"\x89PNG bytes", "image/png")  # written via 127.0.0.1
    url = store.url("images/0f1e/1/2.png", expires=300)
    assert urlsplit(url).netloc == urlsplit(public).netloc
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG bytes"
        assert response.headers["Content-Disposition"] == 'inline; filename="dq-0f1e-2.png"'
    # Without the setting, URLs name the endpoint the app uses.
    inside = S3Storage(bucket, "p", endpoint_url=moto_endpoint)
    assert urlsplit(inside.url("images/0f1e/1/2.png")).netloc == urlsplit(moto_endpoint).netloc


def test_make_storage_follows_the_storage_url(tmp_path: Path, moto_endpoint: str) -> None:
    secret = {"DQ_SECRET_KEY": tmp_env(tmp_path)["DQ_SECRET_KEY"]}
    local = make_storage(Settings.from_env({"DQ_STORAGE_URL": f"file://{tmp_path}/o", **secret}))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "o").resolve()
    bucket = s3_bucket(moto_endpoint)
    s3 = make_storage(
        Settings.from_env(
            {
                "DQ_STORAGE_URL": f"s3://{bucket}/prefix",
                "DQ_S3_ENDPOINT_URL": moto_endpoint,
                **secret,
            }
        )
    )
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == (bucket, "prefix")
    s3.put("k.txt", b"v")
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    assert raw.get_object(Bucket=bucket, Key="prefix/k.txt")["Body"].read() == b"v"


# --- faults ---------------------------------------------------------------------------------


class FaultProxy:
    """An HTTP proxy in front of moto that answers the first few requests with a fault.

    ``faults`` is a list consumed one per request: an (HTTP status, S3 error code) pair, or
    "reset" to drop the connection without a reply. When it is empty, requests pass through.
    """

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.faults: list[tuple[int, str] | str] = []
        self.requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append(f"{self.command} {self.path}")
                fault = proxy.faults.pop(0) if proxy.faults else None
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None:
                    status, code = fault
                    xml = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_endpoint)
    yield p
    p.close()


@pytest.fixture
def faulty_store(proxy: FaultProxy, moto_endpoint: str) -> S3Storage:
    # botocore's standard mode sleeps random(0, 1) × 2^n seconds before retry n (throttling
    # codes such as SlowDown back off longer): a few seconds for these tests.
    return S3Storage(s3_bucket(moto_endpoint), "p", endpoint_url=proxy.url, max_attempts=5)


def test_transient_503s_are_retried_until_the_put_lands(
    proxy: FaultProxy, faulty_store: S3Storage
) -> None:
    proxy.faults = [(503, "SlowDown"), (503, "ServiceUnavailable"), (500, "InternalError")]
    faulty_store.put("images/j/0.png", b"after three faults", "image/png")
    puts = [r for r in proxy.requests if r.startswith("PUT")]
    assert len(puts) == 4  # three faults, then the one that landed
    assert faulty_store.get("images/j/0.png") == b"after three faults"
    assert proxy.faults == []


def test_a_reset_connection_is_retried(proxy: FaultProxy, faulty_store: S3Storage) -> None:
    faulty_store.put("a.txt", b"v")
    proxy.requests.clear()
    proxy.faults = ["reset", "reset"]
    assert faulty_store.get("a.txt") == b"v"
    assert len(proxy.requests) == 3


def test_faults_beyond_the_retry_budget_fail_with_a_storage_error(
    proxy: FaultProxy, faulty_store: S3Storage
) -> None:
    proxy.faults = [(503, "ServiceUnavailable")] * 10
    with pytest.raises(StorageError, match="ServiceUnavailable"):
        faulty_store.put("x.txt", b"v")
    assert len(proxy.requests) == 5  # max_attempts in all, no more


def test_access_denied_fails_at_once_with_a_clear_message(
    proxy: FaultProxy, faulty_store: S3Storage
) -> None:
    proxy.faults = [(403, "AccessDenied")]
    with pytest.raises(StorageError, match="denied; check the credentials"):
        faulty_store.put("x.txt", b"v")
    assert len(proxy.requests) == 1  # not retried


def test_a_missing_bucket_fails_at_once_with_a_clear_message(proxy: FaultProxy) -> None:
    store = S3Storage("no-such-bucket-here", endpoint_url=proxy.url)
    with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist"):
        store.put("x.txt", b"v")
    with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist"):
        store.check()
    assert len(proxy.requests) == 2  # one PUT, one HEAD: neither retried


def test_an_unreachable_endpoint_is_a_storage_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    store = S3Storage("b", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(StorageError, match="unreachable"):
        store.get("x")
