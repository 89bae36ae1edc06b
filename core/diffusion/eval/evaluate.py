"""``dq eval``: FID and prompt adherence of a checkpoint, at its default settings and in sweeps.

What is measured (every number depends only on the checkpoint, the classifier and the seed):

- **Default settings** (the checkpoint's sampler, steps and guidance) on N prompts (see
  :mod:`.scenes`): FID of the N generated images against N real images, the real-against-real
  floor from two disjoint real samples of N, prompt adherence per group (seen or held-out pairs,
  one or two objects) and per attribute, and the classifier's reading of the prompts' own real
  renderings (what a perfect generator would score).
- **Sampler sweep** (DDPM 1000, DDIM 50, DPM-Solver++ 20 and 10 steps, default guidance) on the
  first ``sweep_n`` prompts, the same prompts and seeds in every row, with the floor at that N.
  DDPM at 1000 steps costs 50× the default, so this sweep has its own, smaller N.
- **Guidance sweep** (1, 2, 4, 7) at the default sampler and steps, on all N prompts unless
  ``guidance_n`` says fewer.
- The autoencoder's reconstruction PSNR on held-out-pair images.
- **Precision.** Every row runs the UNet and text encoder at ``precision`` (fp32 unless asked;
  :mod:`core.diffusion.precision`). With ``precision_baseline``, the default settings run again
  on the same N prompts and seeds with the model loaded at that precision, so one run compares
  e.g. bf16 with fp32: FID, adherence per group and images/s side by side.
- **Image editing** at the default settings, on ``edit_n`` real images each
  (:func:`.scenes.recolor_tasks`, :func:`.scenes.inpaint_tasks`). Image-to-image (SDEdit) at each
  of ``edit_strengths``: a one-object image prompted for the same object in another color; the
  classifier reads whether the color changed and the position, shape and size stayed.
  Inpainting (RePaint): in a two-object image one object's region is masked and prompted as
  another object; the classifier reads the new object, and every pixel outside the mask is
  compared with the init image.

Every FID is reported with its floor at the same N: FID's estimate is biased upwards by roughly
a constant over N, so numbers are only comparable at equal N.

Image i of the prompts always gets seed ``seed·10⁶ + i``; an image depends only on its prompt,
settings and seed (the pipeline is batch-invariant), so rows that share settings share images and
a smaller N reuses a prefix of a larger one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.diffusion.checkpoint import read_config
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.eval.classifier import AttributeClassifier, Scene, attribute_accuracy
from core.diffusion.eval.common import Adherence, image_seed, pil_to_tensor
from core.diffusion.eval.editing import (
    EditResults,
    edit_results,
)
from core.diffusion.eval.fid import GaussianStats, frechet_distance, gaussian_stats
from core.diffusion.eval.scenes import (
    HELD_OUT,
    SEEN,
    EvalScene,
    grid_label,
    grid_mark,
    grid_scenes,
    held_out_pairs,
    scene_stream,
)
from core.diffusion.pipeline import LatentDiffusion, SamplingDefaults
from core.diffusion.sample_grid import Cell, save_grid
from core.diffusion.samplers import SAMPLERS

SAMPLER_NAMES = {name: spec.label for name, spec in SAMPLERS.items()}
GROUPS = (
    f"{SEEN}, 1 object",
    f"{HELD_OUT}, 1 object",
    f"{SEEN}, 2 objects",
    f"{HELD_OUT}, 2 objects",
)
GRID_SEED_OFFSET = 500_000  # grid images' seeds, apart from the prompts' seeds


@dataclass(frozen=True)
class EvalSettings:
    n: int = 2000
    sweep_n: int = 256
    guidance_n: int | None = None  # None: n
    seed: int = 0
    batch_size: int = 32
    sweeps: bool = True
    sampler_sweep: tuple[tuple[str, int], ...] = (
        ("ddpm", 1000),
        ("ddim", 50),
        ("dpmpp-2m", 20),
        ("dpmpp-2m", 10),
    )
    guidance_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 7.0)
    # Images/s against quality: (sampler, steps, guidance interval lo, hi) at the model's
    # guidance, each at N = speed_n (None: n), beside the current defaults.
    speed: bool = False
    speed_n: int | None = None
    speed_sweep: tuple[tuple[str, int, float, float], ...] = (
        ("dpmpp-2m", 20, 0.0, 1.0),
        ("dpmpp-3m", 10, 0.0, 1.0),
        ("dpmpp-3m", 8, 0.0, 1.0),
        ("dpmpp-3m", 10, 0.0, 0.6),
        ("dpmpp-3m", 10, 0.2, 0.8),
        ("dpmpp-3m", 10, 0.3, 1.0),
    )
    # Image editing: image-to-image at each strength and inpainting, edit_n images per row.
    edits: bool = True
    edit_n: int = 128
    edit_strengths: tuple[float, ...] = (0.6, 0.8)
    grid_columns: int = 6
    psnr_images: int = 256
    # The precision every row runs at (resolved: fp32, bf16 or fp16), and an optional second
    # precision at which the defaults run again, for the precision comparison.
    precision: str = "fp32"
    precision_baseline: str | None = None

    def validate(self) -> None:
        if self.n < 4 or self.sweep_n < 2 or (self.guidance_n is not None and self.guidance_n < 2):
            raise ValueError(
                "n must be at least 4, sweep_n and guidance_n at least 2 (FID needs 2 images)"
            )
        if self.speed_n is not None and self.speed_n < 2:
            raise ValueError("speed_n must be at least 2 (FID needs 2 images)")
        for sampler, steps, lo, hi in self.speed_sweep:
            if sampler not in SAMPLER_NAMES or steps < 1 or not 0 <= lo <= hi <= 1:
                raise ValueError(f"bad speed-sweep setting {(sampler, steps, lo, hi)}")
        if self.edit_n < 1:
            raise ValueError("edit_n must be at least 1")
        if not all(0 < s <= 1 for s in self.edit_strengths):
            raise ValueError("every edit strength must be greater than 0 and at most 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.seed < 0 or self.seed >= 2**40:
            raise ValueError("seed must be from 0 to 2^40")
        for p in (self.precision, self.precision_baseline):
            if p is not None and p not in ("fp32", "bf16", "fp16"):
                raise ValueError(f"precision must be fp32, bf16 or fp16, not {p!r}")


QUICK = EvalSettings(n=32, sweep_n=4, edit_n=4, grid_columns=3, psnr_images=32)
"""Settings of ``dq eval --quick``: a smoke run, its numbers are not meaningful."""


@dataclass(frozen=True)
class Sampling:
    sampler: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def of(cls, defaults: SamplingDefaults) -> Sampling:
        """A checkpoint's sampling defaults (``LatentDiffusion.defaults``) as a setting."""
        return cls(defaults.sampler, defaults.steps, defaults.guidance, defaults.guidance_interval)

    @property
    def label(self) -> str:
        return f"{self.sampler_label}, guidance {self.guidance:g}{self.interval_label}"

    @property
    def sampler_label(self) -> str:
        """The sampler and its steps, e.g. "DPM-Solver++(3M), 10 steps"."""
        return f"{SAMPLER_NAMES.get(self.sampler, self.sampler)}, {self.steps} steps"

    @property
    def interval_label(self) -> str:
        lo, hi = self.guidance_interval
        return "" if (lo, hi) == (0.0, 1.0) else f" at t/T ∈ [{lo:g}, {hi:g}]"


