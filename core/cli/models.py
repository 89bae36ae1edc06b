"""``dq model``: the operator's model versions: import a checkpoint trained elsewhere, list them,
activate one (behind the eval gate), retire one, and set or end the canary.

Every change is audited as the admin API's are (actor ``cli``), in the transaction that makes
it. No torch: a checkpoint is checked from its JSON config and its safetensors header
(``core.services.model_versions.safetensors_summary``), and a pickle is refused before anything
reads it. Every error a user can cause is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from core.cli._common import database_error, fail, load_settings

ACTOR = "cli"
# What a generation checkpoint's weights hold (LatentDiffusion.save): every part of the model.
MODEL_PARTS = ("autoencoder", "text_encoder", "unet")


@click.group()
def model() -> None:
    """Model versions: import, list, activate (eval gate), retire, canary."""


def _engine() -> Any:
    """The engine of DQ_DATABASE_URL, once it is known to hold the model_versions table."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from core.db import get_engine

    settings = load_settings()
    engine = get_engine(settings)
    try:
        migrated = inspect(engine).has_table("model_versions")
    except OperationalError as e:
        raise database_error(settings.database_url, e) from None
    if not migrated:
        raise fail("the database has no model_versions table; run `dq db upgrade` first")
    return engine


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's config and its weights' summary, checked without torch; one-line
    errors for a missing directory or file, a pickle, a malformed config or safetensors file,
    or a checkpoint that is not a whole generation model."""
    from core.services.model_versions import CheckpointFileError, safetensors_summary

    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    config_path, weights = directory / "model.json", directory / "model.safetensors"
    if not config_path.is_file():
        pickles = sorted(
            p.name
            for p in directory.iterdir()
            if p.suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
        )
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
        raise fail(f"{directory} has no model.json; it is not a diffusion-queue checkpoint{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != "diffusion-queue":
        raise fail(f"{config_path} is not a diffusion-queue checkpoint config")
    if config.get("format_version") != 1:
        raise fail(
            f"{config_path} has format version {config.get('format_version')!r}; this build "
            "reads version 1"
        )
    if config.get("kind") != "latent-diffusion":
        raise fail(
            f"{config_path} is a {config.get('kind')!r} checkpoint; serving needs a "
            "'latent-diffusion' one (autoencoder, text encoder and UNet)"
        )
    if not weights.is_file():
        raise fail(f"{directory} has no model.safetensors")
    try:
        summary = safetensors_summary(weights)
    except CheckpointFileError as e:
        raise fail(str(e)) from None
    missing = [part for part in MODEL_PARTS if part not in summary["prefixes"]]
    if missing:
        raise fail(f"{weights} holds no weights for {', '.join(missing)}")
    _check_sampling_defaults(config_path, config)
    return config, {k: summary[k] for k in ("bytes", "parameters", "tensors")}


def _check_sampling_defaults(path: Path, config: dict[str, Any]) -> None:
    """The config's defaults as the web app reads them, so that a bad one fails here, not in
    every request that names the model."""
    from core.services.jobs import SAMPLER_NAMES
    from core.services.model_versions import config_model

    try:
        serving = config_model(config)
    except (TypeError, ValueError, AttributeError) as e:
        raise fail(f"{path} has sampling defaults that cannot be read: {e}") from None
    if serving.sampler not in SAMPLER_NAMES:
        raise fail(f"{path} names the unknown sampler {serving.sampler!r} as its default")
    if serving.steps < 1 or serving.image_size < serving.size_multiple:
        raise fail(f"{path} has a default of {serving.steps} steps at {serving.image_size} px")


@model.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The version's name, as requests will name it.")
@click.option("--activate", is_flag=True, help="Serve it for default requests at once.")
@click.option("--force", is_flag=True, help="With --activate: past the eval gate.")
def model_import(directory: Path, name: str, activate: bool, force: bool) -> None:
    """Check the checkpoint in DIRECTORY (model.json + model.safetensors; pickles refused) and
    upload it to storage as version NAME."""
    from core.db import session_scope
    from core.db.models import ModelKind, ModelVersion
    from core.services.audit import record
    from core.services.model_rollout import GateBounds, active_version, gate
    from core.services.model_versions import ModelRequestError, check_version_name
    from core.services.model_versions import register_import as register
    from core.storage import make_storage

    config, checkpoint = read_checkpoint(directory)
    settings = load_settings()
    engine = _engine()
    files = {f: (directory / f).read_bytes() for f in ("model.json", "model.safetensors")}
    with session_scope(engine) as session:
        try:
            check_version_name(session, name)
        except ModelRequestError as e:
            raise fail(str(e)) from None
        if activate:  # the gate first: a refused import uploads nothing
            candidate = ModelVersion(name=name, kind=ModelKind.DENOISER, metrics={})
            result = gate(candidate, active_version(session), GateBounds.of(settings))
            if not result.passed and not force:
                raise fail(
                    f"{name} would not be activated: {'; '.join(result.findings)}; import "
                    "without --activate, or pass --force"
                )
        version = register(session, make_storage(settings), name, config, files, checkpoint)
        record(
            session,
            ACTOR,
            "model.import",
            f"model:{version.id}",
            detail={"name": name, "source": str(directory.resolve())[:150], **checkpoint},
        )
        if activate:
            _activate(session, version.id, settings, force)
        version_id, prefix = version.id, version.checkpoint_key
    state = "active" if activate else "inactive"
    click.echo(
        f"imported {name} ({checkpoint['parameters']:,} parameters) as version {version_id}, "
        f"{state}; files under {prefix}/"
    )


def _activate(session: Any, ref: Any, settings: Any, force: bool) -> Any:
    """Activate behind the gate and audit it; the version."""
    from core.services.audit import record
    from core.services.model_rollout import GateBounds, GateRefused, activate_checked
    from core.services.model_versions import ModelStateError

    try:
        version, result = activate_checked(session, ref, GateBounds.of(settings), force=force)
    except GateRefused as e:
        raise fail(f"{e} (--force)") from None
    except (LookupError, ModelStateError) as e:
        raise fail(str(e)) from None
    record(
        session,
        ACTOR,
        "model.activate",
        f"model:{version.id}",
        detail={
            "name": version.name,
            "kind": version.kind.value,
            "forced": force and not result.passed,
            "gate": result.as_dict(),
        },
    )
    for finding in result.findings:
        click.echo(f"gate: {finding}", err=True)
    return version


@model.command("list")
def model_list() -> None:
    """Versions, newest first: name, kind, state (active, canary N%, retired), created, eval,
    id; then the shipped model."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.db.models import ModelVersion

    with session_scope(_engine()) as session:
        rows = list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))
        any_active = False
        for v in rows:
            state = (
                "retired"
                if v.retired_at
                else "active"
                if v.is_active
                else f"canary {v.canary_percent}%"
                if v.canary_percent
                else "-"
            )
            any_active |= v.is_active and v.kind.value == "denoiser"
            found = (v.metrics or {}).get("eval")
            shown = "-"
            if isinstance(found, dict) and isinstance(found.get("fid"), (int, float)):
                shown = f"FID {found['fid']:.2f}"
                if isinstance(found.get("adherence"), (int, float)):
                    shown += f", adherence {found['adherence']:.1%}"
            created = v.created_at.isoformat(timespec="seconds")
            click.echo(f"{v.name}\t{v.kind.value}\t{state}\t{created}\t{shown}\t{v.id}")
        click.echo(f"shipped\tdenoiser\t{'-' if any_active else 'active'}\t-\t-\t-")


