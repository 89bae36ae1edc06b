"""A training run submitted with ``activate`` serves its version only past the eval gate, as an
admin's activation would; a refused version stays registered, inactive, with the gate's findings
on it and in the audit log."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.db import ModelKind, ModelVersion, session_scope, utcnow
from core.db.models import AuditEvent
from core.runtime.settings import Settings
from worker.training import _activate_behind_the_gate


def add(engine: Engine, name: str, active: bool = False, **evaluation: Any) -> uuid.UUID:
    version = ModelVersion(
        id=uuid.uuid4(),
        name=name,
        kind=ModelKind.DENOISER,
        checkpoint_key=f"models/{name}",
        config={},
        metrics={"eval": evaluation},
        is_active=active,
        created_at=utcnow(),
    )
    with session_scope(engine) as session:
        session.add(version)
    return version.id


def finish_run(engine: Engine, version_id: uuid.UUID) -> None:
    ctx: Any = SimpleNamespace(settings=Settings())
    spec: Any = SimpleNamespace(id=uuid.uuid4())
    with session_scope(engine) as session:
        version = session.get(ModelVersion, version_id)
        _activate_behind_the_gate(ctx, session, spec, version)


def test_a_run_that_regresses_is_registered_but_not_activated(engine: Engine) -> None:
    served = add(engine, "served", active=True, fid=10.0, n=256, reference="shapes")
    worse = add(engine, "worse", fid=14.0, n=256, reference="shapes")
    finish_run(engine, worse)
    with session_scope(engine) as session:
        assert session.get(ModelVersion, served).is_active  # type: ignore[union-attr]
        refused = session.get(ModelVersion, worse)
        assert refused is not None and not refused.is_active
        assert refused.metrics["activation"]["refused"] is True
        assert "FID 14.00 against 10.00" in refused.metrics["activation"]["findings"][0]
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.actor == "worker"))
        assert event.action == "model.activate" and event.detail["activated"] is False

    better = add(engine, "better", fid=9.0, n=256, reference="shapes")
    finish_run(engine, better)
    with session_scope(engine) as session:
        assert session.get(ModelVersion, better).is_active  # type: ignore[union-attr]
        assert not session.get(ModelVersion, served).is_active  # type: ignore[union-attr]
