"""Synthetic captioned shapes: a small, fully known text-to-image dataset.

Every image shows one or two flat shapes on a dark background, and its caption names each
shape's size, color, kind and position. Because the generator knows what it drew, evaluation can
check whether a model put the right thing in the right place, and because some color-shape pairs
are kept out of training, it can measure compositional generalisation ("an orange square" when
only orange circles and green squares were seen). Everything here is numpy; samples are a pure
function of ``(seed, split, index)``.

Constants
---------
``SHAPES``
    The shape kinds: ``circle``, ``square``, ``triangle``.
``COLORS``
    Object colors by name, as RGB: red (220, 40, 40), green (40, 180, 60), blue (50, 90, 230),
    yellow (240, 220, 50), purple (150, 60, 200), orange (250, 140, 30), white (240, 240, 240).
``SIZES``
    ``small`` and ``large``; their radii are in ``SIZE_RADII``.
``POSITIONS``
    ``top left``, ``top right``, ``bottom left``, ``bottom right``, ``center``; their centers are
    in ``POSITION_CENTERS``.
``BACKGROUNDS``
    Four dark background colors, so every object color stands out: black (12, 12, 12),
    gray (64, 64, 64), navy (20, 26, 70), brown (72, 46, 26).
``DEFAULT_HELD_OUT``
    Color-shape pairs kept out of the ``train`` split and required by the ``held_out`` split:
    orange square, purple triangle, green circle. Each held-out color and each held-out shape
    still appears in training in other pairs, so only the combination is new.

Geometry
--------
Shapes are laid out in a 64 × 64 frame (``FRAME``) that is scaled by ``image_size / 64`` when
rendering, so a sample looks the same at every resolution. ``POSITION_CENTERS`` puts the corners
at 16 and 48 px (top left is x=16, y=16; y grows downwards) and the center at (32, 32).
``SIZE_RADII`` gives small 7 px and large 13 px: a circle has that radius and a square that
half-side. A triangle is equilateral and points up; its circumradius is ``TRIANGLE_SCALE`` (2/√3)
times the size radius, which makes its base exactly as wide as the square of the same size (with
circumradius equal to the radius it would cover a third of the square's area and read as a
smaller size). It is centered on its bounding box rather than its centroid, so it sits in the
middle of its cell like the other shapes.

Shapes are drawn from signed distance fields d (in output pixels, negative inside) with
anti-aliased edges: a pixel's coverage is clip(0.5 − d, 0, 1) and its color is the object color
blended over what is below by that coverage. A pixel whose center lies a pixel or more inside a
shape therefore has exactly the object's RGB.

The dataset jitters each object by up to ``MAX_JITTER`` (2 px) in x and y. Two objects get
distinct positions and are resampled unless their jittered bounding boxes are at least
``MIN_GAP`` (2 px) apart along x or y; in practice a large object never shares an image with a
center object, and two small ones only when the jitter keeps them apart. The gap keeps the
anti-aliased edges of two objects disjoint at any ``image_size`` of 32 or more.

Captions
--------
:func:`canonical_caption` gives "a large red circle in the top left and a small blue square in
the center". :func:`caption` picks it or one of several paraphrases, and mentions the background
about one time in three. Every caption names every object's size, color, shape and position with
the words of the constants above, so the vocabulary (:func:`vocabulary`) is small and closed.
"""

from __future__ import annotations

import math
import operator
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from core.diffusion.data.captioned import CaptionedImage
from core.diffusion.words import split_words

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape kinds an object can have."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (240, 240, 240),
}
"""Object colors by caption word, as RGB; a fully covered pixel has exactly this value."""

SIZES: tuple[str, ...] = ("small", "large")
"""Object sizes; see ``SIZE_RADII``."""

POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
"""Where an object can sit; see ``POSITION_CENTERS``."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "gray": (64, 64, 64),
    "navy": (20, 26, 70),
    "brown": (72, 46, 26),
}
"""Background colors by caption word, as RGB; all dark so every object color stands out."""

DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("orange", "square"),
    ("purple", "triangle"),
    ("green", "circle"),
)
"""(color, shape) pairs kept out of training to measure compositional generalisation."""

FRAME = 64
"""Side of the layout frame in pixels; rendering scales it to ``image_size``."""

POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "top left": (16.0, 16.0),
    "top right": (48.0, 16.0),
    "bottom left": (16.0, 48.0),
    "bottom right": (48.0, 48.0),
    "center": (32.0, 32.0),
}
"""(x, y) center of each position in the 64-pixel frame; y grows downwards."""

SIZE_RADII: dict[str, float] = {"small": 7.0, "large": 13.0}
"""Circle radius and square half-side of each size, in frame pixels."""

TRIANGLE_SCALE = 2.0 / math.sqrt(3.0)
"""Triangle circumradius over size radius: the triangle's base is as wide as the square."""

