"""Editing benchmark: images/s of image-to-image and inpainting jobs against text-to-image at the
same steps, with the shipped model, its default sampler, steps and guidance, in one run.

    .venv/bin/python bench/bench_edit.py            # full run: 3 min on 2 idle CPU cores, 6 at most
    .venv/bin/python bench/bench_edit.py --quick    # smoke run, batch 4, 2 rounds

Image-to-image at strength s runs round(s·steps) of the sampler's steps (SDEdit), so it should
cost about s of a text-to-image batch; inpainting at strength 1 runs every step and should cost
what text-to-image does. A batch whose images have different strengths shares each model call
from the step each image starts (``core.diffusion.editing.run_staggered``).

Every row is a whole ``generate()`` call on one batch (text encoding, the init images' encoding,
sampling, decoding, the inpainting composite), with the same prompts and seeds. The UNet's calls
and rows (images it evaluated, the unconditional rows of guided steps included) are counted by
wrapping ``model.unet.forward``. The default guidance interval skips guidance at low noise, so
the last steps, the ones image-to-image keeps, evaluate half the rows of a guided step: the
"expected, by UNet rows" column gives the ratio that alone predicts.

Prints a markdown table. Not a test: numbers depend on the machine and its load, which is why the
rows are timed interleaved, round by round, and each is compared to text-to-image of its round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.cli._common import resolve_checkpoint
from core.diffusion.data.shapes import ShapesDataset
from core.diffusion.editing import start_index
from core.diffusion.pipeline import LatentDiffusion
from core.runtime.machine import cpu_name

# The CPU flags that decide the speed of torch's CPU kernels (fp32 on AVX2 or AVX-512, bf16 on
# AVX-512 BF16 or AMX).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def cpu_flags() -> str:
    """Which of :data:`FLAGS` the CPU has, as ``avx2 yes, avx512f no, ...``."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown (no /proc/cpuinfo)"
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return ", ".join(f"{f} {'yes' if f in present else 'no'}" for f in FLAGS)


@dataclass
class UNetCounter:
    """Counts the UNet's forward calls, the rows (images) they evaluated and their seconds."""

    calls: int = 0
    rows: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls, self.rows, self.seconds = 0, 0, 0.0

    def wrap(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            out = forward(x, *args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.rows += x.shape[0]
            return out

        return counted


@dataclass
class Case:
    """One row of the table: the edit arguments of ``generate`` and what it should cost."""

    name: str
    kwargs: dict[str, Any]
    steps_run: int  # image-steps the batch runs, summed over its images
    seconds: list[float] = field(default_factory=list)
    unet_seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # to text-to-image of the same round
    calls: int = 0
    rows: int = 0


def half_mask(size: int) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[:, size // 2 :] = 255
    return Image.fromarray(pixels)


def cases(batch: int, steps: int, inits: list[Image.Image], size: int) -> list[Case]:
    def run(strength: float) -> int:
        return steps - start_index(steps, strength)

    out = [Case("text-to-image", {}, batch * steps)]
    for s in STRENGTHS:
        out.append(
            Case(
                f"image-to-image, strength {s}",
                {"init_images": inits, "strength": s},
                batch * run(s),
            )
        )
    out.append(
        Case(
            "inpainting, half mask, strength 1",
            {"init_images": inits, "masks": [half_mask(size)] * batch, "strength": 1.0},
            batch * steps,
        )
    )
    mixed = [STRENGTHS[i % len(STRENGTHS)] for i in range(batch)]
    out.append(
        Case(
            f"mixed batch, strengths {'/'.join(str(s) for s in STRENGTHS)}",
            {"init_images": inits, "strength": mixed},
            sum(run(s) for s in mixed),
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 rounds; a smoke run")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 8)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 25)")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=5.0,
        help="stop adding rounds after this long, once 3 are done (default 5)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    batch = args.batch or (4 if args.quick else 8)
    rounds = args.rounds or (2 if args.quick else 25)
    if batch % len(STRENGTHS):
        ap.error(f"--batch must be a multiple of {len(STRENGTHS)}, for the mixed batch")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = LatentDiffusion.load(resolve_checkpoint(None))
    counter = UNetCounter()
    model.unet.forward = counter.wrap(model.unet.forward)  # type: ignore[method-assign]
    d = model.defaults
    dataset = ShapesDataset(seed=0, paraphrase=False)
    samples = [dataset[i] for i in range(batch)]
    prompts = [s.caption for s in samples]
    seeds = list(range(batch))
    inits = [Image.fromarray(s.image) for s in samples]
    table = cases(batch, d.steps, inits, model.image_size)

    def generate(case: Case) -> float:
        counter.reset()
        t0 = time.perf_counter()
        model.generate(prompts, seeds=seeds, **case.kwargs)
        return time.perf_counter() - t0

    for case in table:  # warm-up, and the UNet counts (the same every run)
        generate(case)
        case.calls, case.rows = counter.calls, counter.rows
    started = time.perf_counter()
    for r in range(rounds):
        if r >= 3 and time.perf_counter() - started > 60 * args.max_minutes:
            break  # a loaded machine: fewer rounds rather than an unbounded run
        # Interleaved, so the machine's load hits every row alike; the order turns each round so
        # that no row always follows the same one.
        order = table[r % len(table) :] + table[: r % len(table)]
        for case in order:
            case.seconds.append(generate(case))
            case.unet_seconds.append(counter.seconds)
        for case in table:
            case.ratios.append(case.seconds[-1] / table[0].seconds[-1])

    base = table[0]
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"CPU flags: {cpu_flags()}")
    print(
        f"Shipped model, {d.sampler}, {d.steps} steps, guidance {d.guidance} "
        f"at noise levels {d.guidance_interval[0]}-{d.guidance_interval[1]}, "
        f"batch {batch}, {model.image_size}×{model.image_size}; "
        f"median of {len(base.seconds)} interleaved rounds"
    )
    print()
    print(
        "| job | images/s | s per batch | s in the UNet | UNet calls | UNet rows | "
        "time / text-to-image | expected, by steps (steps per image) | expected, by UNet rows |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in table:
        sec = statistics.median(case.seconds)
        ratio = statistics.median(case.ratios)
        by_steps = (
            f"{case.steps_run / base.steps_run:.2f} ({case.steps_run / batch:g} of {d.steps})"
        )
        print(
            f"| {case.name} | {batch / sec:.2f} | {sec:.3f} | "
            f"{statistics.median(case.unet_seconds):.3f} | {case.calls} | {case.rows} | "
            f"**{ratio:.2f}** | {by_steps} | {case.rows / base.rows:.2f} |"
        )


if __name__ == "__main__":
    main()
