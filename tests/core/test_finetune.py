"""Fine-tuning from a base model: a few steps from a tiny base record the base, a new caption
word gets an embedding row, a frozen text encoder stays bit for bit, image folders refuse bad
files in one line, and the quick eval gives its figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import main
from core.diffusion.data.imagefolder import ImageFolderDataset
from core.diffusion.eval import DEFAULT_CLASSIFIER
from core.diffusion.eval.classifier import AttributeClassifier
from core.diffusion.eval.concept import NewColor, concept_adherence, concept_scenes
from core.diffusion.eval.quick import quick_eval
from core.diffusion.pipeline import LatentDiffusion, SamplingDefaults
from tests.conftest import make_tiny_pipeline

PINK = NewColor("pink", (250, 130, 200))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    model = make_tiny_pipeline()
    model.defaults = SamplingDefaults(steps=2, sampler="ddim")  # cheap previews and evals
    model.save(out, {"training": {"config": {"data": {"held_out": []}}}})
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pink shapes with sidecar captions (NAME.png + NAME.txt)."""
    out = tmp_path_factory.mktemp("pink")
    for i, scene in enumerate(concept_scenes(PINK, seed=0, count=6, image_size=32)):
        Image.fromarray(scene.image).save(out / f"{i}.png")
        (out / f"{i}.txt").write_text(scene.caption + "\n")
    return out


def fine_tune(base: Path, folder: Path, out: Path, *extra: str) -> dict:
    main(
        ["train", "denoiser", "--base", str(base), "--data", str(folder), "--steps", "3",
         "--batch-size", "4", "--init-word", "pink=red purple", "--out", str(out), "--quiet",
         "--device", "cpu", *extra]
    )  # fmt: skip
    return json.loads((out / "model.json").read_text())


