"""The quick eval that ends an autoencoder run: reconstruction FID and PSNR on the run's own data,
which tell a trained autoencoder from an untrained one of the same shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from core.diffusion.autoencoder import Autoencoder
from core.diffusion.checkpoint import read_config
from core.diffusion.data.shapes import ShapesDataset
from core.diffusion.eval.quick import autoencoder_eval_images, autoencoder_quick_eval
from core.diffusion.pipeline import load_autoencoder, save_autoencoder
from core.diffusion.training.config import DataConfig
from core.services.model_versions import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def shipped_size() -> int:
    return int(read_config(DEFAULT_MODEL_DIR)["image_size"])


def red_folder(root: Path, count: int) -> Path:
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"red {i}\n")
    return root


def test_a_trained_autoencoder_reconstructs_far_better_than_an_untrained_one(
    tmp_path: Path, shipped_size: int
) -> None:
    data = DataConfig(image_size=shipped_size, seed=3)
    shipped = autoencoder_quick_eval(DEFAULT_MODEL_DIR, data, n=24)  # a whole model's checkpoint
    torch.manual_seed(0)
    untrained = Autoencoder(load_autoencoder(DEFAULT_MODEL_DIR).config)
    save_autoencoder(tmp_path / "untrained", untrained)
    fresh = autoencoder_quick_eval(tmp_path / "untrained", data, n=24)
    assert shipped["kind"] == fresh["kind"] == "reconstruction"
    assert shipped["n"] == shipped["real_n"] == 24
    assert shipped["reference"] == "shapes held-out split, seed 3"
    assert shipped["adherence"] is None and shipped["floor"] is None
    assert shipped["psnr_db"] > fresh["psnr_db"] + 10  # the shipped one is above 30 dB
    assert 0 <= shipped["fid"] < fresh["fid"] / 5


def test_the_images_are_the_held_out_split_or_the_folders_last(
    tmp_path: Path, shipped_size: int
) -> None:
    data = DataConfig(image_size=shipped_size, seed=5)
    images, label = autoencoder_eval_images(data, 4)
    held_out = ShapesDataset(seed=5, split="held_out", image_size=shipped_size)
    first = torch.from_numpy(held_out[0].image).permute(2, 0, 1).float() / 127.5 - 1
    assert images.shape == (4, 3, shipped_size, shipped_size) and torch.equal(images[0], first)
    assert label == "shapes held-out split, seed 5"

    folder = DataConfig(kind="imagefolder", path=str(red_folder(tmp_path, 5)), image_size=32)
    images, label = autoencoder_eval_images(folder, 3, "s3://bucket/reds")
    assert label == "image folder s3://bucket/reds (its last 3 of 5 images, seen in training)"
    assert images.shape == (3, 3, 32, 32)
    reds = sorted(round((float(x[0, 0, 0]) + 1) * 127.5) for x in images)
    assert reds == [80, 120, 160]  # the folder's images 2, 3 and 4


def test_too_few_images_is_a_clear_error(tmp_path: Path) -> None:
    folder = DataConfig(kind="imagefolder", path=str(red_folder(tmp_path, 1)), image_size=32)
    with pytest.raises(ValueError, match="at least 2 images"):
        autoencoder_quick_eval(DEFAULT_MODEL_DIR, folder, n=4)
    with pytest.raises(ValueError, match="n ≥ 2"):
        autoencoder_quick_eval(DEFAULT_MODEL_DIR, DataConfig(), n=1)
