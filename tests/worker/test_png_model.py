"""Each PNG names the model it came from, as its job's params.model does."""

from __future__ import annotations

import io
import uuid
from types import SimpleNamespace

from PIL import Image as PILImage
from sqlalchemy.engine import Engine

from tests.web.conftest import add_version
from worker.generation import encode_png, model_name


def test_the_png_text_chunk_names_the_version_and_the_shipped_model_default(
    engine: Engine,
) -> None:
    version_id = add_version(engine, "shapes-v3")
    ctx = SimpleNamespace(engine=engine)
    assert model_name(ctx, None) == "default"  # type: ignore[arg-type]
    name = model_name(ctx, version_id)  # type: ignore[arg-type]
    assert name == "shapes-v3"
    data = encode_png(PILImage.new("RGB", (8, 8)), "a red circle", 7, name)
    png = PILImage.open(io.BytesIO(data))
    assert png.text == {"prompt": "a red circle", "seed": "7", "model": "shapes-v3"}
    missing = uuid.uuid4()  # a version deleted meanwhile: its id, never a crash
    assert model_name(ctx, missing) == str(missing)  # type: ignore[arg-type]
