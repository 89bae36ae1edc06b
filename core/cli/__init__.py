"""The ``dq`` command.

Heavy imports (torch, the model) happen inside the commands that need them, so ``dq --help``
and the service commands start fast. Every error a user can cause ends in one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "diffusion" / "default_model"


class UsageError(click.ClickException):
    exit_code = 2


def _fail(message: str) -> UsageError:
    return UsageError(message.rstrip("."))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-queue")
def cli() -> None:
    """diffusion-queue: text-to-image generation with our own latent diffusion model."""


# --- generate --------------------------------------------------------------------------------


def resolve_checkpoint(checkpoint: str | None) -> Path:
    if checkpoint is not None:
        return Path(checkpoint)
    if (DEFAULT_CHECKPOINT / "model.json").is_file():
        return DEFAULT_CHECKPOINT
    raise _fail(
        "no default model is installed; pass --checkpoint DIR "
        "(train one with `dq train autoencoder` then `dq train denoiser`)"
    )


@cli.command()
@click.argument("prompt")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="Model directory (default: the shipped model).",
)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option(
    "--sampler", default=None, help="ddpm, ddim, dpmpp-2m or dpmpp-3m (default: the model's)."
)
@click.option(
    "--guidance", type=float, default=None, help="Classifier-free guidance scale; 1 turns it off."
)
@click.option(
    "--guidance-interval",
    type=(float, float),
    default=None,
    metavar="LO HI",
    help="Guide only at noise levels t/T from LO to HI (default: the model's; 0 1: every step).",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the first image; the rest use seed+1, seed+2, …"
)
@click.option("-n", "--num-images", type=click.IntRange(1, 64), default=1, help="How many images.")
@click.option("--size", type=int, default=None, help="Image side in pixels (default: the model's).")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default="out.png",
    help="PNG file; with -n > 1, OUT-<i>.png.",
)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
def generate(
    prompt: str,
    negative_prompt: str,
    checkpoint: str | None,
    steps: int | None,
    sampler: str | None,
    guidance: float | None,
    guidance_interval: tuple[float, float] | None,
    seed: int | None,
    num_images: int,
    size: int | None,
    output: str,
    device: str | None,
) -> None:
    """Generate images for PROMPT and write them as PNG."""
    from PIL import PngImagePlugin

    from core.diffusion.pipeline import LatentDiffusion, PromptTruncatedWarning, random_seed

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise _fail(f"output must be a .png file, not {out.name!r}")
    if not out.parent.is_dir():
        raise _fail(f"output directory {out.parent} does not exist")
    try:
        model = LatentDiffusion.load(resolve_checkpoint(checkpoint), device=device)
    except RuntimeError as e:  # e.g. an unknown or absent device
        raise _fail(f"cannot use device {device!r}: {e}") from None
    first = random_seed() if seed is None else seed
    seeds = [first + i for i in range(num_images)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        images = model.generate(
            [prompt] * num_images,
            [negative_prompt] * num_images,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seeds=seeds,
            size=size,
            guidance_interval=guidance_interval,
        )
    for w in caught:
        if issubclass(w.category, PromptTruncatedWarning):
            click.echo(f"dq: note: {w.message}", err=True)
            break
    paths = (
        [out]
        if num_images == 1
        else [out.with_name(f"{out.stem}-{i}.png") for i in range(num_images)]
    )
    for img, path, s in zip(images, paths, seeds, strict=True):
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", str(s))
        img.save(path, pnginfo=info)
        click.echo(f"{path}  seed={s}")


# --- train -----------------------------------------------------------------------------------


@cli.group()
def train() -> None:
    """Train the autoencoder, then the denoiser (text encoder + UNet)."""


def _train_options(f: Any) -> Any:
    options = [
        click.option(
            "--config", "config_path", type=click.Path(), default=None, help="TOML config file."
        ),
        click.option(
            "--out",
            required=True,
            type=click.Path(),
            help="Output directory (checkpoints, metrics).",
        ),
        click.option("--steps", type=int, default=None, help="Override train.steps."),
        click.option("--batch-size", type=int, default=None, help="Override train.batch_size."),
        click.option("--lr", type=float, default=None, help="Override train.lr."),
        click.option("--seed", type=int, default=None, help="Override train.seed."),
        click.option(
            "--checkpoint-every", type=int, default=None, help="Override train.checkpoint_every."
        ),
        click.option(
            "--data",
            "data_path",
            type=click.Path(),
            default=None,
            help="Train on this image folder.",
        ),
        click.option(
            "--no-resume", is_flag=True, help="Start over even if OUT holds a training state."
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when present)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _overrides(kw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    train_keys = ("steps", "batch_size", "lr", "seed", "checkpoint_every")
    o: dict[str, dict[str, Any]] = {"train": {k: kw[k] for k in train_keys}}
    if kw["data_path"]:
        o["data"] = {"kind": "imagefolder", "path": kw["data_path"]}
    return o


def _device(name: str | None) -> Any:
    import torch

    from core.diffusion.pipeline import pick_device

    if name is None:
        return pick_device()
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise _fail(f"device must be cpu or cuda, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise _fail("device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


@train.command("autoencoder")
@_train_options
def train_autoencoder_cmd(**kw: Any) -> None:
    """Train the autoencoder on images alone."""
    from core.diffusion.training.autoencoder import train_autoencoder
    from core.diffusion.training.config import AutoencoderTrainConfig, load_config

    cfg = load_config(AutoencoderTrainConfig, kw["config_path"], _overrides(kw))
    _, summary = train_autoencoder(
        cfg,
        kw["out"],
        resume=not kw["no_resume"],
        progress=not kw["quiet"],
        device=_device(kw["device"]),
    )
    click.echo(
        f"autoencoder saved to {kw['out']}: {summary['steps']} steps, "
        f"held-out PSNR {summary['heldout_psnr_db']:.2f} dB, "
        f"latent scale factor {summary['latent_scale_factor']:.4f}"
    )


@train.command("denoiser")
@_train_options
@click.option(
    "--autoencoder", required=True, type=click.Path(), help="A trained autoencoder checkpoint."
)
def train_denoiser_cmd(**kw: Any) -> None:
    """Train the text encoder and UNet on the autoencoder's latents."""
    from core.diffusion.training.config import DenoiserTrainConfig, fit_to_data, load_config
    from core.diffusion.training.denoiser import train_denoiser

    cfg = load_config(DenoiserTrainConfig, kw["config_path"], _overrides(kw))
    _, off = fit_to_data(cfg)
    if off:
        click.echo(
            f"note: {cfg.data.kind} data has no object masks; training without {', '.join(off)}"
        )
    _, summary = train_denoiser(
        cfg,
        kw["autoencoder"],
        kw["out"],
        resume=not kw["no_resume"],
        progress=not kw["quiet"],
        device=_device(kw["device"]),
    )
    click.echo(
        f"model saved to {kw['out']}: {summary['steps']} steps; samples in {kw['out']}/samples.png"
    )