@dataclass
class Row:
    """One setting's results on its first ``n`` prompts."""

    sampling: Sampling
    n: int
    fid: float
    floor: float  # real against real, two disjoint samples of n
    adherence: dict[str, Adherence]
    seconds: float  # generation wall-clock; 0 when the images were made for an earlier row
    # Images per second of the model's generate() alone (no judging), from when they were made.
    images_per_second: float = 0.0


@dataclass
class EvalResult:
    checkpoint: str
    classifier: str
    settings: EvalSettings
    defaults: Sampling
    main: Row
    attribute_accuracy: dict[str, dict[str, float]]  # group → attribute → share (default row)
    real_adherence: dict[str, Adherence]  # the classifier on the prompts' real renderings
    sampler_rows: list[Row]
    guidance_rows: list[Row]
    autoencoder_psnr_db: float
    autoencoder_psnr_images: int
    classifier_info: dict[str, Any]
    grid_rows: list[tuple[str, str, int]]  # caption, pairs, images read as the prompt
    speed_rows: list[Row] = field(default_factory=list)
    # (precision, row) of the default settings: the baseline first, then settings.precision.
    precision_rows: list[tuple[str, Row]] = field(default_factory=list)
    edits: EditResults | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def numbers(self) -> dict[str, Any]:
        """Every measured number, timings left out: two runs with one seed give equal dicts."""

        def row(r: Row) -> dict[str, Any]:
            return {
                "sampling": vars(r.sampling),
                "n": r.n,
                "fid": r.fid,
                "floor": r.floor,
                "adherence": {k: vars(a) for k, a in r.adherence.items()},
            }

        return {
            "main": row(self.main),
            "attribute_accuracy": self.attribute_accuracy,
            "real_adherence": {k: vars(a) for k, a in self.real_adherence.items()},
            "sampler_sweep": [row(r) for r in self.sampler_rows],
            "guidance_sweep": [row(r) for r in self.guidance_rows],
            "speed_sweep": [row(r) for r in self.speed_rows],
            "precision": self.settings.precision,
            "precision_comparison": [{"precision": p, **row(r)} for p, r in self.precision_rows],
            "autoencoder_psnr_db": self.autoencoder_psnr_db,
            "autoencoder_psnr_images": self.autoencoder_psnr_images,
            "grid_rows": self.grid_rows,
            "edits": None if self.edits is None else self.edits.numbers(),
        }

    def to_json(self) -> dict[str, Any]:
        timings = {
            "seconds_total": self.seconds,
            "main_seconds": self.main.seconds,
            "sampler_sweep_seconds": [r.seconds for r in self.sampler_rows],
            "guidance_sweep_seconds": [r.seconds for r in self.guidance_rows],
            "main_images_per_second": self.main.images_per_second,
            "speed_sweep_images_per_second": [r.images_per_second for r in self.speed_rows],
            "precision_images_per_second": {p: r.images_per_second for p, r in self.precision_rows},
            "image_to_image_seconds": [r.seconds for r in self.edits.image_to_image]
            if self.edits
            else [],
            "inpainting_seconds": self.edits.inpainting.seconds if self.edits else 0.0,
        }
        return {
            "checkpoint": self.checkpoint,
            "classifier": self.classifier,
            "settings": {**vars(self.settings)},
            "environment": self.environment,
            "classifier_info": self.classifier_info,
            **self.numbers(),
            "timings": timings,
        }


