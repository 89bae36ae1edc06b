"""Fine-tuning: a denoiser run that starts from a trained model instead of from scratch.

The base checkpoint gives the architecture, the autoencoder, the sampling defaults and every
weight. Its tokenizer has a closed word vocabulary (the shapes' 35 words), so a caption word it
lacks ("pink") would read as ``<unk>``: the vocabulary is extended instead. New words are
appended after the base's (every old id keeps its row) and each new embedding row starts at the
mean of some base words' rows (``finetune.init_words``), as textual inversion starts its token
from a chosen word (Gal et al. 2022, §4.1), or else at the ``<unk>`` row, which is how the base
read it (punctuation too: the shipped vocabulary has none, so a fine-tune on its own captions
adds "," and ":" and starts them where the base had them). Starting "pink" at the mean of the
color words puts it where the encoder already treats a word as a color, so the layout head places
it with its object from the first step.

With ``finetune.freeze_text_encoder`` the encoder's weights stay the base's bit for bit: every
parameter is frozen but the embedding, whose gradient is zeroed on the base's rows, and the
embedding has no weight decay (AdamW decays every row of a decayed tensor, even one with a zero
gradient; with zero moments its update is exactly 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.diffusion.checkpoint import read_config
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.schedule import ScheduleConfig
from core.diffusion.text import (
    SPECIAL_TOKENS,
    UNK,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
)
from core.diffusion.training.config import DenoiserTrainConfig
from core.diffusion.unet import UNetConfig


def adopt_base_architecture(cfg: DenoiserTrainConfig, base_dir: str | Path) -> DenoiserTrainConfig:
    """``cfg`` with the base checkpoint's ``[text]``, ``[unet]`` and ``[schedule]`` tables, so
    the run's recorded config (and its resume fingerprint) says what actually trains."""
    base = read_config(base_dir)
    if base.get("kind") != "latent-diffusion":
        raise ValueError(f"the fine-tuning base {cfg.finetune.base!r} is not a text-to-image model")
    size = int(base["image_size"])
    if cfg.data.kind == "imagefolder":  # its images are resized to the model's size
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    if size != cfg.data.image_size:
        raise ValueError(
            f"data.image_size is {cfg.data.image_size} but the base "
            f"{cfg.finetune.base!r} makes {base['image_size']}-pixel images"
        )
    return dataclasses.replace(
        cfg,
        text=TextEncoderConfig(**base["text_encoder"]),
        unet=UNetConfig.from_dict(base["unet"]),
        schedule=ScheduleConfig(**base["schedule"]),
    )


def new_words(tokenizer: WordTokenizer, captions: Iterable[str]) -> list[str]:
    """Caption words the tokenizer does not know, in order of first use."""
    found: dict[str, None] = {}
    for caption in captions:
        for word in tokenizer.split(caption):
            if word not in tokenizer.index and word not in SPECIAL_TOKENS:
                found.setdefault(word)
    return list(found)


def extend_vocabulary(
    encoder: TextEncoder, words: Sequence[str], init_words: dict[str, str]
) -> TextEncoder:
    """A copy of ``encoder`` whose tokenizer also knows ``words``, appended after the old ones.

    Each new embedding row is the mean of the rows of ``init_words[word]`` (base words, space
    separated), or else the ``<unk>`` row: what the base read the word as, so that before a step
    is taken the model reads every caption as the base did. Old rows and every other weight are
    copied unchanged.
    """
    old = encoder.tokenizer
    unknown = sorted(set(init_words) - set(words))
    if unknown:
        raise ValueError(
            f"finetune.init_words names {unknown[0]!r}, which is no new word of the data"
        )
    tokenizer = WordTokenizer([*old.vocab, *words], max_length=old.max_length)
    extended = TextEncoder(encoder.config, tokenizer)
    state = {k: v for k, v in encoder.state_dict().items() if k != "token_embedding.weight"}
    extended.load_state_dict(state, strict=False)
    table = encoder.token_embedding.weight.detach()  # (V_old, D)
    unk = [old.index[UNK]]
    with torch.no_grad():
        rows = extended.token_embedding.weight  # (V_old + new, D)
        rows[: len(old)] = table
        for word in words:
            named = init_words.get(word, "").split()
            missing = [w for w in named if w not in old.index]
            if missing:
                raise ValueError(
                    f"finetune.init_words.{word}: {missing[0]!r} is not a word of the base's "
                    "vocabulary"
                )
            source = [old.index[w] for w in named] or unk
            rows[tokenizer.index[word]] = table[source].mean(0)
    return extended.to(table.device)


def freeze_text_encoder(encoder: TextEncoder, trainable_from: int) -> list[nn.Parameter]:
    """Freezes ``encoder`` but for the embedding rows from ``trainable_from`` on (the new
    words'). Returns the parameters that must take no weight decay (see the module docstring)."""
    encoder.requires_grad_(False)
    embedding = encoder.token_embedding.weight
    assert isinstance(embedding, nn.Parameter)
    if trainable_from >= embedding.shape[0]:
        return []
    embedding.requires_grad_(True)

    def keep_base_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:trainable_from] = 0
        return grad

    embedding.register_hook(keep_base_rows)
    return [embedding]


def load_base(
    base_dir: str | Path, cfg: DenoiserTrainConfig, captions: Iterable[str]
) -> tuple[LatentDiffusion, list[str]]:
    """The base model, its text encoder extended by the data's new words (see
    :func:`extend_vocabulary`), and those words."""
    base = LatentDiffusion.load(base_dir, device="cpu")
    words = new_words(base.text_encoder.tokenizer, captions)
    if words:
        base.text_encoder = extend_vocabulary(base.text_encoder, words, cfg.finetune.init_words)
    elif cfg.finetune.init_words:
        extend_vocabulary(base.text_encoder, [], cfg.finetune.init_words)  # raises, naming it
    return base, words


def finetune_record(cfg: DenoiserTrainConfig, words: Sequence[str]) -> dict[str, Any]:
    """What the new model's config and metrics say about its base."""
    return {
        "base_version": cfg.finetune.base,
        "freeze_text_encoder": cfg.finetune.freeze_text_encoder,
        "new_words": list(words),
    }