def test_a_frozen_fine_tune_records_its_base_and_learns_only_the_new_word(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    saved = fine_tune(base, folder, tmp_path / "frozen", "--freeze-text-encoder")
    tuned = saved["training"]["finetune"]
    # The captions' punctuation is new too: the shapes vocabulary has none.
    assert tuned == {
        "base_version": str(base),
        "freeze_text_encoder": True,
        "new_words": ["pink", ",", ":"],
    }
    assert saved["training"]["config"]["finetune"]["base"] == str(base)
    assert saved["tokenizer"]["vocab"][-3:] == ["pink", ",", ":"]
    before = LatentDiffusion.load(base, device="cpu")
    after = LatentDiffusion.load(tmp_path / "frozen", device="cpu")
    old = before.text_encoder.state_dict()
    new = after.text_encoder.state_dict()
    for name, weights in old.items():
        if name == "token_embedding.weight":
            rows = len(before.text_encoder.tokenizer)
            assert torch.equal(new[name][:rows], weights), "a base word's row moved"
            vocab = before.text_encoder.tokenizer.index
            start = (weights[vocab["red"]] + weights[vocab["purple"]]) / 2
            assert not torch.allclose(new[name][rows], start)  # pink's row trained
            unk = weights[vocab["<unk>"]]
            assert not torch.equal(new[name][rows + 1], unk)  # so did the comma's, from <unk>
        else:
            assert torch.equal(new[name], weights), name
    unet_moved = any(
        not torch.equal(a, b)
        for a, b in zip(
            before.unet.state_dict().values(), after.unet.state_dict().values(), strict=True
        )
    )
    assert unet_moved
    assert after.defaults == before.defaults  # the base's sampling defaults are kept


def test_an_unfrozen_fine_tune_trains_the_text_encoder(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    fine_tune(base, folder, tmp_path / "free")
    before = LatentDiffusion.load(base, device="cpu").text_encoder.state_dict()
    after = LatentDiffusion.load(tmp_path / "free", device="cpu").text_encoder.state_dict()
    assert not torch.equal(before["blocks.0.qkv.weight"], after["blocks.0.qkv.weight"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--freeze-text-encoder"], "need --base"),
        (["--base", "nowhere"], "neither default nor a model checkpoint"),
        (["--base", "default", "--autoencoder", "x"], "drop --autoencoder"),
        (["--base", "default", "--init-word", "pink"], "--init-word takes WORD=BASE WORDS"),
    ],
)
def test_bad_fine_tune_options_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    # A name that is no directory is looked up as a version; there is no database here.
    monkeypatch.setenv("DQ_DATABASE_URL", f"sqlite:///{tmp_path}/none.sqlite3")
    with pytest.raises(SystemExit):
        main(["train", "denoiser", "--out", str(tmp_path / "o"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "none.sqlite3").exists()


def test_a_fine_tune_starts_from_a_version_named_in_the_database(
    base: Path,
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--base NAME`: the version's checkpoint is fetched from object storage, as a worker's
    fine-tune fetches it; a name that is no version, or an autoencoder, is one line."""
    import uuid

    from core.db import (
        ModelKind,
        ModelVersion,
        dispose_engines,
        get_engine,
        migrate,
        session_scope,
        utcnow,
    )
    from core.storage import LocalStorage

    url = f"sqlite:///{tmp_path}/dq.sqlite3"
    migrate.upgrade(url)
    store = LocalStorage(tmp_path / "objects", secret="s" * 32)
    for name in ("model.json", "model.safetensors"):
        store.put(f"models/tiny-v1/{name}", (base / name).read_bytes())
    with session_scope(get_engine(url=url)) as session:
        for name, kind in (("tiny-v1", ModelKind.DENOISER), ("an-ae", ModelKind.AUTOENCODER)):
            session.add(
                ModelVersion(
                    id=uuid.uuid4(), name=name, kind=kind, checkpoint_key=f"models/{name}",
                    config={}, metrics={}, created_at=utcnow(),
                )
            )  # fmt: skip
    dispose_engines()
    monkeypatch.setenv("DQ_DATABASE_URL", url)
    monkeypatch.setenv("DQ_STORAGE_URL", f"file://{tmp_path / 'objects'}")
    monkeypatch.setenv("DQ_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DQ_SECRET_KEY", "k" * 64)  # not var/secret_key in the checkout
    try:
        main(
            ["train", "denoiser", "--base", "tiny-v1", "--data", str(folder), "--steps", "1",
             "--batch-size", "4", "--out", str(tmp_path / "tuned"), "--quiet", "--device", "cpu"]
        )  # fmt: skip
        saved = json.loads((tmp_path / "tuned" / "model.json").read_text())
        assert saved["training"]["finetune"]["base_version"] == "tiny-v1"
        fetched = list((tmp_path / "cache").iterdir())
        assert (
            len(fetched) == 1
            and (fetched[0] / "model.safetensors").read_bytes()
            == (base / "model.safetensors").read_bytes()
        )
        for name, said in (
            ("no-such", "as a version: there is no model version 'no-such'"),
            ("an-ae", "as a version: 'an-ae' is an autoencoder"),
        ):
            with pytest.raises(SystemExit):
                main(["train", "denoiser", "--base", name, "--out", str(tmp_path / name)])
            err = capsys.readouterr().err
            assert said in err and len(err.strip().splitlines()) == 1, err
    finally:
        dispose_engines()


def test_an_init_word_that_the_base_lacks_is_refused(
    base: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(
            ["train", "denoiser", "--base", str(base), "--data", str(folder), "--steps", "1",
             "--init-word", "pink=magenta", "--out", str(tmp_path / "o"), "--quiet"]
        )  # fmt: skip
    assert "'magenta' is not a word of the base's vocabulary" in capsys.readouterr().err


def test_sidecar_folders_refuse_bad_files_naming_them(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a.png .* has no caption file a.txt"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"caption file .*a.txt is empty"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a.txt").write_text("a cat\n")
    assert ImageFolderDataset(tmp_path, image_size=4)[0].caption == "a cat"
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(ValueError, match=r"b.png is not an image Pillow can read"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "b.png").unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "b.gif")
    (tmp_path / "c.webp").write_bytes(_bomb_header())
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"c.webp"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "c.webp").unlink()
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "d.png", save_all=True, append_images=frames[1:])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"d.png is animated"):
        ImageFolderDataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has neither a metadata.jsonl nor any image"):
        ImageFolderDataset(empty)


def _bomb_header() -> bytes:
    """A PNG whose header claims 30000×30000 pixels (it is never decoded)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def test_real_pink_scenes_read_right_and_other_colors_do_not() -> None:
    scenes = concept_scenes(PINK, seed=4, count=24)
    classifier = AttributeClassifier.load(DEFAULT_CLASSIFIER)
    read = concept_adherence(classifier, [s.image for s in scenes], scenes, PINK)
    assert read["all"].matched == read["all"].total == 24
    # The same scenes with the new object left in the placeholder color: no pink at all.
    from core.diffusion.data.shapes import render

    red = [render(s.objects, s.background, 64, s.offsets) for s in scenes]
    assert concept_adherence(classifier, red, scenes, PINK)["all"].matched == 0


def test_the_quick_eval_measures_against_the_runs_own_data(base: Path, folder: Path) -> None:
    shapes = quick_eval(base, {"kind": "shapes"}, n=4)
    assert shapes["n"] == 4 and shapes["reference"] == "shapes eval stream, seed 0"
    assert 0.0 <= shapes["adherence"] <= 1.0 and shapes["fid"] > 0 and shapes["floor"] > 0
    own = quick_eval(base, {"kind": "imagefolder", "path": str(folder)}, "pink", n=4)
    assert own["adherence"] is None and own["floor"] is None and own["real_n"] == 4
    assert own["reference"] == "image folder pink (6 images)" and np.isfinite(own["fid"])
