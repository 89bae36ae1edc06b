"""Half precision: images/s of the shipped model at its defaults in fp32, bf16 and auto, side by
side in one run, against the defaults before the solver work (DPM-Solver++(2M), 20 steps,
guidance on every step) in fp32.

    .venv/bin/python bench/bench_precision.py                  # 5 interleaved rounds, 2 threads
    .venv/bin/python bench/bench_precision.py --compile        # also torch.compile of the UNet
    .venv/bin/python bench/bench_precision.py --device cuda --precisions fp32,bf16,fp16
    .venv/bin/python bench/bench_precision.py --quick          # smoke run

Every round generates the same 32 two-object prompts and seeds under each setting in turn
(interleaved, so load on the machine hits all alike), and the table gives the median. Pixel
differences are against fp32 at the same sampling settings. Not a test: the figures depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.cli._common import DEFAULT_CHECKPOINT as DEFAULT_MODEL_DIR
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.precision import cpu_flags, resolve_precision
from core.runtime.machine import cpu_name

FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES = ("circle", "square", "triangle")
# The sampling defaults before the solver work (issue 22): what the ≥3× target is measured from.
OLD_DEFAULTS = {"sampler": "dpmpp-2m", "steps": 20, "guidance": 4.0, "guidance_interval": (0, 1)}


def two_object_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b = COLORS[i % 7], COLORS[(i + 3) % 7]
        s, t = SHAPES[i % 3], SHAPES[(i + 1) % 3]
        out.append(
            f"a large {a} {s} in the top left and a small {b} {t} in the bottom right "
            "on a gray background"
        )
    return out


@dataclass
class Setting:
    label: str
    model: LatentDiffusion
    kwargs: dict[str, object] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    first_call: float = 0.0
    pixels: np.ndarray | None = None


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="images per generate() call")
    ap.add_argument(
        "--precisions",
        default="fp32,bf16,auto",
        help="comma-separated precisions at the model's defaults (default fp32,bf16,auto)",
    )
    ap.add_argument("--no-old-defaults", action="store_true", help="leave out the old defaults")
    ap.add_argument("--compile", action="store_true", help="also torch.compile(UNet) rows")
    ap.add_argument("--quick", action="store_true", help="one round of 4 images; a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batch = 1, 4
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prompts = two_object_prompts(args.batch)
    seeds = list(range(args.batch))

    models: dict[str, LatentDiffusion] = {}

    def model_at(precision: str) -> LatentDiffusion:
        if precision not in models:
            models[precision] = LatentDiffusion.load(DEFAULT_MODEL_DIR, device, precision)
        return models[precision]

    defaults = model_at("fp32").defaults
    lo, hi = defaults.guidance_interval
    settings: list[Setting] = []
    if not args.no_old_defaults:
        settings.append(Setting("old defaults: DPM-Solver++(2M), 20, every step; fp32",
                                model_at("fp32"), dict(OLD_DEFAULTS)))  # fmt: skip
        for p in args.precisions.split(","):
            if p.strip() == "bf16" or (
                p.strip() == "auto" and resolve_precision("auto", device) != "fp32"
            ):
                resolved = resolve_precision(p.strip(), device)
                settings.append(Setting(f"old defaults; {resolved}", model_at(resolved),
                                        dict(OLD_DEFAULTS)))  # fmt: skip
                break
    for p in args.precisions.split(","):
        p = p.strip()
        resolved = resolve_precision(p, device)
        label = p if p == resolved else f"{p} (→ {resolved})"
        settings.append(Setting(f"defaults; {label}", model_at(resolved)))
    if args.compile:
        for p in sorted({resolve_precision(q.strip(), device) for q in args.precisions.split(",")}):
            compiled = LatentDiffusion.load(DEFAULT_MODEL_DIR, device, p)
            compiled.unet = torch.compile(compiled.unet)  # type: ignore[assignment]
            settings.append(Setting(f"defaults; {p} + torch.compile(UNet)", compiled))

    def run(s: Setting) -> list[object]:
        return s.model.generate(prompts, seeds=seeds, **s.kwargs)  # type: ignore[arg-type]

    for s in settings:  # the first call: oneDNN's kernels for each shape, torch.compile's build
        t0 = time.perf_counter()
        images = run(s)
        s.first_call = time.perf_counter() - t0
        s.pixels = np.stack([np.asarray(im, dtype=np.int16) for im in images])
    for _ in range(args.rounds):
        for s in settings:
            s.seconds.append(timed(lambda s=s: run(s)))

    def ref_pixels(s: Setting) -> np.ndarray | None:
        for r in settings:
            if r.kwargs == s.kwargs and r.model.precision == "fp32" and "compile" not in r.label:
                return r.pixels
        return None

    base = settings[0]
    base_ips = args.batch / statistics.median(base.seconds)
    flags = cpu_flags()
    print(f"Machine: {cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name()}")
    print(f"CPU flags: {' '.join(f for f in FLAGS_SHOWN if f in flags) or '(none of interest)'}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; auto → "
        f"{resolve_precision('auto', device)}; {args.batch} two-object images per call, "
        f"median of {args.rounds} interleaved rounds; model defaults: {defaults.sampler}, "
        f"{defaults.steps} steps, guidance {defaults.guidance:g} at t/T ∈ [{lo:g}, {hi:g}]"
    )
    print()
    print(
        "| setting | images/s | × first row | × first row, per round (median) "
        "| range (images/s) | first call (s) | mean abs px diff vs fp32 (/255) | max |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for s in settings:
        med = statistics.median(s.seconds)
        ips = args.batch / med
        rng = f"{args.batch / max(s.seconds):.2f}–{args.batch / min(s.seconds):.2f}"
        # The ratio within each round, then its median: robust to load that drifts between rounds.
        paired = statistics.median(b / t for b, t in zip(base.seconds, s.seconds, strict=True))
        ref = ref_pixels(s)
        if ref is None or s.pixels is None:
            diff_mean, diff_max = "–", "–"
        else:
            d = np.abs(s.pixels - ref)
            diff_mean, diff_max = f"{d.mean():.3f}", f"{d.max()}"
        print(
            f"| {s.label} | {ips:.2f} | {ips / base_ips:.2f}× | {paired:.2f}× | {rng} "
            f"| {s.first_call:.1f} "
            f"| {diff_mean} | {diff_max} |"
        )
    if args.compile:
        print()
        for s in settings:
            if "compile" not in s.label:
                continue
            plain = next(
                r for r in settings if r.model.precision == s.model.precision and r.kwargs == {}
            )
            t_plain = statistics.median(plain.seconds) / args.batch
            t_comp = statistics.median(s.seconds) / args.batch
            extra = s.first_call - statistics.median(s.seconds)
            gain = t_plain - t_comp
            verdict = (
                f"pays back its first-call cost after {extra / gain:.0f} images"
                if gain > 0
                else "no gain per image: never pays back its first-call cost"
            )
            print(
                f"{s.label}: {1 / t_comp:.2f} against {1 / t_plain:.2f} images/s; first call "
                f"{s.first_call:.1f} s ({extra:.1f} s over a warm call); {verdict}."
            )


if __name__ == "__main__":
    main()
