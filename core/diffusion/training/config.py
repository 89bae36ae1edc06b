"""Training configuration: dataclasses read from a TOML file and command-line overrides.

A file has up to four tables: ``[train]`` (the loop and optimiser), ``[data]`` (what to train
on), and the model tables (``[model]`` for the autoencoder; ``[text]``, ``[unet]`` and
``[schedule]`` for the denoiser). An unknown table or key is an error that names it, so a typo
never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.diffusion.autoencoder import AutoencoderConfig
from core.diffusion.data.shapes import DEFAULT_HELD_OUT
from core.diffusion.schedule import ScheduleConfig
from core.diffusion.text import TextEncoderConfig
from core.diffusion.unet import UNetConfig


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr·min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    caption_dropout: float = 0.1  # denoiser only: share of captions replaced by "" for CFG
    min_snr_gamma: float = 0.0  # denoiser only: 0 turns min-SNR-γ weighting off
    # Denoiser on shapes only: weights of the grounding losses (training/grounding.py); 0 is off.
    grounding_token: float = 0.0
    grounding_spatial: float = 0.0
    text_grounding: float = 0.0  # weight of grounding.location_loss on the text encoder
    text_pretrain_steps: int = 0  # steps of text-side grounding alone before joint training
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("train.steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError("train.batch_size must be at least 1")
        if not self.lr > 0:
            raise ValueError("train.lr must be positive")
        if self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise ValueError("train.warmup_steps must be ≥ 0 and train.checkpoint_every ≥ 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("train.caption_dropout must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("train.ema_decay must be in [0, 1)")
        if self.min_snr_gamma < 0:
            raise ValueError("train.min_snr_gamma must be ≥ 0")
        if self.text_pretrain_steps < 0 or (self.text_pretrain_steps and not self.text_grounding):
            raise ValueError("train.text_pretrain_steps must be ≥ 0 and needs text_grounding > 0")
        if min(self.grounding_token, self.grounding_spatial, self.text_grounding) < 0:
            raise ValueError("train.grounding_token, grounding_spatial, text_grounding must be ≥ 0")


@dataclass
class DataConfig:
    kind: str = "shapes"  # "shapes" or "imagefolder"
    path: str = ""  # the image folder, for kind = "imagefolder"
    seed: int = 0
    image_size: int = 64
    held_out: list[list[str]] = field(default_factory=lambda: [list(p) for p in DEFAULT_HELD_OUT])
    max_objects: int = 2
    two_object_share: float = 0.4  # shapes: share of images with two objects (max_objects 2)

    def validate(self) -> None:
        if self.kind not in ("shapes", "imagefolder"):
            raise ValueError(f"data.kind must be 'shapes' or 'imagefolder', not {self.kind!r}")
        if self.kind == "imagefolder" and not self.path:
            raise ValueError("data.path is required when data.kind is 'imagefolder'")
        if not 0.0 <= self.two_object_share <= 1.0:
            raise ValueError("data.two_object_share must be in [0, 1]")
        if self.image_size < 16:
            raise ValueError("data.image_size must be at least 16")


@dataclass
class AutoencoderTrainConfig:
    train: LoopConfig = field(default_factory=lambda: LoopConfig(lr=1e-3, weight_decay=0.0))
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)


@dataclass
class FineTuneConfig:
    """``[finetune]``: start from a trained model rather than from scratch (docs/MODEL.md,
    *Fine-tuning*). The base's architecture, autoencoder and sampling defaults are kept; the
    ``[text]``, ``[unet]`` and ``[schedule]`` tables are taken from it."""

    # The base version's name ("shipped" for the shipped model), recorded in the new model's
    # config; its checkpoint directory is handed to train_denoiser. Empty: train from scratch.
    base: str = ""
    # Train the UNet alone; the text encoder's weights stay the base's, bit for bit, except the
    # embedding rows of words the base's vocabulary lacks (they must learn something).
    freeze_text_encoder: bool = False
    # New caption words (not in the base's vocabulary) get embedding rows appended to the
    # base's; each starts at the mean embedding of the base words named here
    # ({"pink": "red purple white"}), or at the base's <unk> row (what it read the word as).
    init_words: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.base and (self.freeze_text_encoder or self.init_words):
            raise ValueError("finetune.freeze_text_encoder and init_words need finetune.base")
        for word, init in self.init_words.items():
            if not isinstance(word, str) or not isinstance(init, str) or not init.split():
                raise ValueError(
                    'finetune.init_words maps a new word to base words, e.g. {pink = "red purple"}'
                )


@dataclass
class DenoiserTrainConfig:
    train: LoopConfig = field(default_factory=LoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(names))}"
        )
    values = {}
    for k, v in table.items():
        # TOML arrays arrive as lists; the frozen model configs want tuples.
        if isinstance(v, list) and "tuple" in str(names[k].type):
            v = tuple(v)
        values[k] = v
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad [{where}] table: {e}") from None


def load_config(
    cls: type[AutoencoderTrainConfig] | type[DenoiserTrainConfig],
    path: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Reads ``path`` (TOML), applies ``overrides`` ({table: {key: value}}), validates."""
    tables: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            tables = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    for table, values in (overrides or {}).items():
        tables.setdefault(table, {}).update({k: v for k, v in values.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tables) - set(known))
    if unknown:
        raise ValueError(f"unknown table [{unknown[0]}]; known tables: {', '.join(sorted(known))}")
    defaults = cls()
    parts = {}
    for name in known:
        default_part = getattr(defaults, name)
        merged = {**dataclasses.asdict(default_part), **tables.get(name, {})}
        parts[name] = _build(type(default_part), merged, name)
    config = cls(**parts)
    config.train.validate()
    config.data.validate()
    if isinstance(config, DenoiserTrainConfig):
        config.finetune.validate()
    return config


