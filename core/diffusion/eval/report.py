"""The markdown report of ``dq eval``: the tables, the machine and the command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.diffusion.eval.common import Adherence
from core.diffusion.eval.editing import EditResults, InpaintingRow
from core.diffusion.eval.evaluate import GROUPS, SAMPLER_NAMES, EvalResult, Row
from core.diffusion.eval.scenes import EDIT_MASK_MARGIN
from core.runtime.machine import cpu_name

# The bar of issue 16 (two-object binding); the figures are docs/MODEL.md's "Targets".
TARGET_TWO_SEEN = 0.80
TARGET_TWO_HELD_OUT = 0.70
TARGET_ONE = 0.99
TARGET_ATTRIBUTE = 0.90
TARGET_FID_OVER_FLOOR = 1.25
TARGET_FID_RATIO = 1.05
TARGET_PSNR_DB = 35.0
# Image editing (issue 26): image-to-image at strength 0.8 changes the color and keeps the
# place; inpainting draws the new object and leaves every pixel outside the mask as it was.
TARGET_EDIT_STRENGTH = 0.8
TARGET_EDIT_NEW_COLOR = 0.90
TARGET_EDIT_POSITION_KEPT = 0.90
TARGET_INPAINT_NEW_OBJECT = 0.90
# Half precision (issue 28): at the defaults, FID within +2% of the baseline's and adherence
# within 1 point in every group.
TARGET_PRECISION_FID_RATIO = 1.02
TARGET_PRECISION_ADHERENCE_POINTS = 1.0
ONE_SEEN, ONE_HELD_OUT, TWO_SEEN, TWO_HELD_OUT = GROUPS


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
    }


def _shown(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _pct(a: Adherence | None) -> str:
    if a is None or a.rate is None:
        return "–"
    return f"{a.rate:.1%}"


def _minutes(seconds: float) -> str:
    if seconds == 0:
        return "(reused)"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _group_sizes(row: Row) -> str:
    return ", ".join(f"{g}: {row.adherence[g].total}" for g in GROUPS if g in row.adherence)


def _sweep_table(first: str, rows: list[tuple[str, Row]], ratio_to: float | None) -> list[str]:
    """One line per row: FID, its floor and excess at the row's N, the FID ratio to a
    reference row (when given), adherence per group and wall-clock."""
    ratio_head, ratio_rule = (" FID / FID(DDPM 1000) |", "---:|") if ratio_to else ("", "")
    out = [
        f"| {first} | FID | floor | FID − floor |{ratio_head} seen, 1 obj | held-out, 1 obj "
        "| seen, 2 obj | held-out, 2 obj | wall-clock |",
        f"|---|---:|---:|---:|{ratio_rule}---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        ratio = f" {r.fid / ratio_to:.3f} |" if ratio_to else ""
        cells = " | ".join(_pct(r.adherence.get(g)) for g in GROUPS)
        out.append(
            f"| {label} | {r.fid:.2f} | {r.floor:.2f} | {r.fid - r.floor:.2f} |{ratio} {cells} "
            f"| {_minutes(r.seconds)} |"
        )
    return out


def _speed_section(result: EvalResult) -> list[str]:
    """Images/s beside FID and adherence for each speed-sweep setting, against the first row
    (the current defaults), in one table."""
    rows = result.speed_rows
    base = rows[0]
    n = base.n
    out = [
        f"## Speed sweep: images/s against quality; guidance {result.defaults.guidance:g}; "
        f"N = {n} per row",
        "",
        "Images/s counts the model's `generate` alone (text encoder, denoising, decoding), batches "
        f"of {result.settings.batch_size}, on the machine above; each row against the first. "
        "Δ adherence is the largest change, in points, over the four prompt groups.",
        "",
        "| setting | images/s | × first | FID | FID / first | seen, 1 obj | held-out, 1 obj "
        "| seen, 2 obj | held-out, 2 obj | Δ adherence |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = " | ".join(_pct(r.adherence.get(g)) for g in GROUPS)
        deltas = [
            abs((r.adherence[g].rate or 0) - (base.adherence[g].rate or 0)) * 100
            for g in GROUPS
            if g in r.adherence and g in base.adherence and r.adherence[g].total
        ]
        speed = r.images_per_second / base.images_per_second if base.images_per_second else 0
        label = f"{_short(r)}{r.sampling.interval_label}"
        out.append(
            f"| {label} | {r.images_per_second:.2f} | {speed:.2f}× | {r.fid:.2f} "
            f"| {r.fid / base.fid:.3f} | {cells} | {max(deltas, default=0):.1f} |"
        )
    out.append("")
    return out


def _unmasked(row: InpaintingRow) -> str:
    """ "identical" when every pixel outside every mask is the init image's, else the PSNR and
    how many images are identical there."""
    same = row.unmasked_identical
    if same.matched == same.total:
        return "identical"
    return f"{row.unmasked_psnr_db:.2f} dB ({same.matched}/{same.total} images identical)"


def _edit_section(result: EvalResult, edits: EditResults) -> list[str]:
    """Image-to-image at each strength and inpainting, as the classifier reads them."""
    paint = edits.inpainting
    out = [
        f"## Image editing: {result.defaults.label}; N = {paint.n} per row",
        "",
        "Every edit starts from a real image (scenes of the evaluation stream apart from the "
        "prompts). *Perfect* is the classifier on the intended edit rendered (the new scene "
        "with the init image's jitter), read as the new prompt: what a perfect editor would "
        "score.",
        "",
        "**Image-to-image** (SDEdit): a one-object image, prompted for the same object in "
        "another color (a pair seen in training). New color: the object at its place has the "
        "prompt's color; position kept: that place and no other is occupied; shape and size "
        "kept: the object there has the init image's.",
        "",
        "| strength | N | new color | position kept | shape kept | size kept "
        "| read as the new prompt | wall-clock |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in edits.image_to_image:
        c = r.counts
        cells = " | ".join(
            _pct(c[k])
            for k in ("new_color", "position_kept", "shape_kept", "size_kept", "read_as_prompt")
        )
        out.append(f"| {r.strength:g} | {r.n} | {cells} | {_minutes(r.seconds)} |")
    c = paint.counts
    out += [
        f"| perfect | {edits.perfect_image_to_image.total} | | | | "
        f"| {_pct(edits.perfect_image_to_image)} | |",
        "",
        "**Inpainting** (RePaint, strength 1): in a two-object image, one object's square "
        f"(where it can be at any jitter, {EDIT_MASK_MARGIN:g} px wider, less the other "
        "object's pixels) is masked and prompted as another shape in another color, the same "
        "size, beside the kept object. New object: the classifier reads the prompt's shape and "
        "color at the mask's place; outside the mask every pixel is compared with the init "
        "image.",
        "",
        "| N | new object | its size | kept object | read as the new prompt | perfect "
        "| pixels outside the mask | wall-clock |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| {paint.n} | {_pct(c['new_object'])} | {_pct(c['new_size'])} "
        f"| {_pct(c['kept_object'])} | {_pct(c['read_as_prompt'])} "
        f"| {_pct(edits.perfect_inpainting)} | {_unmasked(paint)} | {_minutes(paint.seconds)} |",
        "",
    ]
    return out


def _edit_targets(result: EvalResult) -> list[tuple[str, str, bool | None]]:
    """Issue 26's editing targets; met is None where the run did not measure it."""
    edits, n = result.edits, result.settings.edit_n
    recolor: dict[str, Adherence] = {}
    paint: InpaintingRow | None = None
    if edits is not None:
        paint, n = edits.inpainting, edits.inpainting.n
        for r in edits.image_to_image:
            if r.strength == TARGET_EDIT_STRENGTH:
                recolor = r.counts

    def share(a: Adherence | None, bar: float, what: str) -> tuple[str, str, bool | None]:
        rate = None if a is None else a.rate
        return (f"{what} ≥ {bar:.0%} (N = {n})", _pct(a), None if rate is None else rate >= bar)

    at = f"image-to-image at strength {TARGET_EDIT_STRENGTH:g}"
    return [
        share(recolor.get("new_color"), TARGET_EDIT_NEW_COLOR, f"{at}, new color"),
        share(recolor.get("position_kept"), TARGET_EDIT_POSITION_KEPT, f"{at}, position kept"),
        share(
            None if paint is None else paint.counts["new_object"],
            TARGET_INPAINT_NEW_OBJECT,
            "inpainting, new object's shape and color",
        ),
        (
            f"inpainting, pixels outside the mask identical to the init image (N = {n})",
            "–" if paint is None else _unmasked(paint),
            None if paint is None else paint.unmasked_identical.matched == paint.n,
        ),
    ]


