"""Training: the models learn (loss falls, PSNR rises), and an interrupted run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.diffusion.autoencoder import AutoencoderConfig
from core.diffusion.checkpoint import CheckpointError
from core.diffusion.pipeline import LatentDiffusion, load_autoencoder
from core.diffusion.training.autoencoder import reconstruction_psnr, train_autoencoder
from core.diffusion.training.config import (
    AutoencoderTrainConfig,
    DataConfig,
    DenoiserTrainConfig,
    LoopConfig,
    load_config,
)
from core.diffusion.training.datasets import build_dataset
from core.diffusion.training.denoiser import train_denoiser
from core.diffusion.training.loop import lr_at
from tests.conftest import TINY_AE, TINY_TEXT, TINY_UNET

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def tiny_ae_config(steps: int, **train: object) -> AutoencoderTrainConfig:
    settings: dict[str, object] = {
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 5,
        "weight_decay": 0.0,
        "ema_decay": 0.9,
        "checkpoint_every": 1000,
        **train,
    }
    loop = LoopConfig(steps=steps, **settings)  # type: ignore[arg-type]
    return AutoencoderTrainConfig(
        train=loop,
        data=DataConfig(image_size=32, max_objects=1),
        model=AutoencoderConfig(channels=TINY_AE.channels, groups=TINY_AE.groups),
    )


@pytest.fixture(scope="module")
def trained_tiny_autoencoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ae")
    _, summary = train_autoencoder(tiny_ae_config(120), out, progress=False, device=CPU)
    return out, summary


@pytest.mark.slow
def test_autoencoder_training_raises_reconstruction_psnr(
    trained_tiny_autoencoder: tuple[Path, dict],
) -> None:
    out, summary = trained_tiny_autoencoder
    cfg = tiny_ae_config(1)
    torch.manual_seed(0)
    from core.diffusion.autoencoder import Autoencoder
    from core.diffusion.training.autoencoder import held_out_images

    images = held_out_images(cfg, 64)
    untrained = reconstruction_psnr(Autoencoder(cfg.model), images)
    trained = reconstruction_psnr(load_autoencoder(out), images)
    assert trained > untrained + 6.0, (untrained, trained)
    assert summary["heldout_psnr_db"] == pytest.approx(
        reconstruction_psnr(load_autoencoder(out), held_out_images(cfg, 256)), abs=1e-4
    )
    # the scale factor is measured from data and stored in the checkpoint
    stored = json.loads((out / "model.json").read_text())["autoencoder"]["latent_scale_factor"]
    assert stored == summary["latent_scale_factor"] != 1.0


@pytest.mark.slow
def test_denoiser_overfits_a_tiny_set_loss_falls_five_fold(
    trained_tiny_autoencoder: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ae_dir, _ = trained_tiny_autoencoder
    losses: list[float] = []
    # Overfit: a dataset of 4 images repeated, so the model can memorise it.
    cfg = DenoiserTrainConfig(
        train=LoopConfig(
            steps=250,
            batch_size=16,
            lr=2e-3,
            warmup_steps=10,
            ema_decay=0.9,
            checkpoint_every=1000,
            caption_dropout=0.0,
        ),
        data=DataConfig(image_size=32, max_objects=1),
        text=TINY_TEXT,
        unet=TINY_UNET,
    )
    import core.diffusion.training.denoiser as den

    tiny = _RepeatingDataset(build_dataset(cfg.data), 4)
    monkeypatch.setattr(den, "build_dataset", lambda *_a, **_k: tiny)
    train_denoiser(
        cfg,
        ae_dir,
        tmp_path,
        progress=False,
        device=CPU,
        on_metrics=lambda m: losses.append(m["loss"]),
    )
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first / last >= 5.0, (first, last)
    assert (tmp_path / "samples.png").is_file()
    model = LatentDiffusion.load(tmp_path, device="cpu")
    assert len(model.generate(["a large red circle in the top left"], seeds=[0], steps=3)) == 1


class _RepeatingDataset:
    def __init__(self, base, n: int) -> None:  # type: ignore[no-untyped-def]
        self.items = [base[i] for i in range(n)]

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.items[i % len(self.items)]


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_autoencoder(tiny_ae_config(12, checkpoint_every=6), straight, progress=False, device=CPU)
    _run_with_stop(split, stop_after=6)
    result, _ = train_autoencoder(
        tiny_ae_config(12, checkpoint_every=6), split, progress=False, device=CPU
    )
    assert result.resumed_from == 6 and result.steps_done == 6
    a, b = load_autoencoder(straight), load_autoencoder(split)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))


def test_resume_refuses_a_state_trained_under_another_config(tmp_path: Path) -> None:
    train_autoencoder(tiny_ae_config(2), tmp_path, progress=False, device=CPU)
    other = tiny_ae_config(2)
    other.train.lr = 1e-2
    with pytest.raises(CheckpointError, match="different configuration"):
        train_autoencoder(other, tmp_path, progress=False, device=CPU)
    # --no-resume starts over instead
    result, _ = train_autoencoder(other, tmp_path, resume=False, progress=False, device=CPU)
    assert result.resumed_from == 0 and result.steps_done == 2


def _run_with_stop(out: Path, stop_after: int) -> None:
    """Runs the 12-step job but raises KeyboardInterrupt once step ``stop_after`` is saved."""

    def on_metrics(m: dict[str, float]) -> None:
        if m["step"] == stop_after + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(
            tiny_ae_config(12, checkpoint_every=6),
            out,
            progress=False,
            device=CPU,
            on_metrics=on_metrics,
        )


def test_lr_warms_up_linearly_then_decays_by_cosine() -> None:
    cfg = LoopConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["autoencoder.toml", "denoiser.toml"])
def test_shipped_configs_load(name: str) -> None:
    cls = AutoencoderTrainConfig if name.startswith("auto") else DenoiserTrainConfig
    cfg = load_config(cls, REPO / "configs" / name)
    assert cfg.train.steps > 0 and cfg.data.kind == "shapes"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[train]\nstepz = 3\n", "unknown key train.stepz"),
        ("[trian]\nsteps = 3\n", r"unknown table \[trian\]"),
        ("[train]\nsteps = 0\n", "train.steps must be at least 1"),
        ("[data]\nkind = 'video'\n", "data.kind must be 'shapes' or 'imagefolder'"),
        ("[data]\nkind = 'imagefolder'\n", "data.path is required"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ValueError, match=message):
        load_config(AutoencoderTrainConfig, p)


def test_the_shipped_binding_options_step_aside_on_an_image_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/denoiser.toml turns on the layout head and its grounding, which need the shapes
    dataset's object masks. On an image folder the same config trains without them, says so in
    one line, and records what it turned off."""
    from core.cli import DEFAULT_CHECKPOINT, main
    from core.diffusion.data.imagefolder import export_image_folder
    from core.diffusion.data.shapes import ShapesDataset

    folder = tmp_path / "folder"
    export_image_folder((ShapesDataset(seed=5)[i] for i in range(8)), folder)
    shipped = load_config(DenoiserTrainConfig, REPO / "configs" / "denoiser.toml")
    assert shipped.text.layout and shipped.train.text_grounding > 0
    config = tmp_path / "tiny.toml"
    config.write_text(
        (REPO / "configs" / "denoiser.toml")
        .read_text()
        .replace("width = 128", "width = 32")
        .replace("channels = [64, 128, 128]", "channels = [16, 32]\ngroups = 8")
        .replace("attention_levels = [false, true, true]", "attention_levels = [false, true]")
        .replace("context_width = 128", "context_width = 32")
    )
    out = tmp_path / "out"
    main(
        ["train", "denoiser", "--config", str(config), "--autoencoder", str(DEFAULT_CHECKPOINT),
         "--data", str(folder), "--steps", "2", "--batch-size", "4", "--out", str(out), "--quiet"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "note: imagefolder data has no object masks; training without" in printed
    assert "text.layout" in printed and "train.text_grounding" in printed
    saved = json.loads((out / "model.json").read_text())
    assert saved["text_encoder"]["layout"] is False and saved["unet"]["layout_bias"] is False
    assert "unet.layout_bias" in saved["training"]["turned_off_without_masks"]
    model = LatentDiffusion.load(out, device="cpu")
    assert len(model.generate(["stripes"], seeds=[0], steps=2)) == 1
