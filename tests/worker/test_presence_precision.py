"""A worker's presence row says what precision its models run in: DQ_PRECISION resolved for
its device, from the moment it has loaded a model."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db.models import Job, WorkerPresence
from core.db.transitions import Lease
from core.runtime.settings import Settings
from core.storage.local import LocalStorage
from tests.conftest import tmp_env
from worker.context import build_context


def test_the_heartbeat_writes_the_precision_of_the_loaded_models(
    engine: Engine, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {
            "DQ_DEVICE": "cpu",
            "DQ_PRECISION": "bf16",
            "DQ_MODEL_CACHE_DIR": str(tmp_path / "m"),
            **tmp_env(tmp_path),
        },
        storage_url=f"file://{tmp_path / 'objects'}",
    )
    storage = LocalStorage(tmp_path / "objects", "s")
    ctx = build_context(settings, None, engine=engine, storage=storage)  # type: ignore[arg-type]
    heartbeat = ctx.heartbeat
    heartbeat.hold(Lease(Job, uuid.uuid4(), 1))
    try:
        heartbeat.announce()  # no model loaded yet: the precision is not known
        with Session(engine) as s:
            assert s.scalars(select(WorkerPresence.precision)).one() is None
        model = ctx.models.get(None)  # the shipped model
        assert model.precision == "bf16"
        heartbeat.announce()
    finally:
        heartbeat.stop()
    with Session(engine) as s:
        row = s.scalars(select(WorkerPresence)).one()
        assert (row.precision, row.queues) == ("bf16", "generate")
