"""Generation speed of checkpoints side by side: images/s of ``generate()`` at each one's own
sampling defaults, on the same eval prompts and seeds, timed round by round, interleaved.

    .venv/bin/python bench/bench_checkpoints.py core/diffusion/default_model OTHER_DIR [...]

To compare with the model before a retraining, check the old checkpoint out of git first:

    mkdir -p /tmp/old && git archive 105ebd9~1 core/diffusion/default_model | tar -x -C /tmp/old
    .venv/bin/python bench/bench_checkpoints.py core/diffusion/default_model \\
        /tmp/old/core/diffusion/default_model

Prints a markdown table. Not a test: the numbers depend on the machine and its load, which is why
the checkpoints take turns and the table gives the median and the range over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from core.diffusion.checkpoint import read_config
from core.diffusion.eval.evaluate import Sampling
from core.diffusion.eval.scenes import held_out_pairs, scene_stream
from core.diffusion.pipeline import LatentDiffusion
from core.runtime.machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories")
    ap.add_argument("--batch", type=int, default=32, help="images per generate() call")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per checkpoint")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in args.checkpoints:
        if not (path / "model.json").is_file():
            ap.error(f"{path} is not a checkpoint directory (no model.json)")

    models = [LatentDiffusion.load(p) for p in args.checkpoints]
    first = models[0]
    held_out = held_out_pairs(read_config(args.checkpoints[0]))
    prompts = [s.caption for s in scene_stream(0, 0, args.batch, first.image_size, held_out)]
    seeds = list(range(args.batch))
    times: list[list[float]] = [[] for _ in models]
    for m in models:  # warm-up, untimed
        m.generate(prompts[:2], seeds=seeds[:2])
    for _ in range(args.rounds):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m.generate(prompts, seeds=seeds)
            times[i].append(time.perf_counter() - t0)

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"Batch {args.batch}, {args.rounds} rounds, the checkpoints taking turns.")
    print()
    print("| checkpoint | sampling defaults | images/s (median) | range | × first |")
    print("|---|---|---:|---:|---:|")
    base = args.batch / statistics.median(times[0])
    for path, m, ts in zip(args.checkpoints, models, times, strict=True):
        label = Sampling.of(m.defaults).label
        rate = args.batch / statistics.median(ts)
        spread = f"{args.batch / max(ts):.2f}–{args.batch / min(ts):.2f}"
        print(f"| `{path}` | {label} | {rate:.2f} | {spread} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
