"""generate(): per-image seeds, batch invariance, callbacks, input validation, checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.diffusion.checkpoint import CheckpointError
from core.diffusion.pipeline import LatentDiffusion, PromptTruncatedWarning
from core.diffusion.samplers import SamplingCanceled

PROMPTS = [
    "a large red circle in the top left",
    "a small blue square in the bottom right and a large white triangle in the top left",
    "a small green triangle in the center",
]


def pixels(img) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(img)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
def test_image_is_bit_identical_alone_and_inside_a_batch(
    tiny_pipeline: LatentDiffusion, sampler: str
) -> None:
    kw = {"steps": 6, "sampler": sampler, "guidance": 3.0}
    batch = tiny_pipeline.generate(PROMPTS, seeds=[11, 12, 13], **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = tiny_pipeline.generate([prompt], seeds=[11 + i], **kw)[0]
        assert np.array_equal(pixels(alone), pixels(batch[i]))


@pytest.mark.parametrize(
    ("guidance", "sampler", "steps", "interval"),
    [
        (1.0, "dpmpp-2m", 5, (0.0, 1.0)),
        (4.0, "dpmpp-2m", 5, (0.0, 1.0)),
        (4.0, "dpmpp-3m", 5, (0.0, 1.0)),
        (4.0, "dpmpp-3m", 10, (0.3, 1.0)),  # the shipped defaults: guided at some steps only
    ],
)
def test_image_is_bit_identical_at_every_batch_size(
    tiny_pipeline: LatentDiffusion,
    guidance: float,
    sampler: str,
    steps: int,
    interval: tuple[float, float],
) -> None:
    prompts = [PROMPTS[i % 3] for i in range(8)]
    seeds = list(range(100, 108))
    kw = {"steps": steps, "guidance": guidance, "sampler": sampler, "guidance_interval": interval}
    full = [pixels(im) for im in tiny_pipeline.generate(prompts, seeds=seeds, **kw)]
    for b in (1, 2, 3, 5):
        part = tiny_pipeline.generate(prompts[:b], seeds=seeds[:b], **kw)
        assert all(np.array_equal(pixels(p), f) for p, f in zip(part, full, strict=False)), b


def _unet_rows(pipeline: LatentDiffusion) -> tuple[list[int], Any]:
    rows: list[int] = []
    handle = pipeline.unet.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    return rows, handle


def test_outside_the_guidance_interval_the_unet_sees_only_the_conditional_rows(
    tiny_pipeline: LatentDiffusion,
) -> None:
    from core.diffusion.schedule import inference_timesteps

    steps, lo, hi = 10, 0.3, 0.7
    rows, handle = _unet_rows(tiny_pipeline)
    try:
        tiny_pipeline.generate(
            PROMPTS, seeds=[1, 2, 3], steps=steps, guidance=4.0, guidance_interval=(lo, hi)
        )
    finally:
        handle.remove()
    ts = inference_timesteps(tiny_pipeline.schedule.num_train_timesteps, steps)
    T = tiny_pipeline.schedule.num_train_timesteps - 1
    expected = [6 if lo <= t / T <= hi else 3 for t in ts]
    assert rows == expected
    assert 3 in rows and 6 in rows  # both kinds of step happened

    # Per image: only the images guided at a step get their unconditional row.
    rows, handle = _unet_rows(tiny_pipeline)
    try:
        tiny_pipeline.generate(
            PROMPTS,
            seeds=[1, 2, 3],
            steps=steps,
            guidance=[4.0, 4.0, 1.0],
            guidance_interval=[(0.0, 1.0), (lo, hi), (0.0, 1.0)],
        )
    finally:
        handle.remove()
    assert rows == [3 + 1 + (1 if lo <= t / T <= hi else 0) for t in ts]


def test_bad_guidance_intervals_are_refused(tiny_pipeline: LatentDiffusion) -> None:
    for bad in [(0.5, 0.2), (-0.1, 1.0), (0.0, 1.5), [(0.0, 1.0)] * 2, "0,1"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            tiny_pipeline.prepare(PROMPTS, guidance_interval=bad)  # type: ignore[arg-type]


def test_batch_invariance_holds_with_mixed_guidance_and_negative_prompts(
    tiny_pipeline: LatentDiffusion,
) -> None:
    batch = tiny_pipeline.generate(
        PROMPTS,
        negative_prompts=["", "red", ""],
        guidance=[1.0, 5.0, 0.0],
        seeds=[1, 2, 3],
        steps=5,
    )
    alone0 = tiny_pipeline.generate(PROMPTS[:1], guidance=1.0, seeds=[1], steps=5)[0]
    alone1 = tiny_pipeline.generate(PROMPTS[1:2], ["red"], guidance=5.0, seeds=[2], steps=5)[0]
    assert np.array_equal(pixels(alone0), pixels(batch[0]))
    assert np.array_equal(pixels(alone1), pixels(batch[1]))


def test_seed_decides_the_image(tiny_pipeline: LatentDiffusion) -> None:
    a, b, c = tiny_pipeline.generate([PROMPTS[0]] * 3, seeds=[5, 5, 6], steps=4)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert a.info["seed"] == 5 and c.info["seed"] == 6
    assert a.mode == "RGB" and a.size == (32, 32)


def test_guidance_and_negative_prompt_change_the_image(tiny_pipeline: LatentDiffusion) -> None:
    base = pixels(tiny_pipeline.generate([PROMPTS[0]], seeds=[1], steps=4, guidance=1.0)[0])
    guided = pixels(tiny_pipeline.generate([PROMPTS[0]], seeds=[1], steps=4, guidance=7.0)[0])
    neg = pixels(
        tiny_pipeline.generate([PROMPTS[0]], ["circle"], seeds=[1], steps=4, guidance=7.0)[0]
    )
    assert not np.array_equal(base, guided)
    assert not np.array_equal(guided, neg)


def test_on_step_sees_every_step_with_an_x0_estimate_that_previews(
    tiny_pipeline: LatentDiffusion,
) -> None:
    calls: list[tuple[int, int, tuple[int, ...]]] = []
    tiny_pipeline.generate(
        PROMPTS[:2],
        seeds=[1, 2],
        steps=5,
        on_step=lambda i, n, x0: calls.append((i, n, tuple(x0.shape))),
    )
    assert [(i, n) for i, n, _ in calls] == [(i, 5) for i in range(1, 6)]
    assert calls[0][2] == (2, 4, 8, 8)
    previews = tiny_pipeline.preview(torch.zeros(2, 4, 8, 8))
    assert len(previews) == 2 and previews[0].size == (32, 32)


def test_should_stop_cancels_between_steps(tiny_pipeline: LatentDiffusion) -> None:
    steps_seen: list[int] = []
    with pytest.raises(SamplingCanceled, match="after step 2 of 10"):
        tiny_pipeline.generate(
            PROMPTS[:1],
            seeds=[1],
            steps=10,
            on_step=lambda i, n, x0: steps_seen.append(i),
            should_stop=lambda: len(steps_seen) >= 2,
        )
    assert steps_seen == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "euler"}, "unknown sampler 'euler'"),
        ({"steps": 0}, "steps must be an integer of at least 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"steps": 1001}, "steps must be at most 1000"),
        ({"guidance": -1.0}, "guidance must be a finite number of at least 0"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"prompts": [""]}, "prompt must not be empty"),
        ({"prompts": ["   "]}, "prompt must not be empty"),
        ({"prompts": ["x" * 1001]}, "prompt is 1001 characters long; the limit is 1000"),
        ({"prompts": "a red circle"}, "prompts must be a list of strings"),
        ({"prompts": []}, "at least one prompt"),
        ({"negative_prompts": ["a", "b"]}, "one entry per prompt"),
        ({"seeds": [-1]}, "seed must be an integer from 0"),
        ({"seeds": [2**63]}, "seed must be an integer from 0"),
        ({"seeds": [1, 2]}, "one seed per prompt"),
        ({"size": 33}, "size must be a multiple of 8"),
        ({"guidance": [1.0, 2.0]}, "one value per prompt"),
    ],
)
def test_bad_input_is_a_clear_value_error(
    tiny_pipeline: LatentDiffusion, kwargs: dict, message: str
) -> None:
    args = {"prompts": [PROMPTS[0]], "seeds": [1], "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipeline.generate(**args)


def test_over_long_prompt_is_cut_with_a_warning(tiny_pipeline: LatentDiffusion) -> None:
    long_prompt = " and ".join([PROMPTS[0]] * 5)
    with pytest.warns(PromptTruncatedWarning, match="cut to 16 tokens"):
        images = tiny_pipeline.generate([long_prompt], seeds=[1], steps=2)
    assert len(images) == 1


def test_checkpoint_round_trip_gives_identical_images(
    tiny_pipeline: LatentDiffusion, tmp_path: Path
) -> None:
    tiny_pipeline.save(tmp_path / "m")
    loaded = LatentDiffusion.load(tmp_path / "m", device="cpu")
    for name, tensor in tiny_pipeline.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.config_dict() == tiny_pipeline.config_dict()
    a = tiny_pipeline.generate(PROMPTS[:1], seeds=[3], steps=3)[0]
    b = loaded.generate(PROMPTS[:1], seeds=[3], steps=3)[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_a_pickle_offered_as_a_checkpoint_is_refused_without_unpickling(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (marker.write_text, ("unpickled!",))

    # torch.save's zip format and a raw pickle, each put where the safetensors file belongs
    torch.save({"w": torch.zeros(1), "x": Exploit()}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        LatentDiffusion.load(bad, device="cpu")
    (bad / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        LatentDiffusion.load(bad, device="cpu")
    assert not marker.exists()


def test_a_directory_with_only_a_pt_file_names_the_problem(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: pickle checkpoints are refused"):
        LatentDiffusion.load(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "model.json").write_text(json.dumps({"format": "other"})),
            "not a diffusion-queue",
        ),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\xff"),
            "not a safetensors",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda d: shutil.rmtree(d), "does not exist"),
    ],
)
def test_damaged_checkpoints_are_clear_errors(
    tiny_checkpoint: Path, tmp_path: Path, mutate, message: str
) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    mutate(d)
    with pytest.raises(CheckpointError, match=message):
        LatentDiffusion.load(d, device="cpu")


def test_an_autoencoder_checkpoint_is_not_a_generation_model(
    tmp_path: Path, tiny_pipeline: LatentDiffusion
) -> None:
    from core.diffusion.pipeline import load_autoencoder, save_autoencoder

    save_autoencoder(tmp_path, tiny_pipeline.autoencoder)
    assert isinstance(load_autoencoder(tmp_path), type(tiny_pipeline.autoencoder))
    with pytest.raises(CheckpointError, match="needs a 'latent-diffusion' checkpoint"):
        LatentDiffusion.load(tmp_path, device="cpu")


def test_fast_preview_approximates_the_decoder_far_better_than_a_flat_colour() -> None:
    import numpy as np

    from core.diffusion.data.captioned import images_to_tensor
    from core.diffusion.data.shapes import ShapesDataset
    from core.services.model_versions import DEFAULT_MODEL_DIR

    model = LatentDiffusion.load(DEFAULT_MODEL_DIR, device="cpu")
    data = ShapesDataset(seed=11, split="train", image_size=64)
    images = images_to_tensor([data[i].image for i in range(8)])
    with torch.no_grad():
        z = model.autoencoder.encode(images).mean * model.latent_scale_factor
    decoded = np.stack([np.asarray(im, float) for im in model.preview(z)])
    fast = np.stack([np.asarray(im, float) for im in model.fast_preview(z)])
    assert fast.shape == decoded.shape == (8, 64, 64, 3)
    flat = np.broadcast_to(decoded.mean(axis=(1, 2), keepdims=True), decoded.shape)
    err, baseline = np.abs(fast - decoded).mean(), np.abs(flat - decoded).mean()
    assert err < 0.6 * baseline, (err, baseline)
    again = LatentDiffusion.load(DEFAULT_MODEL_DIR, device="cpu").fast_preview(z)
    assert [a.tobytes() for a in again] == [np.uint8(f).tobytes() for f in fast]
