"""Core model benchmark: training and sampling throughput, FLOP utilisation, and our UNet against
diffusers' UNet2DConditionModel at equal configuration, measured side by side in one run.

    .venv/bin/python bench/bench_core.py            # full run, a few minutes on 2 CPU cores
    .venv/bin/python bench/bench_core.py --quick    # smoke run

Prints a markdown table. Not a test: numbers depend on the machine and its load, which is why
ours and the reference are timed interleaved, round by round, and compared as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.diffusion.autoencoder import Autoencoder
from core.diffusion.data.shapes import vocabulary
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.schedule import NoiseSchedule
from core.diffusion.text import TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.training.denoiser import diffusion_loss
from core.diffusion.unet import UNet, UNetConfig
from core.runtime.machine import cpu_name


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n**3 / best


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channels)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    assert len(down) == levels
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.blocks_per_level,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.context_width,
        attention_head_dim=cfg.heads,  # diffusers reads this as the number of heads
        norm_num_groups=cfg.groups,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; a smoke run")
    args = ap.parse_args()
    rounds = 3 if args.quick else 10
    torch.manual_seed(0)
    rows: list[tuple[str, str, str, str]] = []

    unet_cfg, text_cfg = UNetConfig(), TextEncoderConfig()
    ours = UNet(unet_cfg).eval()
    ref = diffusers_unet(unet_cfg).eval()
    b, latent = 32, 16
    x = torch.randn(b, 4, latent, latent)
    t = torch.full((b,), 500)
    ctx = torch.randn(b, text_cfg.max_length, text_cfg.width)
    mask = torch.zeros(b, text_cfg.max_length, dtype=torch.bool)
    mask[:, :14] = True  # a typical caption: 12 words plus <bos>/<eos>

    def run_ours() -> object:
        return ours(x, t, ctx, mask)

    def run_ref() -> object:
        return ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask.float()).sample

    with torch.inference_mode():
        for _ in range(2):
            run_ours(), run_ref()
        ours_t, ref_t = [], []
        for _ in range(rounds):  # interleaved, so load on the machine hits both alike
            ours_t += timed(run_ours, 1)
            ref_t += timed(run_ref, 1)
        flops_ours = count_flops(run_ours)
        flops_ref = count_flops(run_ref)
    peak = matmul_flops_per_s()
    med_ours, med_ref = statistics.median(ours_t), statistics.median(ref_t)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    rows.append(
        (
            "UNet parameters",
            f"{n_ours / 1e6:.2f} M",
            f"{n_ref / 1e6:.2f} M",
            f"{n_ours / n_ref:.3f}",
        )
    )
    rows.append(
        (
            f"UNet forward, batch {b}, latents {latent}×{latent} (images/s)",
            f"{b / med_ours:.1f}",
            f"{b / med_ref:.1f}",
            f"**{med_ref / med_ours:.2f}×**",
        )
    )
    rows.append(
        (
            "UNet forward GFLOP per image",
            f"{flops_ours / b / 1e9:.3f}",
            f"{flops_ref / b / 1e9:.3f}",
            f"{flops_ours / flops_ref:.3f}",
        )
    )
    rows.append(
        (
            "UNet achieved GFLOP/s (share of fp32 matmul peak)",
            f"{flops_ours / med_ours / 1e9:.1f} ({flops_ours / med_ours / peak:.0%})",
            f"{flops_ref / med_ref / 1e9:.1f} ({flops_ref / med_ref / peak:.0%})",
            "",
        )
    )
    rows.append(("fp32 matmul peak, 1024² (GFLOP/s)", f"{peak / 1e9:.1f}", "", ""))

    # Training throughput: the real step (text encoder + UNet forward/backward + AdamW), plus
    # the autoencoder's step, at the default batch of 32.
    tok = WordTokenizer(vocabulary(), max_length=text_cfg.max_length)
    text = TextEncoder(text_cfg, tok)
    ae = Autoencoder()
    sched = NoiseSchedule()
    params = list(ours.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    captions = ["a large red circle in the top left and a small blue square in the center"] * b
    g = torch.Generator().manual_seed(0)
    ours.train()

    def denoiser_step() -> None:
        cond = text.encode(captions)
        loss = diffusion_loss(ours, sched, x, cond.states, cond.mask, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ae_opt = torch.optim.AdamW(ae.parameters(), lr=1e-4)
    images = torch.rand(b, 3, 64, 64) * 2 - 1

    def ae_step() -> None:
        loss, _ = ae.loss(images, g)
        ae_opt.zero_grad()
        loss.backward()
        ae_opt.step()

    denoiser_step(), ae_step()
    den_s = statistics.median(timed(denoiser_step, max(3, rounds // 2)))
    ae_s = statistics.median(timed(ae_step, max(3, rounds // 2)))
    rows.append(("Training, denoiser + text encoder (samples/s)", f"{b / den_s:.1f}", "", ""))
    rows.append(("Training, autoencoder (samples/s)", f"{b / ae_s:.1f}", "", ""))

    # Sampling throughput through generate(): DPM-Solver++(2M), 20 steps, guidance 4.
    ours.eval()
    model = LatentDiffusion(ae.eval(), text.eval(), ours, sched, image_size=64)
    for batch in (1, 16):
        prompts = captions[:batch]
        seeds = list(range(batch))

        def gen(prompts: list[str] = prompts, seeds: list[int] = seeds) -> object:
            return model.generate(prompts, steps=20, guidance=4.0, sampler="dpmpp-2m", seeds=seeds)

        gen()
        s = statistics.median(timed(gen, 2 if args.quick else 3))
        rows.append(
            (
                f"Sampling, 20 steps, guidance 4, batch {batch} (images/s)",
                f"{batch / s:.2f}",
                "",
                "",
            )
        )

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print()
    print("| measure | diffusion-queue | diffusers UNet2DConditionModel | ours / reference |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
