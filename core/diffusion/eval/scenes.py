"""The evaluation's scenes: the prompts, and the real images they are measured against.

One deterministic stream of shapes scenes per evaluation seed, alternating between the train
split (every object uses a colour-shape pair seen in training) and the held-out split (some
object uses a held-out pair). Item k comes from the train split when k is even and from the
held-out split when it is odd, so every prefix of the stream is half seen, half held-out, and
about 60% of each half are one-object scenes, as in the training data.

- The prompts are items 0 … N−1: each scene's canonical caption, background included.
- The real images for FID are items N … 2N−1, a sample from the same distribution disjoint from
  the prompts' own renderings (items 0 … N−1), which give the real-against-real floor.

The data seed is offset from the evaluation seed so that no evaluation scene is drawn from the
stream a model was trained on (the shipped configs train on data seeds 0 and 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.diffusion.data.shapes import DEFAULT_HELD_OUT, ShapesDataset
from core.diffusion.eval.classifier import Scene
from core.diffusion.sample_grid import held_out_mark

DATA_SEED_OFFSET = 10_000
SEEN, HELD_OUT = "seen", "held-out"


@dataclass(frozen=True, eq=False)
class EvalScene:
    scene: Scene
    pairs: str  # SEEN or HELD_OUT
    image: np.ndarray  # the scene rendered with the dataset's jitter, (H, W, 3) uint8

    @property
    def caption(self) -> str:
        return self.scene.caption

    @property
    def objects(self) -> int:
        return len(self.scene.objects)

    @property
    def group(self) -> str:
        """The adherence group: pairs and object count, e.g. "held-out, 1 object"."""
        count = "1 object" if self.objects == 1 else f"{self.objects} objects"
        return f"{self.pairs}, {count}"


def held_out_pairs(model_config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The pairs a checkpoint was trained without, read from its training config."""
    try:
        pairs = model_config["training"]["config"]["data"]["held_out"]
        return tuple((str(c), str(s)) for c, s in pairs)
    except (KeyError, TypeError, ValueError):
        return DEFAULT_HELD_OUT


def scene_stream(
    seed: int,
    start: int,
    n: int,
    image_size: int = 64,
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
) -> list[EvalScene]:
    """Items ``start … start+n−1`` of the evaluation stream of ``seed``."""
    pairs = tuple(held_out)
    splits = {
        name: ShapesDataset(
            seed=DATA_SEED_OFFSET + seed,
            split=split,
            held_out=pairs,
            image_size=image_size,
            paraphrase=False,
        )
        for name, split in ((SEEN, "train"), (HELD_OUT, "held_out"))
    }
    out = []
    for k in range(start, start + n):
        name = SEEN if k % 2 == 0 else HELD_OUT
        sample = splits[name][k // 2]
        out.append(EvalScene(Scene.of(sample.objects, sample.background), name, sample.image))
    return out


def grid_scenes(scenes: Sequence[EvalScene], seen: int = 5) -> list[EvalScene]:
    """Rows of the sample grid: the first ``seen`` one-object seen scenes, the first one-object
    scene of each held-out pair, then the first two-object scene of each kind."""
    ones = [s for s in scenes if s.objects == 1]
    rows = [s for s in ones if s.pairs == SEEN][:seen]
    held_pairs: set[tuple[str, str]] = set()
    for s in ones:
        pair = s.scene.objects[0].pair
        if s.pairs == HELD_OUT and pair not in held_pairs:
            held_pairs.add(pair)
            rows.append(s)
    for kind in (SEEN, HELD_OUT):
        rows += [s for s in scenes if s.objects == 2 and s.pairs == kind][:1]
    return rows


def grid_label(s: EvalScene) -> str:
    """A short caption for the grid: each object as "size color shape, position", objects
    joined by " + ", then the background: "small red circle, top left + large blue square,
    center; gray bg"."""
    objects = " + ".join(f"{o.size} {o.color} {o.shape}, {o.position}" for o in s.scene.objects)
    return f"{objects}; {s.scene.background} bg"


def grid_mark(s: EvalScene, held_out: Iterable[tuple[str, str]]) -> str:
    """ "held-out pair: orange square" for a scene that uses one, else ""."""
    pairs = set(held_out)
    return held_out_mark([f"{o.color} {o.shape}" for o in s.scene.objects if o.pair in pairs])
