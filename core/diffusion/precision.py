"""Numeric precision of the UNet and the text encoder: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

Half precision applies to the two networks that do nearly all the work; everything that decides
the trajectory stays in fp32: the sampler's state, the schedule's arithmetic, the guidance
combination and the autoencoder (``core.diffusion.pipeline`` casts at the UNet's boundary).

``auto`` picks, for the device at hand:

- CUDA: bf16 where the GPU supports it (Ampere and later), else fp16;
- CPU: bf16 where the CPU computes bf16 natively (AVX-512 BF16 or AMX, read from the CPU's flags,
  or oneDNN's own answer where there are no flags to read), else fp32. On an AVX2-only CPU bf16
  is emulated and slower than fp32.

fp16 on a CPU is refused: oneDNN has no fp16 kernels on x86 CPUs without AMX-FP16, and torch's
fallbacks are many times slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.runtime.settings import PRECISIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (as /proc/cpuinfo spells them) of native bf16 arithmetic.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """A precision that is unknown or that the device cannot run; the message names the
    setting (DQ_PRECISION for workers, --precision for commands)."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first CPU in ``/proc/cpuinfo`` (or in the text given); empty when
    there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware: its flags when it lists any, otherwise
    oneDNN's own query (which is also true on ARM CPUs with BF16)."""
    flags = cpu_flags(cpuinfo)
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    if cpuinfo is not None:
        return False
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_precision(raw: str, setting: str = "--precision") -> str:
    """``raw`` checked against :data:`PRECISIONS` (case and blanks ignored)."""
    value = raw.strip().lower()
    if value not in PRECISIONS:
        raise PrecisionError(f"{setting} must be one of {', '.join(PRECISIONS)}, not {raw!r}")
    return value


def resolve_precision(
    precision: str,
    device: str | torch.device,
    setting: str = "--precision",
    cpuinfo: str | None = None,
) -> str:
    """The concrete precision (fp32, bf16 or fp16) that ``precision`` means on ``device``.

    Raises :class:`PrecisionError`, naming ``setting``, for an unknown value or for fp16 on a
    CPU. bf16 asked of a CPU without native bf16 is honoured (it is slower, not wrong).
    """
    value = parse_precision(precision, setting)
    dev = torch.device(device)
    if dev.type == "cuda":
        if value != "auto":
            return value
        if not torch.cuda.is_available():  # loading on the device will say so
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if value == "fp16":
        raise PrecisionError(
            f"{setting}=fp16 needs a CUDA device; on a CPU use bf16 (native on CPUs with "
            "AVX-512 BF16 or AMX), fp32 or auto"
        )
    if value == "auto":
        return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"
    return value


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision."""
    try:
        return DTYPES[precision]
    except KeyError:
        raise PrecisionError(f"precision must be resolved first, not {precision!r}") from None