MAX_JITTER = 2.0
"""Largest random shift of an object's center along x and along y, in frame pixels."""

MIN_GAP = 2.0
"""Smallest gap between two objects' bounding boxes, in frame pixels."""

ONE_OBJECT_PROBABILITY = 0.6
"""Chance that an image holds one object rather than two (when ``max_objects`` is 2)."""

SPLITS: tuple[str, ...] = ("train", "held_out", "all")
"""Dataset splits: no held-out pair, at least one held-out pair, anything."""

_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# Bound on rejection-sampling draws per sample. Even the rarest valid request (a two-object
# train image with 20 of the 21 pairs held out) is accepted about once in 600 draws, so hitting
# this bound means a bug, not bad luck.
_MAX_ATTEMPTS = 10_000

Offsets = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ShapeObject:
    """One shape in an image, named by the same words its caption uses."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field_name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field_name} {value!r}; expected one of {allowed}")

    @property
    def pair(self) -> tuple[str, str]:
        """The (color, shape) pair, the unit that held-out splits are defined on."""
        return (self.color, self.shape)


@dataclass(frozen=True, eq=False)
class ShapesSample(CaptionedImage):
    objects: tuple[ShapeObject, ...]
    background: str
    # Per-object (dx, dy) jitter in frame pixels, so the image can be re-rendered exactly;
    # empty means the objects sit on their position centers.
    offsets: Offsets = ()
    # For each word of the caption (as the tokenizer splits it), the index of the object whose
    # size, color, shape or position it names, or -1 (a, in, the, and, the background, ...).
    # Training's grounding loss reads it; the model itself only ever sees the caption.
    word_objects: tuple[int, ...] = ()


# --- captions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """A caption form: ``prefix`` + object phrases joined by ``joiner``."""

    prefix: str
    phrase: str  # str.format fields: size, color, shape, position, place
    joiner: str


_CANONICAL = _Template("", "a {size} {color} {shape} in the {position}", " and ")
_TEMPLATES: tuple[_Template, ...] = (
    _CANONICAL,
    _Template("", "{size} {color} {shape}, {position}", " and "),
    _Template("there is ", "a {size} {color} {shape} in the {place}", " and "),
    _Template("", "a {color} {shape}, {size}, at the {position}", " and "),
    _Template("", "{position}: a {size} {color} {shape}", ", "),
    _Template("", "a {size} {color} {shape} at the {position}", " and "),
)
_CANONICAL_BACKGROUND = " on a {background} background"
_BACKGROUND_SUFFIXES: tuple[str, ...] = (_CANONICAL_BACKGROUND, ", {background} background")
_BACKGROUND_PROBABILITY = 1.0 / 3.0


def _place(position: str) -> str:
    """A position as a place: "top left corner", but plain "center"."""
    return position if position == "center" else f"{position} corner"


# Every value each template field can take; vocabulary() reads the words from here.
_FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": POSITIONS,
    "place": tuple(_place(p) for p in POSITIONS),
    "background": tuple(BACKGROUNDS),
}


def _fields(obj: ShapeObject) -> dict[str, str]:
    return {
        "size": obj.size,
        "color": obj.color,
        "shape": obj.shape,
        "position": obj.position,
        "place": _place(obj.position),
    }


def caption_words(text: str) -> list[str]:
    """The words of a caption: commas and colons removed, then split on whitespace."""
    return text.replace(",", "").replace(":", "").split()


def _checked_objects(objects: Iterable[ShapeObject]) -> tuple[ShapeObject, ...]:
    objects = tuple(objects)
    if not objects:
        raise ValueError("a shapes image needs at least one object")
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"objects must have distinct positions, got {positions}")
    return objects


def _checked_background(background: str) -> str:
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    return background


def _compose_aligned(
    template: _Template, objects: Sequence[ShapeObject], background_suffix: str | None, bg: str
) -> tuple[str, tuple[int, ...]]:
    """The caption, and for each of its words the object it names (see ShapesSample)."""
    pieces: list[tuple[str, int]] = [(template.prefix, -1)]
    for k, obj in enumerate(objects):
        if k:
            pieces.append((template.joiner, -1))
        fields = _fields(obj)
        for literal, field_name, _, _ in string.Formatter().parse(template.phrase):
            pieces.append((literal, -1))
            if field_name is not None:
                pieces.append((fields[field_name], k))
    if background_suffix is not None:
        pieces.append((background_suffix.format(background=bg), -1))
    # Every piece starts and ends at a word boundary, so its words are the caption's words.
    owners = tuple(k for text, k in pieces for _ in split_words(text))
    return "".join(text for text, _ in pieces), owners


def _compose(
    template: _Template, objects: Sequence[ShapeObject], background_suffix: str | None, bg: str
) -> str:
    return _compose_aligned(template, objects, background_suffix, bg)[0]


def canonical_caption(objects: Iterable[ShapeObject], background: str | None = None) -> str:
    """ "a large red circle in the top left and a small blue square in the center", plus
    " on a navy background" when ``background`` is given."""
    objects = _checked_objects(objects)
    if background is None:
        return _compose(_CANONICAL, objects, None, "")
    return _compose(_CANONICAL, objects, _CANONICAL_BACKGROUND, _checked_background(background))


def caption(objects: Iterable[ShapeObject], background: str, rng: np.random.Generator) -> str:
    """A random caption: the canonical form or a paraphrase, naming the background about 1 in 3."""
    return aligned_caption(objects, background, rng)[0]


def aligned_caption(
    objects: Iterable[ShapeObject], background: str, rng: np.random.Generator | None
) -> tuple[str, tuple[int, ...]]:
    """:func:`caption` (or, without ``rng``, :func:`canonical_caption` with no background) and
    the object each of its words names, -1 for none (see ``ShapesSample.word_objects``)."""
    objects = _checked_objects(objects)
    background = _checked_background(background)
    if rng is None:
        return _compose_aligned(_CANONICAL, objects, None, background)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    suffix = None
    if rng.random() < _BACKGROUND_PROBABILITY:
        suffix = _BACKGROUND_SUFFIXES[int(rng.integers(len(_BACKGROUND_SUFFIXES)))]
    return _compose_aligned(template, objects, suffix, background)


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted; read off the templates and the constants."""
    texts = [_CANONICAL_BACKGROUND, *_BACKGROUND_SUFFIXES]
    for template in _TEMPLATES:
        texts += [template.prefix, template.phrase, template.joiner]
    words: set[str] = set()
    for text in texts:
        for literal, field_name, _, _ in string.Formatter().parse(text):
            words.update(caption_words(literal))
            if field_name is not None:
                for value in _FIELD_VALUES[field_name]:
                    words.update(caption_words(value))
    return sorted(words)


