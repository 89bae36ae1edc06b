"""Object storage: images, previews, checkpoints and datasets, on S3 or in a local directory.

One interface, :class:`Storage`, with two implementations. Keys are built by the server
(``images/<job-uuid>/<n>.png``); :func:`validate_key` refuses anything that could escape the
store (``..``, absolute paths, backslashes, control characters) before either backend sees it.

S3 requests go through botocore's "standard" retry mode, which retries 5xx replies, throttling
(SlowDown) and broken connections with exponential backoff and jitter. Errors that retrying
cannot fix (AccessDenied, NoSuchBucket) fail at once as :class:`StorageError` with a sentence a
person can act on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from core.runtime.settings import Settings, storage_location

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9._\-]+)*$")
MAX_KEY_LENGTH = 512


class StorageError(RuntimeError):
    """Storage failed in a way that retrying will not fix, or retries ran out."""


class ObjectNotFound(StorageError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class InvalidKey(ValueError):
    """A key that could name something outside the store."""


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InvalidKey`.

    Keys are ``/``-separated segments of letters, digits, ``.``, ``_`` and ``-``; no segment may
    be ``.`` or ``..``. With ``prefix=True`` the empty key and a trailing ``/`` are allowed, for
    listing.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a string, not {type(key).__name__}")
    body = key.rstrip("/") if prefix else key
    if prefix and body == "":
        return key
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"object key is longer than {MAX_KEY_LENGTH} characters")
    if not KEY_PATTERN.fullmatch(body) or any(seg in (".", "..") for seg in body.split("/")):
        raise InvalidKey(f"unsafe object key {key!r}: use relative a/b/c.ext names only")
    return key


def download_name(key: str) -> str:
    """The file name a browser saves an object as: ``dq-<job>-<n>.png`` for a job's image
    (``images/<job>/<attempt>/<n>.png``), else the key's last part."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "images":
        return f"dq-{parts[1]}-{parts[3]}"
    return parts[-1]


def content_disposition(key: str) -> str:
    """``inline`` (shown in the page, saved under a useful name), for any key: keys are
    restricted to safe characters (:func:`validate_key`), so the name needs no escaping."""
    return f'inline; filename="{download_name(validate_key(key))}"'


class Storage(ABC):
    """put/get/exists/delete/url/list over one bucket prefix or directory."""

    @abstractmethod
    def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing an absent key is not an error."""

    @abstractmethod
    def url(self, key: str, expires: int = 3600) -> str:
        """A URL that serves the object for ``expires`` seconds."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix``, in lexicographic order."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError when the store cannot be reached or written."""

    @abstractmethod
    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Every key under ``prefix`` with its size in bytes, in lexicographic order."""

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every object in ``keys``; absent ones are not an error."""

    def describe(self) -> str:
        return type(self).__name__


# --- local directory ------------------------------------------------------------------------


class LocalStorage(Storage):
    """Objects as files under ``root``. Writes are atomic (temp file, then rename), so a retried
    job overwrites its images and a reader never sees half a file.

    ``url()`` returns ``<base_url>/<key>?expires=…&sig=…``, signed with the secret key; the web
    app serves it after :meth:`verify_url` — the local analogue of an S3 presigned URL.
    """

    def __init__(self, root: str | os.PathLike[str], secret: str, base_url: str = "/files"):
        self.root = Path(root).resolve()
        self._secret = secret.encode()
        self.base_url = base_url.rstrip("/")

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        validate_key(key, prefix=prefix)
        path = (self.root / key).resolve()
        # Belt and braces: validate_key already excludes every way out; a symlink inside the
        # store could still point elsewhere.
        if path != self.root and self.root not in path.parents:
            raise InvalidKey(f"object key {key!r} resolves outside the store")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        """The file behind ``key`` (for serving it without reading it into memory)."""
        return self._path(key)

    def _signature(self, key: str, expires_at: int) -> str:
        mac = hmac.new(self._secret, f"{key}\n{expires_at}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def url(self, key: str, expires: int = 3600) -> str:
        validate_key(key)
        expires_at = int(time.time()) + int(expires)
        sig = self._signature(key, expires_at)
        return f"{self.base_url}/{quote(key)}?expires={expires_at}&sig={sig}"

    def verify_url(self, key: str, expires: str | None, sig: str | None) -> bool:
        """True when ``sig`` was made by :meth:`url` for ``key`` and has not expired."""
        if not expires or not sig or not expires.isdigit():
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self._signature(key, int(expires)), sig)

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        if not self.root.is_dir():
            return
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """As :meth:`list`, with sizes; it reads only the directory that holds the prefix's last
        segment, not the whole store, so one job's objects are found in time that does not grow
        with the store."""
        validate_key(prefix, prefix=True)
        head, _, tail = prefix.rpartition("/")
        base = self._path(head, prefix=True) if head else self.root
        if not base.is_dir():
            return
        paths = []
        for entry in os.scandir(base):
            if not entry.name.startswith(tail) or entry.name.startswith(".tmp-"):
                continue
            if entry.is_file(follow_symlinks=False):
                paths.append(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                for dirpath, _dirs, files in os.walk(entry.path):
                    paths += [Path(dirpath, n) for n in files if not n.startswith(".tmp-")]
        for key, path in sorted((p.relative_to(self.root).as_posix(), p) for p in paths):
            try:
                yield key, path.stat().st_size
            except FileNotFoundError:  # deleted since it was listed
                continue

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove the files, then the directories they leave empty (``images/<job>/<attempt>/``
        would otherwise pile up by the million)."""
        parents: set[Path] = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.update(p for p in path.parents if self.root in p.parents)
        # Deepest first; rmdir refuses a directory that is not empty, which is the test we want.
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:  # not empty: another job's objects, or a put in progress
                continue

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".tmp-check-"):
                pass
        except OSError as e:
            raise StorageError(f"local storage {self.root} is not writable: {e}") from None

    def describe(self) -> str:
        return f"file://{self.root}"


