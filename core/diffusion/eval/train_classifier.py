"""``dq train classifier``: trains the attribute classifier on the shapes data, all pairs.

The same loop as the autoencoder and the denoiser (AdamW, warm-up and cosine decay, EMA,
resumable checkpoints in ``OUT/train_state/``). Each step renders a fresh batch of the ``all``
split, held-out pairs included, and adds a little Gaussian noise to some images so that the
judge reads a generated image's slightly imperfect pixels as it reads clean ones. At the end the
EMA weights are scored on images of another seed, per attribute, and the scores are saved in
the checkpoint's JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.shapes import ShapesDataset
from core.diffusion.eval.classifier import (
    AttributeClassifier,
    ClassifierConfig,
    Scene,
    attribute_accuracy,
    classifier_loss,
    flops_per_image,
    scene_targets,
)
from core.diffusion.pipeline import pick_device
from core.diffusion.training.config import DataConfig, LoopConfig, load_config
from core.diffusion.training.datasets import batch_indices
from core.diffusion.training.loop import LoopResult, MetricsCallback, TrainLoop

ACCURACY_SAMPLES = 2000  # images of another seed, "all" split, scored after training
ACCURACY_HELD_OUT_SAMPLES = 1000  # images whose objects use a held-out pair


@dataclass
class AugmentConfig:
    noise_probability: float = 0.5  # share of images that get noise
    noise_std: float = 0.05  # their noise σ is drawn from U(0, noise_std), images in [−1, 1]

    def validate(self) -> None:
        if not 0 <= self.noise_probability <= 1 or self.noise_std < 0:
            raise ValueError("augment.noise_probability must be in [0, 1], augment.noise_std ≥ 0")


@dataclass
class ClassifierTrainConfig:
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            steps=600, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.995, threads=2
        )
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(seed=2))
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def load_classifier_config(
    path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None
) -> ClassifierTrainConfig:
    # load_config reads any dataclass of tables; its annotation names only the two it was
    # written for.
    cfg = cast(
        ClassifierTrainConfig, load_config(cast(Any, ClassifierTrainConfig), path, overrides)
    )
    if cfg.data.kind != "shapes":
        raise ValueError("the classifier trains on the shapes dataset only (data.kind = 'shapes')")
    if cfg.data.image_size != cfg.model.image_size:
        raise ValueError("data.image_size must equal model.image_size")
    cfg.augment.validate()
    return cfg


def training_dataset(cfg: ClassifierTrainConfig, seed: int, split: str = "all") -> ShapesDataset:
    return ShapesDataset(
        seed=seed,
        split=split,
        held_out=tuple((str(c), str(s)) for c, s in cfg.data.held_out),
        image_size=cfg.data.image_size,
        max_objects=cfg.data.max_objects,
        paraphrase=False,
    )


def labelled_batch(dataset: ShapesDataset, indices: list[int]) -> tuple[torch.Tensor, list[Scene]]:
    """Images (B, 3, H, W) in [−1, 1] and their scenes."""
    samples = [dataset[i] for i in indices]
    images = images_to_tensor([s.image for s in samples])
    return images, [Scene.of(s.objects, s.background) for s in samples]


def add_noise(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    chosen = torch.rand(b, generator=generator) < cfg.noise_probability
    std = torch.rand(b, generator=generator) * cfg.noise_std * chosen
    noise = torch.randn(images.shape, generator=generator)
    return images + std.view(b, 1, 1, 1) * noise


def score(
    classifier: AttributeClassifier, dataset: ShapesDataset, n: int, batch: int = 250
) -> dict[str, float]:
    """Per-attribute accuracy on the first ``n`` images of ``dataset``."""
    read: list[Scene] = []
    truth: list[Scene] = []
    for start in range(0, n, batch):
        images, scenes = labelled_batch(dataset, list(range(start, min(start + batch, n))))
        read += classifier.read(images)
        truth += scenes
    return attribute_accuracy(read, truth)


def train_classifier(
    cfg: ClassifierTrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> tuple[LoopResult, dict[str, Any]]:
    """Trains, scores the EMA weights on another seed, and saves ``out_dir/model.*``."""
    device = device or pick_device()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = AttributeClassifier(cfg.model).to(device)
    dataset = training_dataset(cfg, cfg.data.seed)
    out = Path(out_dir)
    config_dict = dataclasses.asdict(cfg)

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float], int]:
        indices = batch_indices(len(dataset), cfg.data.seed, step, cfg.train.batch_size)
        images, scenes = labelled_batch(dataset, indices)
        images = add_noise(images, cfg.augment, gen)
        targets = {k: v.to(device) for k, v in scene_targets(scenes).items()}
        loss, parts = classifier_loss(model(images.to(device)), targets)
        return loss, parts, len(indices)

    def export(ema: nn.Module, step: int) -> None:
        assert isinstance(ema, AttributeClassifier)
        ema.save(out, {"training": {"step": step, "config": config_dict}})

    fingerprint = {"kind": "classifier", "config": config_dict}
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
    )
    result = loop.run(resume=resume)

    final = loop.ema.module
    assert isinstance(final, AttributeClassifier)
    final.eval()
    check_seed = cfg.data.seed + 1
    accuracy = score(final, training_dataset(cfg, check_seed), ACCURACY_SAMPLES)
    accuracy_held_out = score(
        final, training_dataset(cfg, check_seed, "held_out"), ACCURACY_HELD_OUT_SAMPLES
    )
    summary = {
        "steps": loop.step,
        "train_seconds": round(result.elapsed_s, 1),
        "parameters": final.num_parameters(),
        "flops_per_image": flops_per_image(cfg.model),
        "accuracy": {
            "seed": check_seed,
            "all_pairs": {"images": ACCURACY_SAMPLES, **_rounded(accuracy)},
            "held_out_pairs": {"images": ACCURACY_HELD_OUT_SAMPLES, **_rounded(accuracy_held_out)},
        },
    }
    final.save(out, {"training": {"config": config_dict, **summary}})
    return result, summary


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: float(np.round(v, 5)) for k, v in d.items()}
