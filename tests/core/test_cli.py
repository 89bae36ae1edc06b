"""The dq command: generation from the command line, and one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def dq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=300,
    )


def dq_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cwd: Path, *args: str
) -> tuple[int, str]:
    """``dq ARGS`` run in this process from ``cwd`` (no interpreter and torch to start, 2 s each
    on 2 cores): its exit status and stderr. The tests that run ``dq`` as its own process show
    that the process prints the same line and exits with the same status."""
    from core.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def generate_here(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cwd: Path,
    checkpoint: Path,
    *extra: str,
) -> tuple[int, str]:
    """``dq generate "a red circle"`` on ``checkpoint`` at 2 steps, plus ``extra``, in this
    process (:func:`dq_here`)."""
    args = ("generate", "a red circle", "--checkpoint", str(checkpoint), "--steps", "2", *extra)
    return dq_here(monkeypatch, capsys, cwd, *args)


def test_generate_writes_a_png_that_the_seed_reproduces(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    args = [
        "generate",
        "a large red circle in the top left",
        "--checkpoint",
        str(tiny_checkpoint),
        "--steps",
        "4",
        "--sampler",
        "dpmpp-2m",
        "--guidance",
        "4",
        "--seed",
        "1",
    ]
    r1 = dq(*args, "-o", str(tmp_path / "a.png"))
    dq(*args, "-o", str(tmp_path / "b.png"))
    assert r1.returncode == 0, r1.stderr
    assert "seed=1" in r1.stdout
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (32, 32) and a.mode == "RGB"
    assert a.text["seed"] == "1" and a.text["prompt"] == "a large red circle in the top left"
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_generate_several_images_numbers_the_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    r = dq(
        "generate",
        "a small blue square in the center",
        "--checkpoint",
        str(tiny_checkpoint),
        "--steps",
        "2",
        "-n",
        "2",
        "--seed",
        "7",
        "-o",
        str(tmp_path / "x.png"),
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]
    assert Image.open(tmp_path / "x-1.png").text["seed"] == "8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "euler"], "unknown sampler 'euler'; choose one of ddim, ddpm, dpmpp-2m"),
        (["--steps", "0"], "steps must be an integer of at least 1"),
        (["--guidance", "-2"], "guidance must be a finite number of at least 0"),
        (["--seed", "-5"], "seed must be an integer from 0"),
        (["-o", "out.jpg"], "output must be a .png file"),
        (["-o", "/nonexistent/dir/x.png"], "output directory /nonexistent/dir does not exist"),
        (["--size", "30"], "size must be a multiple of 8"),
        (["--steps", "many"], "'many' is not a valid integer"),
        (["--device", "tpu"], "cannot use device 'tpu'"),
    ],
)
def test_bad_generate_input_is_one_line_without_traceback(
    tiny_checkpoint: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = generate_here(monkeypatch, capsys, tmp_path, tiny_checkpoint, *extra)
    assert code == 2
    assert err.startswith("dq: error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt must not be empty"),
        ("x" * 1001, "prompt is 1001 characters long; the limit is 1000"),
    ],
)
def test_empty_and_over_long_prompts_are_refused(
    tiny_checkpoint: Path, prompt: str, message: str
) -> None:
    r = dq("generate", prompt, "--checkpoint", str(tiny_checkpoint), "--steps", "2")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_prompt_over_the_token_limit_is_cut_with_a_note(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    r = dq(
        "generate",
        " ".join(["red"] * 40),
        "--checkpoint",
        str(tiny_checkpoint),
        "--steps",
        "2",
        "-o",
        str(tmp_path / "o.png"),
    )
    assert r.returncode == 0, r.stderr
    assert "dq: note: prompt was cut to 16 tokens" in r.stderr


def test_missing_or_pickled_checkpoint_is_one_line(tmp_path: Path) -> None:
    r = dq("generate", "a red circle", "--checkpoint", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04N.")
    r = dq("generate", "a red circle", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "pickle checkpoints are refused" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "autoencoder", "--out", "o", "--config", "missing.toml"],
            "config file missing.toml does not exist",
        ),
        (["train", "autoencoder", "--out", "o", "--steps", "0"], "train.steps must be at least 1"),
        (
            ["train", "autoencoder", "--out", "o", "--data", "nowhere"],
            "image folder nowhere does not exist",
        ),
        (["train", "denoiser", "--out", "o", "--autoencoder", "nowhere"], "nowhere does not exist"),
        (["train", "autoencoder"], "Missing option '--out'"),
        (["train", "autoencoder", "--out", "o", "--device", "cuda"], "no CUDA device is available"),
    ],
)
def test_bad_train_input_is_one_line(
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DQ_DATABASE_URL", f"sqlite:///{tmp_path / 'none.sqlite3'}")
    code, err = dq_here(monkeypatch, capsys, tmp_path, *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bad_train_option_is_one_line_from_the_real_process_too(tmp_path: Path) -> None:
    r = dq("train", "autoencoder", "--out", "o", "--steps", "0", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "dq: error: train.steps must be at least 1\n"


def test_help_lists_the_commands() -> None:
    r = dq("--help")
    assert r.returncode == 0
    assert "generate" in r.stdout and "train" in r.stdout


def _edit_files(tmp_path: Path) -> None:
    """init.png (a red square on dark noise), mask.png (its left half white), mask-big.png (the
    same at twice the size) and junk.png (not an image), in ``tmp_path``."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (200, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask).resize((64, 64)).save(tmp_path / "mask-big.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))


def test_generate_edits_an_init_image_and_inpaints_through_a_mask(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    _edit_files(tmp_path)
    common = ["--checkpoint", str(tiny_checkpoint), "--steps", "4", "--seed", "3"]
    r = dq("generate", "a blue square", *common, "--init-image", "init.png", "--strength", "0.5",
           "-o", "edit.png", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "edit.png").size == (32, 32)
    r = dq("generate", "a blue square", *common, "--init-image", "init.png", "--mask", "mask.png",
           "-o", "inpainted.png", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(tmp_path / "inpainted.png"))
    want = np.asarray(Image.open(tmp_path / "init.png"))
    assert np.array_equal(got[:, 16:], want[:, 16:])  # black in the mask: kept exactly
    assert not np.array_equal(got[:, :14], want[:, :14])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "mask.png"], "--mask and --strength need --init-image"),
        (["--strength", "0.5"], "--mask and --strength need --init-image"),
        (["--init-image", "init.png", "--strength", "0"], "strength must be greater than 0"),
        (["--init-image", "init.png", "--strength", "1.5"], "strength must be greater than 0"),
        (["--init-image", "junk.png"], "--init-image is not an image Pillow can read"),
        (["--init-image", "absent.png"], "--init-image: cannot read absent.png"),
        (["--init-image", "init.png", "--mask", "mask-big.png"], "--mask is 64×64 pixels"),
    ],
)
def test_bad_edit_input_is_one_line_without_traceback(
    tiny_checkpoint: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _edit_files(tmp_path)
    code, err = generate_here(monkeypatch, capsys, tmp_path, tiny_checkpoint, *extra)
    assert code == 2, err
    assert err.startswith("dq: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