@train.command("classifier")
@_train_options
def train_classifier_cmd(**kw: Any) -> None:
    """Train the attribute classifier that `dq eval` judges and computes FID with."""
    if kw["data_path"]:
        raise _fail("the classifier trains on the shapes dataset only; --data is not supported")
    from core.diffusion.eval.train_classifier import load_classifier_config, train_classifier

    cfg = load_classifier_config(kw["config_path"], _overrides(kw))
    _, summary = train_classifier(
        cfg,
        kw["out"],
        resume=not kw["no_resume"],
        progress=not kw["quiet"],
        device=_device(kw["device"]),
    )
    acc = summary["accuracy"]
    click.echo(
        f"classifier saved to {kw['out']}: {summary['steps']} steps, "
        f"{summary['parameters']} parameters"
    )
    for name, scores in (
        ("all pairs", acc["all_pairs"]),
        ("held-out pairs", acc["held_out_pairs"]),
    ):
        parts = ", ".join(f"{k} {v:.2%}" for k, v in scores.items() if k != "images")
        click.echo(f"accuracy on {scores['images']} images of seed {acc['seed']}, {name}: {parts}")


# --- eval ------------------------------------------------------------------------------------


def _speed_setting(raw: str) -> tuple[str, int, float, float]:
    parts = raw.split(":")
    try:
        if len(parts) == 2:
            return parts[0], int(parts[1]), 0.0, 1.0
        if len(parts) == 4:
            return parts[0], int(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        pass
    raise _fail(f"--speed-setting {raw!r} is not SAMPLER:STEPS or SAMPLER:STEPS:LO:HI")


@cli.command("eval")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="Model directory (default: the shipped model).",
)
@click.option(
    "--classifier",
    type=click.Path(),
    default=None,
    help="Attribute classifier directory (default: the shipped one).",
)
@click.option("--n", type=int, default=None, help="Prompts and real images for FID (default 2000).")
@click.option(
    "--sweep-n", type=int, default=None, help="Prompts per sampler-sweep row (default 256)."
)
@click.option(
    "--guidance-n", type=int, default=None, help="Prompts per guidance-sweep row (default: N)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes prompts and noise.")