# --- S3 -------------------------------------------------------------------------------------

# Error codes that retrying cannot fix, and the sentence a person reads for each.
_FATAL_S3_CODES = {
    "AccessDenied": "access to S3 bucket {bucket!r} was denied; check the credentials and policy",
    "InvalidAccessKeyId": "the S3 access key id is not known to the server",
    "SignatureDoesNotMatch": "the S3 secret key does not match the access key id",
    "NoSuchBucket": "S3 bucket {bucket!r} does not exist; create it or fix DQ_STORAGE_URL",
    "AllAccessDisabled": "all access to S3 bucket {bucket!r} is disabled",
}


class S3Storage(Storage):
    """Objects in an S3 bucket under a prefix, through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 6,
        client: Any = None,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url
        if client is None:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=5,
                read_timeout=60,
                # Path-style addressing works with MinIO and moto without DNS for buckets.
                s3={"addressing_style": "path"},
                signature_version="s3v4",
            )
            client = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
            )
        self.client = client
        # Presigning is local arithmetic, but the signature covers the host: URLs that browsers
        # follow must be signed for the host they reach (DQ_S3_PUBLIC_ENDPOINT_URL), which may
        # differ from the one this process uses (http://minio:9000 inside Compose).
        self.public_endpoint_url = public_endpoint_url
        self.presign_client = client
        if public_endpoint_url and public_endpoint_url != endpoint_url:
            self.presign_client = boto3.client(
                "s3",
                endpoint_url=public_endpoint_url,
                region_name=client.meta.region_name,
                config=client.meta.config,
            )

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, key: str | None = None) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            missing_key = code in ("NoSuchKey", "404", "NotFound")
            if missing_key or (status == 404 and code != "NoSuchBucket"):
                return ObjectNotFound(f"no object {key!r} in s3://{self.bucket}/{self.prefix}")
            if code == "403":  # a HEAD reply has no body, hence no error code
                code = "AccessDenied"
            if code in _FATAL_S3_CODES:
                return StorageError(_FATAL_S3_CODES[code].format(bucket=self.bucket))
            return StorageError(f"S3 request failed ({code or status}): {e}")
        return StorageError(f"S3 is unreachable at {self.endpoint_url or 'AWS'}: {e}")

    def _call(self, method: str, key: str | None = None, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key) from e

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(
            "put_object",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        response = self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))
        try:
            return bytes(response["Body"].read())
        except BotoCoreError as e:
            raise self._error(e, key) from e

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    def url(self, key: str, expires: int = 3600) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "ResponseContentDisposition": content_disposition(key),
        }
        try:
            return str(
                self.presign_client.generate_presigned_url(
                    ClientMethod="get_object", Params=params, ExpiresIn=int(expires)
                )
            )
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key) from e

    def list(self, prefix: str = "") -> Iterator[str]:
        for key, _size in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_key(prefix, prefix=True)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    yield item["Key"][strip:], int(item.get("Size", 0))
        except (ClientError, BotoCoreError) as e:
            raise self._error(e) from e

    def delete_many(self, keys: Iterable[str]) -> None:
        """DeleteObjects, at most 1,000 keys a request (S3's limit)."""
        full_keys = [self._key(key) for key in keys]
        for start in range(0, len(full_keys), 1000):
            self._delete_batch(full_keys[start : start + 1000])

    def _delete_batch(self, full_keys: Sequence[str]) -> None:
        response = self._call(
            "delete_objects",
            None,
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": k} for k in full_keys], "Quiet": True},
        )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"S3 could not delete {len(errors)} of {len(full_keys)} objects, e.g. "
                f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
            )

    def check(self) -> None:
        try:
            self._call("head_bucket", None, Bucket=self.bucket)
        except ObjectNotFound:  # HEAD on a missing bucket is a bare 404
            raise StorageError(_FATAL_S3_CODES["NoSuchBucket"].format(bucket=self.bucket)) from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def make_storage(settings: Settings) -> Storage:
    """The store that DQ_STORAGE_URL names."""
    kind, location = storage_location(settings.storage_url)
    if kind == "file":
        return LocalStorage(location, secret=settings.effective_secret_key)
    bucket, _, prefix = location.partition("/")
    return S3Storage(
        bucket,
        prefix,
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        region=settings.s3_region,
    )
