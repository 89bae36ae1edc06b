"""``dq train autoencoder``: trains the autoencoder on images alone (captions are ignored)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.diffusion.autoencoder import Autoencoder, compute_latent_scale, psnr
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.pipeline import pick_device, save_autoencoder
from core.diffusion.training.config import AutoencoderTrainConfig, DataConfig, config_to_dict
from core.diffusion.training.datasets import build_dataset, load_batch
from core.diffusion.training.loop import LoopResult, MetricsCallback, TrainLoop

SCALE_SAMPLES = 256  # images used to measure the latent scale factor
EVAL_SAMPLES = 256  # held-out images for the reconstruction PSNR


def held_out_set(data: DataConfig, n: int) -> tuple[torch.Tensor, int]:
    """Images the autoencoder never trained on: the held-out split of shapes (another seed for
    an image folder is not possible, so there it is the folder's last images, at most ``n``);
    and how many images the dataset they come from holds."""
    if data.kind == "shapes":
        ds = build_dataset(data, split="held_out")
        return images_to_tensor([ds[i].image for i in range(n)]), len(ds)
    ds = build_dataset(data)
    return images_to_tensor([ds[i].image for i in range(max(len(ds) - n, 0), len(ds))]), len(ds)


def held_out_images(cfg: AutoencoderTrainConfig, n: int) -> torch.Tensor:
    """:func:`held_out_set`'s images for a run's data."""
    return held_out_set(cfg.data, n)[0]


@torch.no_grad()
def reconstruct(ae: Autoencoder, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """decode(mean of encode(x)) of each image, on the CPU."""
    device = next(ae.parameters()).device
    return torch.cat(
        [
            ae.decode(ae.encode(images[i : i + batch].to(device)).mean).cpu()
            for i in range(0, len(images), batch)
        ]
    )


def reconstruction_psnr(ae: Autoencoder, images: torch.Tensor, batch: int = 64) -> float:
    """PSNR of decode(mean of encode(x)) against x, over all images together."""
    return psnr(reconstruct(ae, images, batch), images)


def train_autoencoder(
    cfg: AutoencoderTrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    pause_requested: Callable[[], bool] | None = None,
) -> tuple[LoopResult, dict[str, Any]]:
    """Trains, then measures the latent scale factor and the held-out PSNR, and saves
    ``out_dir/model.{safetensors,json}`` (EMA weights). Returns the loop result and the summary."""
    device = device or pick_device()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    ae = Autoencoder(cfg.model).to(device)
    dataset = build_dataset(cfg.data)
    out = Path(out_dir)

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float], int]:
        images, _captions = load_batch(dataset, cfg.data.seed, step, cfg.train.batch_size)
        loss, parts = ae.loss(images.to(device), gen)
        return loss, parts, images.shape[0]

    def export(ema: nn.Module, step: int) -> None:
        assert isinstance(ema, Autoencoder)
        save_autoencoder(out, ema, {"training": {"step": step, "config": config_to_dict(cfg)}})

    fingerprint = {"kind": "autoencoder", "config": config_to_dict(cfg)}
    loop = TrainLoop(
        ae,
        cfg.train,
        out,
        step_fn,
        export,
        fingerprint,
        on_metrics,
        progress,
        device,
        on_checkpoint=on_checkpoint,
        pause_requested=pause_requested,
    )
    result = loop.run(resume=resume)

    # The latent scale factor: 1/std of latents over training images, stored in the checkpoint.
    ema = loop.ema.module
    assert isinstance(ema, Autoencoder)
    train_images, _ = load_batch(dataset, cfg.data.seed + 1, 0, SCALE_SAMPLES)
    scale = compute_latent_scale(ema, train_images.to(device))
    final = Autoencoder(dataclasses.replace(cfg.model, latent_scale_factor=scale))
    final.load_state_dict(ema.state_dict())
    heldout_psnr = reconstruction_psnr(final.to(device), held_out_images(cfg, EVAL_SAMPLES))
    summary = {
        "steps": loop.step,
        "train_seconds": round(result.elapsed_s, 1),
        "latent_scale_factor": scale,
        "heldout_psnr_db": heldout_psnr,
        "parameters": sum(p.numel() for p in final.parameters()),
    }
    save_autoencoder(out, final, {"training": {"config": config_to_dict(cfg), **summary}})
    return result, summary
