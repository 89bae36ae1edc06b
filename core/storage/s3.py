"""Objects in an S3 bucket under a prefix, through boto3.

Requests go through botocore's "standard" retry mode, which retries 5xx replies, throttling
(SlowDown) and broken connections with exponential backoff and jitter. Errors that retrying
cannot fix (AccessDenied, NoSuchBucket) fail at once as :class:`~core.storage.base.StorageError`
with a sentence a person can act on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from core.storage.base import (
    ObjectNotFound,
    Storage,
    StorageError,
    content_disposition,
    validate_key,
)

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
