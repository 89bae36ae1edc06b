"""Uploads: the images a caller sends to edit (an init image, a mask), and how a job names them.

A job's ``init_image`` and ``mask`` are each an upload's id (``POST /api/v1/uploads`` made it,
for the same owner) or an inline ``data:image/png;base64,…`` URL (PNG, JPEG or WebP), which
becomes an upload of the job's owner in the job's own transaction. Either way the image is
checked by :mod:`core.services.images` and kept as a bare PNG under ``uploads/<id>.png``.

Everything is checked before anything is written: a request with a bad image, a mask without an
init image or of another size, a strength outside (0, 1], or another owner's upload id fails
with a :class:`~core.services.jobs.JobRequestError` naming the field, and stores nothing.
Uploads go with retention and ``dq prune`` once no job names them (``core.upkeep.retention``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import uuid
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from core.db.models import Upload, utcnow
from core.runtime.settings import Settings
from core.services.images import BadImage, png_bytes, read_image
from core.storage import Storage

UPLOAD_PREFIX = "uploads/"
# Image-to-image's strength when none is given (with a mask: 1), as core.diffusion.pipeline's.
DEFAULT_STRENGTH = 0.75
_DATA_URL = re.compile(r"data:image/(?:png|jpeg|webp);base64,(?P<data>[A-Za-z0-9+/=\s]*)\Z")


class EditRequestError(ValueError):
    """An edit input that cannot be used; ``field`` names it (init_image, mask or strength)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def upload_key(upload_id: uuid.UUID) -> str:
    return f"{UPLOAD_PREFIX}{upload_id}.png"


@dataclass
class NewUpload:
    """An upload checked and encoded, not yet stored: :func:`store` writes it."""

    row: Upload
    png: bytes


def prepare_upload(data: bytes, owner: str, field_name: str, settings: Settings) -> NewUpload:
    """``data`` checked (BadImage names ``field_name``) and re-encoded as a bare PNG: grey for a
    greyscale image (a mask), RGB for any other."""
    image = read_image(data, field_name, max_bytes=settings.max_upload_bytes, mode=None)
    png = png_bytes(image)
    upload_id = uuid.uuid4()
    row = Upload(
        id=upload_id,
        owner=owner,
        storage_key=upload_key(upload_id),
        width=image.width,
        height=image.height,
        bytes=len(png),
        sha256=hashlib.sha256(png).hexdigest(),
        created_at=utcnow(),
    )
    return NewUpload(row, png)


def store(session: Session, storage: Storage, new: NewUpload) -> Upload:
    """Write the PNG, then add its row to the session (committed with the caller's work)."""
    storage.put(new.row.storage_key, new.png, "image/png")
    session.add(new.row)
    return new.row


def create_upload(
    session: Session, storage: Storage, owner: str, data: bytes, settings: Settings
) -> Upload:
    """``POST /api/v1/uploads``: the image checked, stored, and recorded for ``owner``."""
    new = prepare_upload(data, owner, "file", settings)
    upload = store(session, storage, new)
    session.flush()
    return upload


@dataclass
class EditInputs:
    """A job's edit inputs, resolved and checked: the uploads it names, and the ones that
    inline data URLs made, which :func:`store_edits` writes."""

    init: Upload
    mask: Upload | None
    strength: float
    new: list[NewUpload] = field(default_factory=list)


def _reference(
    session: Session, owner: str, ref: object, field_name: str, settings: Settings
) -> tuple[Upload, NewUpload | None]:
    if not isinstance(ref, str):
        raise EditRequestError(field_name, "must be an upload id or a data:image/… base64 URL")
    if ref.startswith("data:"):
        match = _DATA_URL.match(ref)
        if match is None:
            raise EditRequestError(
                field_name, "must be a data:image/png;base64,… URL (png, jpeg or webp)"
            )
        try:
            raw = base64.b64decode(re.sub(r"\s", "", match.group("data")), validate=True)
        except (binascii.Error, ValueError):
            raise EditRequestError(field_name, "is not valid base64") from None
        try:
            new = prepare_upload(raw, owner, field_name, settings)
        except BadImage as e:
            raise EditRequestError(field_name, str(e).removeprefix(f"{field_name} ")) from None
        return new.row, new
    try:
        upload_id = uuid.UUID(ref)
    except ValueError:
        raise EditRequestError(
            field_name, "must be an upload id or a data:image/png;base64,… URL"
        ) from None
    upload = session.get(Upload, upload_id)
    if upload is None or upload.owner != owner:
        raise EditRequestError(field_name, f"there is no upload {upload_id} of yours")
    return upload, None


def resolve_edits(
    session: Session,
    owner: str,
    init_image: object,
    mask: object,
    strength: object,
    settings: Settings,
) -> EditInputs | None:
    """The job's edit inputs checked; None for text-to-image. Reads uploads, writes nothing."""
    if init_image is None:
        if mask is not None:
            raise EditRequestError("mask", "needs an init_image: a mask says what to repaint of it")
        if strength is not None:
            raise EditRequestError("strength", "applies only with an init_image")
        return None
    if strength is not None and (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not (math.isfinite(strength) and 0 < strength <= 1)
    ):
        raise EditRequestError("strength", "must be greater than 0 and at most 1")
    init, new_init = _reference(session, owner, init_image, "init_image", settings)
    found_mask, new_mask = (None, None)
    if mask is not None:
        found_mask, new_mask = _reference(session, owner, mask, "mask", settings)
        if (found_mask.width, found_mask.height) != (init.width, init.height):
            raise EditRequestError(
                "mask",
                f"is {found_mask.width}×{found_mask.height} pixels; its init_image is "
                f"{init.width}×{init.height}",
            )
    chosen = (1.0 if found_mask is not None else DEFAULT_STRENGTH) if strength is None else strength
    return EditInputs(
        init=init,
        mask=found_mask,
        strength=float(chosen),
        new=[n for n in (new_init, new_mask) if n is not None],
    )


def store_edits(session: Session, storage: Storage | None, edits: EditInputs) -> None:
    """Store the uploads that inline data URLs made (after every check has passed)."""
    if not edits.new:
        return
    if storage is None:
        raise RuntimeError("inline images need object storage to be kept in")
    for new in edits.new:
        store(session, storage, new)