# --- rendering ------------------------------------------------------------------------------


def _half_extent(obj: ShapeObject) -> tuple[float, float]:
    """Half width and half height of the object's bounding box, in frame pixels."""
    r = SIZE_RADII[obj.size]
    if obj.shape == "triangle":
        vertices = _triangle_vertices(r)
        return max(abs(x) for x, _ in vertices), max(abs(y) for _, y in vertices)
    return r, r


def _triangle_vertices(r: float) -> list[tuple[float, float]]:
    """Upward equilateral triangle with circumradius TRIANGLE_SCALE·r, bounding-box centered."""
    circumradius = TRIANGLE_SCALE * r
    half_width = circumradius * math.sqrt(3.0) / 2.0  # half the side
    half_height = circumradius * 0.75  # the height is 1.5 circumradii
    return [(0.0, -half_height), (half_width, half_height), (-half_width, half_height)]


def _convex_polygon_sdf(
    vertices: Sequence[tuple[float, float]], px: np.ndarray, py: np.ndarray
) -> np.ndarray:
    """Exact signed distance to a convex polygon: distance to the nearest edge, negative inside."""
    px, py = np.broadcast_arrays(px, py)
    dist2 = np.full(px.shape, np.inf)
    all_left = np.ones(px.shape, dtype=bool)
    all_right = np.ones(px.shape, dtype=bool)
    for i, (ax, ay) in enumerate(vertices):
        bx, by = vertices[(i + 1) % len(vertices)]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        cross = ex * wy - ey * wx
        all_left &= cross >= 0
        all_right &= cross <= 0
    # Inside a convex polygon means on the same side of every edge, whichever the winding.
    distance = np.sqrt(dist2)
    return np.where(all_left | all_right, -distance, distance)


