"""What every store is: the :class:`Storage` interface, its errors, and object keys.

Keys are built by the server (``images/<job-uuid>/<n>.png``); :func:`validate_key` refuses anything
that could escape the store (``..``, absolute paths, backslashes, control characters) before either
backend sees it. :func:`download_name` and :func:`content_disposition` are the name a browser saves
an object under, which both backends serve.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

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
