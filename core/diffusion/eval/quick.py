"""The quick eval that ends every finished training run, stored on the new version as
``ModelVersion.metrics["eval"]``; activation compares a denoiser's with the active version's.
A denoiser's:

    {"fid": float, "n": 256, "adherence": float | None, "reference": str,
     "floor": float | None, "real_n": int, "seconds": float}

- **FID at N = 256 against the run's own data**, with the attribute classifier's features (as
  ``dq eval``: comparable between our models, not with published FIDs). The model makes N
  images at its default settings, image i with seed i.
  - *Shapes data*: the prompts are the first N scenes of ``dq eval``'s stream (seed 0, the
    model's held-out pairs) and the real images the next N; ``floor`` is real against real at
    the same N (the prompts' own renderings against those), so ``fid − floor`` is the part a
    model can close. At N = 256 the floor is about 79 (FID's small-sample bias; the shipped
    model scores 79.97 against 78.81), so compare only figures with the same ``reference``
    and ``n``.
  - *An image folder*: the prompts are its captions, in order and repeated up to N; the real
    images are its first min(N, size) images (``real_n``), and there is no floor.
- **Adherence** on shapes data only: the share of the N images the classifier reads as exactly
  their prompt (every object's shape, color, size and position, the background, nothing
  else). An image folder's captions are free text, so it is None there.
- ``reference`` names what the figures were measured against, e.g. ``shapes eval stream, seed
  0`` or ``image folder s3://bucket/cats (40 images)``: two evals are comparable when it and
  ``n`` are equal.

256 images at the default 10 steps took 141 s on two shared CPU cores (docs/MODEL.md).

A finished **autoencoder** run ends with :func:`autoencoder_quick_eval` instead, stored the same
way; an autoencoder serves no prompts, so it is measured on what it is for, turning images into
latents and back:

    {"kind": "reconstruction", "fid": float, "psnr_db": float, "n": int, "real_n": int,
     "reference": str, "adherence": None, "floor": None, "seconds": float}

- **Reconstruction FID** (rFID, as the Latent Diffusion paper reports its autoencoders): the
  same classifier features, of N images against their reconstructions decode(mean of
  encode(x)), each rounded to 8 bits as a served image is. 0 is a perfect copy.
- **PSNR** of the reconstructions against the images, in dB, over all N together.
- The images: the shapes data's held-out split (pairs of color and shape the run never saw), or
  an image folder's last N images, which the run trained on (an image folder has nothing held
  out), as ``reference`` says.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from core.diffusion.autoencoder import psnr
from core.diffusion.checkpoint import read_config
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.imagefolder import ImageFolderDataset
from core.diffusion.data.shapes import DEFAULT_HELD_OUT
from core.diffusion.eval import DEFAULT_CLASSIFIER
from core.diffusion.eval.classifier import AttributeClassifier
from core.diffusion.eval.common import pil_to_tensor
from core.diffusion.eval.fid import fid
from core.diffusion.eval.scenes import held_out_pairs, scene_stream
from core.diffusion.pipeline import LatentDiffusion, load_autoencoder
from core.diffusion.training.autoencoder import held_out_set, reconstruct
from core.diffusion.training.config import DataConfig

QUICK_N = 256
SHAPES_REFERENCE = "shapes eval stream, seed 0"
BATCH = 32


def _generate(
    model: LatentDiffusion, classifier: AttributeClassifier, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' images (seed i for image i), as classifier features and as pixels."""
    features, pixels = [], []
    for i in range(0, len(prompts), BATCH):
        batch = prompts[i : i + BATCH]
        images = model.generate(batch, seeds=list(range(i, i + len(batch))))
        x = pil_to_tensor(images)
        features.append(classifier.features(x))
        pixels.append(x)
    return torch.cat(features), torch.cat(pixels)


def _np(x: torch.Tensor) -> Any:
    return x.double().cpu().numpy()


