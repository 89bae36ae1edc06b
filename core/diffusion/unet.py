"""The denoiser: a UNet over latents with time embedding, self- and cross-attention.

Shape of the network (the Latent Diffusion UNet, Rombach et al. 2022, §3.3, scaled down):

    conv_in → [level 0: ResBlock×n] ↓ [level 1: (ResBlock, Transformer)×n] ↓ … → mid
            → … ↑ [level 1: (ResBlock, Transformer)×(n+1), each eating a skip] ↑ … → conv_out

Every ResBlock takes the timestep embedding; each Transformer does self-attention over the
feature map's positions, cross-attention from positions to the text tokens, and a GEGLU MLP.
The layer layout mirrors diffusers' UNet2DConditionModel so the benchmark can build the same
network there and compare speed at equal configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.diffusion.text import LAYOUT_WIDTH


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 128)
    blocks_per_level: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)
    heads: int = 4
    context_width: int = 128  # the text encoder's width
    groups: int = 32
    dropout: float = 0.0
    # The context is [contextual | lexical] (TextEncoderConfig.lexical), 2·context_width wide:
    # cross-attention keys come from the first half, values from the second.
    lexical_values: bool = False
    # The context ends with the text encoder's layout, (x, y, owned logit) per token
    # (TextEncoderConfig.layout). Each cross-attention head adds −s·σ(owned)·‖p − (x, y)‖² to
    # the logit between the pixel at p and the token, with a learned s ≥ 0 per head: a pixel
    # reads the words of the object the text places near it, and every pixel the free words
    # (the background, "a", padding aside). The layout is read, not trained, through this path.
    layout_bias: bool = False

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"], d["attention_levels"] = list(self.channels), list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])  # type: ignore[arg-type]
        d["attention_levels"] = tuple(d["attention_levels"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, [cos | sin] (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


@dataclass(frozen=True)
class TimeEmbedding:
    """The embedding of each distinct timestep in the batch, and which one each row uses.

    Layers act on the distinct rows only and are then gathered per row. When sampling, every
    row shares one timestep, so these small matmuls always see one row, whatever the batch
    size: a GEMM's rounding can depend on its row count, and this keeps an image bit-identical
    alone and inside a batch.
    """

    unique: torch.Tensor  # (U, D)
    index: torch.Tensor  # (B,) row → its timestep's row in ``unique``

    def project(self, layer: nn.Module) -> torch.Tensor:
        return layer(F.silu(self.unique))[self.index]  # (B, C)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: TimeEmbedding) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + t_emb.project(self.t_proj)[:, :, None, None]  # (B, C, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given, else cross-attention."""

    def __init__(
        self,
        width: int,
        heads: int,
        context_width: int | None = None,
        lexical_values: bool = False,
        layout_bias: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.lexical_values = lexical_values
        # softplus(−0.5 + log(e^5 − 1)) ≈ 4.5: at the start a pixel half a frame from an
        # object's center down-weights its words by e^−1.1, a frame away by e^−4.5.
        self.layout_scale = (
            nn.Parameter(torch.full((heads,), math.log(math.expm1(5.0)) - 0.5))
            if layout_bias
            else None
        )
        kv_width = context_width or width
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(kv_width, width, bias=False)
        self.to_v = nn.Linear(kv_width, width, bias=False)
        self.to_out = nn.Linear(width, width)
        # Set by UNet.recording_cross_attention: keep the last attention probabilities.
        self.keep_probs = False
        self.probs: torch.Tensor | None = None  # (B, nh, N, L) when kept

    def layout_logits(self, layout: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, heads, h·w, L) the spatial bias of :attr:`UNetConfig.layout_bias` for a feature
        map of ``grid`` = (h, w) cells, from the layout (B, L, 3); cell centers in [−1, 1]."""
        h, w = grid
        layout = layout.detach()
        ys = (torch.arange(h, device=layout.device, dtype=layout.dtype) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=layout.device, dtype=layout.dtype) + 0.5) / w * 2 - 1
        cells = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)
        d2 = (cells[None, :, None, :] - layout[:, None, :, :2]).pow(2).sum(-1)  # (B, h·w, L)
        owned = torch.sigmoid(layout[..., 2])  # (B, L)
        assert self.layout_scale is not None
        scale = F.softplus(self.layout_scale).to(layout.dtype)  # (heads,)
        return -scale[None, :, None, None] * (owned[:, None, :] * d2)[:, None]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        b, n, c = x.shape
        ctx = x if context is None else context
        bias = None
        if self.layout_scale is not None:
            if context is None or grid is None:
                raise ValueError("layout bias needs a context and the feature map's grid")
            ctx, layout = ctx[..., :-LAYOUT_WIDTH], ctx[..., -LAYOUT_WIDTH:]
            bias = self.layout_logits(layout, grid)
        if self.lexical_values:
            ctx_k, ctx_v = ctx.chunk(2, dim=-1)  # [contextual | lexical]
            q, k, v = self.to_q(x), self.to_k(ctx_k), self.to_v(ctx_v)
        else:
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (z.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        # (B, nh, N, hs) against (B, nh, L, hs); padding text tokens are masked out of the keys
        mask: torch.Tensor | None = None if context_mask is None else context_mask[:, None, None, :]
        if bias is not None:  # a float mask: the layout bias, −inf on padding
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        if self.keep_probs:
            # The same attention, spelled out so training can read the maps (grounding loss).
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, N, L)
            if mask is not None and mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif mask is not None:
                scores = scores + mask
            self.probs = scores.softmax(dim=-1)
            y = self.probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(y.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    """The gated-GELU MLP of the LDM transformer (Shazeer 2020), hidden width 4×."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2 * 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm, project to tokens, [self-attn, cross-attn, MLP] with pre-LN, project back."""

    def __init__(
        self,
        width: int,
        heads: int,
        context_width: int,
        groups: int,
        lexical_values: bool = False,
        layout_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, width)
        self.proj_in = nn.Linear(width, width)
        self.ln1, self.attn1 = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.attn2 = (
            nn.LayerNorm(width),
            Attention(width, heads, context_width, lexical_values, layout_bias),
        )
        self.ln3, self.ff = nn.LayerNorm(width), GEGLU(width)
        self.proj_out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        tokens = tokens + self.attn1(self.ln1(tokens))
        tokens = tokens + self.attn2(self.ln2(tokens), context, context_mask, (h, w))
        tokens = tokens + self.ff(self.ln3(tokens))
        out = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + out


class _Stage(nn.Module):
    """One ResBlock, optionally followed by a SpatialTransformer."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(
        self, x: torch.Tensor, t_emb: TimeEmbedding, ctx: torch.Tensor, ctx_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.res(x, t_emb)
        return x if self.attn is None else self.attn(x, ctx, ctx_mask)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or UNetConfig()
        if len(c.attention_levels) != len(c.channels):
            raise ValueError("attention_levels needs one entry per level of channels")
        ch = c.channels
        t_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        def stage(c_in: int, c_out: int, attn: bool) -> _Stage:
            res = ResBlock(c_in, c_out, t_dim, c.groups, c.dropout)
            st = (
                SpatialTransformer(
                    c_out, c.heads, c.context_width, c.groups, c.lexical_values, c.layout_bias
                )
                if attn
                else None
            )
            return _Stage(res, st)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = [ch[0]]
        c_prev = ch[0]
        for level, (c_level, attn) in enumerate(zip(ch, c.attention_levels, strict=True)):
            for _ in range(c.blocks_per_level):
                self.down.append(stage(c_prev, c_level, attn))
                c_prev = c_level
                skip_channels.append(c_prev)
            if level < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c_prev, c_prev, 3, stride=2, padding=1))
                skip_channels.append(c_prev)

        self.mid1 = stage(c_prev, c_prev, True)
        self.mid2 = ResBlock(c_prev, c_prev, t_dim, c.groups, c.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for _ in range(c.blocks_per_level + 1):
                self.up.append(
                    stage(c_prev + skip_channels.pop(), ch[level], c.attention_levels[level])
                )
                c_prev = ch[level]
            if level > 0:
                self.upsample.append(nn.Conv2d(c_prev, c_prev, 3, padding=1))

        self.norm_out = nn.GroupNorm(c.groups, c_prev)
        self.conv_out = nn.Conv2d(c_prev, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start as the zero predictor: a stable first step
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, C, h, w) noisy latents, t (B,) timesteps, context (B, L, D) with mask (B, L)."""
        c = self.config
        t_unique, t_index = torch.unique(t, return_inverse=True)
        t_emb = TimeEmbedding(
            self.time_mlp(timestep_embedding(t_unique, c.channels[0]).to(x.dtype)), t_index
        )  # (U, 4·ch0) for the U distinct timesteps
        h = self.conv_in(x)
        skips = [h]
        stages = iter(self.down)
        for level in range(len(c.channels)):
            for _ in range(c.blocks_per_level):
                h = next(stages)(h, t_emb, context, context_mask)
                skips.append(h)
            if level < len(c.channels) - 1:
                h = self.downsample[level](h)
                skips.append(h)

        h = self.mid2(self.mid1(h, t_emb, context, context_mask), t_emb)

        stages = iter(self.up)
        for i, _level in enumerate(reversed(range(len(c.channels)))):
            for _ in range(c.blocks_per_level + 1):
                h = next(stages)(torch.cat([h, skips.pop()], dim=1), t_emb, context, context_mask)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def cross_attentions(self) -> list[Attention]:
        """Every text cross-attention layer, in forward order."""
        return [m.attn2 for m in self.modules() if isinstance(m, SpatialTransformer)]

    @contextmanager
    def recording_cross_attention(self) -> Iterator[list[Attention]]:
        """Within the block, each forward leaves every cross-attention layer's probabilities in
        its ``probs`` (B, heads, h·w, L); the maps are dropped on the way out."""
        layers = self.cross_attentions()
        for layer in layers:
            layer.keep_probs = True
        try:
            yield layers
        finally:
            for layer in layers:
                layer.keep_probs, layer.probs = False, None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
