"""Objects as files in a local directory, with signed URLs the web app serves."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import quote

from core.storage.base import InvalidKey, ObjectNotFound, Storage, StorageError, validate_key


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
        for key, _size in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Every key under ``prefix`` with its size; it reads only the directory that holds the
        prefix's last segment, not the whole store, so one job's objects are found in time that
        does not grow with the store."""
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
