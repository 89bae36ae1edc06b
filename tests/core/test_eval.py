"""dq eval: FID against scipy, the shipped classifier as a judge, reproducible evaluation."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from core.cli import DEFAULT_CHECKPOINT, main
from core.diffusion.checkpoint import read_config
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.shapes import (
    BACKGROUNDS,
    DEFAULT_HELD_OUT,
    POSITIONS,
    ShapeObject,
    ShapesDataset,
    render,
)
from core.diffusion.eval import DEFAULT_CLASSIFIER
from core.diffusion.eval.classifier import (
    AttributeClassifier,
    ClassifierConfig,
    Scene,
    classifier_loss,
    scene_targets,
)
from core.diffusion.eval.common import Adherence
from core.diffusion.eval.editing import (
    EditResults,
    ImageToImageRow,
    InpaintingRow,
    image_to_image_counts,
    inpainting_counts,
)
from core.diffusion.eval.evaluate import GROUPS, EvalResult, EvalSettings, Row, Sampling, evaluate
from core.diffusion.eval.fid import fid, frechet_distance, gaussian_stats
from core.diffusion.eval.report import targets
from core.diffusion.eval.scenes import (
    HELD_OUT,
    SEEN,
    edit_sources,
    inpaint_tasks,
    recolor_tasks,
    scene_stream,
)
from core.diffusion.pipeline import LatentDiffusion

# --- FID ---------------------------------------------------------------------------------------


def _correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)


def test_fid_of_a_sample_against_itself_is_zero_and_grows_with_noise_on_one_side() -> None:
    rng = np.random.default_rng(0)
    x = _correlated(rng, 1000, 16)
    noise = rng.standard_normal(x.shape)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    fids = [fid(x, x + sigma * noise) for sigma in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in pairwise(fids)), fids
    assert fids[0] > 1e-3


def test_frechet_distance_matches_scipys_sqrtm_formula_on_random_gaussians() -> None:
    rng = np.random.default_rng(1)
    for d, n in ((8, 500), (32, 200), (32, 20)):  # the last one has rank-deficient covariances
        a = gaussian_stats(_correlated(rng, n, d))
        b = gaussian_stats(_correlated(rng, n, d) * 0.7 + 0.3)
        covmean = scipy.linalg.sqrtm(a.cov @ b.cov).real
        diff = a.mean - b.mean
        expected = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_gaussian_stats_are_the_mean_and_unbiased_covariance_in_float64() -> None:
    x = _correlated(np.random.default_rng(2), 50, 4).astype(np.float32)
    s = gaussian_stats(x)
    assert s.mean.dtype == s.cov.dtype == np.float64 and s.n == 50
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(s.cov, centred.T @ centred / 49, rtol=1e-10)


# --- the classifier ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> AttributeClassifier:
    return AttributeClassifier.load(DEFAULT_CLASSIFIER)


def _real(n: int, seed: int, split: str = "all") -> tuple[torch.Tensor, list[Scene]]:
    ds = ShapesDataset(seed=seed, split=split, paraphrase=False)
    samples = [ds[i] for i in range(n)]
    images = images_to_tensor([s.image for s in samples])
    return images, [Scene.of(s.objects, s.background) for s in samples]


def test_shipped_classifier_reads_real_shapes_images_held_out_pairs_included(
    classifier: AttributeClassifier,
) -> None:
    for split in ("all", "held_out"):
        images, truth = _real(48, seed=777, split=split)
        assert classifier.read(images) == truth


def test_shipped_classifier_features_have_the_documented_shape(
    classifier: AttributeClassifier,
) -> None:
    images, _ = _real(6, seed=778)
    features = classifier.features(images)
    # five position slots of slot_width, then the background's hidden vector
    cfg = classifier.config
    assert cfg.feature_dim == len(POSITIONS) * cfg.slot_width + cfg.background_width == 128
    assert features.shape == (6, cfg.feature_dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # the same images at another resolution are resized to the classifier's input first
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    assert classifier.features(small).shape == (6, cfg.feature_dim)
    # its training record states its accuracy on another seed
    acc = read_config(DEFAULT_CLASSIFIER)["training"]["accuracy"]
    assert min(v for k, v in acc["all_pairs"].items() if k != "images") >= 0.99


def test_classifier_fid_of_real_images_is_zero_against_themselves_and_grows_with_noise(
    classifier: AttributeClassifier,
) -> None:
    images, _ = _real(256, seed=779)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    clean = classifier.features(images).double().numpy()
    fids = [
        fid(clean, classifier.features(images + sigma * noise).double().numpy())
        for sigma in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert fids[0] == pytest.approx(0.0, abs=1e-6)
    assert all(x < y for x, y in pairwise(fids)), fids


def test_classifier_loss_ignores_attributes_of_empty_slots() -> None:
    model = AttributeClassifier(ClassifierConfig(channels=(8, 8, 8, 8), slot_width=4))
    _, scenes = _real(4, seed=781)
    targets = scene_targets(scenes)
    logits = model(torch.zeros(4, 3, 64, 64))
    loss, _ = classifier_loss(logits, targets)
    empty = ~targets["presence"].bool()
    changed = {k: v.clone() for k, v in logits.items()}
    for name in ("shape", "color", "size"):
        changed[name][empty] += 10 * torch.randn_like(changed[name][empty])
    assert classifier_loss(changed, targets)[0].item() == pytest.approx(loss.item())
    changed["presence"][empty, 1] += 10.0
    assert classifier_loss(changed, targets)[0].item() != pytest.approx(loss.item())


# --- evaluation --------------------------------------------------------------------------------


def test_scene_stream_alternates_seen_and_held_out_pairs_and_real_images_are_disjoint() -> None:
    prompts = scene_stream(0, 0, 40)
    reals = scene_stream(0, 40, 40)
    held = set(DEFAULT_HELD_OUT)
    assert [p.pairs for p in prompts[:4]] == [SEEN, HELD_OUT, SEEN, HELD_OUT]
    for p in prompts:
        uses = any(o.pair in held for o in p.scene.objects)
        assert uses == (p.pairs == HELD_OUT)
        assert p.caption.endswith(f"on a {p.scene.background} background")
    assert not {p.image.tobytes() for p in prompts} & {r.image.tobytes() for r in reals}


def test_default_checkpoint_loads_and_generates_a_batch_read_as_prompted(
    classifier: AttributeClassifier,
) -> None:
    model = LatentDiffusion.load(DEFAULT_CHECKPOINT, device="cpu")
    scenes = [p.scene for p in scene_stream(3, 0, 8) if p.objects == 1 and p.pairs == SEEN][:2]
    images = model.generate([s.caption for s in scenes], seeds=[0, 1])
    assert [im.size for im in images] == [(64, 64)] * 2
    x = images_to_tensor([np.asarray(im) for im in images])
    assert classifier.read(x) == scenes


def test_evaluation_with_fixed_seeds_gives_identical_numbers() -> None:
    settings = EvalSettings(
        n=8, sweeps=False, edit_n=3, grid_columns=1, psnr_images=4, batch_size=4
    )
    first = evaluate(DEFAULT_CHECKPOINT, DEFAULT_CLASSIFIER, settings, progress=False)
    second = evaluate(DEFAULT_CHECKPOINT, DEFAULT_CLASSIFIER, settings, progress=False)
    assert first.numbers() == second.numbers()
    assert first.main.n == 8 and first.main.floor >= 0 and first.main.fid > 0
    assert sum(a.total for a in first.main.adherence.values()) == 8
    assert first.edits is not None
    assert [r.strength for r in first.edits.image_to_image] == [0.6, 0.8]
    assert first.edits.inpainting.n == 3


# --- image editing -----------------------------------------------------------------------------


def _pixels_of(
    obj: ShapeObject, background: str, size: int, offset: tuple[float, float]
) -> np.ndarray:
    """(H, W) bool: the pixels an object alone changes from the background."""
    alone = render([obj], background, size, [offset])
    return (alone != np.asarray(BACKGROUNDS[background], dtype=np.uint8)).any(-1)


@pytest.mark.parametrize("size", [64, 32])
def test_inpainting_masks_cover_the_removed_object_and_not_one_pixel_of_the_kept_one(
    size: int,
) -> None:
    _, twos = edit_sources(5, 300, size)
    tasks = inpaint_tasks(twos, 5)
    assert all(t.source.objects == 2 for t in tasks) and len(tasks) == 300
    removed_positions = set()
    for t in tasks:
        scene = t.source.scene
        assert t.mask is not None and t.mask.shape == (size, size)
        # the sources are re-rendered exactly from their scene and jitter
        assert (
            render(scene.objects, scene.background, size, t.source.offsets) == t.source.image
        ).all()
        for obj, offset in zip(scene.objects, t.source.offsets, strict=True):
            pixels = _pixels_of(obj, scene.background, size, offset)
            if obj.position == t.position:
                assert t.mask[pixels].all()
            else:
                assert not t.mask[pixels].any()
        removed_positions.add(t.position)
    assert removed_positions == set(POSITIONS)


def test_edit_tasks_change_what_they_say_into_pairs_seen_in_training() -> None:
    ones, twos = edit_sources(0, 64)
    assert [s.objects for s in ones] == [1] * 64 and [s.objects for s in twos] == [2] * 64
    prompts = {p.image.tobytes() for p in scene_stream(0, 0, 4000)}
    assert not prompts & {s.image.tobytes() for s in ones + twos}
    held = set(DEFAULT_HELD_OUT)
    for t in recolor_tasks(ones, 0):
        (old,), (new,) = t.source.scene.objects, t.target.objects
        assert new.color != old.color and new.pair not in held
        assert (new.shape, new.size, new.position) == (old.shape, old.size, old.position)
        assert t.target.background == t.source.scene.background and t.mask is None
        assert t.prompt == t.target.caption
    for t in inpaint_tasks(twos, 0):
        old = next(o for o in t.source.scene.objects if o.position == t.position)
        new = next(o for o in t.target.objects if o.position == t.position)
        assert new.shape != old.shape and new.color != old.color and new.size == old.size
        assert new.pair not in held
        kept = [o for o in t.source.scene.objects if o.position != t.position]
        assert [o for o in t.target.objects if o.position != t.position] == kept
        # the prompt names both objects, in position order, as the dataset's captions do
        assert t.prompt.startswith("a ") and t.prompt.count(" and a ") == 1
    # the same seed gives the same tasks, another seed others
    again = [t.prompt for t in recolor_tasks(ones, 0)]
    assert again == [t.prompt for t in recolor_tasks(ones, 0)]
    assert again != [t.prompt for t in recolor_tasks(ones, 1)]


def test_edit_counts_read_each_measure_from_the_classifiers_scenes() -> None:
    (task,) = recolor_tasks(edit_sources(0, 1)[0], 0)
    (old,), (new,) = task.source.scene.objects, task.target.objects
    bg = task.target.background
    other = next(p for p in POSITIONS if p != old.position)
    other_shape = next(s for s in ("circle", "square") if s != old.shape)
    readings = {
        "the edit": Scene.of([new], bg),
        "unchanged": task.source.scene,
        "moved": Scene.of([ShapeObject(new.shape, new.color, new.size, other)], bg),
        "reshaped": Scene.of([ShapeObject(other_shape, new.color, new.size, new.position)], bg),
        "an extra object": Scene.of([new, ShapeObject(old.shape, old.color, "small", other)], bg),
    }
    counts = {k: image_to_image_counts([r], [task]) for k, r in readings.items()}
    hits = {k: {m for m, a in c.items() if a.matched} for k, c in counts.items()}
    every = {"new_color", "position_kept", "shape_kept", "size_kept", "read_as_prompt"}
    assert hits["the edit"] == every
    assert hits["unchanged"] == every - {"new_color", "read_as_prompt"}
    assert hits["moved"] == set()
    assert hits["reshaped"] == {"new_color", "position_kept", "size_kept"}
    assert hits["an extra object"] == every - {"position_kept", "read_as_prompt"}

    (task,) = inpaint_tasks(edit_sources(0, 1)[1], 0)
    new = next(o for o in task.target.objects if o.position == task.position)
    (kept,) = [o for o in task.target.objects if o.position != task.position]
    bg = task.target.background
    bigger = "large" if new.size == "small" else "small"
    readings = {
        "the edit": task.target,
        "unchanged": task.source.scene,
        "resized": Scene.of([kept, ShapeObject(new.shape, new.color, bigger, new.position)], bg),
        "emptied": Scene.of([kept], bg),
        "kept one lost": Scene.of([new], bg),
    }
    counts = {k: inpainting_counts([r], [task]) for k, r in readings.items()}
    hits = {k: {m for m, a in c.items() if a.matched} for k, c in counts.items()}
    assert hits["the edit"] == {"new_object", "new_size", "kept_object", "read_as_prompt"}
    assert hits["unchanged"] == {"new_size", "kept_object"}
    assert hits["resized"] == {"new_object", "kept_object"}
    assert hits["emptied"] == {"kept_object"}
    assert hits["kept one lost"] == {"new_object", "new_size"}


# The tiny model reads 16 tokens; two-object prompts are longer, and are cut with a warning.
@pytest.mark.filterwarnings("ignore::core.diffusion.pipeline.PromptTruncatedWarning")
def test_dq_eval_quick_writes_the_report_and_the_sample_grid(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--quick", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    main([*args, "--n", "8", "--sweep-n", "2", "--quiet"])
    report = (out / "eval.md").read_text()
    assert report in capsys.readouterr().out
    for heading in (
        "## Default settings",
        "## Sampler sweep",
        "## Guidance sweep",
        "## Image editing",
        "## Targets",
    ):
        assert heading in report
    assert "N = 8" in report and "N = 2 per row" in report and "torch" in report
    data = json.loads((out / "eval.json").read_text())
    assert [r["sampling"]["steps"] for r in data["sampler_sweep"]] == [1000, 50, 20, 10]
    assert [r["sampling"]["guidance"] for r in data["guidance_sweep"]] == [1, 2, 4, 7]
    # The editing rows, at --quick's N of 4: whatever an untrained model paints inside the
    # masks, every pixel outside them is the init image's.
    edits = data["edits"]
    assert [(r["strength"], r["n"]) for r in edits["image_to_image"]] == [(0.6, 4), (0.8, 4)]
    assert edits["inpainting"]["unmasked_identical"] == {"matched": 4, "total": 4}
    assert edits["inpainting"]["unmasked_mse"] == 0
    section = report.split("## Image editing", 1)[1].split("\n## ", 1)[0]
    assert "| 0.6 | 4 |" in section and "| 0.8 | 4 |" in section and "identical" in section
    grid = Image.open(out / "samples.png")
    assert grid.mode == "RGB" and grid.height > 32


@pytest.mark.filterwarnings("ignore::core.diffusion.pipeline.PromptTruncatedWarning")
def test_dq_eval_speed_sweep_puts_images_per_second_beside_fid_and_adherence(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--quick",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--quiet",
            "--n",
            "4",
            "--no-sweeps",
            "--no-edits",
            "--speed-sweep",
            "--speed-n",
            "4",
            "--batch-size",
            "4",
        ]
    )
    report = (out / "eval.md").read_text()
    assert "## Speed sweep" in report and "## Sampler sweep" not in report
    assert "## Image editing" not in report
    data = json.loads((out / "eval.json").read_text())
    assert data["edits"] is None
    rows = data["speed_sweep"]
    assert [(r["sampling"]["sampler"], r["sampling"]["steps"]) for r in rows][:2] == [
        ("dpmpp-2m", 20),
        ("dpmpp-3m", 10),
    ]
    assert [r["sampling"]["guidance_interval"] for r in rows][2:4] == [[0.0, 1.0], [0.0, 0.6]]
    speeds = data["timings"]["speed_sweep_images_per_second"]
    assert len(speeds) == len(rows) and all(v > 0 for v in speeds)
    # Every row of the table names its speed relative to the first.
    table = report.split("## Speed sweep", 1)[1].split("##", 1)[0]
    assert table.count("×") >= len(rows) and "1.00×" in table


def test_dq_eval_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--n", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dq: error: n must be at least 4") and err.count("\n") == 1


def test_dq_train_classifier_saves_a_loadable_classifier_and_resumes_after_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.diffusion.eval.train_classifier as tc
    from core.diffusion.training.loop import TrainLoop

    # The final accuracy check scores thousands of images; a few are enough to test the plumbing.
    monkeypatch.setattr(tc, "ACCURACY_SAMPLES", 16)
    monkeypatch.setattr(tc, "ACCURACY_HELD_OUT_SAMPLES", 8)
    out = tmp_path / "classifier"
    args = ["train", "classifier", "--config", "configs/classifier.toml", "--out", str(out)]
    args += ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--quiet"]

    save_state = TrainLoop.save_state

    def crash_after_saving(loop: TrainLoop) -> None:
        save_state(loop)
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as m:
        m.setattr(TrainLoop, "save_state", crash_after_saving)
        with pytest.raises(RuntimeError, match="went away"):
            main(args)
    first_lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(first_lines) == 2 and read_config(out)["training"]["step"] == 2

    main(args)  # the same command again: resumes at step 2
    assert "classifier saved to" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[:2] == first_lines  # kept as written; a restart from 0 would rewrite them
    saved = read_config(out)
    assert saved["kind"] == "attribute-classifier" and saved["training"]["steps"] == 4
    assert saved["training"]["accuracy"]["held_out_pairs"]["images"] == 8
    classifier = AttributeClassifier.load(out)
    dataset = ShapesDataset(seed=9, split="all", image_size=64)
    images = images_to_tensor([dataset[i].image for i in range(4)])
    assert classifier.features(images).shape == (4, classifier.config.feature_dim)


def test_dq_train_classifier_refuses_an_image_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "classifier", "--config", "configs/classifier.toml"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "c"), "--data", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dq: error: the classifier trains on the shapes dataset only")
    assert err.count("\n") == 1 and not (tmp_path / "c").exists()


# --- targets ------------------------------------------------------------------------------------


def _edits(
    new_color: int = 95, position_kept: int = 97, new_object: int = 92, identical: int = 100
) -> EditResults:
    """Hand-built editing rows of 100 images each; at strength 0.6 only half change color, which
    no target reads. Outside the masks, every image not identical differs by one grey level in
    10% of its pixels."""

    def counts(**matched: int) -> dict[str, Adherence]:
        return {k: Adherence(v, 100) for k, v in matched.items()}

    def recolor(strength: float, color: int, kept: int) -> ImageToImageRow:
        c = counts(
            new_color=color,
            position_kept=kept,
            shape_kept=kept,
            size_kept=kept,
            read_as_prompt=min(color, kept),
        )
        return ImageToImageRow(strength, 100, c, seconds=1.0)

    paint = InpaintingRow(
        100,
        counts(new_object=new_object, new_size=new_object, kept_object=100, read_as_prompt=90),
        Adherence(identical, 100),
        unmasked_mse=(100 - identical) / 100 * 0.1,
        seconds=1.0,
    )
    perfect = Adherence(100, 100)
    return EditResults(
        [recolor(0.6, 50, 100), recolor(0.8, new_color, position_kept)], paint, perfect, perfect
    )


def _result(
    two_seen: int, per_object_color: float, fid: float, edits: EditResults | None = None
) -> EvalResult:
    """A hand-built result: 100 prompts a group, ``two_seen`` of the seen two-object ones right;
    the editing rows of :func:`_edits` unless given."""
    right = dict(zip(GROUPS, (100, 100, two_seen, 90), strict=True))
    adherence = {g: Adherence(right[g], 100) for g in GROUPS}
    dpm = Sampling("dpmpp-3m", 10, 4.0, (0.3, 1.0))
    main_row = Row(dpm, 400, fid=fid, floor=8.0, adherence=adherence, seconds=1.0)
    sweep = [
        Row(Sampling(s, k, 4.0), 256, fid=f, floor=80.0, adherence=adherence, seconds=1.0)
        for s, k, f in (("ddpm", 1000, 80.0), ("dpmpp-2m", 20, 81.0))
    ]
    accuracy = {g: {"shape": 0.99, "color": 1.0, "size": 0.98} for g in GROUPS}
    accuracy[GROUPS[3]]["color"] = per_object_color
    return EvalResult(
        checkpoint="c", classifier="k", settings=EvalSettings(n=400), defaults=dpm,
        main=main_row, attribute_accuracy=accuracy, real_adherence=adherence,
        sampler_rows=sweep, guidance_rows=[], autoencoder_psnr_db=36.0,
        autoencoder_psnr_images=256, classifier_info={}, grid_rows=[],
        edits=edits or _edits(),
    )  # fmt: skip


def test_targets_are_the_two_object_bar_and_each_one_fails_on_its_own_figure() -> None:
    good = {name: (value, met) for name, value, met in targets(_result(85, 0.95, 9.0))}
    assert all(met for _, met in good.values()), good
    assert len(good) == 14
    assert good["FID / real-vs-real floor ≤ 1.25 (N = 400)"] == ("1.125", True)
    assert good["FID DPM-Solver++ 20 ≤ 1.05 × FID DDPM 1000 (N = 256)"] == ("1.012 ×", True)

    bad = {name: met for name, _, met in targets(_result(79, 0.85, 10.5))}
    failed = sorted(name for name, met in bad.items() if not met)
    assert failed == [
        "FID / real-vs-real floor ≤ 1.25 (N = 400)",
        "per-object color ≥ 90%, two objects (the lower group)",
        "prompt adherence ≥ 80%, two objects, seen pairs (N = 400)",
    ]


EDIT_TARGETS = (
    "image-to-image at strength 0.8, new color ≥ 90% (N = 100)",
    "image-to-image at strength 0.8, position kept ≥ 90% (N = 100)",
    "inpainting, new object's shape and color ≥ 90% (N = 100)",
    "inpainting, pixels outside the mask identical to the init image (N = 100)",
)


def test_edit_targets_read_strength_0_8_and_each_one_fails_on_its_own_figure() -> None:
    good = {name: (value, met) for name, value, met in targets(_result(85, 0.95, 9.0, _edits()))}
    assert [good[name] for name in EDIT_TARGETS] == [
        ("95.0%", True),
        ("97.0%", True),
        ("92.0%", True),
        ("identical", True),
    ]
    for k, edits in enumerate(
        (
            _edits(new_color=89),
            _edits(position_kept=89),
            _edits(new_object=89),
            _edits(identical=99),
        )
    ):
        failed = [name for name, _, met in targets(_result(85, 0.95, 9.0, edits)) if not met]
        assert failed == [EDIT_TARGETS[k]]
    # one image in 100 not identical outside its mask: MSE 0.001, PSNR 10·log10(255²/0.001)
    values = {
        name: value for name, value, _ in targets(_result(85, 0.95, 9.0, _edits(identical=99)))
    }
    assert values[EDIT_TARGETS[3]] == "78.13 dB (99/100 images identical)"


def test_edit_targets_are_unmeasured_when_the_run_had_no_edits() -> None:
    result = _result(85, 0.95, 9.0)
    result.edits = None
    rows = [(value, met) for _, value, met in targets(result)]
    assert rows[-4:] == [("–", None)] * 4
