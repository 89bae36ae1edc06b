"""Tests for the data package: captioned-shapes generator, image folders, tensor conversion."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import core.diffusion.data.imagefolder as imagefolder_module
import core.diffusion.data.shapes as shapes_module
from core.diffusion.data.captioned import CaptionedImage, images_to_tensor, tensor_to_images
from core.diffusion.data.imagefolder import ImageFolderDataset, export_image_folder
from core.diffusion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELD_OUT,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesDataset,
    ShapesSample,
    canonical_caption,
    caption,
    caption_words,
    layout_is_clear,
    render,
    render_sample,
    vocabulary,
)


def _samples(dataset: ShapesDataset, count: int) -> list[ShapesSample]:
    return [dataset[i] for i in range(count)]


def _random_objects(rng: np.random.Generator) -> list[ShapeObject]:
    count = int(rng.integers(1, 3))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    return [
        ShapeObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=tuple(COLORS)[int(rng.integers(len(COLORS)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            position=POSITIONS[int(p)],
        )
        for p in positions
    ]


def _object_mask(sample: ShapesSample, which: int, image_size: int) -> np.ndarray:
    """Pixels that differ from the background when only object ``which`` is drawn."""
    image = render([sample.objects[which]], sample.background, image_size, [sample.offsets[which]])
    return np.any(image != np.array(BACKGROUNDS[sample.background]), axis=-1)


def _area(obj: ShapeObject, background: str = "black") -> int:
    image = render([obj], background)
    return int(np.any(image != np.array(BACKGROUNDS[background]), axis=-1).sum())


# --- ShapesDataset: determinism and splits ---------------------------------------------------


def test_same_seed_and_index_give_identical_sample() -> None:
    first, second = ShapesDataset(seed=7), ShapesDataset(seed=7)
    for index in (0, 1, 123, 999_999):
        a, b = first[index], second[index]
        assert np.array_equal(a.image, b.image)
        assert (a.caption, a.objects, a.background, a.offsets) == (
            b.caption,
            b.objects,
            b.background,
            b.offsets,
        )


def test_samples_do_not_depend_on_access_order() -> None:
    forward = ShapesDataset(seed=3)
    backward = ShapesDataset(seed=3)
    in_order = [forward[i] for i in range(20)]
    reversed_order = [backward[i] for i in reversed(range(20))][::-1]
    for a, b in zip(in_order, reversed_order, strict=True):
        assert a.caption == b.caption
        assert np.array_equal(a.image, b.image)


def test_different_seeds_and_splits_give_different_samples() -> None:
    captions = {
        (seed, split): [s.caption for s in _samples(ShapesDataset(seed=seed, split=split), 10)]
        for seed, split in ((0, "train"), (1, "train"), (0, "all"))
    }
    assert captions[(0, "train")] != captions[(1, "train")]
    assert captions[(0, "train")] != captions[(0, "all")]


def test_train_split_never_contains_held_out_pairs() -> None:
    held_out = set(DEFAULT_HELD_OUT)
    samples = _samples(ShapesDataset(seed=0, split="train"), 500)
    assert all(o.pair not in held_out for s in samples for o in s.objects)
    # The held-out colors and shapes still occur in training, only not in those pairs.
    seen_colors = {o.color for s in samples for o in s.objects}
    seen_shapes = {o.shape for s in samples for o in s.objects}
    assert seen_colors == set(COLORS)
    assert seen_shapes == set(SHAPES)


def test_held_out_split_always_contains_a_held_out_pair() -> None:
    held_out = set(DEFAULT_HELD_OUT)
    samples = _samples(ShapesDataset(seed=0, split="held_out"), 300)
    assert all(any(o.pair in held_out for o in s.objects) for s in samples)
    singles = [s.objects[0] for s in samples if len(s.objects) == 1]
    assert singles and all(o.pair in held_out for o in singles)
    assert {o.pair for s in samples for o in s.objects} >= held_out


def test_all_split_mixes_held_out_and_training_pairs() -> None:
    held_out = set(DEFAULT_HELD_OUT)
    pairs = [o.pair for s in _samples(ShapesDataset(seed=0, split="all"), 300) for o in s.objects]
    assert any(p in held_out for p in pairs)
    assert any(p not in held_out for p in pairs)


def test_custom_held_out_pairs_are_respected() -> None:
    dataset = ShapesDataset(seed=0, split="held_out", held_out=[("white", "circle")])
    for sample in _samples(dataset, 50):
        assert ("white", "circle") in [o.pair for o in sample.objects]


def test_object_count_is_one_or_two_about_60_40() -> None:
    counts = [len(s.objects) for s in _samples(ShapesDataset(seed=0), 500)]
    assert set(counts) == {1, 2}
    assert 0.52 < counts.count(1) / len(counts) < 0.68


def test_max_objects_one_gives_single_object_images() -> None:
    dataset = ShapesDataset(seed=0, max_objects=1)
    assert all(len(s.objects) == 1 for s in _samples(dataset, 100))


def test_two_objects_have_distinct_positions_and_small_jitter() -> None:
    for sample in _samples(ShapesDataset(seed=1), 300):
        positions = [o.position for o in sample.objects]
        assert len(set(positions)) == len(positions)
        assert len(sample.offsets) == len(sample.objects)
        assert all(abs(d) <= 2.0 for offset in sample.offsets for d in offset)


def test_sample_image_is_the_render_of_its_objects() -> None:
    for sample in _samples(ShapesDataset(seed=2, image_size=48), 30):
        assert sample.image.shape == (48, 48, 3) and sample.image.dtype == np.uint8
        again = render(sample.objects, sample.background, 48, sample.offsets)
        assert np.array_equal(sample.image, again)


def test_dataset_length_and_index_bounds() -> None:
    dataset = ShapesDataset(length=5)
    assert len(dataset) == 5
    assert isinstance(dataset[4], ShapesSample)
    for bad in (-1, 5):
        with pytest.raises(IndexError):
            dataset[bad]


def test_unknown_split_is_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'test'.*train.*held_out.*all"):
        ShapesDataset(split="test")


@pytest.mark.parametrize(
    ("held_out", "match"),
    [([("pink", "square")], "color 'pink'"), ([("red", "hexagon")], "shape 'hexagon'")],
)
def test_unknown_held_out_color_or_shape_is_rejected(
    held_out: list[tuple[str, str]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ShapesDataset(held_out=held_out)


def test_impossible_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one held-out pair"):
        ShapesDataset(split="held_out", held_out=())
    with pytest.raises(ValueError, match="not held out"):
        ShapesDataset(split="train", held_out=list(product(COLORS, SHAPES)))


# --- captions ---------------------------------------------------------------------------------


def test_canonical_caption_reads_as_documented() -> None:
    circle = ShapeObject("circle", "red", "large", "top left")
    square = ShapeObject("square", "blue", "small", "center")
    assert canonical_caption([circle]) == "a large red circle in the top left"
    assert canonical_caption([circle, square]) == (
        "a large red circle in the top left and a small blue square in the center"
    )
    assert (
        canonical_caption([square], "navy")
        == "a small blue square in the center on a navy background"
    )


def test_caption_names_every_object_attribute() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        objects = _random_objects(rng)
        text = " ".join(caption_words(caption(objects, "gray", rng)))
        words = text.split()
        for obj in objects:
            assert obj.size in words and obj.color in words and obj.shape in words
            assert f" {obj.position} " in f" {text} "


def test_dataset_captions_name_every_object_attribute() -> None:
    for sample in _samples(ShapesDataset(seed=4), 200):
        text = " ".join(caption_words(sample.caption))
        for obj in sample.objects:
            for word in (obj.size, obj.color, obj.shape, obj.position):
                assert f" {word} " in f" {text} "


def test_captions_use_only_vocabulary_words() -> None:
    allowed = set(vocabulary())
    rng = np.random.default_rng(1)
    texts = [
        caption(_random_objects(rng), str(rng.choice(list(BACKGROUNDS))), rng) for _ in range(500)
    ]
    texts += [s.caption for s in _samples(ShapesDataset(seed=5), 100)]
    used = {w for text in texts for w in caption_words(text)}
    assert used <= allowed
    # And the vocabulary is not padded: nearly every word in it shows up in 600 captions.
    assert len(allowed - used) <= 1


def test_vocabulary_is_sorted_and_covers_the_constants() -> None:
    words = vocabulary()
    assert words == sorted(set(words))
    constants = [*SHAPES, *COLORS, *SIZES, *POSITIONS, *BACKGROUNDS]
    assert {w for c in constants for w in c.split()} <= set(words)
    assert len(words) < 40


def test_paraphrases_vary_and_mention_the_background_about_one_time_in_three() -> None:
    rng = np.random.default_rng(2)
    obj = [ShapeObject("triangle", "white", "small", "bottom right")]
    texts = [caption(obj, "brown", rng) for _ in range(600)]
    assert canonical_caption(obj) in texts
    forms = {
        t.removesuffix(" on a brown background").removesuffix(", brown background") for t in texts
    }
    assert len(forms) >= 5
    mentions = sum("brown" in t for t in texts) / len(texts)
    assert 0.25 < mentions < 0.42


def test_without_paraphrase_captions_are_canonical() -> None:
    for sample in _samples(ShapesDataset(seed=0, paraphrase=False), 50):
        assert sample.caption == canonical_caption(sample.objects)


def test_unknown_attribute_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        ShapeObject("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="unknown position"):
        ShapeObject("circle", "red", "small", "middle")
    with pytest.raises(ValueError, match="unknown background"):
        canonical_caption([ShapeObject("circle", "red", "small", "center")], "teal")


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 32])
def test_two_objects_never_overlap(image_size: int) -> None:
    samples = _samples(ShapesDataset(seed=6, image_size=image_size), 400)
    pairs = [s for s in samples if len(s.objects) == 2]
    assert len(pairs) > 100
    assert any(o.position == "center" for s in pairs for o in s.objects)
    for sample in pairs:
        first, second = (_object_mask(sample, i, image_size) for i in range(2))
        assert first.any() and second.any()
        assert not (first & second).any(), sample.caption


def test_rendered_object_has_its_color_at_its_position() -> None:
    for shape, size, position in product(SHAPES, SIZES, POSITIONS):
        obj = ShapeObject(shape, "purple", size, position)
        image = render([obj], "gray")
        x, y = POSITION_CENTERS[position]
        assert tuple(image[int(y), int(x)]) == COLORS["purple"], (shape, size, position)
    # Jittered dataset objects too, at their shifted centers.
    for sample in _samples(ShapesDataset(seed=8), 100):
        for obj, (dx, dy) in zip(sample.objects, sample.offsets, strict=True):
            x, y = POSITION_CENTERS[obj.position]
            assert tuple(sample.image[int(y + dy), int(x + dx)]) == COLORS[obj.color]


def test_background_fills_the_image_away_from_objects() -> None:
    image = render([ShapeObject("circle", "yellow", "large", "center")], "navy")
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63), (32, 2)):
        assert tuple(image[y, x]) == BACKGROUNDS["navy"]


def test_object_sizes_differ() -> None:
    for shape in SHAPES:
        small = _area(ShapeObject(shape, "white", "small", "center"))
        large = _area(ShapeObject(shape, "white", "large", "center"))
        assert large > 2 * small, shape


def test_triangle_points_up_and_is_as_wide_as_the_square() -> None:
    triangle = render([ShapeObject("triangle", "white", "large", "center")], "black")
    square = render([ShapeObject("square", "white", "large", "center")], "black")
    tri_mask = np.any(triangle != np.array(BACKGROUNDS["black"]), axis=-1)
    square_mask = np.any(square != np.array(BACKGROUNDS["black"]), axis=-1)
    rows = np.flatnonzero(tri_mask.any(axis=1))
    top_width, bottom_width = tri_mask[rows[1]].sum(), tri_mask[rows[-2]].sum()
    assert top_width < bottom_width / 4
    assert abs(int(tri_mask.any(axis=0).sum()) - int(square_mask.any(axis=0).sum())) <= 1


def test_edges_are_anti_aliased() -> None:
    obj = ShapeObject("circle", "white", "large", "center")
    image = render([obj], "black")
    values = set(np.unique(image[..., 0]).tolist())
    assert len(values - {COLORS["white"][0], BACKGROUNDS["black"][0]}) > 5


def test_render_scales_with_image_size() -> None:
    obj = ShapeObject("square", "red", "small", "top right")
    masks = [
        np.any(render([obj], "black", size) != np.array(BACKGROUNDS["black"]), axis=-1)
        for size in (64, 128)
    ]
    assert masks[1].shape == (128, 128)
    assert masks[1].sum() == pytest.approx(4 * masks[0].sum(), rel=0.1)
    center = np.argwhere(masks[1]).mean(axis=0)
    assert center == pytest.approx((32.0, 96.0), abs=0.5)  # (row, column) of top right, doubled


def test_render_sample_uses_the_canonical_caption() -> None:
    objects = [
        ShapeObject("square", "orange", "large", "top left"),
        ShapeObject("circle", "green", "small", "bottom right"),
    ]
    sample = render_sample(objects, "brown")
    assert sample.caption == canonical_caption(objects)
    assert np.array_equal(sample.image, render(objects, "brown"))
    jittered = render_sample(
        objects, "brown", rng=np.random.default_rng(0), mention_background=True
    )
    assert jittered.caption.endswith(" on a brown background")
    assert any(d != 0.0 for offset in jittered.offsets for d in offset)
    assert layout_is_clear(objects, jittered.offsets)


def test_render_sample_rejects_overlapping_objects() -> None:
    objects = [
        ShapeObject("square", "red", "large", "center"),
        ShapeObject("circle", "blue", "large", "top left"),
    ]
    assert not layout_is_clear(objects)
    with pytest.raises(ValueError, match="overlap"):
        render_sample(objects, "black")


# --- image folders ----------------------------------------------------------------------------


def test_image_folder_round_trip(tmp_path: Path) -> None:
    samples = _samples(ShapesDataset(seed=9, length=12), 12)
    assert export_image_folder(samples, tmp_path / "shapes") == 12
    loaded = ImageFolderDataset(tmp_path / "shapes", image_size=64)
    assert len(loaded) == 12
    for original, back in zip(samples, (loaded[i] for i in range(12)), strict=True):
        assert back.caption == original.caption
        assert np.array_equal(back.image, original.image)
    first_line = (tmp_path / "shapes" / "metadata.jsonl").read_text().splitlines()[0]
    assert json.loads(first_line) == {"file_name": "000000.png", "text": samples[0].caption}


def test_image_folder_resizes_the_short_side_and_center_crops(tmp_path: Path) -> None:
    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:96] = (0, 255, 0)
    wide[:, 96:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((40, 40), 77, dtype=np.uint8)).save(tmp_path / "gray.png")
    lines = [{"file_name": "wide.png", "text": "stripes"}, {"file_name": "gray.png", "text": "g"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    dataset = ImageFolderDataset(tmp_path, image_size=32)
    stripes = dataset[0].image
    assert stripes.shape == (32, 32, 3)
    # The 128 × 64 image becomes 64 × 32 and its middle 32 columns are all green; only the crop's
    # edge columns may pick up some red or blue through the bicubic kernel.
    assert np.abs(stripes[:, 4:28].astype(int) - (0, 255, 0)).max() <= 2
    gray = dataset[1].image
    assert gray.shape == (32, 32, 3)
    assert np.all(gray == 77)


def _folder(root: Path, metadata: str | None, files: tuple[str, ...] = ("a.png",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / name)
    if metadata is not None:
        (root / "metadata.jsonl").write_text(metadata)
    return root


def _not_a_directory(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def _escaping(tmp_path: Path) -> Path:
    _folder(tmp_path, None, ("outside.png",))  # exists, so only the escape can be the problem
    return _folder(tmp_path / "root", '{"file_name": "../outside.png", "text": "x"}\n')


_GOOD = '{"file_name": "a.png", "text": "ok"}\n'

_INVALID_FOLDERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "root missing": (lambda p: p / "missing", "does not exist"),
    "root is a file": (_not_a_directory, "is not a directory"),
    "no metadata": (lambda p: _folder(p, None), r"image a\.png in .* has no caption file a\.txt"),
    "line not json": (lambda p: _folder(p, _GOOD + "{oops\n"), "line 2 is not valid JSON"),
    "line not object": (lambda p: _folder(p, '["a.png", "x"]\n'), "line 1 is not a JSON object"),
    "file_name missing": (lambda p: _folder(p, '{"text": "x"}\n'), 'string "file_name"'),
    "file_name not string": (
        lambda p: _folder(p, '{"file_name": 3, "text": "x"}\n'),
        'line 1 needs a string "file_name"',
    ),
    "text missing": (lambda p: _folder(p, '{"file_name": "a.png"}\n'), 'string "text"'),
    "text not string": (
        lambda p: _folder(p, _GOOD + '{"file_name": "a.png", "text": null}\n'),
        'line 2 needs a string "text"',
    ),
    "absolute file_name": (
        lambda p: _folder(p, json.dumps({"file_name": str(p / "a.png"), "text": "x"}) + "\n"),
        "must be relative",
    ),
    "escaping file_name": (_escaping, "points outside the folder"),
    "listed file missing": (
        lambda p: _folder(p, '{"file_name": "b.png", "text": "x"}\n'),
        "lists 'b.png', which is not a file",
    ),
    "empty metadata": (lambda p: _folder(p, ""), "lists no images"),
    "blank metadata": (lambda p: _folder(p, "\n  \n"), "lists no images"),
}


@pytest.mark.parametrize("case", list(_INVALID_FOLDERS))
def test_image_folder_rejects_invalid_folder(tmp_path: Path, case: str) -> None:
    make, message = _INVALID_FOLDERS[case]
    root = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(root)


def test_image_folder_names_the_file_it_cannot_decode(tmp_path: Path) -> None:
    root = _folder(tmp_path, _GOOD + '{"file_name": "bad.png", "text": "x"}\n')
    (root / "bad.png").write_bytes(b"not an image at all")
    # Every image's header is checked when the folder is opened, before any training.
    with pytest.raises(ValueError, match=r"bad\.png is not an image Pillow can read"):
        ImageFolderDataset(root, image_size=8)


def test_export_refuses_to_mix_into_an_existing_folder(tmp_path: Path) -> None:
    sample = CaptionedImage(image=np.zeros((4, 4, 3), dtype=np.uint8), caption="x")
    assert export_image_folder([sample], tmp_path) == 1
    with pytest.raises(FileExistsError):
        export_image_folder([sample], tmp_path)
    with pytest.raises(ValueError, match="no samples"):
        export_image_folder([], tmp_path / "empty")
    assert not (tmp_path / "empty" / "metadata.jsonl").exists()


# --- tensors ----------------------------------------------------------------------------------


def test_images_to_tensor_round_trip() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8) for _ in range(3)]
    images[0][0, 0] = (0, 255, 128)
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 6, 5) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)
    back = tensor_to_images(x)
    assert all(b.mode == "RGB" for b in back)
    for original, image in zip(images, back, strict=True):
        assert np.array_equal(np.asarray(image), original)


def test_tensor_to_images_clamps_out_of_range_values() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    (image,) = tensor_to_images(x)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_tensor_conversion_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        images_to_tensor([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        images_to_tensor([])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tensor_to_images(torch.zeros(3, 4, 4))


def test_torch_is_used_only_by_the_tensor_converters() -> None:
    for module in (shapes_module, imagefolder_module):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
        }
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name.split(".")[0] == "torch" for name in imported), module.__name__
