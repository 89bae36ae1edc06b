"""The long-running processes, started by name so that ``core`` imports neither Flask nor Celery:
``dq web`` (gunicorn), ``dq worker`` (Celery), ``dq reaper``, ``dq worker-alive`` (the probe of
a worker's liveness file) and ``dq serve``, which runs them all under ``core.cli.supervisor``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from core.cli._common import fail, load_settings
from core.cli.db import migrate_schema, require_current_schema

# --- web -------------------------------------------------------------------------------------


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Per process. Each open event stream (SSE) holds one while it is open.",
)
@click.option(
    "--migrate",
    is_flag=True,
    help="Apply the migrations first. Production runs `dq db upgrade` once (the migrate Job) "
    "instead, so that web replicas never race to change the schema.",
)
def web_cmd(host: str, port: int, workers: int, threads: int, migrate: bool) -> None:
    """Serve the web pages and API under gunicorn (replaces this process).

    The database schema must be current: run `dq db upgrade` first, or pass --migrate.
    """
    import os
    import shutil

    settings = load_settings()
    settings.check_secret_key()
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    if migrate:
        migrate_schema(settings.database_url)
    else:
        require_current_schema(settings.database_url)
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which(
        "gunicorn"
    )
    if gunicorn is None:
        raise fail("the gunicorn command is missing; reinstall diffusion-queue")
    args = [
        gunicorn,
        "--bind",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers",
        str(workers),
        # Threads serve keep-alive connections and slow clients without blocking a process.
        "--worker-class",
        "gthread",
        "--threads",
        str(threads),
        # The checkout root, so that `web` imports from a source tree as from an install.
        "--pythonpath",
        str(Path(__file__).resolve().parents[2]),
        "--access-logfile",
        "-",
        # gunicorn's default line, plus the request id that problem bodies also name.
        "--access-logformat",
        '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" rid=%({x-request-id}o)s',
        # No control socket: nothing uses it, and a read-only home has no room for one.
        "--no-control-socket",
        *(
            ["--logger-class", "web.gunicorn_logging.JsonLogger"]
            if settings.log_format == "json"
            else []
        ),
        "web:create_app()",
    ]
    sys.stdout.flush()
    os.execv(gunicorn, args)


# --- serve -----------------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=None,
    help="Generation worker processes (default: one per CPU core, up to 8, on a host without a "
    "GPU, each with one torch thread, as bench/bench_worker.py measured fastest; 1 with a GPU).",
)
@click.option(
    "--train-worker/--no-train-worker",
    default=True,
    show_default=True,
    help="Also run a worker for admin training runs.",
)
@click.option("--web-workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--threads-per-worker",
    type=click.IntRange(1, 256),
    default=None,
    help="torch CPU threads of each generation worker (default: the cores shared out among "
    "the workers, at least 1).",
)
def serve_cmd(
    host: str,
    port: int,
    workers: int | None,
    train_worker: bool,
    web_workers: int,
    threads_per_worker: int | None,
) -> None:
    """Run everything on this machine: migrations, web app, workers and reaper.

    State lives under ./var unless DQ_* settings say otherwise. Ctrl-C or SIGTERM stops every
    process; queued jobs survive and run after the next start.
    """

    from core.cli.supervisor import serve

    settings = load_settings()
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    settings.effective_secret_key  # noqa: B018 -- made once here, before the children race for it
    migrate_schema(settings.database_url)
    import os

    from core.cli.supervisor import default_workers

    workers = workers or default_workers(settings)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    sys.exit(serve(host, port, workers, train_worker, web_workers, threads))


# --- worker and reaper ---------------------------------------------------------------------


@click.command("worker")
@click.option(
    "--queues",
    "-Q",
    default="generate",
    show_default=True,
    help="Comma-separated queues: generate, train, webhooks (deliveries; loads no model).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes. Keep 1 per GPU: start one worker per GPU with CUDA_VISIBLE_DEVICES.",
)
@click.option("--name", default=None, help="Worker node name (default: QUEUES@HOST).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="torch CPU threads per process (default: torch's, one per core). On a CPU-only host "
    "running several workers, give each cores ÷ workers.",
)
def worker_cmd(
    queues: str, concurrency: int, name: str | None, loglevel: str, threads: int | None
) -> None:
    """Run a Celery worker on the given queues (replaces this process)."""
    import os
    import shutil

    settings = load_settings()
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - {"generate", "train", "webhooks"})
    if not wanted or unknown:
        raise fail(
            "--queues must name generate, train and/or webhooks, "
            f"not {', '.join(unknown) or queues!r}"
        )
    if settings.precision == "fp16" and not _may_use_cuda(settings.device):
        raise fail(
            "DQ_PRECISION=fp16 needs a CUDA device and this worker runs on the CPU; use bf16, "
            "fp32 or auto"
        )
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    celery = shutil.which("celery", path=str(Path(sys.executable).parent)) or shutil.which("celery")
    if celery is None:
        raise fail("the celery command is missing; reinstall diffusion-queue")
    # One process per GPU: the solo pool runs tasks in the worker process itself, so the model
    # stays loaded between tasks; prefork with concurrency N suits CPU-only hosts.
    pool = ["--pool", "solo"] if concurrency == 1 else ["--pool", "prefork", "-c", str(concurrency)]
    args = [
        celery,
        "-A",
        "worker.app",
        "worker",
        "-Q",
        ",".join(wanted),
        *pool,
        "--loglevel",
        loglevel,
        "-n",
        name or f"{'+'.join(wanted)}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if threads is not None:
        # Read by torch (OpenMP) and MKL when they start in the worker.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    sys.stdout.flush()
    os.execv(celery, args)


def _may_use_cuda(device: str | None) -> bool:
    """DQ_DEVICE names CUDA, or is empty on a host with an NVIDIA GPU (told without torch)."""
    from core.cli.supervisor import has_gpu

    return device.startswith("cuda") if device is not None else has_gpu()


@click.command("worker-alive")
@click.argument("liveness_file", required=False)
@click.option(
    "--max-age",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds since the last touch after which the worker counts as hung.",
)
def worker_alive_cmd(liveness_file: str | None, max_age: float) -> None:
    """Exit 0 when a worker's liveness file is fresh, 1 when it is stale or missing (for a
    Kubernetes exec probe). The file defaults to DQ_WORKER_LIVENESS_FILE."""
    from core.runtime.liveness import liveness_age

    path = liveness_file or load_settings().worker_liveness_file
    if not path:
        raise fail("name the liveness file, or set DQ_WORKER_LIVENESS_FILE")
    age = liveness_age(path)
    if age is None:
        click.echo(f"not alive: {path} does not exist", err=True)
        sys.exit(1)
    if age > max_age:
        click.echo(f"not alive: {path} was last touched {age:.0f} s ago", err=True)
        sys.exit(1)
    click.echo(f"alive: {path} touched {age:.1f} s ago")


@click.command("reaper")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds per pass.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option(
    "--liveness-file",
    default=None,
    help="Touch this file after every pass; probe it with `dq worker-alive FILE`.",
)
def reaper_cmd(interval: float, once: bool, liveness_file: str | None) -> None:
    """Re-queue work of lost workers and publish messages the broker never got."""
    from core.runtime import logs
    from core.upkeep.reaper import run_reaper

    settings = load_settings()
    logs.configure(settings.log_format)
    run_reaper(settings, interval=interval, once=once, liveness_file=liveness_file)
