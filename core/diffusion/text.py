"""The text side: a word-level tokenizer and a small transformer text encoder.

The encoder is trained jointly with the denoiser, as in Latent Diffusion's text-to-image model
(Rombach et al. 2022, §4.3.2). Anything with ``encode(prompts) -> TextConditioning`` and a
``width`` can stand in for it, so a frozen pretrained encoder can be plugged in later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from core.diffusion.words import split_words

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
LAYOUT_WIDTH = 3  # (x, y, owned logit) per token, see TextEncoderConfig.layout


@dataclass(frozen=True)
class Tokenized:
    ids: torch.Tensor  # (B, L) int64, padded with the <pad> id
    mask: torch.Tensor  # (B, L) bool, True where a real token (including <bos>/<eos>) sits
    truncated: list[bool]  # per prompt: did it have more tokens than max_length allows?


class WordTokenizer:
    """Lower-cased, NFKC-normalised words and punctuation marks over a fixed vocabulary.

    Any Unicode string is accepted: words outside the vocabulary become ``<unk>``. Prompts longer
    than ``max_length`` tokens (counting ``<bos>`` and ``<eos>``) are cut, and
    :attr:`Tokenized.truncated` says which were.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 32) -> None:
        if max_length < 3:
            raise ValueError("max_length must leave room for <bos>, one word and <eos>")
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        self.vocab: list[str] = [*SPECIAL_TOKENS, *dict.fromkeys(words)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    @classmethod
    def from_corpus(cls, texts: Iterable[str], max_length: int = 32) -> WordTokenizer:
        words = sorted({w for text in texts for w in cls.split(text)})
        return cls(words, max_length=max_length)

    @staticmethod
    def split(text: str) -> list[str]:
        return split_words(text)

    @property
    def pad_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: Sequence[str]) -> Tokenized:
        unk = self.index[UNK]
        rows, truncated = [], []
        for prompt in prompts:
            ids = [self.index.get(w, unk) for w in self.split(prompt)]
            room = self.max_length - 2
            truncated.append(len(ids) > room)
            rows.append([self.index[BOS], *ids[:room], self.index[EOS]])
        # Always pad to max_length: equal shapes keep a prompt's encoding bit-identical whatever
        # else shares its batch (a ragged width changes reduction lengths, and so the rounding).
        width = self.max_length
        ids_t = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids_t[i, : len(r)] = torch.tensor(r)
        return Tokenized(ids=ids_t, mask=ids_t != self.pad_id, truncated=truncated)

    def to_dict(self) -> dict[str, object]:
        return {"vocab": self.vocab, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> WordTokenizer:
        vocab = d["vocab"]
        max_length = d["max_length"]
        if not isinstance(vocab, list) or not isinstance(max_length, int):
            raise ValueError("tokenizer config needs a 'vocab' list and an integer 'max_length'")
        return cls([str(w) for w in vocab], max_length=max_length)


@dataclass(frozen=True)
class TextConditioning:
    states: torch.Tensor  # (B, L, D) per-token states
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    truncated: list[bool] = field(default_factory=list)


class TextEncoderLike(Protocol):
    """What the denoiser needs of a text encoder; a frozen pretrained one would fit too."""

    width: int

    def encode(self, prompts: Sequence[str]) -> TextConditioning: ...


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 32
    dropout: float = 0.0
    # Append each token's own word embedding (no position, no context) to its contextual state,
    # so the states are [contextual | lexical], 2·width wide. A UNet with lexical_values reads
    # cross-attention keys from the first half and values from the second: attention finds a
    # word by its context (which object, where) but reads back only the word itself.
    lexical: bool = False
    # When > 0, every attention layer adds a learned bias per head for each relative distance
    # between two tokens, clipped to ±relative_positions (as in T5, Raffel et al. 2020), so
    # "the words next to me" is as easy to find wherever the phrase sits in the caption.
    relative_positions: int = 0
    # A layout head: a linear read-out of each token's contextual state into (x, y, owned), where
    # the object the token names sits in the image ([-1, 1], y down) and a logit for whether it
    # names an object at all. It is appended to the states, LAYOUT_WIDTH channels after the
    # rest; a UNet with layout_bias turns it into a spatial bias on cross-attention, so each
    # pixel reads the words of the object the text places there. Trained by text-side grounding
    # (train.text_grounding) on data whose captions say which object each word names.
    layout: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def state_width(self) -> int:
        """Width of the per-token states the encoder hands the denoiser."""
        return (2 * self.width if self.lexical else self.width) + (
            LAYOUT_WIDTH if self.layout else 0
        )


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (bidirectional; padding keys are masked out)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        # (B, nh, L, hs); key_mask (B, 1, 1, L) keeps padding out of every token's attention
        mask: torch.Tensor = key_mask[:, None, None, :]
        if bias is not None:  # (nh, L, L) relative-position bias, added to the logits
            mask = bias[None].masked_fill(~mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """Token and position embeddings, a few transformer blocks, a final LayerNorm."""

    def __init__(self, config: TextEncoderConfig, tokenizer: WordTokenizer) -> None:
        super().__init__()
        if config.width % config.heads:
            raise ValueError("text encoder width must be divisible by heads")
        self.config = config
        self.tokenizer = tokenizer
        self.width = config.state_width
        self.token_embedding = nn.Embedding(len(tokenizer), config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            _Block(config.width, config.heads, config.dropout) for _ in range(config.layers)
        )
        r = config.relative_positions
        self.relative_bias = (
            nn.Parameter(torch.zeros(config.layers, config.heads, 2 * r + 1)) if r > 0 else None
        )
        self.ln_final = nn.LayerNorm(config.width)
        self.ln_lexical = nn.LayerNorm(config.width) if config.lexical else None
        self.layout_head = nn.Linear(config.width, LAYOUT_WIDTH) if config.layout else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        words = self.token_embedding(ids)  # (B, L, D)
        x = words + self.position_embedding[:n]
        biases: list[torch.Tensor | None] = [None] * len(self.blocks)
        if self.relative_bias is not None:
            r = self.config.relative_positions
            pos = torch.arange(n, device=ids.device)
            distance = (pos[None, :] - pos[:, None]).clamp(-r, r) + r  # (L, L) key − query
            biases = list(self.relative_bias[:, :, distance])  # each (nh, L, L)
        for block, bias in zip(self.blocks, biases, strict=True):
            x = block(x, mask, bias)
        x = self.ln_final(x)
        parts = [x]
        if self.ln_lexical is not None:
            parts.append(self.ln_lexical(words))  # [contextual | lexical], (B, L, 2D)
        if self.layout_head is not None:
            parts.append(self.layout_head(x))  # (B, L, 3): where each token's object is
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        tok = self.tokenizer.encode(prompts)
        device = self.position_embedding.device
        ids, mask = tok.ids.to(device), tok.mask.to(device)
        return TextConditioning(states=self(ids, mask), mask=mask, truncated=tok.truncated)
