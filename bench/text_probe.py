"""Does the text encoder bind each object's words together? A linear probe on its states.

For two-object captions, two read-outs, each a linear classifier fitted on the states of one
kind of word and scored on captions it was not fitted on:

- **color → position**: from the state of each object's color word, its object's position
  (5 classes). Cross-attention needs this in its keys to find the right color at a pixel.
- **position → color**: from the state of each object's last position word ("left", "right",
  "center"), its object's color (7 classes).

An encoder that only knows which colors a caption mentions scores about 50% on the second (it
can do no better than guess between the two); one that binds scores near 100%. The states are
read as the denoiser sees them (for a lexical encoder, [contextual | lexical]).

    .venv/bin/python bench/text_probe.py --checkpoint core/diffusion/default_model runs/x ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.diffusion.data.shapes import COLORS, POSITIONS, ShapesDataset
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.words import split_words
from core.runtime.machine import cpu_name

COLOR_WORDS = tuple(COLORS)
LAST_POSITION_WORD = {"left", "right", "center"}


def _examples(
    model: LatentDiffusion, n: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(states, labels) for both read-outs, from ``n`` two-object training-split captions."""
    data = ShapesDataset(seed=seed, two_object_share=1.0)
    samples = [data[i] for i in range(n)]
    feats: dict[str, list[torch.Tensor]] = {"color→position": [], "position→color": []}
    labels: dict[str, list[int]] = {"color→position": [], "position→color": []}
    with torch.no_grad():
        for start in range(0, n, 256):
            batch = samples[start : start + 256]
            states = model.text_encoder.encode([s.caption for s in batch]).states
            for b, sample in enumerate(batch):
                words = split_words(sample.caption)
                for w, (word, k) in enumerate(zip(words, sample.word_objects, strict=True)):
                    if k < 0 or w + 1 >= states.shape[1] - 1:
                        continue
                    obj = sample.objects[k]
                    if word in COLOR_WORDS:
                        feats["color→position"].append(states[b, w + 1])
                        labels["color→position"].append(POSITIONS.index(obj.position))
                    elif word in LAST_POSITION_WORD:
                        feats["position→color"].append(states[b, w + 1])
                        labels["position→color"].append(COLOR_WORDS.index(obj.color))
    return {k: (torch.stack(feats[k]), torch.tensor(labels[k])) for k in feats}


def _fit_and_score(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
) -> float:
    x, y = train
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = nn.Linear(x.shape[1], int(max(y.max(), test[1].max())) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.cross_entropy(probe((x - mean) / std), y).backward()
        opt.step()
    with torch.no_grad():
        pred = probe((test[0] - mean) / std).argmax(-1)
    return float((pred == test[1]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--train-n", type=int, default=3000)
    parser.add_argument("--test-n", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}")
    print(f"two-object captions: {args.train_n} to fit, {args.test_n} to score\n")
    print("| checkpoint | color word → its position | position word → its color |")
    print("|---|---:|---:|")
    for ckpt in args.checkpoints:
        model = LatentDiffusion.load(ckpt, device="cpu")
        fit = _examples(model, args.train_n, seed=123)
        test = _examples(model, args.test_n, seed=456)
        scores = [_fit_and_score(fit[k], test[k]) for k in fit]
        print(f"| {ckpt} | {scores[0]:.1%} | {scores[1]:.1%} |")


if __name__ == "__main__":
    main()
