"""``dq train``: the autoencoder, then the denoiser (text encoder + UNet), and the attribute
classifier that ``dq eval`` judges with; the options they share."""

from __future__ import annotations

from typing import Any

import click

from core.cli._common import fail, torch_device


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
        device=torch_device(kw["device"]),
    )
    click.echo(
        f"model saved to {kw['out']}: {summary['steps']} steps; samples in {kw['out']}/samples.png"
    )


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