@dataclass
class _Generated:
    features: torch.Tensor  # (n, d)
    scenes: list[Scene]  # the classifier's readings
    seconds: float
    images_per_second: float = 0.0  # generate() alone


class _Generations:
    """Generates the prompts' images under each setting once, judged and featurised as they
    come; a row with fewer prompts reuses a prefix."""

    def __init__(
        self,
        model: LatentDiffusion,
        classifier: AttributeClassifier,
        prompts: Sequence[EvalScene],
        seed: int,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.model = model
        self.classifier = classifier
        self.prompts = prompts
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        self.cache: dict[Sampling, _Generated] = {}

    def get(self, sampling: Sampling, n: int) -> _Generated:
        """The first ``n`` prompts' results; ``seconds`` is 0 when an earlier call made them."""
        done = self.cache.get(sampling)
        if done is not None and len(done.scenes) >= n:
            return _Generated(done.features[:n], done.scenes[:n], 0.0, done.images_per_second)
        captions = [p.caption for p in self.prompts[:n]]
        seeds = [image_seed(self.seed, i) for i in range(n)]
        t0 = time.perf_counter()
        generating = 0.0
        features, scenes = [], []
        bar = tqdm(
            total=n * sampling.steps,
            desc=f"{sampling.label}, N={n}",
            unit="img-step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        with bar:
            for i in range(0, n, self.batch_size):
                batch = captions[i : i + self.batch_size]

                def on_step(step: int, total: int, x0: torch.Tensor, k: int = len(batch)) -> None:
                    bar.update(k)

                t_gen = time.perf_counter()
                images = self.model.generate(
                    batch,
                    steps=sampling.steps,
                    guidance=sampling.guidance,
                    sampler=sampling.sampler,
                    seeds=seeds[i : i + self.batch_size],
                    on_step=on_step,
                    guidance_interval=sampling.guidance_interval,
                )
                generating += time.perf_counter() - t_gen
                x = pil_to_tensor(images)
                features.append(self.classifier.features(x))
                scenes += self.classifier.read(x)
        result = _Generated(
            torch.cat(features), scenes, time.perf_counter() - t0, n / max(generating, 1e-9)
        )
        self.cache[sampling] = result
        return result


def adherence_by_group(read: Sequence[Scene], prompts: Sequence[EvalScene]) -> dict[str, Adherence]:
    """Per group, how many images the classifier reads as exactly the prompt's scene: every
    object's shape, color, size and position, the background, and no other object."""
    counts = {g: [0, 0] for g in GROUPS}
    for r, p in zip(read, prompts, strict=True):
        c = counts.setdefault(p.group, [0, 0])
        c[0] += r == p.scene
        c[1] += 1
    return {g: Adherence(m, t) for g, (m, t) in counts.items()}


def _stats(features: torch.Tensor) -> GaussianStats:
    return gaussian_stats(features.double().numpy())


class _Judge:
    """FID and adherence of generated images against the real ones, at any prefix N."""

    def __init__(
        self, prompts: Sequence[EvalScene], prompt_features: torch.Tensor, real: torch.Tensor
    ) -> None:
        self.prompts = prompts
        self.prompt_features = prompt_features  # the prompts' own real renderings
        self.real = real  # the disjoint real sample
        self.real_stats: dict[int, GaussianStats] = {}
        self.floors: dict[int, float] = {}

    def real_at(self, n: int) -> GaussianStats:
        """The Gaussian of the first ``n`` real images, fitted once per N."""
        if n not in self.real_stats:
            self.real_stats[n] = _stats(self.real[:n])
        return self.real_stats[n]

    def floor(self, n: int) -> float:
        if n not in self.floors:
            self.floors[n] = frechet_distance(self.real_at(n), _stats(self.prompt_features[:n]))
        return self.floors[n]

    def row(self, gens: _Generations, sampling: Sampling, n: int) -> Row:
        g = gens.get(sampling, n)
        fid = frechet_distance(self.real_at(n), _stats(g.features))
        adherence = adherence_by_group(g.scenes, self.prompts[:n])
        return Row(sampling, n, fid, self.floor(n), adherence, g.seconds, g.images_per_second)


@torch.no_grad()
def autoencoder_psnr(model: LatentDiffusion, scenes: Sequence[EvalScene]) -> float:
    """Reconstruction PSNR of the autoencoder (decode of the encoder's mean) on real images."""
    from core.diffusion.training.autoencoder import reconstruction_psnr

    images = images_to_tensor([s.image for s in scenes])
    return reconstruction_psnr(model.autoencoder, images)


def evaluate(
    checkpoint: str | Path,
    classifier_dir: str | Path,
    settings: EvalSettings,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvalResult:
    """Runs the whole evaluation; with ``out_dir``, writes ``samples.png`` there."""
    settings.validate()
    t_start = time.perf_counter()
    model = LatentDiffusion.load(checkpoint, device=device, precision=settings.precision)
    classifier = AttributeClassifier.load(classifier_dir, model.device)
    classifier_config = read_config(classifier_dir)
    held_out = held_out_pairs(read_config(checkpoint))
    d = model.defaults
    defaults = Sampling.of(d)
    n = settings.n
    sweep_n = settings.sweep_n if settings.sweeps else 0
    guidance_n = (settings.guidance_n or n) if settings.sweeps else 0
    total = max(n, sweep_n, guidance_n)

    prompts = scene_stream(settings.seed, 0, total, model.image_size, held_out)
    reals = scene_stream(settings.seed, total, total, model.image_size, held_out)
    prompt_images = images_to_tensor([s.image for s in prompts])
    real_features = classifier.features(images_to_tensor([s.image for s in reals]))
    prompt_features = classifier.features(prompt_images)
    real_read = classifier.read(prompt_images)

    gens = _Generations(model, classifier, prompts, settings.seed, settings.batch_size, progress)
    judge = _Judge(prompts, prompt_features, real_features)
    main = judge.row(gens, defaults, n)
    main_read = gens.get(defaults, n).scenes
    accuracy = {}
    for group in GROUPS:
        idx = [i for i, p in enumerate(prompts[:n]) if p.group == group]
        if idx:
            truth = [prompts[i].scene for i in idx]
            accuracy[group] = attribute_accuracy([main_read[i] for i in idx], truth)

    sampler_rows: list[Row] = []
    guidance_rows: list[Row] = []
    if settings.sweeps:
        for g in settings.guidance_sweep:
            guidance_rows.append(judge.row(gens, Sampling(d.sampler, d.steps, g), guidance_n))
        # Fewest steps first, so that the long DDPM run comes last.
        for sampler, steps in sorted(settings.sampler_sweep, key=lambda s: s[1]):
            sampling = Sampling(sampler, steps, d.guidance)
            sampler_rows.append(judge.row(gens, sampling, sweep_n))
        order = {s: i for i, s in enumerate(settings.sampler_sweep)}
        sampler_rows.sort(key=lambda r: order[(r.sampling.sampler, r.sampling.steps)])

    precision_rows: list[tuple[str, Row]] = []
    if settings.precision_baseline is not None:
        baseline = LatentDiffusion.load(
            checkpoint, device=device, precision=settings.precision_baseline
        )
        base_gens = _Generations(
            baseline, classifier, prompts, settings.seed, settings.batch_size, progress
        )
        precision_rows = [
            (settings.precision_baseline, judge.row(base_gens, defaults, n)),
            (settings.precision, main),
        ]
        del baseline, base_gens

    speed_rows: list[Row] = []
    if settings.speed:
        speed_n = settings.speed_n or n
        for sampler, steps, lo, hi in settings.speed_sweep:
            sampling = Sampling(sampler, steps, d.guidance, (lo, hi))
            speed_rows.append(judge.row(gens, sampling, speed_n))

    grid = grid_scenes(prompts[:n]) or list(prompts[:1])
    cols = settings.grid_columns
    grid_images = model.generate(
        [s.caption for s in grid for _ in range(cols)],
        seeds=[image_seed(settings.seed, GRID_SEED_OFFSET + i) for i in range(len(grid) * cols)],
    )
    grid_read = classifier.read(pil_to_tensor(grid_images))
    grid_rows = [
        (s.caption, s.pairs, sum(r == s.scene for r in grid_read[k * cols : (k + 1) * cols]))
        for k, s in enumerate(grid)
    ]
    if out_dir is not None:
        cells = [
            Cell(
                grid_images[k * cols : (k + 1) * cols],
                f"{grid_label(s)}; read as the prompt in {hits} of {cols}",
                grid_mark(s, held_out),
            )
            for k, (s, (_, _, hits)) in enumerate(zip(grid, grid_rows, strict=True))
        ]
        save_grid(cells, Path(out_dir) / "samples.png", cells_per_row=1, scale=2)

    edits = None
    if settings.edits:
        edits = edit_results(
            model,
            classifier,
            n=settings.edit_n,
            seed=settings.seed,
            strengths=settings.edit_strengths,
            batch_size=settings.batch_size,
            held_out=held_out,
            progress=progress,
        )

    psnr_scenes = [s for s in prompts if s.pairs == HELD_OUT][: settings.psnr_images]
    training = classifier_config.get("training", {})
    return EvalResult(
        checkpoint=str(checkpoint),
        classifier=str(classifier_dir),
        settings=settings,
        defaults=defaults,
        main=main,
        attribute_accuracy=accuracy,
        real_adherence=adherence_by_group(real_read[:n], prompts[:n]),
        sampler_rows=sampler_rows,
        guidance_rows=guidance_rows,
        speed_rows=speed_rows,
        precision_rows=precision_rows,
        edits=edits,
        autoencoder_psnr_db=autoencoder_psnr(model, psnr_scenes),
        autoencoder_psnr_images=len(psnr_scenes),
        classifier_info={
            "parameters": classifier.num_parameters(),
            "feature_dim": classifier.config.feature_dim,
            "accuracy": training.get("accuracy"),
        },
        grid_rows=grid_rows,
        seconds=time.perf_counter() - t_start,
    )