def targets(result: EvalResult) -> list[tuple[str, str, bool | None]]:
    """(target, result, met) rows; met is None where the run did not measure it."""
    main = result.main
    out: list[tuple[str, str, bool | None]] = []

    def adherence(group: str, bar: float, what: str) -> None:
        a = main.adherence.get(group)
        rate = None if a is None else a.rate
        out.append(
            (
                f"prompt adherence ≥ {bar:.0%}, {what} (N = {main.n})",
                _pct(a),
                None if rate is None else rate >= bar,
            )
        )

    adherence(TWO_SEEN, TARGET_TWO_SEEN, "two objects, seen pairs")
    adherence(TWO_HELD_OUT, TARGET_TWO_HELD_OUT, "two objects, held-out pairs")
    adherence(ONE_SEEN, TARGET_ONE, "one object, seen pairs")
    adherence(ONE_HELD_OUT, TARGET_ONE, "one object, held-out pairs")
    accuracy = result.attribute_accuracy
    two = [accuracy[g] for g in (TWO_SEEN, TWO_HELD_OUT) if g in accuracy]
    for attribute in ("shape", "color", "size"):
        worst = min((a[attribute] for a in two), default=None)
        out.append(
            (
                f"per-object {attribute} ≥ {TARGET_ATTRIBUTE:.0%}, two objects (the lower group)",
                "–" if worst is None else f"{worst:.1%}",
                None if worst is None else worst >= TARGET_ATTRIBUTE,
            )
        )
    over_floor = main.fid / main.floor if main.floor > 0 else None
    out.append(
        (
            f"FID / real-vs-real floor ≤ {TARGET_FID_OVER_FLOOR} (N = {main.n})",
            "–" if over_floor is None else f"{over_floor:.3f}",
            None if over_floor is None else over_floor <= TARGET_FID_OVER_FLOOR,
        )
    )
    ratio = fid_ratio(result)
    label = (
        f"FID DPM-Solver++ 20 ≤ {TARGET_FID_RATIO} × FID DDPM 1000 (N = {result.settings.sweep_n})"
    )
    out.append(
        (
            label,
            "–" if ratio is None else f"{ratio:.3f} ×",
            None if ratio is None else ratio <= TARGET_FID_RATIO,
        )
    )
    psnr = result.autoencoder_psnr_db
    out.append(
        (
            f"autoencoder PSNR ≥ {TARGET_PSNR_DB:g} dB (held-out pairs)",
            f"{psnr:.2f} dB",
            psnr >= TARGET_PSNR_DB,
        )
    )
    return out + _precision_targets(result) + _edit_targets(result)


