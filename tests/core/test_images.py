"""Images sent to edit (core.services.images): every refusal names its field, a bomb is refused
from its header, and what is kept is re-encoded as a bare PNG."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.services.images import BadImage, png_bytes, read_image

LIMIT = 1_000_000


def encoded(image: Image.Image, format: str = "PNG", **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **save)
    return out.getvalue()


def picture(size: int = 16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height pixels (and no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def animated_gif_as_png() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])  # an APNG
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"plain text, not an image", "is not an image Pillow can read"),
        (encoded(picture())[:200], "is truncated or corrupt"),
        (animated_gif_as_png(), "is animated"),
        (bomb_png(30000, 30000), "claims more pixels than the limit of 4096 a side"),
        (bomb_png(5000, 100), "is 5000×100 pixels; the limit is 4096 a side"),
        (encoded(picture(600)), "bytes; the limit is 1,000,000"),
        (encoded(picture(), "GIF"), "is GIF; send PNG, JPEG or WebP"),
    ],
)
def test_each_bad_image_is_refused_naming_its_field(data: bytes, problem: str) -> None:
    with pytest.raises(BadImage) as refused:
        read_image(data, "init_image", max_bytes=LIMIT)
    assert str(refused.value).startswith("init_image ") and problem in str(refused.value)
    assert refused.value.field == "init_image"


def test_a_bomb_is_refused_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    for width, height in ((30000, 30000), (5000, 100)):
        with pytest.raises(BadImage, match=r"the limit (of|is) 4096 a side"):
            read_image(bomb_png(width, height), "mask", max_bytes=LIMIT)
    assert decoded == []


def test_what_is_kept_is_the_pixels_alone_as_png() -> None:
    exif = Image.Exif()
    exif[0x010E] = "a description that must not survive"
    source = encoded(picture(), "JPEG", exif=exif.tobytes(), quality=95)
    image = read_image(source, "init_image", max_bytes=LIMIT)
    again = Image.open(io.BytesIO(png_bytes(image)))
    assert again.format == "PNG" and again.size == (16, 16) and again.mode == "RGB"
    assert not again.info.get("exif") and not getattr(again, "text", {})
    assert np.array_equal(np.asarray(again), np.asarray(image))
    mask = read_image(encoded(picture().convert("L")), "mask", max_bytes=LIMIT, mode="L")
    assert mask.mode == "L"
