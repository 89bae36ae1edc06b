"""What several ``dq`` commands share: the usage error that ends in one line and exit status 2,
the settings read from DQ_* variables, the one-line database error, and the model checkpoint,
torch device and precision a command's flags name. A leaf: it imports no other module of
``core.cli``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "diffusion" / "default_model"


class UsageError(click.ClickException):
    exit_code = 2


def fail(message: str) -> UsageError:
    return UsageError(message.rstrip("."))


def resolve_checkpoint(checkpoint: str | None) -> Path:
    if checkpoint is not None:
        return Path(checkpoint)
    if (DEFAULT_CHECKPOINT / "model.json").is_file():
        return DEFAULT_CHECKPOINT
    raise fail(
        "no default model is installed; pass --checkpoint DIR "
        "(train one with `dq train autoencoder` then `dq train denoiser`)"
    )


def torch_device(name: str | None) -> Any:
    import torch

    from core.diffusion.pipeline import pick_device

    if name is None:
        return pick_device()
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise fail(f"device must be cpu or cuda, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise fail("device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_precision_option(precision: str, device: Any) -> str:
    """``--precision`` resolved for ``device`` (fp32, bf16 or fp16); one line when it cannot
    run there or is unknown."""
    from core.diffusion.precision import PrecisionError, resolve_precision

    try:
        return resolve_precision(precision, device, "--precision")
    except PrecisionError as e:
        raise fail(str(e)) from None


PRECISION_HELP = (
    "Precision of the UNet and text encoder: auto, fp32, bf16 or fp16 (CUDA only). auto: bf16 "
    "on a GPU that has it, else fp16; on a CPU, bf16 where it is native (AVX-512 BF16, AMX), "
    "else fp32."
)


def load_settings() -> Any:
    from core.runtime.settings import Settings

    return Settings.from_env()  # SettingsError names the variable; main() prints it


def database_error(url: str, e: Exception) -> UsageError:
    from core.runtime.settings import Settings

    shown = Settings(database_url=url).public_dict()["DQ_DATABASE_URL"]
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    return fail(f"cannot reach the database at {shown} (DQ_DATABASE_URL): {reason}")