def _adherence_points(row: Row, base: Row) -> dict[str, float]:
    """Per group, |adherence(row) − adherence(base)| in points."""
    return {
        g: abs((row.adherence[g].rate or 0) - (base.adherence[g].rate or 0)) * 100
        for g in GROUPS
        if g in row.adherence and g in base.adherence and row.adherence[g].total
    }


def _precision_targets(result: EvalResult) -> list[tuple[str, str, bool | None]]:
    if not result.precision_rows:
        return []
    (base_name, base), (name, row) = result.precision_rows
    ratio = row.fid / base.fid if base.fid > 0 else None
    points = _adherence_points(row, base)
    worst = max(points.values(), default=None)
    return [
        (
            f"FID at {name} ≤ {TARGET_PRECISION_FID_RATIO} × FID at {base_name} (N = {row.n})",
            "–" if ratio is None else f"{ratio:.3f} ×",
            None if ratio is None else ratio <= TARGET_PRECISION_FID_RATIO,
        ),
        (
            f"adherence at {name} within {TARGET_PRECISION_ADHERENCE_POINTS:g} point of "
            f"{base_name}, every group",
            "–" if worst is None else f"{worst:.1f} points (largest)",
            None if worst is None else worst <= TARGET_PRECISION_ADHERENCE_POINTS,
        ),
    ]


