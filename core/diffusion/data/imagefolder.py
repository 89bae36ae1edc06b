"""Captioned images from a directory, in one of two layouts.

- **metadata.jsonl** (the Hugging Face "imagefolder" layout): image files and a
  ``metadata.jsonl`` whose every line is a JSON object
  ``{"file_name": "relative/path.png", "text": "the caption"}``.
- **Sidecar captions** (as kohya's trainers read them), used when there is no
  ``metadata.jsonl``: every image ``NAME.png`` (or ``.jpg``, ``.jpeg``, ``.webp``) directly in
  the folder has its caption in ``NAME.txt`` beside it, UTF-8, surrounding whitespace dropped.

The whole folder is checked when the dataset is built, so a broken folder fails before training
starts rather than hours in: every caption, and every image's header (PNG, JPEG or WebP, one
frame, at most :data:`MAX_SIDE` pixels a side, read before a pixel is decoded, so a
decompression bomb is refused; the same rules as ``core.services.images``, which this package
may not import). Only decoding waits until an item is read. :func:`export_image_folder` writes
the metadata.jsonl layout, e.g. to turn the synthetic shapes dataset into files.
"""

from __future__ import annotations

import json
import operator
import posixpath
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from core.diffusion.data.captioned import CaptionedImage

METADATA_FILE = "metadata.jsonl"
"""Name of the captions file inside an image folder."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Image files of the sidecar layout."""
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 64 * 1024 * 1024


def _open_checked(path: Path) -> Image.Image:
    """The image at ``path``, its header checked (format, size, frames); not yet decoded."""
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image {path} is over {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"image {path} claims more than {MAX_SIDE} pixels a side") from None
    except (OSError, SyntaxError, ValueError):
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG or WebP)") from None
    width, height = image.size
    problem = None
    if image.format not in FORMATS:
        problem = f"is {image.format}; use PNG, JPEG or WebP"
    elif not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and width * height <= MAX_PIXELS):
        problem = f"is {width}×{height} pixels; the limit is {MAX_SIDE} a side"
    elif getattr(image, "n_frames", 1) > 1:
        problem = "is animated; use single frames"
    if problem:
        image.close()
        raise ValueError(f"image {path} {problem}")
    return image


def _checked_file_name(value: object, line_number: int, metadata: Path) -> str:
    if not isinstance(value, str):
        raise ValueError(f'{metadata} line {line_number} needs a string "file_name"')
    # Both path flavours: a metadata file written on Windows must not reach outside the root here.
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
        raise ValueError(
            f"{metadata} line {line_number}: file_name {value!r} must be relative to the folder"
        )
    normalized = posixpath.normpath(value.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise ValueError(
            f"{metadata} line {line_number}: file_name {value!r} points outside the folder"
        )
    return normalized


class ImageFolderDataset:
    """Images with captions from ``metadata.jsonl``, resized and center-cropped to a square.

    Each image is converted to RGB, resized (bicubic) so its short side is ``image_size``, then
    center-cropped to ``image_size`` × ``image_size``.
    """

    def __init__(self, root: str | Path, image_size: int = 64) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        if not self.root.exists():
            raise ValueError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} is not a directory")
        metadata = self.root / METADATA_FILE
        if metadata.is_file():
            self.entries: list[tuple[Path, str]] = self._read_metadata(metadata)
        else:
            self.entries = self._read_sidecars()
        for path, _ in self.entries:
            _open_checked(path).close()

    def _read_sidecars(self) -> list[tuple[Path, str]]:
        images = sorted(
            p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise ValueError(
                f"image folder {self.root} has neither a {METADATA_FILE} nor any image "
                f"({', '.join(IMAGE_SUFFIXES)}) with a caption file beside it"
            )
        entries = []
        for path in images:
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                raise ValueError(
                    f"image {path.name} in {self.root} has no caption file {sidecar.name}"
                )
            try:
                text = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{sidecar} is not UTF-8 text ({err.reason})") from None
            if not text:
                raise ValueError(f"caption file {sidecar} is empty")
            entries.append((path, text))
        return entries

    def _read_metadata(self, metadata: Path) -> list[tuple[Path, str]]:
        try:
            lines = metadata.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{metadata} is not UTF-8 text ({err.reason})") from None
        entries = []
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # a trailing or stray blank line holds no entry
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{metadata} line {line_number} is not valid JSON") from None
            if not isinstance(record, dict):
                raise ValueError(f"{metadata} line {line_number} is not a JSON object")
            raw_name = record.get("file_name")
            file_name = _checked_file_name(raw_name, line_number, metadata)
            text = record.get("text")
            if not isinstance(text, str):
                raise ValueError(f'{metadata} line {line_number} needs a string "text"')
            path = self.root / file_name
            if not path.is_file():
                raise ValueError(
                    f"{metadata} line {line_number} lists {raw_name!r}, which is not a file "
                    f"in {self.root}"
                )
            entries.append((path, text))
        if not entries:
            raise ValueError(f"{metadata} lists no images")
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def captions(self) -> list[str]:
        """Every caption, without loading an image (the tokenizer's vocabulary is built from it)."""
        return [text for _, text in self.entries]

    def __getitem__(self, index: int) -> CaptionedImage:
        index = operator.index(index)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.entries)}")
        path, text = self.entries[index]
        return CaptionedImage(image=self._load(path), caption=text)

    def _load(self, path: Path) -> np.ndarray:
        size = self.image_size
        try:
            with _open_checked(path) as opened:
                image = opened.convert("RGB")  # also forces the lazy decode inside the try
        # PIL reports broken files as OSError (UnidentifiedImageError is one), SyntaxError from
        # some parsers, or ValueError / DecompressionBombError for absurd headers.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from None
        width, height = image.size
        if (width, height) != (size, size):
            scale = size / min(width, height)
            # max(): rounding must never leave the short side (or the long one) below the crop.
            new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
            left = (new_size[0] - size) // 2
            top = (new_size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8).copy()


def export_image_folder(samples: Iterable[CaptionedImage], out_dir: str | Path) -> int:
    """Write ``samples`` as 000000.png, 000001.png, ... plus ``metadata.jsonl``; return the count.

    The metadata file is written last, under a temporary name then renamed, so an interrupted
    export never leaves a metadata file listing images that were not written. Refuses a
    directory that already holds a ``metadata.jsonl``, so two datasets are never mixed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = out / METADATA_FILE
    if metadata.exists():
        raise FileExistsError(f"{metadata} already exists; export into a new directory")
    lines = []
    for index, sample in enumerate(samples):
        file_name = f"{index:06d}.png"
        Image.fromarray(sample.image).save(out / file_name)
        record = {"file_name": file_name, "text": sample.caption}
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise ValueError("no samples to export; an image folder needs at least one image")
    partial = out / (METADATA_FILE + ".partial")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    partial.replace(metadata)
    return len(lines)
