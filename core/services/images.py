"""Images that callers send to edit (init images and masks): judged from their header before a
pixel is decoded, then decoded in full and re-encoded as plain PNG.

What is refused, each with a message that names the field (:class:`BadImage`, a ValueError):

- more than the byte limit (DQ_MAX_UPLOAD_BYTES);
- anything Pillow cannot identify, or a format other than PNG, JPEG or WebP;
- more than :data:`MAX_SIDE` pixels a side or :data:`MAX_PIXELS` in all, read from the header,
  so a decompression bomb (a small file that claims 30000×30000 pixels) is never decoded;
- an animation (more than one frame);
- a file whose pixels do not decode (truncated or corrupt).

What is kept is the pixels alone: :func:`png_bytes` writes them with no EXIF, ICC profile or
text chunks. No torch here: the web app checks uploads with it too.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class BadImage(ValueError):
    """An image a caller sent cannot be used; ``field`` names what it was sent as."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


def read_image(data: bytes, field: str, *, max_bytes: int, mode: str | None = "RGB") -> Image.Image:
    """The image in ``data``, checked and decoded, converted to ``mode`` (RGB, or L for a mask;
    None: L for a greyscale image, RGB for any other)."""
    from PIL import Image, UnidentifiedImageError  # here: a web process loads Pillow when sent one

    if len(data) > max_bytes:
        raise BadImage(field, f"is {len(data):,} bytes; the limit is {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, from the header's size: far past ours.
        raise BadImage(
            field, f"claims more pixels than the limit of {MAX_SIDE} a side in its header"
        ) from None
    except (UnidentifiedImageError, OSError):
        raise BadImage(field, "is not an image Pillow can read (send PNG, JPEG or WebP)") from None
    if image.format not in FORMATS:
        raise BadImage(field, f"is {image.format}; send PNG, JPEG or WebP")
    width, height = image.size
    if (
        width < 1
        or height < 1
        or width > MAX_SIDE
        or height > MAX_SIDE
        or width * height > MAX_PIXELS
    ):
        raise BadImage(field, f"is {width}×{height} pixels; the limit is {MAX_SIDE} a side")
    if getattr(image, "n_frames", 1) > 1:
        raise BadImage(field, "is animated; send a single frame")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):
        raise BadImage(field, "is truncated or corrupt: its pixels do not decode") from None
    if mode is None:
        mode = "L" if image.mode in GREY_MODES else "RGB"
    return image.convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    """The pixels as a PNG with nothing else in it (no EXIF, profile or text)."""
    from PIL import Image

    out = io.BytesIO()
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    clean.save(out, format="PNG", optimize=False)
    return out.getvalue()