@click.option(
    "--out",
    type=click.Path(),
    default="eval",
    show_default=True,
    help="Directory for eval.md, eval.json and samples.png.",
)
@click.option("--quick", is_flag=True, help="A smoke run at tiny N; its numbers mean nothing.")
@click.option(
    "--sweeps/--no-sweeps", default=True, show_default=True, help="Sampler and guidance sweeps."
)
@click.option(
    "--speed-sweep",
    is_flag=True,
    help="Also images/s against FID and adherence for faster settings (fewer steps, "
    "higher-order solvers, guidance in an interval), each at N = --speed-n.",
)
@click.option("--speed-n", type=int, default=None, help="Prompts per speed-sweep row (default N).")
@click.option(
    "--speed-setting",
    "speed_settings",
    multiple=True,
    metavar="SAMPLER:STEPS[:LO:HI]",
    help="A speed-sweep row, e.g. dpmpp-3m:10:0.3:1 (guided at t/T in [0.3, 1]); repeat for "
    "more rows. Default: the built-in list. The first row is what the others compare with.",
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per batch.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    checkpoint: str | None,
    classifier: str | None,
    n: int | None,
    sweep_n: int | None,
    guidance_n: int | None,
    seed: int,
    out: str,
    quick: bool,
    sweeps: bool,
    speed_sweep: bool,
    speed_n: int | None,
    speed_settings: tuple[str, ...],
    batch_size: int,
    device: str | None,
    threads: int | None,
    quiet: bool,
) -> None:
    """Measure FID and prompt adherence of a model, with sampler and guidance sweeps."""
    import dataclasses
    import json
    import shlex

    import torch

    from core.diffusion.eval import DEFAULT_CLASSIFIER
    from core.diffusion.eval.evaluate import QUICK, EvalSettings, evaluate
    from core.diffusion.eval.report import environment, markdown

    base = QUICK if quick else EvalSettings()
    settings = dataclasses.replace(
        base,
        n=base.n if n is None else n,
        sweep_n=base.sweep_n if sweep_n is None else sweep_n,
        guidance_n=base.guidance_n if guidance_n is None else guidance_n,
        seed=seed,
        sweeps=sweeps,
        speed=speed_sweep or bool(speed_settings),
        speed_n=speed_n,
        batch_size=batch_size,
    )
    if speed_settings:
        settings = dataclasses.replace(
            settings, speed_sweep=tuple(_speed_setting(s) for s in speed_settings)
        )
    settings.validate()
    if threads is not None:
        if threads < 1:
            raise _fail("--threads must be at least 1")
        torch.set_num_threads(threads)
    dev = _device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(
        resolve_checkpoint(checkpoint),
        Path(classifier) if classifier else DEFAULT_CLASSIFIER,
        settings,
        out_dir=out_dir,
        device=dev,
        progress=not quiet,
    )
    result.environment = environment(dev)
    command = shlex.join(["dq", *sys.argv[1:]]) if Path(sys.argv[0]).name == "dq" else ""
    report = markdown(result, command)
    (out_dir / "eval.md").write_text(report)
    (out_dir / "eval.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    click.echo(report)
    click.echo(
        f"dq: wrote {out_dir / 'eval.md'}, {out_dir / 'eval.json'}, {out_dir / 'samples.png'}"
    )


# --- config ----------------------------------------------------------------------------------


@cli.command("config")
@click.option("--markdown", is_flag=True, help="Print the reference table of every setting.")
def config_cmd(markdown: bool) -> None:
    """Show the effective DQ_* settings (credentials masked)."""
    from core.runtime.settings import Settings

    if markdown:
        click.echo("| variable | default | meaning |\n|---|---|---|")
        for name, default, help in Settings.describe():
            click.echo(f"| `{name}` | {f'`{default}`' if default else ''} | {help} |")
        return
    for name, value in Settings.from_env().public_dict().items():
        click.echo(f"{name}={'' if value is None else value}")


# --- db --------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The job database: apply migrations, show the schema revision."""


def _settings() -> Any:
    from core.runtime.settings import Settings

    return Settings.from_env()  # SettingsError names the variable; main() prints it


def _database_error(url: str, e: Exception) -> UsageError:
    from core.runtime.settings import Settings

    shown = Settings(database_url=url).public_dict()["DQ_DATABASE_URL"]
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    return _fail(f"cannot reach the database at {shown} (DQ_DATABASE_URL): {reason}")


def _migrate(url: str, revision: str = "head") -> None:
    """Apply the migrations; any database error becomes one line naming DQ_DATABASE_URL."""
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    from core.db import check_database, make_engine, migrate

    engine = make_engine(url)
    try:
        check_database(engine)
    except OperationalError as e:
        raise _database_error(url, e) from None
    finally:
        engine.dispose()
    try:
        migrate.upgrade(url, revision)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise _fail(
            f"migrating the database (DQ_DATABASE_URL) failed: {reason}; if its tables were not "
            "made by `dq db upgrade`, start from an empty database"
        ) from None


def _require_current_schema(url: str) -> None:
    """One line naming the fix when the schema is not at the code's revision."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    try:
        current = migrate.current_revision(url)
    except OperationalError as e:
        raise _database_error(url, e) from None
    head = migrate.head_revision()
    if current != head:
        raise _fail(
            f"the database schema is at revision {current or '(empty)'}, this code needs {head}: "
            "run `dq db upgrade` first (in Kubernetes, the dq-migrate Job)"
        )


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema of DQ_DATABASE_URL."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    settings = _settings()
    _migrate(settings.database_url, revision)
    try:
        current = migrate.current_revision(settings.database_url)
    except OperationalError as e:
        raise _database_error(settings.database_url, e) from None
    click.echo(f"database is at revision {current}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision of DQ_DATABASE_URL and whether it is the newest."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    settings = _settings()
    try:
        current = migrate.current_revision(settings.database_url)
    except OperationalError as e:
        raise _database_error(settings.database_url, e) from None
    head = migrate.head_revision()
    state = "up to date" if current == head else f"behind {head}; run `dq db upgrade`"
    click.echo(f"{current or '(empty)'} ({state})")


# --- token -----------------------------------------------------------------------------------


@cli.group()
def token() -> None:
    """API bearer tokens: create (shown once), list, revoke, weight (fair share)."""


def _token_engine() -> Any:
    """The engine of DQ_DATABASE_URL, once it is known to hold the api_tokens table."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from core.db import get_engine

    settings = _settings()
    engine = get_engine(settings)
    try:
        migrated = inspect(engine).has_table("api_tokens")
    except OperationalError as e:
        raise _database_error(settings.database_url, e) from None
    if not migrated:
        raise _fail("the database has no api_tokens table; run `dq db upgrade` first")
    return engine


@token.command("create")
@click.option(
    "--role", required=True, type=click.Choice(["user", "admin"]), help="What the token may do."
)
@click.option("--label", default="", help="A note to tell tokens apart, e.g. who holds it.")
def token_create(role: str, label: str) -> None:
    """Make a token and print it on stdout, once: only its hash is stored."""
    from core.db import session_scope
    from core.services.tokens import create_token

    with session_scope(_token_engine()) as session:
        row, plaintext = create_token(session, role, label)
        token_id = row.id
    click.echo(f"dq: created {role} token {token_id}; it is shown once, below", err=True)
    click.echo(plaintext)


@token.command("list")
def token_list() -> None:
    """List tokens: id, role, created, revoked, label (never the tokens themselves)."""
    from core.db import session_scope
    from core.services.tokens import list_tokens

    with session_scope(_token_engine()) as session:
        for row in list_tokens(session):
            created = row.created_at.isoformat(timespec="seconds")
            revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "-"
            click.echo(f"{row.id}\t{row.role.value}\t{created}\t{revoked}\t{row.label}")


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke token TOKEN_ID (an id from `dq token list`, or the token itself)."""
    from core.db import session_scope
    from core.services.tokens import TokenNotFound, revoke_token

    try:
        with session_scope(_token_engine()) as session:
            row_id = revoke_token(session, token_id).id
    except TokenNotFound as e:
        raise _fail(str(e)) from None
    click.echo(f"token {row_id} is revoked")


@token.command("weight")
@click.argument("token_id", type=click.IntRange(min=1))
@click.argument("weight", type=float)
def token_weight(token_id: int, weight: float) -> None:
    """Set token TOKEN_ID's fair-share WEIGHT (0.1 to 100; default 1): its waiting jobs get
    WEIGHT turns per round of the queue, against 1 for every other owner."""
    from core.db import session_scope
    from core.services.tokens import TokenNotFound, set_weight

    try:
        with session_scope(_token_engine()) as session:
            row = set_weight(session, token_id, weight)
            row_id, new = row.id, row.weight
    except (TokenNotFound, ValueError) as e:
        raise _fail(str(e)) from None
    click.echo(f"token {row_id} has weight {new:g}")


# --- web -------------------------------------------------------------------------------------


@cli.command("web")
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

    settings = _settings()
    settings.check_secret_key()
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    if migrate:
        _migrate(settings.database_url)
    else:
        _require_current_schema(settings.database_url)
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which(
        "gunicorn"
    )
    if gunicorn is None:
        raise _fail("the gunicorn command is missing; reinstall diffusion-queue")
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


@cli.command("serve")
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

    settings = _settings()
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    settings.effective_secret_key  # noqa: B018 -- made once here, before the children race for it
    _migrate(settings.database_url)
    import os

    from core.cli.supervisor import default_workers

    workers = workers or default_workers(settings)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    sys.exit(serve(host, port, workers, train_worker, web_workers, threads))


# --- worker and reaper ---------------------------------------------------------------------


@cli.command("worker")
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

    settings = _settings()
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - {"generate", "train", "webhooks"})
    if not wanted or unknown:
        raise _fail(
            "--queues must name generate, train and/or webhooks, "
            f"not {', '.join(unknown) or queues!r}"
        )
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    celery = shutil.which("celery", path=str(Path(sys.executable).parent)) or shutil.which("celery")
    if celery is None:
        raise _fail("the celery command is missing; reinstall diffusion-queue")
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


@cli.command("worker-alive")
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

    path = liveness_file or _settings().worker_liveness_file
    if not path:
        raise _fail("name the liveness file, or set DQ_WORKER_LIVENESS_FILE")
    age = liveness_age(path)
    if age is None:
        click.echo(f"not alive: {path} does not exist", err=True)
        sys.exit(1)
    if age > max_age:
        click.echo(f"not alive: {path} was last touched {age:.0f} s ago", err=True)
        sys.exit(1)
    click.echo(f"alive: {path} touched {age:.1f} s ago")


@cli.command("reaper")
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

    settings = _settings()
    logs.configure(settings.log_format)
    run_reaper(settings, interval=interval, once=once, liveness_file=liveness_file)


@cli.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Finished work older than this goes: 30d, 12h, 90m or seconds.",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    show_default=True,
    help="Rows per transaction.",
)
def prune_cmd(older_than: str, dry_run: bool, batch_size: int) -> None:
    """Delete finished jobs with their images and previews, old training metrics and stale
    training state. Queued and running work, model versions and their checkpoints stay."""
    import time

    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from core.db import get_engine
    from core.runtime.settings import parse_duration
    from core.storage import make_storage
    from core.upkeep.retention import PruneReport, prune

    try:
        seconds = parse_duration(older_than)
    except ValueError as e:
        raise _fail(f"--older-than {older_than!r} is not valid: {e}") from None
    settings = _settings()
    engine = get_engine(settings)
    try:
        migrated = inspect(engine).has_table("audit_events")
    except OperationalError as e:
        raise _database_error(settings.database_url, e) from None
    if not migrated:
        raise _fail("the database is not at the code's schema; run `dq db upgrade` first")
    last_shown = time.monotonic()

    def show_progress(report: PruneReport) -> None:
        nonlocal last_shown
        if time.monotonic() - last_shown >= 2.0:
            last_shown = time.monotonic()
            click.echo(f"dq: prune: so far {report.summary()}", err=True)

    report = prune(
        engine,
        make_storage(settings),
        settings,
        seconds,
        dry_run=dry_run,
        batch_size=batch_size,
        progress=show_progress,
        actor="cli",
    )
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} (finished more than {older_than} ago):")
    rows = [
        ("jobs", report.jobs),
        ("images", report.images),
        ("previews", report.previews),
        ("metric rows", report.metric_rows),
        ("run objects", report.run_objects),
        ("work dirs", report.work_dirs),
        ("cache dirs", report.cache_dirs),
    ]
    for label, value in rows:
        click.echo(f"  {label:<12} {value:>10}")
    click.echo(f"  {'bytes':<12} {report.bytes_freed:>10}  ({report.bytes_freed / 1e6:.1f} MB)")
    for error in report.errors:
        click.echo(f"dq: warning: {error}", err=True)
    if report.error_count:
        click.echo(
            f"dq: warning: {report.error_count} item(s) could not be removed; "
            "the next prune tries again",
            err=True,
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="dq", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("dq: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"dq: error: {e.format_message()}", err=True)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        # ValueError is how core reports bad input (CheckpointError is one); the message is
        # written for users.
        click.echo(f"dq: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("dq: interrupted; a training run resumes from its last checkpoint", err=True)
        sys.exit(130)
