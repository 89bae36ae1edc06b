"""The attribute classifier: reads a shapes image back into its scene.

It is the judge of ``dq eval`` (prompt adherence is whether what it reads matches the prompt)
and the feature network of its FID, standing in for Inception, whose weights cannot be had
here. It is trained on every colour-shape pair, the held-out ones included: the judge must know
what the generator was never shown.

Objects sit at one of five positions (``POSITIONS``, jittered by at most 2 px), so the
network reads one slot per position:

    image (B, 3, 64, 64) → stem conv → [↓ conv, ConvResBlock] × 3 → feature map (B, C, 8, 8)
    slot p = Σ_ij softmax(w_p)_ij · map[:, :, i, j] + e_p     (learned pooling per position)
    slot hidden h_p = SiLU(Linear(slot p))                   (B, 5, slot_width)
        → presence (2), shape (3), color (7), size (2)       (one head shared by all slots)
    background hidden g = SiLU(Linear(mean of map))           (B, background_width)
        → background (4)

``features(x)`` is the penultimate vector [h_1 … h_5, g], the input of every logit, as
Inception's pool3 is for the original FID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.diffusion.autoencoder import ConvResBlock
from core.diffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.diffusion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    FRAME,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    canonical_caption,
)

CHECKPOINT_KIND = "attribute-classifier"
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
}
"""Per-object attributes the slot head reads, besides presence; position is the slot itself."""
_COLOR_NAMES = tuple(COLORS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects (at most one per position, in ``POSITIONS`` order) and the
    background. The unit both the prompts and the classifier's readings are written in."""

    objects: tuple[ShapeObject, ...]
    background: str

    @classmethod
    def of(cls, objects: Sequence[ShapeObject], background: str) -> Scene:
        """The scene in canonical form, objects ordered by position."""
        return cls(tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))), background)

    @property
    def caption(self) -> str:
        """The canonical caption with the background, as the evaluation prompts are written."""
        if not self.objects:
            return f"nothing on a {self.background} background"
        return canonical_caption(self.objects, self.background)


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (16, 24, 48, 96)  # the stem, then one entry per ↓2 level
    groups: int = 8
    slot_width: int = 24
    background_width: int = 8

    @property
    def feature_dim(self) -> int:
        return len(POSITIONS) * self.slot_width + self.background_width

    @property
    def map_size(self) -> int:
        return self.image_size // 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        return cls(**{**d, "channels": tuple(d["channels"])})


def _slot_prior(size: int) -> torch.Tensor:
    """(P, size·size) pooling logits that start as a Gaussian bump (σ = one cell) on each
    position's center, so that every slot first looks where its objects are drawn."""
    cells = (torch.arange(size, dtype=torch.float32) + 0.5) * FRAME / size  # cell centers, px
    cy, cx = torch.meshgrid(cells, cells, indexing="ij")
    sigma = FRAME / size
    bumps = [
        -((cx - x) ** 2 + (cy - y) ** 2) / (2 * sigma**2)
        for x, y in (POSITION_CENTERS[p] for p in POSITIONS)
    ]
    return torch.stack(bumps).flatten(1)


class AttributeClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.image_size % 2 ** (len(c.channels) - 1):
            raise ValueError("image_size must be divisible by 2^(levels)")
        self.stem = nn.Conv2d(3, c.channels[0], 3, padding=1)
        levels: list[nn.Module] = []
        for c_in, c_out in pairwise(c.channels):
            levels += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                ConvResBlock(c_out, c_out, c.groups),
            ]
        self.levels = nn.Sequential(*levels)
        width = c.channels[-1]
        self.norm_out = nn.GroupNorm(c.groups, width)
        self.slot_logits = nn.Parameter(_slot_prior(c.map_size))  # (P, S·S)
        self.slot_embedding = nn.Parameter(torch.zeros(len(POSITIONS), width))
        self.slot_hidden = nn.Linear(width, c.slot_width)
        n_slot = 2 + sum(len(v) for v in ATTRIBUTES.values())
        self.slot_head = nn.Linear(c.slot_width, n_slot)
        self.background_hidden = nn.Linear(width, c.background_width)
        self.background_head = nn.Linear(c.background_width, len(BACKGROUNDS))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [−1, 1] at any size → the classifier's size, on its device."""
        x = images.to(self.device, torch.float32)
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The penultimate layer: slot hiddens (B, P, slot_width), background (B, bg_width)."""
        fmap = F.silu(self.norm_out(self.levels(self.stem(x))))  # (B, C, S, S)
        flat = fmap.flatten(2)  # (B, C, S·S)
        weights = self.slot_logits.softmax(-1)  # (P, S·S)
        slots = torch.einsum("pk,bck->bpc", weights, flat) + self.slot_embedding  # (B, P, C)
        slot_h = F.silu(self.slot_hidden(slots))
        background_h = F.silu(self.background_hidden(flat.mean(-1)))  # (B, bg_width)
        return slot_h, background_h

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: presence (B, P, 2), shape (B, P, 3), color (B, P, 7), size (B, P, 2),
        background (B, 4)."""
        slot_h, background_h = self.hidden(x)
        logits = self.slot_head(slot_h)  # (B, P, 14)
        sizes = [2, *(len(v) for v in ATTRIBUTES.values())]
        names = ["presence", *ATTRIBUTES]
        out = dict(zip(names, logits.split(sizes, dim=-1), strict=True))
        out["background"] = self.background_head(background_h)
        return out

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The FID features of images (B, 3, H, W) in [−1, 1]: (B, feature_dim) on the CPU."""
        out = []
        for i in range(0, len(images), batch_size):
            slot_h, background_h = self.hidden(self.prepare(images[i : i + batch_size]))
            out.append(torch.cat([slot_h.flatten(1), background_h], 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Arg-max class indices: presence, shape, color, size (B, P) and background (B,)."""
        parts: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(images), batch_size):
            logits = self(self.prepare(images[i : i + batch_size]))
            parts.append({k: v.argmax(-1).cpu() for k, v in logits.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def read(self, images: torch.Tensor, batch_size: int = 256) -> list[Scene]:
        """What each image shows, according to the classifier."""
        return scenes_from_predictions(self.predict(images, batch_size))

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        config = {
            "kind": CHECKPOINT_KIND,
            "classifier": self.config.to_dict(),
            "parameters": self.num_parameters(),
            "feature_dim": self.config.feature_dim,
            **(extra or {}),
        }
        return save_checkpoint(directory, self.state_dict(), config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> AttributeClassifier:
        tensors, config = load_checkpoint(directory, "cpu")
        if config.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(
                f"checkpoint kind is {config.get('kind')!r}; the evaluation needs an "
                f"{CHECKPOINT_KIND!r} checkpoint (train one with `dq train classifier`)"
            )
        try:
            model = cls(ClassifierConfig.from_dict(config["classifier"]))
            model.load_state_dict(tensors)
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{directory}: not a usable classifier checkpoint: {e}") from None
        return model.to(device).eval()


def scenes_from_predictions(pred: dict[str, torch.Tensor]) -> list[Scene]:
    scenes = []
    for b in range(len(pred["background"])):
        objects = tuple(
            ShapeObject(
                shape=SHAPES[int(pred["shape"][b, p])],
                color=_COLOR_NAMES[int(pred["color"][b, p])],
                size=SIZES[int(pred["size"][b, p])],
                position=position,
            )
            for p, position in enumerate(POSITIONS)
            if pred["presence"][b, p]
        )
        scenes.append(Scene(objects, _BACKGROUND_NAMES[int(pred["background"][b])]))
    return scenes


def scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class indices to train on: presence, shape, color, size (B, P), background (B,).
    Attributes of empty slots are 0 and must be masked by presence."""
    b, p = len(scenes), len(POSITIONS)
    targets = {k: torch.zeros(b, p, dtype=torch.long) for k in ("presence", *ATTRIBUTES)}
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            j = POSITIONS.index(obj.position)
            targets["presence"][i, j] = 1
            targets["shape"][i, j] = SHAPES.index(obj.shape)
            targets["color"][i, j] = _COLOR_NAMES.index(obj.color)
            targets["size"][i, j] = SIZES.index(obj.size)
    targets["background"] = torch.tensor([_BACKGROUND_NAMES.index(s.background) for s in scenes])
    return targets


def classifier_loss(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on presence in every slot and on the background; on shape, color and size
    only in slots that hold an object."""
    present = targets["presence"].bool()  # (B, P)
    parts = {
        "presence": F.cross_entropy(
            logits["presence"].flatten(0, 1), targets["presence"].flatten()
        ),
        "background": F.cross_entropy(logits["background"], targets["background"]),
    }
    for name in ATTRIBUTES:
        parts[name] = F.cross_entropy(logits[name][present], targets[name][present])
    loss = torch.stack(list(parts.values())).sum()
    return loss, {f"loss_{k}": v.item() for k, v in parts.items()}


def attribute_accuracy(read: Sequence[Scene], truth: Sequence[Scene]) -> dict[str, float]:
    """Share of objects whose shape, color and size are read right (at their position, which
    must be read as occupied), of images whose occupied positions are exactly right
    (``position``), whose background is right, and of images read entirely right (``scene``)."""
    if len(read) != len(truth) or not truth:
        raise ValueError("need one reading per true scene, and at least one")
    hits = {name: 0 for name in ATTRIBUTES}
    objects = 0
    position = background = scene = 0
    for r, t in zip(read, truth, strict=True):
        at = {o.position: o for o in r.objects}
        for obj in t.objects:
            objects += 1
            got = at.get(obj.position)
            for name in ATTRIBUTES:
                hits[name] += got is not None and getattr(got, name) == getattr(obj, name)
        position += {o.position for o in r.objects} == {o.position for o in t.objects}
        background += r.background == t.background
        scene += r == Scene.of(t.objects, t.background)
    n = len(truth)
    return {
        **{name: hits[name] / max(objects, 1) for name in ATTRIBUTES},
        "position": position / n,
        "background": background / n,
        "scene": scene / n,
    }


def flops_per_image(config: ClassifierConfig) -> int:
    """Multiply-adds of one forward pass, counted from the convolutions (the rest is <1%)."""
    s = config.image_size
    total = 3 * config.channels[0] * 9 * s * s  # stem
    for c_in, c_out in pairwise(config.channels):
        s //= 2
        total += c_in * c_out * 9 * s * s + 2 * c_out * c_out * 9 * s * s
    return 2 * total
