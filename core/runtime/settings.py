"""One typed settings object, read from ``DQ_*`` environment variables.

The defaults are the embedded topology: SQLite for the database, kombu's SQLAlchemy transport on
SQLite for the broker, a local directory for objects, all under ``./var``. Nothing needs a
server. Production sets URLs for PostgreSQL, Redis and S3.

Every field names its variable and says what it is; ``docs/DEPLOY.md`` and the deploy tests read
that table (``Settings.describe()``). A bad value raises :class:`SettingsError` with one sentence
naming the variable. This module imports neither torch nor any framework.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the variable."""


def _setting(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse})


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError("must be 0 or more")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _optional(raw: str) -> str | None:
    return raw or None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: str) -> int:
    """Seconds in ``30d``, ``12h``, ``90m``, ``3600s`` or a bare number of seconds."""
    text = raw.strip().lower()
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    try:
        value = float(number)
    except ValueError:
        raise ValueError("must be a duration such as 30d, 12h, 90m or 3600s") from None
    if not value > 0:
        raise ValueError("must be a positive duration such as 30d")
    return int(value * _DURATION_UNITS[unit])


def _optional_duration(raw: str) -> int | None:
    return parse_duration(raw) if raw else None


def _cidr_list(raw: str) -> str:
    import ipaddress

    for part in raw.split(","):
        if part.strip():
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"must be comma-separated CIDRs; {part.strip()!r} is not one"
                ) from None
    return ",".join(p.strip() for p in raw.split(",") if p.strip())


# The values of DQ_PRECISION and --precision; core.diffusion.precision resolves them for a device.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _precision(raw: str) -> str:
    value = raw.lower()
    if value not in PRECISIONS:
        raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
    return value


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError("must be text or json")
    return raw


# Values of DQ_SECRET_KEY from the example files and docs, and other well-known placeholders.
PLACEHOLDER_SECRET_MARKERS = ("change", "generate", "example", "secret", "placeholder", "xxxx")
MIN_SECRET_KEY_CHARS = 32


