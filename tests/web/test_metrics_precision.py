"""/metrics counts the live generation workers by the precision their models run in, from
their presence rows (the web app reads the database; it never imports torch)."""

from __future__ import annotations

from datetime import timedelta

from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.engine import Engine

from core.db.models import WorkerPresence, utcnow
from core.db.session import session_scope
from core.queue.eta import mark_present
from tests.web.test_ops import samples


def test_metrics_count_live_generation_workers_by_precision(
    client: FlaskClient, engine: Engine
) -> None:
    with session_scope(engine) as s:
        mark_present(s, "cpu-1", "generate", precision="bf16")
        mark_present(s, "cpu-2", "generate", precision="bf16")
        mark_present(s, "gpu-1", "generate,train", precision="fp16")
        mark_present(s, "new", "generate")  # has not loaded a model yet
        mark_present(s, "trainer", "train", precision="fp32")  # not a generation worker
        mark_present(s, "gone", "generate", precision="fp32")
    with session_scope(engine) as s:
        s.execute(
            update(WorkerPresence)
            .where(WorkerPresence.host == "gone")
            .values(last_seen=utcnow() - timedelta(seconds=61))
        )
    got = samples(client)
    by_precision = {
        labels[0][1]: value for (name, labels), value in got.items() if name == "dq_workers_live"
    }
    assert by_precision == {"bf16": 2, "fp16": 1, "fp32": 0, "unknown": 1}
    # A later beat keeps the precision; a worker that says none keeps the one it had.
    with session_scope(engine) as s:
        mark_present(s, "cpu-1", "generate")
    assert samples(client)[("dq_workers_live", (("precision", "bf16"),))] == 2
