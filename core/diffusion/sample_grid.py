"""A PNG grid of samples, one row per prompt with the prompt written beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 420
PAD = 4


def make_grid(
    rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None, scale: int = 2
) -> Image.Image:
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one image")
    w, h = rows[0][0].size
    cw, ch = w * scale, h * scale
    cols = max(len(r) for r in rows)
    label_w = LABEL_WIDTH if row_labels else 0
    grid = Image.new(
        "RGB", (label_w + cols * (cw + PAD) + PAD, len(rows) * (ch + PAD) + PAD), "white"
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        y = PAD + r * (ch + PAD)
        if row_labels:
            draw.text((PAD, y + ch // 2 - 6), row_labels[r][:64], fill="black", font=font)
        for c, img in enumerate(row):
            tile = img.resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + PAD + c * (cw + PAD), y))
    return grid


def save_grid(
    rows: Sequence[Sequence[Image.Image]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    scale: int = 2,
) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, row_labels, scale).save(p)
    return p