def _precision_section(result: EvalResult) -> list[str]:
    """The default settings at two precisions on the same prompts and seeds, side by side."""
    (_, base), _ = result.precision_rows
    out = [
        f"## Precision: default settings; N = {base.n} per row, the same prompts and seeds",
        "",
        "The UNet and text encoder run at the row's precision; the sampler, the guidance "
        "combination and the autoencoder stay fp32. Images/s counts `generate` alone, batches of "
        f"{result.settings.batch_size}, each row timed while it ran (not interleaved: "
        "`bench/bench_precision.py` compares speed properly). Δ adherence is the largest change, "
        "in points, over the four prompt groups.",
        "",
        "| precision | images/s | × first | FID | floor | FID / first | seen, 1 obj "
        "| held-out, 1 obj | seen, 2 obj | held-out, 2 obj | Δ adherence |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result.precision_rows:
        cells = " | ".join(_pct(r.adherence.get(g)) for g in GROUPS)
        speed = r.images_per_second / base.images_per_second if base.images_per_second else 0
        worst = max(_adherence_points(r, base).values(), default=0.0)
        out.append(
            f"| {name} | {r.images_per_second:.2f} | {speed:.2f}× | {r.fid:.3f} | {r.floor:.3f} "
            f"| {r.fid / base.fid:.3f} | {cells} | {worst:.1f} |"
        )
    out.append("")
    return out


def _fid_of(result: EvalResult, sampler: str, steps: int) -> float | None:
    for r in result.sampler_rows:
        if (r.sampling.sampler, r.sampling.steps) == (sampler, steps):
            return r.fid
    return None


def _ddpm_fid(result: EvalResult) -> float | None:
    return _fid_of(result, "ddpm", 1000) or None


def _short(r: Row) -> str:
    return f"{SAMPLER_NAMES.get(r.sampling.sampler, r.sampling.sampler)}, {r.sampling.steps}"


def fid_ratio(result: EvalResult) -> float | None:
    """FID at DPM-Solver++ 20 steps over FID at DDPM 1000 steps, both at the sweep's N."""
    ddpm, dpm = _ddpm_fid(result), _fid_of(result, "dpmpp-2m", 20)
    return None if ddpm is None or dpm is None else dpm / ddpm


def markdown(result: EvalResult, command: str = "") -> str:
    s, env, main = result.settings, result.environment, result.main
    lines = [f"# Evaluation of `{_shown(result.checkpoint)}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Machine: {env.get('device', '?')}; torch {env.get('torch', '?')} with "
        f"{env.get('threads', '?')} thread(s); UNet and text encoder in {s.precision}. "
        f"Seed {s.seed}. "
        f"Wall-clock {_minutes(result.seconds)} in all.",
        "",
    ]
    info = result.classifier_info
    lines += [
        f"Judge and FID feature network: the attribute classifier `{_shown(result.classifier)}` "
        f"({info['parameters']:,} parameters, {info['feature_dim']}-d penultimate features), "
        "standing in for Inception, whose weights cannot be had here.",
    ]
    acc = (info.get("accuracy") or {}).get("all_pairs")
    if acc:
        parts = ", ".join(f"{k} {v:.2%}" for k, v in acc.items() if k != "images")
        lines += [f"Its accuracy on {acc['images']} real images of another seed: {parts}."]
    lines += [""]

    lines += [
        f"## Default settings: {main.sampling.label}; N = {main.n}",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| FID, {main.n} generated vs {main.n} real images | {main.fid:.3f} |",
        f"| FID floor, real vs real (two disjoint samples of {main.n}) | {main.floor:.3f} |",
        f"| autoencoder reconstruction PSNR, {result.autoencoder_psnr_images} "
        f"held-out-pair images | {result.autoencoder_psnr_db:.2f} dB |",
        f"| generation wall-clock | {_minutes(main.seconds)} |",
        "",
        "Prompt adherence: the share of images whose classifier-read scene is exactly the "
        "prompt's (every object's shape, color, size and position, the background, and no other "
        "object). *Real* is the classifier on the prompts' own real renderings: what a perfect "
        "generator would score.",
        "",
        "| prompts | N | generated | real |",
        "|---|---:|---:|---:|",
    ]
    for g in GROUPS:
        if g in main.adherence and main.adherence[g].total:
            lines.append(
                f"| {g} | {main.adherence[g].total} | {_pct(main.adherence[g])} "
                f"| {_pct(result.real_adherence.get(g))} |"
            )
    lines += [
        "",
        "Per attribute (default settings): shape, color and size per object (read at its "
        "position); position = exactly the prompt's positions are occupied; background per image.",
        "",
        "| prompts | shape | color | size | position | background | all |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g, a in result.attribute_accuracy.items():
        cells = " | ".join(
            f"{a[k]:.1%}" for k in ("shape", "color", "size", "position", "background", "scene")
        )
        lines.append(f"| {g} | {cells} |")
    lines.append("")

    if result.sampler_rows:
        sweep_n = result.sampler_rows[0].n
        lines += [
            f"## Sampler sweep: guidance {result.defaults.guidance:g} on every step; "
            f"N = {sweep_n} per row",
            "",
            f"The same {sweep_n} prompts and seeds in every row (the first {sweep_n} of the "
            f"prompts above), FID against the same {sweep_n} real images. Adherence is the share "
            f"read as the prompt, by group ({_group_sizes(result.sampler_rows[0])}).",
            "",
            *_sweep_table(
                "sampler, steps",
                [(_short(r), r) for r in result.sampler_rows],
                _ddpm_fid(result),
            ),
            "",
        ]
    if result.guidance_rows:
        guidance_n = result.guidance_rows[0].n
        d = result.defaults
        lines += [
            f"## Guidance sweep: {d.sampler_label}, guidance on every step; "
            f"N = {guidance_n} per row",
            "",
            f"Adherence by group ({_group_sizes(result.guidance_rows[0])}).",
            "",
            *_sweep_table(
                "guidance", [(f"{r.sampling.guidance:g}", r) for r in result.guidance_rows], None
            ),
            "",
        ]

    if result.speed_rows:
        lines += _speed_section(result)
    if result.precision_rows:
        lines += _precision_section(result)
    if result.edits is not None:
        lines += _edit_section(result, result.edits)

    lines += ["## Targets", "", "| target | result | met |", "|---|---:|---|"]
    for name, value, met in targets(result):
        lines.append(f"| {name} | {value} | {'–' if met is None else 'yes' if met else 'no'} |")
    lines += [
        "",
        f"## Sample grid (`samples.png`): {s.grid_columns} seeds per prompt, default settings",
        "",
        "In the grid's two-object labels TL, TR, BL, BR are the corners, C the center, and * marks "
        "a held-out pair.",
        "",
        "| row | prompt | pairs | read as the prompt |",
        "|---:|---|---|---:|",
    ]
    for k, (caption, pairs, hits) in enumerate(result.grid_rows, 1):
        lines.append(f"| {k} | {caption} | {pairs} | {hits}/{s.grid_columns} |")
    lines.append("")
    return "\n".join(lines)
