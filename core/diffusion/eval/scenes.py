"""The evaluation's scenes: the prompts, and the real images they are measured against.

One deterministic stream of shapes scenes per evaluation seed, alternating between the train
split (every object uses a colour-shape pair seen in training) and the held-out split (some
object uses a held-out pair). Item k comes from the train split when k is even and from the
held-out split when it is odd, so every prefix of the stream is half seen, half held-out, and
about 60% of each half are one-object scenes, as in the training data.

- The prompts are items 0 … N−1: each scene's canonical caption, background included.
- The real images for FID are items N … 2N−1, a sample from the same distribution disjoint from
  the prompts' own renderings (items 0 … N−1), which give the real-against-real floor.
- The editing rows start from real images: items from ``EDIT_STREAM_START`` on, apart from the
  prompts and real images of any N up to 500,000. Each one-object scene becomes an
  image-to-image task (:func:`recolor_tasks`: the same object in another color), each
  two-object scene an inpainting task (:func:`inpaint_tasks`: one object repainted as another).

The data seed is offset from the evaluation seed so that no evaluation scene is drawn from the
stream a model was trained on (the shipped configs train on data seeds 0 and 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.diffusion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELD_OUT,
    FRAME,
    MAX_JITTER,
    POSITION_CENTERS,
    SHAPES,
    SIZE_RADII,
    ShapeObject,
    ShapesDataset,
    render,
)
from core.diffusion.eval.classifier import Scene
from core.diffusion.sample_grid import held_out_mark

DATA_SEED_OFFSET = 10_000
SEEN, HELD_OUT = "seen", "held-out"
EDIT_STREAM_START = 1_000_000
# How far past the removed object's reach (its radius plus the dataset's jitter) an inpainting
# mask extends, in frame pixels: room for the new object's own jitter.
EDIT_MASK_MARGIN = 2.0
_EDIT_RNG_TAG = 7  # keeps the editing tasks' random choices apart from any dataset stream


@dataclass(frozen=True, eq=False)
class EvalScene:
    scene: Scene
    pairs: str  # SEEN or HELD_OUT
    image: np.ndarray  # the scene rendered with the dataset's jitter, (H, W, 3) uint8
    # Each object's jitter (dx, dy) in frame pixels, in the order of ``scene.objects``.
    offsets: tuple[tuple[float, float], ...] = ()

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
        scene = Scene.of(sample.objects, sample.background)
        jitter = dict(zip((o.position for o in sample.objects), sample.offsets, strict=True))
        offsets = tuple(jitter[o.position] for o in scene.objects)
        out.append(EvalScene(scene, name, sample.image, offsets))
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


@dataclass(frozen=True, eq=False)
class EditTask:
    """One editing task: a real image, the scene it should become, and for inpainting the mask
    of what may change."""

    source: EvalScene
    target: Scene  # what the edited image should show; its caption is the prompt
    position: str  # where the edited object is
    mask: np.ndarray | None  # (H, W) bool, True = repaint; None for image-to-image

    @property
    def prompt(self) -> str:
        return self.target.caption

    def perfect(self) -> np.ndarray:
        """The target scene rendered with the source's jitter: what a perfect edit would be."""
        size = self.source.image.shape[0]
        return render(self.target.objects, self.target.background, size, self.source.offsets)


def edit_sources(
    seed: int,
    n: int,
    image_size: int = 64,
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
) -> tuple[list[EvalScene], list[EvalScene]]:
    """The first ``n`` one-object and the first ``n`` two-object scenes of the stream from
    ``EDIT_STREAM_START`` on."""
    pairs = tuple(held_out)
    ones: list[EvalScene] = []
    twos: list[EvalScene] = []
    start, chunk = EDIT_STREAM_START, 2 * n + 16
    while len(ones) < n or len(twos) < n:
        for s in scene_stream(seed, start, chunk, image_size, pairs):
            (ones if s.objects == 1 else twos).append(s)
        start += chunk
    return ones[:n], twos[:n]


def _edit_rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([DATA_SEED_OFFSET + seed, _EDIT_RNG_TAG, kind, index])


def recolor_tasks(
    sources: Sequence[EvalScene], seed: int, held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT
) -> list[EditTask]:
    """Image-to-image: each one-object scene's object in another color, drawn uniformly among
    the colors that make a pair seen in training, at the same place, shape and size."""
    pairs = set(held_out)
    tasks = []
    for i, source in enumerate(sources):
        (old,) = source.scene.objects
        colors = [c for c in COLORS if c != old.color and (c, old.shape) not in pairs]
        if not colors:
            raise ValueError(f"every other color of a {old.shape} is held out: nothing to edit to")
        color = colors[int(_edit_rng(seed, 0, i).integers(len(colors)))]
        new = ShapeObject(old.shape, color, old.size, old.position)
        target = Scene.of([new], source.scene.background)
        tasks.append(EditTask(source, target, old.position, None))
    return tasks


def inpaint_tasks(
    sources: Sequence[EvalScene], seed: int, held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT
) -> list[EditTask]:
    """Inpainting: in each two-object scene one object (drawn at random) is masked and replaced
    by one of the same size with another shape and another color, a pair seen in training; the
    other object is kept. The prompt is the new scene's canonical caption."""
    pairs = set(held_out)
    tasks = []
    for i, source in enumerate(sources):
        rng = _edit_rng(seed, 1, i)
        objects = source.scene.objects
        k = int(rng.integers(len(objects)))
        old, kept = objects[k], objects[1 - k]
        choices = [
            (shape, color)
            for shape in SHAPES
            for color in COLORS
            if shape != old.shape and color != old.color and (color, shape) not in pairs
        ]
        if not choices:
            raise ValueError(f"every pair other than the {old.color} {old.shape}'s is held out")
        shape, color = choices[int(rng.integers(len(choices)))]
        new = ShapeObject(shape, color, old.size, old.position)
        target = Scene.of([kept, new], source.scene.background)
        mask = repaint_mask(source, k)
        tasks.append(EditTask(source, target, old.position, mask))
    return tasks


def repaint_mask(source: EvalScene, index: int) -> np.ndarray:
    """(H, W) bool, True = repaint: the square around object ``index``'s position that holds it
    at any jitter, ``EDIT_MASK_MARGIN`` wider, less every pixel another object touches (those
    are kept exactly). Pixels are in or out by their centers."""
    size = source.image.shape[0]
    scale = size / FRAME
    centers = (np.arange(size) + 0.5) / scale  # pixel centers in frame coordinates
    obj = source.scene.objects[index]
    cx, cy = POSITION_CENTERS[obj.position]
    reach = SIZE_RADII[obj.size] + MAX_JITTER + EDIT_MASK_MARGIN
    inside_x = np.abs(centers - cx) <= reach
    inside_y = np.abs(centers - cy) <= reach
    mask = inside_y[:, None] & inside_x[None, :]
    background = np.asarray(BACKGROUNDS[source.scene.background], dtype=np.uint8)
    for j, other in enumerate(source.scene.objects):
        if j != index:
            alone = render([other], source.scene.background, size, [source.offsets[j]])
            mask &= (alone == background).all(-1)
    return mask