def _sdf(obj: ShapeObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance in frame pixels from points (px, py), relative to the object's center."""
    r = SIZE_RADII[obj.size]
    if obj.shape == "circle":
        return np.hypot(px, py) - r
    if obj.shape == "square":
        qx, qy = np.abs(px) - r, np.abs(py) - r
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    return _convex_polygon_sdf(_triangle_vertices(r), px, py)


def _checked_offsets(
    objects: Sequence[ShapeObject], offsets: Sequence[Sequence[float]] | None
) -> Offsets:
    """Offsets as float pairs, one per object; None or empty means no jitter."""
    if offsets is None or len(offsets) == 0:
        return tuple((0.0, 0.0) for _ in objects)
    if len(offsets) != len(objects):
        raise ValueError(f"got {len(offsets)} offsets for {len(objects)} objects")
    checked = []
    for offset in offsets:
        if len(offset) != 2:
            raise ValueError(f"an offset is a (dx, dy) pair, got {offset!r}")
        checked.append((float(offset[0]), float(offset[1])))
    return tuple(checked)


def render(
    objects: Iterable[ShapeObject],
    background: str,
    image_size: int = 64,
    offsets: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Draw the objects, in order, over the background; returns (H, W, 3) uint8 RGB.

    ``offsets`` shifts each object's center by (dx, dy) frame pixels; None or empty means none.
    """
    objects = _checked_objects(objects)
    background = _checked_background(background)
    shifts = _checked_offsets(objects, offsets)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image = np.empty((image_size, image_size, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[background]
    for obj, offset in zip(objects, shifts, strict=True):
        coverage = _coverage(obj, offset, image_size)[..., None]
        image += (np.asarray(COLORS[obj.color], dtype=np.float64) - image) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _coverage(obj: ShapeObject, offset: tuple[float, float], image_size: int) -> np.ndarray:
    """The share of each pixel the object covers, (H, W) in [0, 1], anti-aliased."""
    scale = image_size / FRAME
    # Pixel centers in frame coordinates: the sample, not the pixel's corner, decides coverage.
    centers = (np.arange(image_size) + 0.5) / scale
    xs, ys = centers[None, :], centers[:, None]
    cx, cy = POSITION_CENTERS[obj.position]
    distance = _sdf(obj, xs - (cx + offset[0]), ys - (cy + offset[1])) * scale  # output pixels
    return np.clip(0.5 - distance, 0.0, 1.0)


def object_masks(sample: ShapesSample, image_size: int | None = None) -> np.ndarray:
    """Each object's coverage of the image, (objects, H, W) float32 in [0, 1]: the masks that
    training's grounding loss pulls each object's words toward. Objects never overlap."""
    size = image_size or sample.image.shape[0]
    shifts = _checked_offsets(sample.objects, sample.offsets)
    return np.stack(
        [_coverage(o, d, size) for o, d in zip(sample.objects, shifts, strict=True)]
    ).astype(np.float32)


def layout_is_clear(
    objects: Iterable[ShapeObject], offsets: Sequence[Sequence[float]] | None = None
) -> bool:
    """Whether every two objects' bounding boxes are at least ``MIN_GAP`` apart along x or y."""
    objects = _checked_objects(objects)
    shifts = _checked_offsets(objects, offsets)
    boxes = []
    for obj, (dx, dy) in zip(objects, shifts, strict=True):
        cx, cy = POSITION_CENTERS[obj.position]
        boxes.append((cx + dx, cy + dy, *_half_extent(obj)))
    for i, (ax, ay, ahx, ahy) in enumerate(boxes):
        for bx, by, bhx, bhy in boxes[i + 1 :]:
            gap_x = abs(ax - bx) - (ahx + bhx)
            gap_y = abs(ay - by) - (ahy + bhy)
            if max(gap_x, gap_y) < MIN_GAP:
                return False
    return True


def _jitter(rng: np.random.Generator, count: int) -> Offsets:
    shifts = rng.uniform(-MAX_JITTER, MAX_JITTER, size=(count, 2))
    return tuple((float(dx), float(dy)) for dx, dy in shifts)


def render_sample(
    objects: Iterable[ShapeObject],
    background: str,
    image_size: int = 64,
    rng: np.random.Generator | None = None,
    *,
    mention_background: bool = False,
) -> ShapesSample:
    """Render a chosen scene (an evaluation prompt, say) with its canonical caption.

    Without ``rng`` the objects sit exactly on their position centers; with it they get the
    dataset's jitter, redrawn until the layout is clear. Raises ValueError for objects that
    would overlap, since the dataset never shows such a scene.
    """
    objects = _checked_objects(objects)
    background = _checked_background(background)
    if not layout_is_clear(objects):
        raise ValueError(f"these objects overlap, so the dataset never draws them: {objects}")
    offsets = _checked_offsets(objects, None)
    if rng is not None:
        for _ in range(_MAX_ATTEMPTS):
            candidate = _jitter(rng, len(objects))
            if layout_is_clear(objects, candidate):
                offsets = candidate
                break
    return ShapesSample(
        image=render(objects, background, image_size, offsets),
        caption=canonical_caption(objects, background if mention_background else None),
        objects=objects,
        background=background,
        offsets=offsets,
    )


# --- dataset --------------------------------------------------------------------------------


class ShapesDataset:
    """Captioned shapes, deterministic from ``(seed, split, index)`` and independent of order.

    ``split`` is ``"train"`` (no object uses a held-out color-shape pair), ``"held_out"`` (at
    least one object does) or ``"all"``. Colors, shapes, sizes, positions and the background are
    drawn uniformly, conditioned on the split rule and a clear layout (rejection sampling); the
    number of objects is drawn first, 1 or 2 at about 60/40 (``two_object_share`` sets the 40),
    so the split does not skew it.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
        image_size: int = 64,
        max_objects: int = 2,
        paraphrase: bool = True,
        length: int = 1_000_000,
        two_object_share: float = 1.0 - ONE_OBJECT_PROBABILITY,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        pairs = tuple((str(color), str(shape)) for color, shape in held_out)
        for color, shape in pairs:
            if color not in COLORS:
                raise ValueError(
                    f"unknown held-out color {color!r}; expected one of {tuple(COLORS)}"
                )
            if shape not in SHAPES:
                raise ValueError(f"unknown held-out shape {shape!r}; expected one of {SHAPES}")
        if split == "held_out" and not pairs:
            raise ValueError("the held_out split needs at least one held-out pair")
        if split == "train" and len(set(pairs)) == len(COLORS) * len(SHAPES):
            raise ValueError("the train split needs at least one color-shape pair not held out")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if not 0.0 <= two_object_share <= 1.0:
            raise ValueError(f"two_object_share must be in [0, 1], got {two_object_share}")
        self.seed = seed
        self.split = split
        self.held_out: frozenset[tuple[str, str]] = frozenset(pairs)
        self.image_size = image_size
        self.max_objects = max_objects
        self.paraphrase = paraphrase
        self.length = length
        self.two_object_share = two_object_share

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        index = operator.index(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        objects, offsets = self._draw_layout(rng)
        background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        text, owners = aligned_caption(objects, background, rng if self.paraphrase else None)
        return ShapesSample(
            image=render(objects, background, self.image_size, offsets),
            caption=text,
            objects=objects,
            background=background,
            offsets=offsets,
            word_objects=owners,
        )

    def _split_accepts(self, objects: Sequence[ShapeObject]) -> bool:
        uses_held_out = any(o.pair in self.held_out for o in objects)
        if self.split == "train":
            return not uses_held_out
        if self.split == "held_out":
            return uses_held_out
        return True

    def _draw_layout(self, rng: np.random.Generator) -> tuple[tuple[ShapeObject, ...], Offsets]:
        one = self.max_objects == 1 or rng.random() < 1.0 - self.two_object_share
        count = 1 if one else 2
        colors = tuple(COLORS)
        for _ in range(_MAX_ATTEMPTS):
            positions = rng.choice(len(POSITIONS), size=count, replace=False)
            objects = tuple(
                ShapeObject(
                    shape=SHAPES[int(rng.integers(len(SHAPES)))],
                    color=colors[int(rng.integers(len(colors)))],
                    size=SIZES[int(rng.integers(len(SIZES)))],
                    position=POSITIONS[int(p)],
                )
                for p in positions
            )
            offsets = _jitter(rng, count)
            if self._split_accepts(objects) and layout_is_clear(objects, offsets):
                return objects, offsets
        raise RuntimeError(f"no valid layout in {_MAX_ATTEMPTS} draws; the split rule is broken")
