"""The training loop shared by the autoencoder and the denoiser.

Plain PyTorch, readable top to bottom: AdamW, linear warm-up then cosine decay, gradient
clipping, an EMA copy of the weights, bf16 autocast on CUDA, a progress bar, a metrics callback,
and periodic checkpoints that a later run resumes from after an interruption.

The resumable state lives in ``OUT/train_state/`` as safetensors (weights, EMA, optimiser
moments, the RNG state) plus JSON (step, optimiser hyper-parameters); nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from core.diffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.diffusion.training.config import LoopConfig

STATE_DIR = "train_state"
MetricsCallback = Callable[[dict[str, float]], None]
# step_fn(step, generator) -> (loss, metrics, samples in the batch)
StepFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float], int]]


class TrainingPaused(Exception):
    """The loop stopped on request after writing a checkpoint at ``step``; resuming goes on
    from there."""

    def __init__(self, step: int):
        super().__init__(f"paused at step {step} after a checkpoint")
        self.step = step


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr·min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay
    (1+n)/(10+n), so early averages are not dominated by the random initialisation."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


@dataclass
class LoopResult:
    steps_done: int
    resumed_from: int
    seconds: float  # this run
    elapsed_s: float  # all runs of this training, resumes included
    last_metrics: dict[str, float]


def _optimizer_tensors(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {
        f"optim.{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val))
        for idx, st in sd["state"].items()
        for key, val in st.items()
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drops metric lines past ``step``: after a resume they are recorded again."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class TrainLoop:
    """Runs ``step_fn`` for ``cfg.steps`` steps over the parameters of ``model``.

    ``export(ema_model, step)`` writes the usable checkpoint (from EMA weights); it runs at every
    checkpoint and at the end. ``fingerprint`` (a JSON-able dict) must match for a resume, so a
    run never continues from a state trained under another configuration.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LoopConfig,
        out_dir: str | Path,
        step_fn: StepFn,
        export: Callable[[nn.Module, int], None],
        fingerprint: dict[str, Any],
        on_metrics: MetricsCallback | None = None,
        progress: bool = True,
        device: torch.device | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        pause_requested: Callable[[], bool] | None = None,
        no_decay: Sequence[nn.Parameter] = (),
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.out = Path(out_dir)
        self.step_fn = step_fn
        self.export = export
        self.fingerprint = fingerprint
        self.on_metrics = on_metrics
        # Runs after each checkpoint is on disk, e.g. to copy it to object storage.
        self.on_checkpoint = on_checkpoint
        # Polled after each step; when it says so, the loop checkpoints and raises
        # TrainingPaused (e.g. a worker's time limit: the run resumes elsewhere).
        self.pause_requested = pause_requested
        self.progress = progress
        self.device = device or torch.device("cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        # No weight decay on biases and norm gains (1-D tensors), as in nanoGPT, nor on what
        # the caller names (a partly frozen embedding: decay would move its frozen rows).
        exempt = {id(p) for p in no_decay}
        decayed = [p for p in params if p.ndim >= 2 and id(p) not in exempt]
        groups = [
            {"params": decayed, "weight_decay": cfg.weight_decay},
            {
                "params": [p for p in params if id(p) not in {id(q) for q in decayed}],
                "weight_decay": 0.0,
            },
        ]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
        self.ema = EMA(model, cfg.ema_decay)
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.step = 0
        self.elapsed_s = 0.0  # wall-clock seconds of training, summed over resumed runs

    # --- resumable state ---------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_DIR

    def save_state(self) -> None:
        opt_tensors, opt_meta = _optimizer_tensors(self.opt)
        tensors = {
            **{f"model.{k}": v for k, v in self.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in self.ema.module.state_dict().items()},
            **opt_tensors,
            "rng": self.generator.get_state(),
        }
        meta = {
            "kind": "train-state",
            "step": self.step,
            "ema_updates": self.ema.updates,
            "elapsed_s": self.elapsed_s,
            "fingerprint": self.fingerprint,
            "optimizer": opt_meta,
        }
        save_checkpoint(self.state_dir, tensors, meta)

    def try_resume(self) -> bool:
        if not (self.state_dir / "model.json").exists():
            return False
        tensors, meta = load_checkpoint(self.state_dir)
        if meta.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            raise CheckpointError(
                f"{self.state_dir} was trained with a different configuration; "
                "use a new --out directory or pass --no-resume to start over"
            )
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.module.load_state_dict(
            {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        )
        _restore_optimizer(self.opt, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng"])
        self.step = int(meta["step"])
        self.ema.updates = int(meta["ema_updates"])
        self.elapsed_s = float(meta.get("elapsed_s", 0.0))
        return True

    # --- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = True) -> LoopResult:
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume() if resume else False
        start = self.step
        metrics_path = self.out / "metrics.jsonl"
        _keep_metrics_up_to(metrics_path, start if resumed else 0)
        cfg = self.cfg
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        t0 = time.perf_counter()
        counted = 0.0  # seconds of this run already added to elapsed_s
        last: dict[str, float] = {}
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        window_t, window_n = time.perf_counter(), 0
        with metrics_path.open("a") as mlog:
            while self.step < cfg.steps:
                lr = lr_at(self.step, cfg)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                self.model.train()
                with autocast:
                    loss, metrics, n = self.step_fn(self.step, self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                self.ema.update(self.model)
                self.step += 1
                window_n += n
                now = time.perf_counter()
                last = {
                    "step": self.step,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": window_n / max(now - window_t, 1e-9),
                    **metrics,
                }
                if self.step % 10 == 0 or self.step == cfg.steps:
                    window_t, window_n = now, 0
                mlog.write(json.dumps(last) + "\n")
                if self.on_metrics is not None:
                    self.on_metrics(last)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{last['samples_per_s']:.1f}"
                )
                pause = self.pause_requested is not None and self.pause_requested()
                if pause or self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    mlog.flush()
                    run_s = time.perf_counter() - t0
                    self.elapsed_s += run_s - counted
                    counted = run_s
                    self.export(self.ema.module, self.step)
                    self.save_state()
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(self.step)
                if pause and self.step < cfg.steps:
                    bar.close()
                    raise TrainingPaused(self.step)
        bar.close()
        return LoopResult(self.step - start, start, time.perf_counter() - t0, self.elapsed_s, last)
