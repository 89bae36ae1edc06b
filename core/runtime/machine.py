"""What machine this is, in the words every benchmark table and evaluation report prints."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, its widest vector ISA and its core count, e.g.
    ``AMD EPYC (AVX2), 2 cores``: training and generation speed hang on the ISA (AVX-512 with
    bf16 runs about 3× faster than AVX2 only)."""
    cores = f"{os.cpu_count() or '?'} cores"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {cores}"
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    isa = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    bf16 = " + bf16" if "avx512_bf16" in info else ""
    return f"{names[0] if names else 'unknown CPU'} ({isa}{bf16}), {cores}"
