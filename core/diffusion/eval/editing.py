"""The evaluation's image-editing rows: image-to-image (SDEdit) at each strength and inpainting
(RePaint), on real images (:func:`.scenes.recolor_tasks`, :func:`.scenes.inpaint_tasks`), read by
the attribute classifier, with the pixels outside each mask compared with its init image."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.shapes import ShapeObject
from core.diffusion.eval.classifier import AttributeClassifier, Scene
from core.diffusion.eval.common import Adherence, image_seed, pil_to_tensor
from core.diffusion.eval.scenes import EditTask, edit_sources, inpaint_tasks, recolor_tasks
from core.diffusion.pipeline import LatentDiffusion

IMAGE_TO_IMAGE_SEED_OFFSET = 600_000  # the editing rows' seeds, apart from the others
INPAINTING_SEED_OFFSET = 700_000


@dataclass
class ImageToImageRow:
    """Image-to-image at one strength: per measure, how many of the ``n`` edited images the
    classifier reads that way (see :func:`image_to_image_counts`)."""

    strength: float
    n: int
    counts: dict[str, Adherence]
    seconds: float


@dataclass
class InpaintingRow:
    """Inpainting: the classifier's counts (see :func:`inpainting_counts`) and the pixels
    outside the masks against the init images."""

    n: int
    counts: dict[str, Adherence]
    unmasked_identical: Adherence  # images whose every pixel outside the mask is the init's
    unmasked_mse: float  # over all pixels outside the masks, 0-255 scale
    seconds: float

    @property
    def unmasked_psnr_db(self) -> float:
        """PSNR of the pixels outside the masks against the init images; inf when identical."""
        return math.inf if self.unmasked_mse == 0 else 10 * math.log10(255**2 / self.unmasked_mse)


@dataclass
class EditResults:
    image_to_image: list[ImageToImageRow]
    inpainting: InpaintingRow
    # The classifier on perfect edits (each target scene rendered with its source's jitter),
    # read as the prompt: what a perfect editor would score.
    perfect_image_to_image: Adherence
    perfect_inpainting: Adherence

    def numbers(self) -> dict[str, Any]:
        def counts(c: dict[str, Adherence]) -> dict[str, Any]:
            return {k: vars(a) for k, a in c.items()}

        p = self.inpainting
        return {
            "image_to_image": [
                {"strength": r.strength, "n": r.n, "counts": counts(r.counts)}
                for r in self.image_to_image
            ],
            "inpainting": {
                "n": p.n,
                "counts": counts(p.counts),
                "unmasked_identical": vars(p.unmasked_identical),
                "unmasked_mse": p.unmasked_mse,
            },
            "perfect_image_to_image": vars(self.perfect_image_to_image),
            "perfect_inpainting": vars(self.perfect_inpainting),
        }


def _at(scene: Scene, position: str) -> ShapeObject | None:
    """The object a scene has at ``position``, if any."""
    return next((o for o in scene.objects if o.position == position), None)


def image_to_image_counts(read: Sequence[Scene], tasks: Sequence[EditTask]) -> dict[str, Adherence]:
    """How many edited images the classifier reads with the new color at the object's place
    (``new_color``); with that place occupied and no other (``position_kept``); with the
    source's shape and size there (``shape_kept``, ``size_kept``); as exactly the prompt."""
    hits = dict.fromkeys(
        ("new_color", "position_kept", "shape_kept", "size_kept", "read_as_prompt"), 0
    )
    for r, t in zip(read, tasks, strict=True):
        old, new = _at(t.source.scene, t.position), _at(t.target, t.position)
        assert old is not None and new is not None
        got = _at(r, t.position)
        hits["new_color"] += got is not None and got.color == new.color
        hits["position_kept"] += {o.position for o in r.objects} == {t.position}
        hits["shape_kept"] += got is not None and got.shape == old.shape
        hits["size_kept"] += got is not None and got.size == old.size
        hits["read_as_prompt"] += r == t.target
    return {k: Adherence(v, len(tasks)) for k, v in hits.items()}


