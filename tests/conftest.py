"""Shared fixtures: a tiny, randomly initialised pipeline that is quick to build and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.diffusion.autoencoder import Autoencoder, AutoencoderConfig
from core.diffusion.data.shapes import vocabulary
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.schedule import NoiseSchedule
from core.diffusion.text import TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.unet import UNet, UNetConfig

TINY_AE = AutoencoderConfig(channels=(8, 16), groups=4, latent_scale_factor=1.0)
TINY_TEXT = TextEncoderConfig(width=32, layers=1, heads=2, max_length=16)
TINY_UNET = UNetConfig(
    channels=(16, 32), attention_levels=(False, True), heads=2, context_width=32, groups=8
)


def make_tiny_pipeline(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    model = LatentDiffusion(
        Autoencoder(TINY_AE),
        TextEncoder(TINY_TEXT, WordTokenizer(vocabulary(), max_length=TINY_TEXT.max_length)),
        UNet(TINY_UNET),
        NoiseSchedule(),
        image_size=32,
    )
    # The UNet's last conv starts at zero; give it weights so outputs depend on the input.
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_pipeline() -> LatentDiffusion:
    return make_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline().save(d)
    return d
