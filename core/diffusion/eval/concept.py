"""A new concept for fine-tuning: shapes in a color the default model has no word for, as an
image folder to train on, and the adherence reader that judges prompts which name it.

The scenes are the shapes dataset's (one object, or two at ``two_object_share``), with one
object in the new color: it is drawn in a placeholder color of the palette and repainted by its
own coverage mask (``bg·(1−m) + rgb·m``, which is what the renderer would have drawn with the
new color), and its caption names it with the new word.

The attribute classifier knows only the seven training colors, so it cannot say "pink". The
reader therefore takes from the classifier everything else of the scene (which positions are
occupied, each object's shape and size, the background, the old object's color) and reads the
new object's color off the pixels: the median color of the pixels in the object's cell that
differ from the background, and the nearest color of the palette with the new one added. Real
renderings read 100% right (a test checks it), so what a model misses is its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.diffusion.data.captioned import CaptionedImage
from core.diffusion.data.imagefolder import export_image_folder
from core.diffusion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    FRAME,
    MAX_JITTER,
    POSITION_CENTERS,
    SIZE_RADII,
    TRIANGLE_SCALE,
    ShapeObject,
    ShapesDataset,
    ShapesSample,
    aligned_caption,
    canonical_caption,
    object_masks,
    render,
    vocabulary,
)
from core.diffusion.eval.classifier import AttributeClassifier, Scene
from core.diffusion.eval.common import Adherence, pil_to_tensor

PLACEHOLDER = "red"  # the new-colored object is drawn and captioned in it, then repainted
# A pixel belongs to an object when it is this far (RGB distance) from the background.
OBJECT_DISTANCE = 48.0
# The object's median color must lie this near a palette color to be read as it.
COLOR_DISTANCE = 60.0
_RNG_TAG = 11  # keeps the concept's random choices apart from every dataset stream


@dataclass(frozen=True)
class NewColor:
    name: str
    rgb: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]+", self.name) or self.name in vocabulary():
            raise ValueError(f"{self.name!r} must be one lower-case word the shapes never use")
        taken = {**COLORS, **BACKGROUNDS}
        near = [n for n, c in taken.items() if np.linalg.norm(np.subtract(c, self.rgb)) < 80]
        if near:
            raise ValueError(f"{self.rgb} is too close to {near[0]} to be read apart from it")

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        return {**COLORS, self.name: self.rgb}


@dataclass(frozen=True, eq=False)
class ConceptScene:
    """A scene with one object in the new color (``new``, an index into ``objects``, which
    carry the placeholder color there)."""

    objects: tuple[ShapeObject, ...]
    new: int
    background: str
    offsets: tuple[tuple[float, float], ...]
    image: np.ndarray  # (H, W, 3) uint8, the new object in the new color
    caption: str  # a training caption (one of the dataset's phrasings)
    prompt: str  # the canonical caption with the background, as evaluation prompts are

    @property
    def count(self) -> int:
        return len(self.objects)


def _rename(text: str, color: NewColor) -> str:
    return re.sub(rf"\b{PLACEHOLDER}\b", color.name, text)


def concept_scenes(
    color: NewColor,
    seed: int,
    count: int,
    start: int = 0,
    image_size: int = 64,
    two_object_share: float = 0.4,
) -> list[ConceptScene]:
    """Items ``start`` … ``start+count−1`` of the concept's stream for ``seed``: layouts and
    backgrounds from the shapes dataset, one object (drawn at random) in the new color, any
    other in an old color but the placeholder."""
    layouts = ShapesDataset(
        seed=seed, split="all", held_out=(), image_size=image_size,
        two_object_share=two_object_share,
    )  # fmt: skip
    others = [c for c in COLORS if c != PLACEHOLDER]
    out = []
    for index in range(start, start + count):
        sample = layouts[index]
        rng = np.random.default_rng([seed, _RNG_TAG, index])
        new = int(rng.integers(len(sample.objects)))
        objects = tuple(
            ShapeObject(
                o.shape,
                PLACEHOLDER if k == new else others[int(rng.integers(len(others)))],
                o.size,
                o.position,
            )
            for k, o in enumerate(sample.objects)
        )
        drawn = render(objects, sample.background, image_size, sample.offsets)
        placed = ShapesSample(
            image=drawn,
            caption="",
            objects=objects,
            background=sample.background,
            offsets=sample.offsets,
        )
        mask = object_masks(placed)[new][..., None]  # (H, W, 1) coverage
        shift = np.subtract(color.rgb, COLORS[PLACEHOLDER], dtype=np.float64)
        image = np.clip(np.rint(drawn + shift * mask), 0, 255).astype(np.uint8)
        text, _ = aligned_caption(objects, sample.background, rng)
        out.append(
            ConceptScene(
                objects=objects,
                new=new,
                background=sample.background,
                offsets=sample.offsets,
                image=image,
                caption=_rename(text, color),
                prompt=_rename(canonical_caption(objects, sample.background), color),
            )
        )
    return out


def write_concept_folder(
    color: NewColor, out_dir: str | Path, count: int, seed: int = 0, image_size: int = 64
) -> int:
    """An image folder (``metadata.jsonl`` layout) of ``count`` concept scenes."""
    scenes = concept_scenes(color, seed, count, image_size=image_size)
    return export_image_folder((CaptionedImage(s.image, s.caption) for s in scenes), out_dir)


def read_color(
    image: np.ndarray, obj: ShapeObject, background: str, palette: dict[str, tuple[int, int, int]]
) -> str | None:
    """The palette color nearest to the median of the object's pixels: those of its cell (its
    reach at any jitter) that differ from the background. None when the cell holds none, or
    when the median is further than ``COLOR_DISTANCE`` from every palette color."""
    size = image.shape[0]
    scale = size / FRAME
    cx, cy = POSITION_CENTERS[obj.position]
    reach = SIZE_RADII[obj.size] * TRIANGLE_SCALE + MAX_JITTER + 1
    lo_x, hi_x = (int(max(0, round((c) * scale))) for c in (cx - reach, cx + reach))
    lo_y, hi_y = (int(max(0, round((c) * scale))) for c in (cy - reach, cy + reach))
    cell = image[lo_y:hi_y, lo_x:hi_x].reshape(-1, 3).astype(np.float64)
    far = np.linalg.norm(cell - np.asarray(BACKGROUNDS[background]), axis=1) > OBJECT_DISTANCE
    if far.sum() < 4:
        return None
    median = np.median(cell[far], axis=0)
    names = list(palette)
    distances = [float(np.linalg.norm(median - np.asarray(palette[n]))) for n in names]
    best = int(np.argmin(distances))
    # A blend between two colors (what a model makes of a word it does not know) is neither.
    return names[best] if distances[best] <= COLOR_DISTANCE else None


def matches(read: Scene, image: np.ndarray, scene: ConceptScene, color: NewColor) -> bool:
    """Whether the image shows the scene: the classifier's reading agrees on every position,
    shape, size and old color and on the background, and the new object's pixels are the new
    color."""
    if read.background != scene.background or len(read.objects) != scene.count:
        return False
    by_place = {o.position: o for o in read.objects}
    for k, want in enumerate(scene.objects):
        got = by_place.get(want.position)
        if got is None or (got.shape, got.size) != (want.shape, want.size):
            return False
        if k != scene.new and got.color != want.color:
            return False
    new = scene.objects[scene.new]
    return read_color(image, new, scene.background, color.palette) == color.name


def concept_adherence(
    classifier: AttributeClassifier,
    images: Sequence[np.ndarray],
    scenes: Sequence[ConceptScene],
    color: NewColor,
) -> dict[str, Adherence]:
    """Adherence per object count ("1 object", "2 objects") and in all."""
    from PIL import Image

    reads = classifier.read(pil_to_tensor([Image.fromarray(im) for im in images]))
    counts: dict[str, list[int]] = {}
    for read, image, scene in zip(reads, images, scenes, strict=True):
        hit = matches(read, image, scene, color)
        for group in (f"{scene.count} object" + ("s" if scene.count > 1 else ""), "all"):
            c = counts.setdefault(group, [0, 0])
            c[0] += hit
            c[1] += 1
    return {g: Adherence(m, t) for g, (m, t) in counts.items()}