def inpainting_counts(read: Sequence[Scene], tasks: Sequence[EditTask]) -> dict[str, Adherence]:
    """How many inpainted images the classifier reads with the new object's shape and color in
    the mask's place (``new_object``) and its size (``new_size``); with the kept object as it
    was (``kept_object``); as exactly the prompt."""
    hits = dict.fromkeys(("new_object", "new_size", "kept_object", "read_as_prompt"), 0)
    for r, t in zip(read, tasks, strict=True):
        new = _at(t.target, t.position)
        assert new is not None
        got = _at(r, t.position)
        hits["new_object"] += got is not None and (got.shape, got.color) == (new.shape, new.color)
        hits["new_size"] += got is not None and got.size == new.size
        kept = [o for o in t.target.objects if o.position != t.position]
        hits["kept_object"] += all(_at(r, o.position) == o for o in kept)
        hits["read_as_prompt"] += r == t.target
    return {k: Adherence(v, len(tasks)) for k, v in hits.items()}


def _edit(
    model: LatentDiffusion,
    tasks: Sequence[EditTask],
    strength: float,
    seeds: Sequence[int],
    batch_size: int,
    progress: bool,
) -> tuple[list[Image.Image], float]:
    """The tasks' edited images at the model's default settings, and the wall-clock."""
    images: list[Image.Image] = []
    t0 = time.perf_counter()
    kind = "image-to-image" if tasks[0].mask is None else "inpainting"
    bar = tqdm(
        total=len(tasks),
        desc=f"{kind}, strength {strength:g}, N={len(tasks)}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for i in range(0, len(tasks), batch_size):
            batch = tasks[i : i + batch_size]
            masks = [None if t.mask is None else Image.fromarray(t.mask) for t in batch]
            images += model.generate(
                [t.prompt for t in batch],
                seeds=seeds[i : i + batch_size],
                init_images=[Image.fromarray(t.source.image) for t in batch],
                strength=strength,
                masks=masks,
            )
            bar.update(len(batch))
    return images, time.perf_counter() - t0


def _read_as_prompt(classifier: AttributeClassifier, tasks: Sequence[EditTask]) -> Adherence:
    """The classifier on each task's perfect edit, read as its prompt."""
    read = classifier.read(images_to_tensor([t.perfect() for t in tasks]))
    return Adherence(sum(r == t.target for r, t in zip(read, tasks, strict=True)), len(tasks))


def edit_results(
    model: LatentDiffusion,
    classifier: AttributeClassifier,
    *,
    n: int,
    seed: int,
    strengths: Sequence[float],
    batch_size: int,
    held_out: Sequence[tuple[str, str]],
    progress: bool = False,
) -> EditResults:
    """Image-to-image at each of ``strengths`` and inpainting, ``n`` real images each, at the
    model's default sampler, steps and guidance."""
    ones, twos = edit_sources(seed, n, model.image_size, held_out)
    recolor = recolor_tasks(ones, seed, held_out)
    inpaint = inpaint_tasks(twos, seed, held_out)

    rows = []
    seeds = [image_seed(seed, IMAGE_TO_IMAGE_SEED_OFFSET + i) for i in range(n)]
    for strength in strengths:
        images, seconds = _edit(model, recolor, strength, seeds, batch_size, progress)
        counts = image_to_image_counts(classifier.read(pil_to_tensor(images)), recolor)
        rows.append(ImageToImageRow(strength, n, counts, seconds))

    seeds = [image_seed(seed, INPAINTING_SEED_OFFSET + i) for i in range(n)]
    images, seconds = _edit(model, inpaint, 1.0, seeds, batch_size, progress)
    identical, squares, pixels = 0, 0, 0
    for image, t in zip(images, inpaint, strict=True):
        assert t.mask is not None
        keep = ~t.mask
        diff = np.asarray(image, dtype=np.int64)[keep] - t.source.image[keep]
        identical += not diff.any()
        squares += int((diff**2).sum())
        pixels += diff.size
    inpainting = InpaintingRow(
        n,
        inpainting_counts(classifier.read(pil_to_tensor(images)), inpaint),
        Adherence(identical, n),
        squares / max(pixels, 1),
        seconds,
    )
    return EditResults(
        rows,
        inpainting,
        _read_as_prompt(classifier, recolor),
        _read_as_prompt(classifier, inpaint),
    )
