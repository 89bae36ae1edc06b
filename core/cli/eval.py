"""``dq eval``: FID and prompt adherence of a model, with sampler, guidance and speed sweeps and
image editing, written to eval.md and eval.json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from core.cli._common import fail, resolve_checkpoint, resolve_precision_option, torch_device


def _speed_setting(raw: str) -> tuple[str, int, float, float]:
    parts = raw.split(":")
    try:
        if len(parts) == 2:
            return parts[0], int(parts[1]), 0.0, 1.0
        if len(parts) == 4:
            return parts[0], int(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        pass
    raise fail(f"--speed-setting {raw!r} is not SAMPLER:STEPS or SAMPLER:STEPS:LO:HI")


@click.command("eval")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="Model directory (default: the shipped model).",
)
@click.option(
    "--classifier",
    type=click.Path(),
    default=None,
    help="Attribute classifier directory (default: the shipped one).",
)
@click.option("--n", type=int, default=None, help="Prompts and real images for FID (default 2000).")
@click.option(
    "--sweep-n", type=int, default=None, help="Prompts per sampler-sweep row (default 256)."
)
@click.option(
    "--guidance-n", type=int, default=None, help="Prompts per guidance-sweep row (default: N)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes prompts and noise.")
@click.option(
    "--out",
    type=click.Path(),
    default="eval",
    show_default=True,
    help="Directory for eval.md, eval.json and samples.png.",
)
@click.option("--quick", is_flag=True, help="A smoke run at tiny N; its numbers mean nothing.")
@click.option(
    "--sweeps/--no-sweeps", default=True, show_default=True, help="Sampler and guidance sweeps."
)
@click.option(
    "--speed-sweep",
    is_flag=True,
    help="Also images/s against FID and adherence for faster settings (fewer steps, "
    "higher-order solvers, guidance in an interval), each at N = --speed-n.",
)
@click.option("--speed-n", type=int, default=None, help="Prompts per speed-sweep row (default N).")
@click.option(
    "--speed-setting",
    "speed_settings",
    multiple=True,
    metavar="SAMPLER:STEPS[:LO:HI]",
    help="A speed-sweep row, e.g. dpmpp-3m:10:0.3:1 (guided at t/T in [0.3, 1]); repeat for "
    "more rows. Default: the built-in list. The first row is what the others compare with.",
)
@click.option(
    "--edits/--no-edits",
    default=True,
    show_default=True,
    help="Image editing: image-to-image at strengths 0.6 and 0.8, and inpainting.",
)
@click.option(
    "--edit-n", type=int, default=None, help="Real images per image-editing row (default 128)."
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per batch.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    help="Precision of the UNet and text encoder in every row: auto, fp32, bf16 or fp16 (CUDA "
    "only). The default is the reference; auto measures what a worker here would serve.",
)
@click.option(
    "--precision-baseline",
    default=None,
    metavar="PRECISION",
    help="Also run the default settings at this precision on the same prompts and seeds, and "
    "compare (e.g. --precision bf16 --precision-baseline fp32).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    checkpoint: str | None,
    classifier: str | None,
    n: int | None,
    sweep_n: int | None,
    guidance_n: int | None,
    seed: int,
    out: str,
    quick: bool,
    sweeps: bool,
    speed_sweep: bool,
    speed_n: int | None,
    speed_settings: tuple[str, ...],
    edits: bool,
    edit_n: int | None,
    batch_size: int,
    device: str | None,
    threads: int | None,
    precision: str,
    precision_baseline: str | None,
    quiet: bool,
) -> None:
    """Measure FID and prompt adherence of a model, with sampler and guidance sweeps and image
    editing."""
    import dataclasses
    import json
    import shlex

    import torch

    from core.diffusion.eval import DEFAULT_CLASSIFIER
    from core.diffusion.eval.evaluate import QUICK, EvalSettings, evaluate
    from core.diffusion.eval.report import environment, markdown

    base = QUICK if quick else EvalSettings()
    settings = dataclasses.replace(
        base,
        n=base.n if n is None else n,
        sweep_n=base.sweep_n if sweep_n is None else sweep_n,
        guidance_n=base.guidance_n if guidance_n is None else guidance_n,
        seed=seed,
        sweeps=sweeps,
        speed=speed_sweep or bool(speed_settings),
        speed_n=speed_n,
        edits=edits,
        edit_n=base.edit_n if edit_n is None else edit_n,
        batch_size=batch_size,
    )
    if speed_settings:
        settings = dataclasses.replace(
            settings, speed_sweep=tuple(_speed_setting(s) for s in speed_settings)
        )
    dev = torch_device(device)
    settings = dataclasses.replace(
        settings,
        precision=resolve_precision_option(precision, dev),
        precision_baseline=None
        if precision_baseline is None
        else resolve_precision_option(precision_baseline, dev),
    )
    settings.validate()
    if threads is not None:
        if threads < 1:
            raise fail("--threads must be at least 1")
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(
        resolve_checkpoint(checkpoint),
        Path(classifier) if classifier else DEFAULT_CLASSIFIER,
        settings,
        out_dir=out_dir,
        device=dev,
        progress=not quiet,
    )
    result.environment = environment(dev)
    command = shlex.join(["dq", *sys.argv[1:]]) if Path(sys.argv[0]).name == "dq" else ""
    report = markdown(result, command)
    (out_dir / "eval.md").write_text(report)
    (out_dir / "eval.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    click.echo(report)
    click.echo(
        f"dq: wrote {out_dir / 'eval.md'}, {out_dir / 'eval.json'}, {out_dir / 'samples.png'}"
    )
