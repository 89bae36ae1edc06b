"""Can a text encoder bind at all? Trains it alone on text-side grounding (no UNet).

Each variant of the text encoder is fitted, with a linear read-out, to give every object word
the center of its object (``grounding.location_loss``) on two-object captions, 800 steps of 64
captions, and scored on 1000 captions it did not see. A test loss near 0 means the architecture
can carry each object's position in its words; about 0.25 means it cannot tell its two objects
apart. This isolates the encoder from the denoiser: the joint runs in docs/MODEL.md did not
bind although the encoder alone can.

    .venv/bin/python bench/text_binding_capacity.py     # about 7 minutes on one core
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.diffusion.data.shapes import ShapesDataset, vocabulary
from core.diffusion.text import TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.training.grounding import location_loss, sample_masks, word_owner_tokens
from core.runtime.machine import cpu_name

FIT, TEST = 5000, 1000


def run(name: str, cfg: TextEncoderConfig, data: dict[str, object], steps: int = 800) -> None:
    captions: list[str] = data["captions"]  # type: ignore[assignment]
    owners: torch.Tensor = data["owners"]  # type: ignore[assignment]
    masks: torch.Tensor = data["masks"]  # type: ignore[assignment]
    torch.manual_seed(0)
    encoder = TextEncoder(cfg, WordTokenizer(vocabulary(), cfg.max_length))
    head = nn.Linear(cfg.width, 2)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, FIT, (64,))
        states = encoder.encode([captions[i] for i in idx]).states[..., : cfg.width]
        loss = location_loss(head(states), owners[idx], masks[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        idx = torch.arange(FIT, FIT + TEST)
        states = encoder.encode([captions[i] for i in idx]).states[..., : cfg.width]
        test = location_loss(head(states), owners[idx], masks[idx]).item()
    seconds = time.perf_counter() - t0
    print(f"| {name} | {loss.item():.3f} | {test:.3f} | {seconds:.0f} s |", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    print(f"CPU: {cpu_name()}, 1 torch thread, torch {torch.__version__}\n")
    dataset = ShapesDataset(seed=5, two_object_share=1.0)
    samples = [dataset[i] for i in range(FIT + TEST)]
    data = {
        "captions": [s.caption for s in samples],
        "owners": word_owner_tokens(samples, [True] * len(samples), 32),
        "masks": sample_masks(samples),
    }
    base = TextEncoderConfig()
    print("| text encoder | fit loss | test loss | time |")
    print("|---|---:|---:|---:|")
    run("2 layers (shipped)", base, data)
    run("2 layers, relative positions ±8", dataclasses.replace(base, relative_positions=8), data)
    run("4 layers", dataclasses.replace(base, layers=4), data)
    run(
        "4 layers, relative positions ±8",
        dataclasses.replace(base, layers=4, relative_positions=8),
        data,
    )


if __name__ == "__main__":
    main()
