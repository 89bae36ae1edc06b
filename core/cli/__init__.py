"""The ``dq`` command: one module per command group, registered on the ``cli`` group here.

- ``generate``: ``dq generate``; ``train``: ``dq train autoencoder|denoiser|classifier``;
  ``eval``: ``dq eval``;
- ``db``: ``dq db upgrade|current``; ``tokens``: ``dq token create|list|revoke|weight``;
  ``models``: ``dq model import|list|activate|retire|canary``;
  ``config``: ``dq config``; ``prune``: ``dq prune``;
- ``processes``: ``dq web``, ``dq worker``, ``dq worker-alive``, ``dq reaper`` and ``dq serve``,
  whose child processes ``supervisor`` starts and watches;
- ``_common``: what several commands share (the usage error, the settings, the checkpoint).

As the top of ``core``, this package may import every other part of it. Heavy imports (torch,
the model) happen inside the commands that need them, and the web app and the workers are
started as processes, by command, so ``dq --help`` and the service commands start fast and
``import core.cli`` loads neither torch, Flask nor Celery. Every error a user can cause ends in
one line on stderr and exit status 2, never a traceback.

The command modules import ``_common`` (and ``processes`` imports ``db``), never this package.
"""

from __future__ import annotations

import sys

import click

from core.cli._common import DEFAULT_CHECKPOINT, resolve_checkpoint
from core.cli.config import config_cmd
from core.cli.db import db
from core.cli.eval import eval_cmd
from core.cli.generate import generate
from core.cli.models import model
from core.cli.processes import reaper_cmd, serve_cmd, web_cmd, worker_alive_cmd, worker_cmd
from core.cli.prune import prune_cmd
from core.cli.tokens import token
from core.cli.train import train

__all__ = ["DEFAULT_CHECKPOINT", "cli", "main", "resolve_checkpoint"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-queue")
def cli() -> None:
    """diffusion-queue: text-to-image generation with our own latent diffusion model."""


for command in (
    generate,
    train,
    eval_cmd,
    config_cmd,
    db,
    token,
    model,
    web_cmd,
    serve_cmd,
    worker_cmd,
    worker_alive_cmd,
    reaper_cmd,
    prune_cmd,
):
    cli.add_command(command)


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
