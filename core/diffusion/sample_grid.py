"""A PNG grid of samples: cells of one or more tiles, each with a short caption under it.

A cell is one prompt: its images side by side (several seeds, say), enlarged with nearest-
neighbour so every pixel stays visible, and its caption under them in a readable font, wrapped
to the cell's width. A cell can be marked, e.g. for a held-out color-shape pair: its caption
gets the mark's text and color. Cells flow left to right, ``cells_per_row`` to a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAD = 6
GAP = 2  # between the tiles of one cell
FONT_SIZE = 15
LINE_HEIGHT = FONT_SIZE + 4
TEXT = (20, 20, 20)


@dataclass(frozen=True)
class Cell:
    images: Sequence[Image.Image]
    caption: str = ""
    mark: str = ""  # appended to the caption on a line of its own, in mark_color
    mark_color: tuple[int, int, int] = (200, 90, 0)


def held_out_mark(pairs: Sequence[str]) -> str:
    """A cell's mark for the held-out color-shape pairs its prompt uses ("orange square"), or ""
    for none."""
    return f"held-out pair: {', '.join(pairs)}" if pairs else ""


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (OSError, TypeError):  # a Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font: object) -> list[str]:
    """Greedy word wrap to ``width`` pixels; explicit newlines start new lines."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:  # type: ignore[arg-type]
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def make_grid(cells: Sequence[Cell], cells_per_row: int = 1, scale: int = 2) -> Image.Image:
    if not cells or not cells[0].images:
        raise ValueError("a grid needs at least one image")
    if cells_per_row < 1 or scale < 1:
        raise ValueError("cells_per_row and scale must be at least 1")
    w, h = cells[0].images[0].size
    tw, th = w * scale, h * scale
    tiles = max(len(c.images) for c in cells)
    cell_w = tiles * tw + (tiles - 1) * GAP
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [
        (_wrap(c.caption, cell_w, measure, font), _wrap(c.mark, cell_w, measure, font))
        for c in cells
    ]
    cap_lines = max(len(t[0]) + (len(t[1]) if t[1] != [""] else 0) for t in texts)
    cell_h = th + 4 + cap_lines * LINE_HEIGHT
    n_rows = -(-len(cells) // cells_per_row)
    cols = min(cells_per_row, len(cells))
    grid = Image.new(
        "RGB", (PAD + cols * (cell_w + PAD), PAD + n_rows * (cell_h + PAD)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for i, (cell, (caption, mark)) in enumerate(zip(cells, texts, strict=True)):
        x0 = PAD + (i % cells_per_row) * (cell_w + PAD)
        y0 = PAD + (i // cells_per_row) * (cell_h + PAD)
        for k, img in enumerate(cell.images):
            tile = img.convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
            grid.paste(tile, (x0 + k * (tw + GAP), y0))
        y = y0 + th + 4
        for line in caption:
            draw.text((x0, y), line, fill=TEXT, font=font)
            y += LINE_HEIGHT
        if cell.mark:
            for line in mark:
                draw.text((x0, y), line, fill=cell.mark_color, font=font)
                y += LINE_HEIGHT
    return grid


def save_grid(
    cells: Sequence[Cell], path: str | Path, cells_per_row: int = 1, scale: int = 2
) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    make_grid(cells, cells_per_row, scale).save(p)
    return p