@model.command("activate")
@click.argument("name")
@click.option("--force", is_flag=True, help="Activate even when its eval regresses.")
def model_activate(name: str, force: bool) -> None:
    """Serve version NAME (a name or id) for default requests, behind the eval gate; NAME
    shipped serves the model shipped with the code again."""
    from core.db import session_scope
    from core.services.audit import record
    from core.services.model_versions import SHIPPED_MODEL_NAME, deactivate_all

    settings = load_settings()
    if name == SHIPPED_MODEL_NAME:
        with session_scope(_engine()) as session:
            deactivate_all(session)
            record(session, ACTOR, "model.activate", "model:default")
        click.echo("the shipped model is active")
        return
    with session_scope(_engine()) as session:
        version = _activate(session, name, settings, force)
        shown = version.name
    click.echo(f"{shown} is active")


@model.command("retire")
@click.argument("name")
def model_retire(name: str) -> None:
    """Retire version NAME: no new job may name it, and it can no longer be activated."""
    from core.db import session_scope
    from core.services.audit import record
    from core.services.model_versions import ModelStateError, find_version, retire_version

    with session_scope(_engine()) as session:
        try:
            version = find_version(session, name)
            changed = retire_version(session, version)
        except (LookupError, ModelStateError) as e:
            raise fail(str(e)) from None
        if changed:
            record(
                session, ACTOR, "model.retire", f"model:{version.id}", detail={"name": version.name}
            )
        shown = version.name
    click.echo(f"{shown} is retired" if changed else f"{shown} was retired already")


@model.command("canary")
@click.argument("name", required=False)
@click.option(
    "--percent",
    type=click.IntRange(0, 100),
    default=None,
    help="Share of default requests (1-100); 0 ends the canary.",
)
@click.option("--end", is_flag=True, help="End the canary: all default traffic to the active one.")
def model_canary(name: str | None, percent: int | None, end: bool) -> None:
    """Send --percent of the default requests to version NAME, or --end the canary."""
    from core.db import session_scope
    from core.services.audit import record
    from core.services.model_rollout import end_canary, set_canary
    from core.services.model_versions import ModelStateError

    if end or percent == 0:
        with session_scope(_engine()) as session:
            was = end_canary(session)
            if was is not None:
                detail = {"percent": 0, "name": was.name}
                record(session, ACTOR, "model.canary", f"model:{was.id}", detail=detail)
            shown = was.name if was is not None else None
        click.echo(f"the canary {shown} has ended" if shown else "there was no canary")
        return
    if name is None or percent is None:
        raise fail("give a version NAME and --percent 1-100, or --end")
    with session_scope(_engine()) as session:
        try:
            version = set_canary(session, name, percent)
        except (LookupError, ModelStateError) as e:
            raise fail(str(e)) from None
        assert version is not None
        detail = {"percent": percent, "name": version.name}
        record(session, ACTOR, "model.canary", f"model:{version.id}", detail=detail)
        shown = version.name
    click.echo(f"{shown} takes {percent}% of default requests")
