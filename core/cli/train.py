"""``dq train``: the autoencoder, then the denoiser (text encoder + UNet), and the attribute
classifier that ``dq eval`` judges with; the options they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from core.cli._common import (
    DEFAULT_CHECKPOINT,
    database_error,
    fail,
    load_settings,
    torch_device,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@click.group()
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
        device=torch_device(kw["device"]),
    )
    click.echo(
        f"autoencoder saved to {kw['out']}: {summary['steps']} steps, "
        f"held-out PSNR {summary['heldout_psnr_db']:.2f} dB, "
        f"latent scale factor {summary['latent_scale_factor']:.4f}"
    )


@train.command("denoiser")
@_train_options
@click.option(
    "--autoencoder", type=click.Path(), default=None, help="A trained autoencoder checkpoint."
)
@click.option(
    "--base",
    default=None,
    help="Fine-tune this model instead of training from scratch: shipped (or default: the "
    "shipped model), a model checkpoint directory, or a denoiser version's name (read from "
    "DQ_DATABASE_URL, its files from DQ_STORAGE_URL). Its config defaults to "
    "configs/finetune.toml.",
)
@click.option("--freeze-text-encoder", is_flag=True, help="With --base: train the UNet alone.")
@click.option(
    "--init-word",
    "init_words",
    multiple=True,
    metavar="WORD=BASE WORDS",
    help="With --base: a new caption word's embedding starts at the mean of these base words, "
    'e.g. --init-word "pink=red purple white".',
)
def train_denoiser_cmd(**kw: Any) -> None:
    """Train the text encoder and UNet on the autoencoder's latents, or fine-tune a model."""
    from core.diffusion.training.config import DenoiserTrainConfig, fit_to_data, load_config
    from core.diffusion.training.denoiser import train_denoiser

    overrides = _overrides(kw)
    base_dir = None
    if kw["base"] is None:
        if kw["freeze_text_encoder"] or kw["init_words"]:
            raise fail("--freeze-text-encoder and --init-word need --base")
        if kw["autoencoder"] is None:
            raise fail("pass --autoencoder DIR, or --base default to fine-tune the shipped model")
    else:
        if kw["autoencoder"] is not None:
            raise fail("a fine-tune uses its base's autoencoder; drop --autoencoder")
        base_dir = _base_checkpoint(kw["base"])
        init_words = {}
        for item in kw["init_words"]:
            word, sep, words = item.partition("=")
            if not sep or not word.strip() or not words.split():
                raise fail(
                    f'--init-word takes WORD=BASE WORDS, e.g. "pink=red purple"; not {item!r}'
                )
            init_words[word.strip()] = words
        overrides["finetune"] = {
            "base": kw["base"],
            "freeze_text_encoder": kw["freeze_text_encoder"],
            "init_words": init_words,
        }
        if kw["config_path"] is None:
            kw["config_path"] = CONFIG_DIR / "finetune.toml"
    cfg = load_config(DenoiserTrainConfig, kw["config_path"], overrides)
    _, off = fit_to_data(cfg)
    if off and base_dir is not None:
        click.echo(
            f"note: fine-tuning {kw['base']} on {cfg.data.kind} data without {', '.join(off)}"
        )
    elif off:
        click.echo(
            f"note: {cfg.data.kind} data has no object masks; training without {', '.join(off)}"
        )
    _, summary = train_denoiser(
        cfg,
        kw["autoencoder"],
        kw["out"],
        resume=not kw["no_resume"],
        progress=not kw["quiet"],
        device=torch_device(kw["device"]),
        base_dir=base_dir,
    )
    tuned = summary.get("finetune")
    if tuned and tuned["new_words"]:
        click.echo(f"new words learned: {', '.join(tuned['new_words'])}")
    click.echo(
        f"model saved to {kw['out']}: {summary['steps']} steps; samples in {kw['out']}/samples.png"
    )


def _base_checkpoint(base: str) -> Path:
    """The directory a fine-tune starts from: the shipped model, a checkpoint directory, or a
    denoiser version by name, fetched from object storage into DQ_MODEL_CACHE_DIR (once)."""
    if base in ("default", "shipped"):
        return DEFAULT_CHECKPOINT
    if (Path(base) / "model.json").is_file():
        return Path(base)
    not_a_directory = f"--base {base} is neither default nor a model checkpoint directory"
    if Path(base).exists() or "/" in base:
        raise fail(not_a_directory)
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from core.db import get_engine
    from core.runtime.settings import sqlite_path
    from core.services.training_runs import TrainingRequestError, resolve_base
    from core.storage import StorageError, make_storage
    from core.storage.checkpoints import fetch_checkpoint

    settings = load_settings()
    path = sqlite_path(settings.database_url)
    if path is not None and not path.is_file():  # no database here: do not make one
        raise fail(
            f"{not_a_directory}, and there is no database at {path} (DQ_DATABASE_URL) to find "
            "a version of that name in"
        )
    try:
        with Session(get_engine(settings)) as session:
            version, _ = resolve_base(session, base)
    except TrainingRequestError as e:
        raise fail(f"{not_a_directory}, and as a version: {e.message}") from None
    except SQLAlchemyError as e:
        reason = database_error(settings.database_url, e).message
        raise fail(
            f"{not_a_directory}, and no version of that name could be read: {reason}"
        ) from None
    assert version is not None  # only "default" and "shipped" resolve to none
    try:
        return fetch_checkpoint(
            make_storage(settings),
            version.checkpoint_key,
            Path(settings.model_cache_dir) / str(version.id),
        )
    except StorageError as e:
        raise fail(f"--base {base}: its checkpoint cannot be read from storage: {e}") from None


@train.command("classifier")
@_train_options
def train_classifier_cmd(**kw: Any) -> None:
    """Train the attribute classifier that `dq eval` judges and computes FID with."""
    if kw["data_path"]:
        raise fail("the classifier trains on the shapes dataset only; --data is not supported")
    from core.diffusion.eval.train_classifier import load_classifier_config, train_classifier

    cfg = load_classifier_config(kw["config_path"], _overrides(kw))
    _, summary = train_classifier(
        cfg,
        kw["out"],
        resume=not kw["no_resume"],
        progress=not kw["quiet"],
        device=torch_device(kw["device"]),
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
