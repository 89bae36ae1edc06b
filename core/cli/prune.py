"""``dq prune``: delete finished work older than a given age, with its images and previews."""

from __future__ import annotations

import click

from core.cli._common import database_error, fail, load_settings


@click.command("prune")
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
        raise fail(f"--older-than {older_than!r} is not valid: {e}") from None
    settings = load_settings()
    engine = get_engine(settings)
    try:
        migrated = inspect(engine).has_table("audit_events")
    except OperationalError as e:
        raise database_error(settings.database_url, e) from None
    if not migrated:
        raise fail("the database is not at the code's schema; run `dq db upgrade` first")
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
