"""Object storage: images, previews, checkpoints and datasets, on S3 or in a local directory.

One interface, :class:`Storage`, with two implementations; :func:`make_storage` builds the one
that ``DQ_STORAGE_URL`` names.

- ``base``: the :class:`Storage` interface, its errors, and object keys (:func:`validate_key`
  refuses any key that could escape the store before either backend sees it);
- ``local``: :class:`LocalStorage`, files under a directory, with signed URLs;
- ``s3``: :class:`S3Storage`, a bucket prefix through boto3, with botocore's retries.
- ``checkpoints``: a model version's files copied from a store to a local directory, once
  (a worker loading a version, `dq train --base NAME` starting a fine-tune from one).

``local`` and ``s3`` import ``base`` and not each other; none of them imports from this
``__init__``, which re-exports their public names so that ``from core.storage import X`` works.
The package imports only ``core.runtime``; never Flask, Celery or torch (the web image has no
torch).
"""

from core.runtime.settings import Settings, storage_location
from core.storage.base import (
    KEY_PATTERN,
    MAX_KEY_LENGTH,
    InvalidKey,
    ObjectNotFound,
    Storage,
    StorageError,
    content_disposition,
    download_name,
    validate_key,
)
from core.storage.local import LocalStorage
from core.storage.s3 import S3Storage

__all__ = [
    "KEY_PATTERN",
    "MAX_KEY_LENGTH",
    "InvalidKey",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "content_disposition",
    "download_name",
    "make_storage",
    "validate_key",
]


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
