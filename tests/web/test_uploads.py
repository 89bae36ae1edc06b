"""Images to edit through the API: POST /api/v1/uploads, and a job's init_image, mask and
strength (an upload id or an inline data: URL). Every bad input is a 4xx naming its field, and
nothing is written: no upload row, no stored object, no job."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.db import Job, Upload, session_scope
from core.storage import LocalStorage
from tests.core.test_images import animated_gif_as_png as animated
from tests.core.test_images import bomb_png
from tests.web.conftest import bearer

SIZE = 64


def png(size: int = SIZE, grey: bool = False, **save: Any) -> bytes:
    rng = np.random.default_rng(size)
    shape = (size, size) if grey else (size, size, 3)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(out, format="PNG", **save)
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def upload(client: FlaskClient, token: str, data: bytes, name: str = "x.png") -> Any:
    return client.post(
        "/api/v1/uploads",
        data={"file": (io.BytesIO(data), name)},
        headers=bearer(token),
        content_type="multipart/form-data",
    )


def written(engine: Engine, storage: LocalStorage) -> tuple[int, int, list[str]]:
    with session_scope(engine) as session:
        uploads = session.scalar(select(func.count()).select_from(Upload))
        jobs = session.scalar(select(func.count()).select_from(Job))
    return int(uploads or 0), int(jobs or 0), sorted(storage.list("uploads/"))


def test_an_upload_is_kept_as_a_bare_png_and_a_job_starts_from_it(
    client: FlaskClient, user_token: str, storage: LocalStorage, engine: Engine
) -> None:
    exif = Image.Exif()
    exif[0x010E] = "secret description"
    out = io.BytesIO()
    Image.open(io.BytesIO(png())).save(out, format="JPEG", exif=exif.tobytes())
    sent = upload(client, user_token, out.getvalue(), "photo.jpg")
    assert sent.status_code == 201, sent.json
    body = sent.json
    assert body["width"] == body["height"] == SIZE and sent.headers["Location"] == body["url"]
    kept = Image.open(io.BytesIO(storage.get(f"uploads/{body['id']}.png")))
    assert kept.format == "PNG" and not kept.info.get("exif") and not getattr(kept, "text", {})
    mask = upload(client, user_token, png(grey=True)).json

    job = client.post(
        "/api/v1/jobs",
        json={"prompt": "a red circle", "init_image": body["id"], "mask": mask["id"]},
        headers=bearer(user_token),
    )
    assert job.status_code == 202, job.json
    params = job.json["params"]
    assert params["init_image"]["id"] == body["id"] and params["mask"]["id"] == mask["id"]
    assert params["strength"] == 1.0  # with a mask
    polled = client.get(f"/api/v1/jobs/{job.json['id']}", headers=bearer(user_token)).json
    assert polled["params"]["init_image"]["id"] == body["id"]
    plain = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).json
    assert plain["params"]["init_image"] is None and plain["params"]["strength"] is None


def test_inline_images_become_uploads_of_the_job(
    client: FlaskClient, user_token: str, storage: LocalStorage, engine: Engine
) -> None:
    job = client.post(
        "/api/v1/jobs",
        json={"prompt": "a red circle", "init_image": data_url(png()), "strength": 0.6},
        headers=bearer(user_token),
    )
    assert job.status_code == 202, job.json
    assert job.json["params"]["strength"] == 0.6
    uploads, jobs, keys = written(engine, storage)
    assert (uploads, jobs) == (1, 1)
    assert keys == [f"uploads/{job.json['params']['init_image']['id']}.png"]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: b"just text", "file: is not an image Pillow can read"),
        (lambda: png()[:300], "file: is truncated or corrupt"),
        (animated, "file: is animated"),
        (lambda: bomb_png(30000, 30000), "file: claims more pixels than the limit of 4096 a side"),
        (lambda: png(300), "file: is"),  # over the test's DQ_MAX_UPLOAD_BYTES
    ],
)
def test_a_bad_upload_is_422_naming_the_file_and_writes_nothing(
    db_url: str,
    tmp_path: Path,
    engine: Engine,
    user_token: str,
    make: Any,
    problem: str,
) -> None:
    from tests.web.conftest import make_settings
    from web import create_app

    app = create_app(make_settings(db_url, tmp_path, max_upload_bytes=100_000))
    client = app.test_client()
    storage = app.extensions["dq"].storage
    sent = upload(client, user_token, make())
    assert sent.status_code == 422, sent.json
    assert sent.json["detail"].startswith(problem), sent.json["detail"]
    assert sent.json["errors"][0]["field"] == "file"
    assert written(engine, storage) == (0, 0, [])


def test_a_body_past_the_image_limit_is_413(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from tests.web.conftest import make_settings
    from web import create_app

    app = create_app(make_settings(db_url, tmp_path, max_upload_bytes=20_000))
    sent = upload(app.test_client(), user_token, png(400))
    assert sent.status_code == 413 and "larger than the limit" in sent.json["detail"]
    assert written(engine, app.extensions["dq"].storage) == (0, 0, [])


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"mask": "MASK"}, "mask", "needs an init_image"),
        ({"strength": 0.5}, "strength", "applies only with an init_image"),
        ({"init_image": "INIT", "strength": 0}, "strength", "must be greater than 0"),
        ({"init_image": "INIT", "strength": 1.5}, "strength", "must be greater than 0"),
        ({"init_image": "INIT", "mask": "SMALL_MASK"}, "mask", "is 32×32 pixels; its init_image"),
        ({"init_image": "OTHERS"}, "init_image", "there is no upload"),
        ({"init_image": str(uuid.UUID(int=7))}, "init_image", "there is no upload"),
        ({"init_image": "not-an-id"}, "init_image", "must be an upload id or a data:"),
        ({"init_image": "data:image/png;base64,!!!"}, "init_image", "must be a data:image/png"),
        ({"init_image": "data:image/png;base64,aGVsbG8="}, "init_image", "is not an image"),
        ({"init_image": "INLINE_BOMB"}, "init_image", "claims more pixels"),
        ({"init_image": "INLINE_TRUNCATED"}, "init_image", "is truncated or corrupt"),
        ({"init_image": "INLINE_ANIMATED"}, "init_image", "is animated"),
        ({"init_image": "INIT", "mask": "INLINE_SMALL"}, "mask", "is 32×32 pixels"),
    ],
)
def test_bad_edit_inputs_are_422_naming_the_field_and_write_nothing(
    client: FlaskClient,
    user_token: str,
    other_token: str,
    storage: LocalStorage,
    engine: Engine,
    body: dict[str, Any],
    field: str,
    message: str,
) -> None:
    makers = {
        "INIT": lambda: upload(client, user_token, png()).json["id"],
        "MASK": lambda: upload(client, user_token, png(grey=True)).json["id"],
        "SMALL_MASK": lambda: upload(client, user_token, png(32, grey=True)).json["id"],
        "OTHERS": lambda: upload(client, other_token, png()).json["id"],
        "INLINE_BOMB": lambda: data_url(bomb_png(30000, 30000)),
        "INLINE_TRUNCATED": lambda: data_url(png()[:300]),
        "INLINE_ANIMATED": lambda: data_url(animated()),
        "INLINE_SMALL": lambda: data_url(png(32, grey=True)),
    }
    refs = {v: makers[v]() for v in body.values() if isinstance(v, str) and v in makers}
    before = written(engine, storage)
    sent = client.post(
        "/api/v1/jobs",
        json={"prompt": "a red circle", **{k: refs.get(v, v) for k, v in body.items()}},
        headers=bearer(user_token),
    )
    assert sent.status_code == 422, sent.json
    assert sent.json["errors"][0]["field"] == field
    assert message in sent.json["detail"], sent.json["detail"]
    assert written(engine, storage) == before


def test_a_batch_shares_one_set_of_edit_inputs(
    client: FlaskClient, user_token: str, storage: LocalStorage, engine: Engine
) -> None:
    """Every job of a batch starts from the same uploads (an inline image is stored once); the
    batch's params keep a digest of an inline image, not its bytes; a bad input is 422 with
    nothing written."""
    inline = data_url(png())
    sent = client.post(
        "/api/v1/batches",
        json={"prompts": ["a red circle", "a blue square"], "init_image": inline, "strength": 0.4},
        headers=bearer(user_token),
    )
    assert sent.status_code == 202, sent.json
    assert sent.json["params"]["init_image"].startswith("data:sha256,")
    assert sent.json["params"]["strength"] == 0.4
    jobs = [
        client.get(f"/api/v1/jobs/{j['id']}", headers=bearer(user_token)).json["params"]
        for j in sent.json["jobs"]
    ]
    assert len({p["init_image"]["id"] for p in jobs}) == 1
    assert {p["strength"] for p in jobs} == {0.4}
    before = written(engine, storage)
    assert before[:2] == (1, 2)
    bad = client.post(
        "/api/v1/batches",
        json={"prompts": ["a red circle"], "init_image": inline, "mask": data_url(png(32, True))},
        headers=bearer(user_token),
    )
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "mask", bad.json
    assert written(engine, storage) == before