POSTGRESQL_SCHEMES = ("postgresql", "postgresql+psycopg")
DATABASE_SCHEMES = ("sqlite", *POSTGRESQL_SCHEMES)
BROKER_SCHEMES = ("redis", "rediss", "sqla+sqlite", "sqla+postgresql", "sqla+postgresql+psycopg")


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the web app, the workers and the ``dq`` command."""

    database_url: str = _setting(
        "sqlite:///var/dq.sqlite3",
        "SQLAlchemy URL of the job database: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.",
    )
    database_replica_url: str | None = _setting(
        None,
        "A PostgreSQL streaming replica of DQ_DATABASE_URL that the web app's polls, lists and "
        "pages read from; what it lacks yet or cannot answer is read from the primary. Empty: "
        "everything reads the primary.",
        _optional,
    )
    broker_url: str = _setting(
        "sqla+sqlite:///var/broker.sqlite3",
        "Celery broker: redis://HOST:6379/0 in production; the default needs no server.",
    )
    storage_url: str = _setting(
        "file://var/objects",
        "Where images and checkpoints go: file://DIR or s3://BUCKET/PREFIX.",
    )
    s3_endpoint_url: str | None = _setting(
        None, "Endpoint of an S3-compatible store such as MinIO; empty for AWS.", _optional
    )
    s3_region: str | None = _setting(None, "S3 region; empty for the SDK's default.", _optional)
    s3_public_endpoint_url: str | None = _setting(
        None,
        "The S3 endpoint as browsers reach it, for presigned image URLs, when it differs from "
        "DQ_S3_ENDPOINT_URL (e.g. http://localhost:9000 in Compose); empty: the same.",
        _optional,
    )
    secret_key: str = _setting(
        "",
        "Signs web sessions, CSRF tokens and local-file URLs. Set it in production; when empty, "
        "a random key is made once and kept in var/secret_key. Outside the embedded setup the "
        "web app refuses a key shorter than 32 characters or one copied from the examples.",
    )
    max_steps: int = _setting(200, "Largest number of denoising steps a job may ask for.")
    max_images_per_job: int = _setting(8, "Largest number of images one job may ask for.")
    max_prompt_chars: int = _setting(1000, "Longest prompt accepted, in characters.")
    max_upload_bytes: int = _setting(
        10 * 1024 * 1024, "Largest image (an init image or a mask) accepted to edit, in bytes."
    )
    max_batch_size: int = _setting(
        16, "Most images a worker denoises in one batch across compatible jobs."
    )
    job_max_attempts: int = _setting(
        3, "Tries a job gets (first run plus retries after a lost worker) before it fails."
    )
    job_lease_seconds: float = _setting(
        60.0,
        "A running job whose worker has not renewed its lease for this long is re-queued.",
        _positive_float,
    )
    job_time_limit_seconds: int = _setting(
        1800,
        "A generation job still running this long after its claim fails, naming the limit.",
    )
    train_time_limit_seconds: int = _setting(
        6 * 3600,
        "A training run still running this long after its claim checkpoints and goes back to "
        "the queue, to resume from that checkpoint.",
    )
    train_eval_images: int = _setting(
        256,
        "Images of the quick eval that ends every finished training run (a denoiser's FID, "
        "an autoencoder's reconstruction FID and PSNR, at this N, stored on the new version); "
        "evals compare only at equal N.",
    )
    worker_hang_grace_seconds: float = _setting(
        30.0,
        "Seconds past a time limit that a task may take to stop on its own. After that the "
        "worker's watchdog records the outcome and exits the process (status 70), so that its "
        "supervisor (Kubernetes, dq serve) starts a fresh one.",
        _positive_float,
    )
    worker_liveness_file: str | None = _setting(
        None,
        "A file the worker's watchdog touches every few seconds while no task is past its time "
        "limit; probe it with `dq worker-alive FILE` (empty: none).",
        _optional,
    )
    db_connect_timeout_seconds: int = _setting(
        10, "PostgreSQL: give up connecting after this long, so a dead database cannot hang us."
    )
    db_statement_timeout_seconds: int = _setting(
        30,
        "PostgreSQL: cancel any statement running longer than this (0: no limit).",
        _non_negative_int,
    )
    db_pool_size: int = _setting(
        10,
        "PostgreSQL: connections each process keeps open for reuse. A process that needs more "
        "at once opens up to as many again, and closes those after use.",
        _positive_int,
    )
    data_root: str = _setting(
        "var/datasets", "Training runs may read local image folders only under this directory."
    )
    work_dir: str = _setting(
        "var/work", "Scratch space of workers: training runs in progress, fetched datasets."
    )
    model_cache_dir: str = _setting(
        "var/models", "Where workers keep model versions fetched from object storage."
    )
    worker_model_memory_mb: int = _setting(
        2048,
        "Memory (MB) for the model versions one worker process keeps loaded, least recently used "
        "out first, measured from each model's weights; it always keeps at least one.",
        _positive_int,
    )
    model_affinity_wait_seconds: float = _setting(
        10.0,
        "A worker may claim queued jobs for a model version it holds ahead of jobs for one it "
        "would have to load, but passes such a job over for at most this long (0: strict fair "
        "order).",
        _non_negative_float,
    )
    model_affinity_presence: bool = _setting(
        True,
        "When the next job's model version is held by another live worker, a worker that does "
        "not hold it first claims a job, within the same rounds, for a version no other worker "
        "holds (read from the workers' presence rows), rather than load a second copy.",
    )
    device: str | None = _setting(
        None, "cpu or cuda for the workers; empty picks CUDA when present.", _optional
    )
    precision: str = _setting(
        "auto",
        "Numeric precision of the workers' UNet and text encoder: fp32, bf16, fp16 (CUDA only) "
        "or auto (bf16 on a GPU that has it, else fp16; on a CPU bf16 where it has native bf16, "
        "AVX-512 BF16 or AMX, else fp32).",
        _precision,
    )
    rate_limit: str = _setting(
        "60/minute", "Job submissions allowed per caller, in Flask-Limiter's notation."
    )
    global_rate_limit: str = _setting(
        "600/minute",
        "Job submissions allowed from all callers together, in Flask-Limiter's notation.",
    )
    max_active_jobs_per_owner: int = _setting(
        20, "Queued and running jobs one caller may have at once; more get 429."
    )
    max_queued_jobs: int = _setting(
        1_000_000,
        "Queued jobs the whole service holds; past it submissions get 503 with Retry-After.",
    )
    queue_snapshot_seconds: float = _setting(
        1.0,
        "How old, at most, the view of the queue (its head, the running jobs, the rates, the "
        "live workers) may be from which each web process answers queue positions and ETAs; "
        "0 reads it again for every request.",
        _non_negative_float,
    )
    trusted_proxy_hops: int = _setting(
        0,
        "Reverse proxies in front of the web app whose X-Forwarded-For and X-Forwarded-Proto "
        "are trusted (0: none; the client's address is the socket's).",
        _non_negative_int,
    )
    form_requires_login: bool = _setting(
        False,
        "The web form queues jobs only for a signed-in browser (an admin login, or a user "
        "token entered on the sign-in page); anonymous visitors see a sign-in link instead.",
    )
    retention: int | None = _setting(
        None,
        "The reaper deletes finished jobs older than this (30d, 12h …), with their images, "
        "previews and old training metrics; empty: keep everything (`dq prune` still works).",
        _optional_duration,
    )
    log_format: str = _setting(
        "text",
        "Log lines as text, or json (one object per line, with the request id).",
        _log_format,
    )
    metrics_token: str | None = _setting(
        None,
        "When set, GET /metrics needs 'Authorization: Bearer <this>'; empty: /metrics is open "
        "(keep it off public routes).",
        _optional,
    )
    webhook_allowed_networks: str = _setting(
        "",
        "Comma-separated CIDRs (e.g. 127.0.0.0/8,10.1.0.0/16) that webhook targets may resolve "
        "to although private, loopback or link-local; targets there may use plain http.",
        _cidr_list,
    )
    webhook_allow_http: bool = _setting(
        False, "Let webhook targets use plain http anywhere (default: https only)."
    )
    webhook_retry_window: int = _setting(
        24 * 3600,
        "How long a webhook delivery is retried, with exponential backoff and jitter, before it "
        "is given up (24h, 90m, …).",
        parse_duration,
    )
    max_batch_items: int = _setting(
        100, "Most jobs one batch submission (a prompt list or matrix) may make; more get 422."
    )
    model_gate_max_fid_increase: float = _setting(
        0.10,
        "Activating a model version is refused (409, unless forced) when its eval's FID is more "
        "than this fraction above the active version's (0.10: +10%).",
        _non_negative_float,
    )
    model_gate_max_adherence_drop: float = _setting(
        5.0,
        "Activating a model version is refused (409, unless forced) when its eval's prompt "
        "adherence is more than this many points below the active version's.",
        _non_negative_float,
    )
    sse_max_streams: int = _setting(
        48,
        "Event streams (SSE) one web process holds at once; each holds a gunicorn thread, so "
        "keep it below `dq web --threads` (64) to leave threads for pages and API calls. Past "
        "it a stream gets 503 with Retry-After, and the job page falls back to polling.",
    )
    sse_heartbeat_seconds: float = _setting(
        15.0, "Seconds between heartbeat comments on an open event stream (SSE).", _positive_float
    )
    rate_limit_storage_url: str = _setting(
        "memory://", "Where the rate limiter counts: redis://… in production."
    )
    debug: bool = _setting(False, "Verbose logs and Flask's debug pages; never in production.")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``DQ_*`` variable; keyword arguments win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = env_var(f.name)
            if f.name in overrides:
                values[f.name] = overrides.pop(f.name)
                continue
            raw = env.get(var)
            if raw is None:
                continue
            parse = f.metadata["parse"] or _parser_for(f.default)
            try:
                values[f.name] = parse(raw.strip())
            except ValueError as e:
                reason = str(e) if "must" in str(e) else f"must be {_kind(f.default)}"
                raise SettingsError(f"{var}={raw!r} is not valid: {reason}") from None
        if overrides:
            raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check the URLs and limits; raise SettingsError naming the first bad variable."""
        scheme = self.database_url.split("://", 1)[0] if "://" in self.database_url else ""
        if scheme not in DATABASE_SCHEMES:
            raise SettingsError(
                f"DQ_DATABASE_URL={self.database_url!r} is not valid: use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            )
        replica = self.database_replica_url
        if replica is not None and (
            self.is_embedded or replica.split("://", 1)[0] not in POSTGRESQL_SCHEMES
        ):
            raise SettingsError(
                f"DQ_DATABASE_REPLICA_URL={_mask_password(replica)!r} is not valid: name a "
                "postgresql+psycopg://USER@HOST/DB replica of a PostgreSQL DQ_DATABASE_URL"
            )
        scheme = self.broker_url.split("://", 1)[0] if "://" in self.broker_url else ""
        if scheme not in BROKER_SCHEMES:
            raise SettingsError(
                f"DQ_BROKER_URL={self.broker_url!r} is not valid: use redis://HOST:PORT/DB "
                "or sqla+sqlite:///PATH"
            )
        storage_location(self.storage_url)  # raises SettingsError
        for name in ("s3_endpoint_url", "s3_public_endpoint_url"):
            url = getattr(self, name)
            if url is not None and urlsplit(url).scheme not in ("http", "https"):
                raise SettingsError(
                    f"{env_var(name)}={url!r} is not valid: use http(s)://HOST:PORT"
                )
        if self.device is not None and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise SettingsError(f"DQ_DEVICE={self.device!r} is not valid: use cpu or cuda")
        for name in (
            "max_steps",
            "max_images_per_job",
            "max_prompt_chars",
            "max_upload_bytes",
            "max_batch_size",
            "max_active_jobs_per_owner",
            "max_queued_jobs",
            "max_batch_items",
            "sse_max_streams",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_var(name)} must be a positive integer")
        for name in (
            "job_max_attempts",
            "job_time_limit_seconds",
            "train_time_limit_seconds",
            "db_connect_timeout_seconds",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_var(name)} must be a positive integer")
        if self.train_eval_images < 2:
            raise SettingsError("DQ_TRAIN_EVAL_IMAGES must be at least 2 (FID fits a covariance)")
        if not 0 <= self.trusted_proxy_hops <= 5:
            raise SettingsError("DQ_TRUSTED_PROXY_HOPS must be from 0 to 5")
        if self.db_statement_timeout_seconds < 0:
            raise SettingsError("DQ_DB_STATEMENT_TIMEOUT_SECONDS must be 0 or more")

    @property
    def is_embedded(self) -> bool:
        """The single-machine topology: the database is a SQLite file."""
        return self.database_url.startswith("sqlite:")

    def check_secret_key(self) -> None:
        """Outside the embedded setup, refuse a missing, short or placeholder DQ_SECRET_KEY."""
        if self.is_embedded:
            return
        key = self.secret_key
        if not key:
            problem = "is not set"
        elif len(key) < MIN_SECRET_KEY_CHARS:
            problem = f"is {len(key)} characters; use at least {MIN_SECRET_KEY_CHARS}"
        elif any(marker in key.lower() for marker in PLACEHOLDER_SECRET_MARKERS):
            problem = "is a placeholder from the examples"
        else:
            return
        raise SettingsError(
            f"DQ_SECRET_KEY {problem}: outside the embedded setup set it to a random value, e.g. "
            "python -c 'import secrets; print(secrets.token_hex(32))'"
        )

    # --- derived values -------------------------------------------------------------------

    @property
    def effective_secret_key(self) -> str:
        """DQ_SECRET_KEY, or a random key kept in ``var/secret_key`` so that every process of
        the embedded topology (gunicorn workers, restarts) signs with the same one."""
        if self.secret_key:
            return self.secret_key
        path = Path("var/secret_key")
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write a temp file, then hard-link it into place: the key appears whole or not at
            # all, and when two processes race, both end up reading the winner's key.
            tmp = path.with_name(f".secret_key.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            return path.read_text().strip()

    @property
    def broker_visibility_timeout(self) -> int:
        """Longer than any task's hard time limit, so Redis never redelivers a running task."""
        limit = max(self.job_time_limit_seconds, self.train_time_limit_seconds)
        return int(limit + self.worker_hang_grace_seconds) + 600

    def local_paths(self) -> list[Path]:
        """Directories the embedded defaults write into, to create at start-up."""
        paths = []
        for url in (self.database_url, self.broker_url):
            path = sqlite_path(url)
            if path is not None:
                paths.append(path.parent)
        kind, location = storage_location(self.storage_url)
        if kind == "file":
            paths.append(Path(location))
        return paths

    def public_dict(self) -> dict[str, Any]:
        """The settings with credentials and the secret key masked, for logs and pages."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "secret_key":
                value = "(set)" if value else "(kept in var/secret_key)"
            elif f.name == "metrics_token":
                value = "(set)" if value else None
            elif isinstance(value, str) and "://" in value:
                value = _mask_password(value)
            out[env_var(f.name)] = value
        return out

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) for every setting, in declaration order."""
        return [
            (env_var(f.name), "" if f.default is None else str(f.default), f.metadata["help"])
            for f in fields(cls)
        ]


def env_var(field_name: str) -> str:
    return "DQ_" + field_name.upper()


def setting_names() -> set[str]:
    """Every ``DQ_*`` variable that the settings object reads."""
    return {env_var(f.name) for f in fields(Settings)}


def _parser_for(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _bool
    if isinstance(default, int):
        return _positive_int
    if isinstance(default, float):
        return _positive_float
    return str


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a positive integer"
    if isinstance(default, float):
        return "a positive number"
    return "a string"


def _mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` or ``sqla+sqlite:///`` URL, or None for other URLs."""
    for prefix in ("sqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :].split("?", 1)[0]
            if rest in ("", ":memory:"):
                return None
            return Path(rest)
    return None


def storage_location(url: str) -> tuple[str, str]:
    """Split DQ_STORAGE_URL into ("file", directory) or ("s3", "bucket/prefix")."""
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path:
            raise SettingsError(f"DQ_STORAGE_URL={url!r} is not valid: name a directory")
        return "file", path
    if url.startswith("s3://"):
        rest = url[len("s3://") :].strip("/")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise SettingsError(f"DQ_STORAGE_URL={url!r} is not valid: name a bucket")
        return "s3", rest
    raise SettingsError(
        f"DQ_STORAGE_URL={url!r} is not valid: use file://DIR or s3://BUCKET/PREFIX"
    )