SHAPES_ONLY_TRAIN = (
    "grounding_token",
    "grounding_spatial",
    "text_grounding",
    "text_pretrain_steps",
)


def fit_to_data(config: DenoiserTrainConfig) -> tuple[DenoiserTrainConfig, list[str]]:
    """The config with the binding supervision turned off where the data cannot give it.

    The grounding losses and the layout head learn from object masks and from which object
    each caption word names, which only the shapes dataset knows. On other data (an image
    folder) they are switched off, the layout head and its cross-attention bias with them
    (untrained, they would only mislead the UNet), so that the shipped config, which turns them
    on, still trains on any folder. Returns the config and the options turned off, by name.
    """
    tuned = config.finetune
    # A fine-tune keeps its base's text encoder: a frozen one learns no grounding, and no
    # fine-tune pretrains the text side again.
    drop = {"text_pretrain_steps"} if tuned.base else set()
    if tuned.freeze_text_encoder:
        drop |= {"text_grounding"}
    if config.data.kind != "shapes":
        drop |= set(SHAPES_ONLY_TRAIN)
    if not drop:
        return config, []
    off = [
        f"train.{name}"
        for name in SHAPES_ONLY_TRAIN
        if name in drop and getattr(config.train, name)
    ]
    train = dataclasses.replace(config.train, **{name: 0 for name in drop})
    text, unet = config.text, config.unet
    if tuned.base:
        # The architecture is the base's: its layout head stays and keeps what it learned.
        return dataclasses.replace(config, train=train), off
    if text.layout:
        off.append("text.layout")
        text = dataclasses.replace(text, layout=False)
    if unet.layout_bias:
        off.append("unet.layout_bias")
        unet = dataclasses.replace(unet, layout_bias=False)
    fitted = dataclasses.replace(config, train=train, text=text, unet=unet)
    return fitted, off


def config_to_dict(config: AutoencoderTrainConfig | DenoiserTrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
