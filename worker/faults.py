"""Faults that a test injects into a real ``dq worker`` process, to show how the worker behaves
when they happen for real: ``DQ_TEST_FAULTS="oom_over_rows=2,progress_write_fails=1"``.

Nothing here runs unless that variable is set, and production never sets it. Each fault stands
for a failure that cannot be caused on demand from outside the process: a GPU out of memory, a
database write lost on the way, a kernel that never returns.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import cache

ENV = "DQ_TEST_FAULTS"


@cache
def _faults() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    pairs = (item.partition("=") for item in raw.split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}


def value(name: str) -> str | None:
    return _faults().get(name)


_counts: dict[str, int] = {}
_lock = threading.Lock()


def countdown(name: str) -> bool:
    """True for the first N calls of a fault set as ``name=N``."""
    limit = value(name)
    if limit is None:
        return False
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        return _counts[name] <= int(limit)


def before_generate(prompts: list[str]) -> None:
    """``oom_over_rows=N``: a batch of more than N images runs out of GPU memory.
    ``poison=WORD``: a prompt containing WORD breaks the model."""
    rows = value("oom_over_rows")
    if rows is not None and len(prompts) > int(rows):
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected for {len(prompts)} rows)"
        )
    poison = value("poison")
    if poison and any(poison in p for p in prompts):
        raise RuntimeError(f"injected: the model cannot take {poison!r}")


def at_step(step: int) -> None:
    """``hang_at_step=K``: at step K the main thread blocks every signal and sleeps for good,
    like a wedged GPU kernel or a hung storage call in C code.
    ``step_seconds=S``: every step takes at least S seconds longer, like a slower GPU, so that a
    test can act while a job runs however fast this machine's CPU is."""
    slow = value("step_seconds")
    if slow is not None:
        time.sleep(float(slow))
    hang = value("hang_at_step")
    if hang is not None and step == int(hang):
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        while True:
            time.sleep(3600)