@torch.no_grad()
def quick_eval(
    checkpoint: str | Path,
    data: dict[str, Any],
    reference: str | None = None,
    n: int = QUICK_N,
    classifier_dir: str | Path = DEFAULT_CLASSIFIER,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The eval of the model in ``checkpoint`` against ``data``, a ``[data]`` table
    (``{"kind": "shapes", ...}`` or ``{"kind": "imagefolder", "path": ...}``); ``reference``
    names an image folder in the result (default: its path)."""
    if n < 2:
        raise ValueError("the quick eval needs n ≥ 2 (FID fits a covariance)")
    t0 = time.perf_counter()
    model = LatentDiffusion.load(checkpoint, device=device or "cpu")
    classifier = AttributeClassifier.load(classifier_dir, model.device)
    size = model.image_size
    floor: float | None = None
    adherence: float | None = None
    if data.get("kind", "shapes") == "shapes":
        # The stream alternates seen and held-out pairs; a model trained on all pairs still
        # gets the usual prompts.
        held_out = held_out_pairs(read_config(checkpoint)) or DEFAULT_HELD_OUT
        prompts = scene_stream(0, 0, n, size, held_out)
        reals = scene_stream(0, n, n, size, held_out)
        features, pixels = _generate(model, classifier, [s.caption for s in prompts])
        real = classifier.features(images_to_tensor([s.image for s in reals]))
        own = classifier.features(images_to_tensor([s.image for s in prompts]))
        read = classifier.read(pixels)
        adherence = sum(r == p.scene for r, p in zip(read, prompts, strict=True)) / n
        floor = fid(_np(real), _np(own))
        real_n, label = n, SHAPES_REFERENCE
    elif data["kind"] == "imagefolder":
        folder = ImageFolderDataset(data["path"], image_size=size)
        real_n = min(n, len(folder))
        if real_n < 2:
            raise ValueError("the quick eval needs an image folder of at least 2 images")
        captions = folder.captions
        prompts_text = [captions[i % len(captions)] for i in range(n)]
        features, _ = _generate(model, classifier, prompts_text)
        real = classifier.features(images_to_tensor([folder[i].image for i in range(real_n)]))
        label = f"image folder {reference or data['path']} ({len(folder)} images)"
    else:
        raise ValueError(f"the quick eval knows shapes and image folders, not {data['kind']!r}")
    return {
        "fid": fid(_np(real), _np(features)),
        "n": n,
        "adherence": adherence,
        "reference": label,
        "floor": floor,
        "real_n": real_n,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def autoencoder_eval_images(
    data: DataConfig, n: int = QUICK_N, reference: str | None = None
) -> tuple[torch.Tensor, str]:
    """The images an autoencoder run is measured on, (N, 3, H, W) in [−1, 1], and what they
    are: those its training measures its held-out PSNR on (``held_out_set``), the shapes data's
    held-out split, else an image folder's last N images."""
    images, size = held_out_set(data, n)
    if data.kind == "shapes":
        return images, f"shapes held-out split, seed {data.seed}"
    if len(images) < 2:
        raise ValueError("the quick eval needs an image folder of at least 2 images")
    label = (
        f"image folder {reference or data.path} (its last {len(images)} of {size} images, "
        "seen in training)"
    )
    return images, label


@torch.no_grad()
def autoencoder_quick_eval(
    checkpoint: str | Path,
    data: DataConfig,
    reference: str | None = None,
    n: int = QUICK_N,
    classifier_dir: str | Path = DEFAULT_CLASSIFIER,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The reconstruction eval of the autoencoder in ``checkpoint`` (an autoencoder's or a whole
    model's) on the images of ``data`` that :func:`autoencoder_eval_images` picks."""
    if n < 2:
        raise ValueError("the quick eval needs n ≥ 2 (FID fits a covariance)")
    t0 = time.perf_counter()
    images, label = autoencoder_eval_images(data, n, reference)
    ae = load_autoencoder(checkpoint, device or "cpu")
    recon = reconstruct(ae, images)
    served = ((recon.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # as an 8-bit PNG holds it
    classifier = AttributeClassifier.load(classifier_dir, next(ae.parameters()).device)
    return {
        "kind": "reconstruction",
        "fid": fid(_np(classifier.features(images)), _np(classifier.features(served))),
        "psnr_db": psnr(served, images),
        "n": len(images),
        "real_n": len(images),
        "reference": label,
        "adherence": None,
        "floor": None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
