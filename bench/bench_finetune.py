"""Fine-tuning demo (docs/MODEL.md, *Fine-tuning*): teach the shipped model a color it has no
word for, from a small image folder, and measure what it learned and what it kept.

    .venv/bin/python bench/bench_finetune.py --work /tmp/ft            # ~15 min on 2 idle cores
    .venv/bin/python bench/bench_finetune.py --work /tmp/ft --quick    # smoke run

1. Writes an image folder (``metadata.jsonl`` layout) of ``--images`` shapes scenes with one
   object in the new color (``core.diffusion.eval.concept``), captioned with the new word.
2. Reads the default model on two prompt sets: *new concept* (``--concept-n`` canonical
   prompts of the concept's stream from item 500,000 on, apart from the folder's images) and
   *old prompts* (the first ``--old-n`` prompts of ``dq eval``'s scene stream, seed 0).
3. Fine-tunes it on the folder (``configs/finetune.toml``, ``--steps``, the text encoder frozen
   unless ``--train-text-encoder``; the new word's embedding starts at the mean of the color
   words), then reads the fine-tuned model on the same prompts and seeds.

Prints a markdown table (the machine, before, after, the ratio for old prompts) and, with
``--grid``, writes a before/after image grid. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.diffusion.data.shapes import COLORS
from core.diffusion.eval import DEFAULT_CLASSIFIER
from core.diffusion.eval.classifier import AttributeClassifier
from core.diffusion.eval.common import Adherence, image_seed, pil_to_tensor
from core.diffusion.eval.concept import (
    ConceptScene,
    NewColor,
    concept_adherence,
    concept_scenes,
    write_concept_folder,
)
from core.diffusion.eval.evaluate import adherence_by_group
from core.diffusion.eval.scenes import EvalScene, scene_stream
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.sample_grid import Cell, save_grid
from core.diffusion.training.config import DenoiserTrainConfig, load_config
from core.diffusion.training.denoiser import train_denoiser
from core.runtime.machine import cpu_name
from core.services.model_versions import DEFAULT_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
CONCEPT_START = 500_000
SEED = 0


def generate(model: LatentDiffusion, prompts: Sequence[str], batch: int = 32) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        seeds = [image_seed(SEED, k) for k in range(i, min(i + batch, len(prompts)))]
        out += [np.asarray(im) for im in model.generate(list(prompts[i : i + batch]), seeds=seeds)]
    return out


def read_model(
    model: LatentDiffusion,
    classifier: AttributeClassifier,
    concept: Sequence[ConceptScene],
    old: Sequence[EvalScene],
    color: NewColor,
) -> tuple[dict[str, Adherence], dict[str, Adherence], list[np.ndarray], float]:
    from PIL import Image

    t0 = time.perf_counter()
    new_images = generate(model, [s.prompt for s in concept])
    new = concept_adherence(classifier, new_images, concept, color)
    old_images = generate(model, [s.caption for s in old])
    reads = classifier.read(pil_to_tensor([Image.fromarray(im) for im in old_images]))
    by_group = adherence_by_group(reads, old)
    total = Adherence(sum(a.matched for a in by_group.values()), len(old))
    return new, {**by_group, "all": total}, new_images, time.perf_counter() - t0


def pct(a: Adherence) -> str:
    return f"{a.rate:.1%} ({a.matched}/{a.total})" if a.rate is not None else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the data and the run")
    ap.add_argument("--color", default="pink")
    ap.add_argument("--rgb", default="250,130,200")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--concept-n", type=int, default=128)
    ap.add_argument("--old-n", type=int, default=256)
    ap.add_argument("--train-text-encoder", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=Path, default=None, help="write a before/after grid here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny N, 4 steps")
    ap.add_argument(
        "--evaluate",
        type=Path,
        default=None,
        help="read this fine-tuned checkpoint (e.g. WORK/run at a checkpoint) instead of training",
    )
    args = ap.parse_args()
    if args.quick:
        args.images, args.steps, args.concept_n, args.old_n = 16, 4, 8, 8
    torch.set_num_threads(args.threads)
    rgb = tuple(int(v) for v in args.rgb.split(","))
    color = NewColor(args.color, (rgb[0], rgb[1], rgb[2]))
    folder = args.work / "data"
    if not (folder / "metadata.jsonl").is_file():
        write_concept_folder(color, folder, args.images, seed=SEED)
    concept = concept_scenes(color, SEED, args.concept_n, start=CONCEPT_START)
    old = scene_stream(SEED, 0, args.old_n)
    classifier = AttributeClassifier.load(DEFAULT_CLASSIFIER)

    base = LatentDiffusion.load(DEFAULT_MODEL_DIR, device="cpu")
    before = read_model(base, classifier, concept, old, color)
    print(f"before: {before[3]:.0f} s", flush=True)

    color_words = " ".join(COLORS)
    overrides = {
        "train": {"steps": args.steps, "lr": args.lr, "threads": args.threads},
        "data": {"kind": "imagefolder", "path": str(folder)},
        "finetune": {
            "base": "default",
            "freeze_text_encoder": not args.train_text_encoder,
            "init_words": {color.name: color_words},
        },
    }
    cfg = load_config(DenoiserTrainConfig, REPO / "configs" / "finetune.toml", overrides)
    run = args.work / "run"
    t0 = time.perf_counter()
    if args.evaluate is None:
        result, summary = train_denoiser(
            cfg, None, run, progress=False, device=torch.device("cpu"), base_dir=DEFAULT_MODEL_DIR
        )
        steps = result.steps_done
    else:
        run = args.evaluate
        summary = json.loads((run / "model.json").read_text())["training"]
        steps = int(summary.get("step", summary.get("steps", 0)))
    train_s = time.perf_counter() - t0
    tuned = LatentDiffusion.load(run, device="cpu")
    after = read_model(tuned, classifier, concept, old, color)

    rows = [("new concept", before[0], after[0]), ("old prompts", before[1], after[1])]
    print()
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads")
    print(
        f"fine-tune: {steps} steps of batch {cfg.train.batch_size} at lr "
        f"{cfg.train.lr:g} on {args.images} images of {color.name} {color.rgb}, text encoder "
        f"{'trained' if args.train_text_encoder else 'frozen'}: {train_s:.0f} s "
        f"({train_s / max(steps, 1):.2f} s/step; 0 with --evaluate); reading one model "
        f"{after[3]:.0f} s"
    )
    print()
    print("| prompts | group | N | before | after | after / before |")
    print("|---|---|---:|---:|---:|---:|")
    for name, b, a in rows:
        for group in b:
            ratio = (
                f"{a[group].rate / b[group].rate:.3f}"
                if b[group].rate and a[group].rate is not None
                else "n/a"
            )
            print(
                f"| {name} | {group} | {b[group].total} | {pct(b[group])} | {pct(a[group])} "
                f"| {ratio} |"
            )
    record = {
        "summary": summary,
        "train_seconds": train_s,
        "before": {n: {g: vars(x) for g, x in b.items()} for n, b, _ in rows},
        "after": {n: {g: vars(x) for g, x in a.items()} for n, _, a in rows},
    }
    (args.work / "result.json").write_text(json.dumps(record, indent=2, default=str))
    if args.grid is not None:
        from PIL import Image

        k = min(6, len(concept))
        cells = [
            Cell(
                [Image.fromarray(before[2][i]), Image.fromarray(after[2][i])],
                f"{concept[i].prompt}: before, after",
            )
            for i in range(k)
        ]
        save_grid(cells, args.grid, cells_per_row=2, scale=2)


if __name__ == "__main__":
    main()
