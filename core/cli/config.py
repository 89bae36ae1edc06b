"""``dq config``: the effective DQ_* settings, or the reference table of every setting."""

from __future__ import annotations

import click


@click.command("config")
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
