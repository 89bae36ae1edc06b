"""``dq train denoiser``: trains the text encoder and the UNet jointly on frozen latents.

Per step (DDPM Algorithm 1, on latents as in LDM eq. 2): encode images with the frozen
autoencoder, scale the latents, pick t ~ U{0..T−1} and ε ~ N(0, I), form
x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, drop captions at random for classifier-free guidance, and regress
the UNet's output on ε (or on v), optionally weighted by min-SNR-γ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from core.diffusion.autoencoder import Autoencoder
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.imagefolder import ImageFolderDataset
from core.diffusion.data.shapes import ShapesDataset, ShapesSample, vocabulary
from core.diffusion.pipeline import (
    LatentDiffusion,
    SamplingDefaults,
    load_autoencoder,
    pick_device,
)
from core.diffusion.sample_grid import Cell, held_out_mark, save_grid
from core.diffusion.schedule import NoiseSchedule
from core.diffusion.text import LAYOUT_WIDTH, TextConditioning, TextEncoder, WordTokenizer
from core.diffusion.training.config import DenoiserTrainConfig, config_to_dict, fit_to_data
from core.diffusion.training.datasets import build_dataset, load_samples
from core.diffusion.training.finetune import (
    adopt_base_architecture,
    finetune_record,
    freeze_text_encoder,
    load_base,
)
from core.diffusion.training.grounding import (
    grounding_losses,
    layout_loss,
    location_loss,
    sample_masks,
    word_owner_tokens,
)
from core.diffusion.training.loop import STATE_DIR, LoopResult, MetricsCallback, TrainLoop
from core.diffusion.unet import Attention, UNet

log = logging.getLogger(__name__)

PREVIEW_PROMPTS = (
    "a large red circle in the top left",
    "a small blue square in the bottom right",
    "a large yellow triangle in the center",
    "a small white circle in the top right and a large green square in the bottom left",
    # held-out pairs by default: compositional generalisation at a glance
    "a large orange square in the center",
    "a large purple triangle in the top right",
    "a large green circle in the bottom left",
    "a small orange square in the top left",
)


def save_preview(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    held_out: Sequence[Sequence[str]],
    path: Path,
    cells_per_row: int = 4,
) -> Path:
    """The prompts' images as large tiles, each prompt under its image, held-out pairs marked."""
    pairs = [f"{color} {shape}" for color, shape in held_out]
    cells = []
    for img, prompt in zip(images, prompts, strict=True):
        used = [p for p in pairs if p in prompt]
        cells.append(Cell([img], prompt, held_out_mark(used)))
    return save_grid(cells, path, cells_per_row=cells_per_row, scale=3)


class TextToLatent(nn.Module):
    """The trainable half of the model: text encoder and UNet, optimised together."""

    def __init__(self, text_encoder: TextEncoder, unet: UNet, locate: bool = False) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        # Training only (train.text_grounding): reads each object word's object center off its
        # contextual state; it is not part of the exported model. An encoder with a layout head
        # (text.layout) is grounded through that head instead, which the UNet reads.
        width = text_encoder.config.width
        self.locate = locate
        self.locator = nn.Linear(width, 2) if locate and not text_encoder.config.layout else None

    def grounding_loss(
        self, cond: TextConditioning, owners: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Text-side grounding (train.text_grounding) of the states in ``cond``."""
        width = self.text_encoder.config.width
        if self.locator is not None:
            return location_loss(self.locator(cond.states[..., :width]), owners, masks)
        layout = cond.states[..., -LAYOUT_WIDTH:]
        return layout_loss(layout, owners, masks, cond.mask)


def pretrain_text_encoder(
    model: TextToLatent, cfg: DenoiserTrainConfig, progress: bool = False, batch_size: int = 64
) -> float:
    """A short first stage on text-side grounding alone: the text encoder and its locator learn
    to give every object word its object's center, on two-object captions, before the UNet
    trains. Joint training from scratch does not find this (docs/MODEL.md); alone, the encoder
    does in a few hundred steps. Returns the last batch's loss."""
    if not model.locate:
        raise ValueError("train.text_pretrain_steps needs train.text_grounding > 0")
    data = ShapesDataset(
        seed=cfg.data.seed + 7919,  # a stream apart from the denoiser's own batches
        held_out=[(str(c), str(s)) for c, s in cfg.data.held_out],
        image_size=cfg.data.image_size,
        two_object_share=1.0,
    )
    params = [*model.text_encoder.parameters()]
    if model.locator is not None:
        params += model.locator.parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    loss = torch.zeros(())
    steps = cfg.train.text_pretrain_steps
    for step in tqdm(range(steps), desc="text encoder", disable=not progress, unit="step"):
        samples = [data[step * batch_size + i] for i in range(batch_size)]
        cond = model.text_encoder.encode([s.caption for s in samples])
        owners = word_owner_tokens(samples, [True] * len(samples), cond.mask.shape[1])
        loss = model.grounding_loss(cond, owners, sample_masks(samples))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.item())


def diffusion_loss(
    unet: UNet,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    generator: torch.Generator,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """‖target − f_θ(x_t, t, c)‖², target ε or v, optionally weighted by min-SNR-γ."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.q_sample(x0, t, eps)
    pred = unet(x_t, t, context, context_mask)
    target = eps if schedule.config.prediction == "epsilon" else schedule.v_target(x0, t, eps)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:
        # Hang et al. 2023, eq. 10: w_t = min(SNR_t, γ)/SNR_t for ε, /(SNR_t + 1) for v.
        snr = schedule.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        w = clipped / snr if schedule.config.prediction == "epsilon" else clipped / (snr + 1)
        per_sample = per_sample * w
    return per_sample.mean()


def dataset_captions(cfg: DenoiserTrainConfig, dataset: object) -> list[str]:
    """Every word the data's captions can hold, without loading an image: the shapes'
    closed vocabulary, or an image folder's captions."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset.captions
    return vocabulary()


def build_tokenizer(cfg: DenoiserTrainConfig) -> WordTokenizer:
    if cfg.data.kind == "shapes":
        return WordTokenizer(vocabulary(), max_length=cfg.text.max_length)
    folder = ImageFolderDataset(cfg.data.path, image_size=cfg.data.image_size)
    return WordTokenizer.from_corpus(folder.captions, max_length=cfg.text.max_length)


def train_denoiser(
    cfg: DenoiserTrainConfig,
    autoencoder_dir: str | Path | None,
    out_dir: str | Path,
    resume: bool = True,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    pause_requested: Callable[[], bool] | None = None,
    base_dir: str | Path | None = None,
) -> tuple[LoopResult, dict[str, Any]]:
    """Trains from scratch on ``autoencoder_dir``'s latents or, with ``base_dir`` (and
    ``cfg.finetune.base`` naming it), fine-tunes that model (:mod:`.finetune`)."""
    device = device or pick_device()
    if (base_dir is None) != (not cfg.finetune.base):
        raise ValueError("finetune.base names the base model and base_dir is its checkpoint")
    if base_dir is not None and autoencoder_dir is not None:
        raise ValueError("a fine-tune uses its base's autoencoder; pass no autoencoder_dir")
    if base_dir is not None:
        cfg = adopt_base_architecture(cfg, base_dir)
    cfg, turned_off = fit_to_data(cfg)
    if turned_off:
        log.warning(
            "training on %s data%s without %s",
            cfg.data.kind,
            f" from {cfg.finetune.base!r}" if cfg.finetune.base else "",
            ", ".join(turned_off),
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if cfg.unet.context_width != cfg.text.width:
        raise ValueError("unet.context_width must equal text.width")
    if cfg.unet.lexical_values != cfg.text.lexical:
        raise ValueError("unet.lexical_values and text.lexical must be set together")
    if cfg.unet.layout_bias != cfg.text.layout:
        raise ValueError("unet.layout_bias and text.layout must be set together")
    if cfg.text.layout and not cfg.train.text_grounding > 0 and base_dir is None:
        raise ValueError("text.layout needs train.text_grounding > 0 to train its layout head")
    ae_source = base_dir if base_dir is not None else autoencoder_dir
    if ae_source is None:
        raise ValueError("training from scratch needs an autoencoder checkpoint")
    ae: Autoencoder = load_autoencoder(ae_source, device).requires_grad_(False)
    scale = ae.config.latent_scale_factor
    if cfg.unet.in_channels != ae.config.latent_channels:
        raise ValueError(
            f"unet.in_channels is {cfg.unet.in_channels} but the autoencoder makes "
            f"{ae.config.latent_channels}-channel latents"
        )
    locate = cfg.train.text_grounding > 0
    dataset = build_dataset(cfg.data)
    defaults: SamplingDefaults | None = None
    no_decay: list[nn.Parameter] = []
    added: list[str] = []
    if base_dir is None:
        tokenizer = build_tokenizer(cfg)
        model = TextToLatent(TextEncoder(cfg.text, tokenizer), UNet(cfg.unet), locate)
    else:
        base, added = load_base(base_dir, cfg, dataset_captions(cfg, dataset))
        tokenizer, defaults = base.text_encoder.tokenizer, base.defaults
        model = TextToLatent(base.text_encoder, base.unet, locate)
        if cfg.finetune.freeze_text_encoder:
            no_decay = freeze_text_encoder(model.text_encoder, len(tokenizer) - len(added))
        if added:
            log.info("new words for %r: %s", cfg.finetune.base, ", ".join(added))
    model = model.to(device)
    schedule = NoiseSchedule(cfg.schedule)
    out = Path(out_dir)

    attention = cfg.train.grounding_token > 0 or cfg.train.grounding_spatial > 0
    grounding = attention or locate  # only ever on shapes data (fit_to_data)

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float], int]:
        samples = load_samples(dataset, cfg.data.seed, step, cfg.train.batch_size)
        images = images_to_tensor([s.image for s in samples])
        captions = [s.caption for s in samples]
        with torch.no_grad():
            x0 = ae.encode(images.to(device)).sample(gen) * scale
        drop = torch.rand(len(captions), generator=gen) < cfg.train.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        cond = model.text_encoder.encode(captions)
        recording: AbstractContextManager[list[Attention]] = (
            model.unet.recording_cross_attention() if attention else nullcontext([])
        )
        with recording as layers:
            loss = diffusion_loss(
                model.unet, schedule, x0, cond.states, cond.mask, gen, cfg.train.min_snr_gamma
            )
            maps = [layer.probs for layer in layers if layer.probs is not None]
        if not grounding:
            return loss, {}, len(captions)
        shapes = [s for s in samples if isinstance(s, ShapesSample)]
        if len(shapes) != len(samples):
            raise TypeError("the grounding losses need every sample to be a ShapesSample")
        owners = word_owner_tokens(shapes, [not d for d in drop.tolist()], cond.mask.shape[1])
        masks = sample_masks(shapes)
        total = loss
        metrics = {"diffusion_loss": loss.item()}
        if attention:
            terms = grounding_losses(maps, masks, owners)
            total = (
                total
                + cfg.train.grounding_token * terms["token"]
                + cfg.train.grounding_spatial * terms["spatial"]
            )
            metrics |= {
                "ground_token": terms["token"].item(),
                "ground_spatial": terms["spatial"].item(),
            }
        if model.locate:
            located = model.grounding_loss(cond, owners, masks)
            total = total + cfg.train.text_grounding * located
            metrics["text_grounding"] = located.item()
        return total, metrics, len(captions)

    def pipeline(ema: nn.Module) -> LatentDiffusion:
        assert isinstance(ema, TextToLatent)
        return LatentDiffusion(
            ae,
            ema.text_encoder,
            ema.unet,
            schedule,
            image_size=cfg.data.image_size,
            defaults=defaults,
        )

    def export(ema: nn.Module, step: int) -> None:
        pipeline(ema).save(out, {"training": {"step": step, "config": config_to_dict(cfg)}})

    fresh = not resume or not (out / STATE_DIR / "model.json").exists()
    if cfg.train.text_pretrain_steps > 0 and fresh:
        pretrain_text_encoder(model, cfg, progress)

    fingerprint = {"kind": "denoiser", "config": config_to_dict(cfg), "vocab": tokenizer.vocab}
    loop = TrainLoop(
        model,
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
        no_decay=no_decay,
    )
    result = loop.run(resume=resume)

    final = pipeline(loop.ema.module).eval()
    images = final.generate(list(PREVIEW_PROMPTS), seeds=list(range(len(PREVIEW_PROMPTS))))
    save_preview(images, list(PREVIEW_PROMPTS), cfg.data.held_out, out / "samples.png")
    summary = {
        "steps": loop.step,
        "train_seconds": round(result.elapsed_s, 1),
        "turned_off_without_masks": turned_off,
        **({"finetune": finetune_record(cfg, added)} if base_dir is not None else {}),
        "parameters": {
            "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
            "unet": sum(p.numel() for p in model.unet.parameters()),
        },
    }
    final.save(out, {"training": {"config": config_to_dict(cfg), **summary}})
    return result, summary
