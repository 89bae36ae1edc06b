"""Status counts kept by triggers: every insert, status change and delete is counted, on both
backends, whichever code path made it; folding keeps the totals."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, migrate, utcnow
from core.db.counts import fold, read
from core.db.models import StatusCountDelta
from tests.core.test_db import new_job


def _truth(session: Session) -> dict[str, int]:
    counts = {s.value: 0 for s in JobStatus}
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[JobStatus(status).value] = n
    return counts


def test_counts_follow_inserts_updates_and_deletes_through_folds(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all(
            [new_job() for _ in range(7)] + [new_job(status=JobStatus.SUCCEEDED) for _ in range(3)]
        )
        session.commit()
        assert read(session, "job") == _truth(session)
        assert fold(session) == 10
        session.commit()
        # A bulk status change, the way a claim or the reaper writes it.
        ids = session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED).limit(4)).all()
        session.execute(update(Job).where(Job.id.in_(ids)).values(status=JobStatus.RUNNING))
        # An update that leaves the status alone is not counted.
        session.execute(update(Job).where(Job.id.in_(ids)).values(status=JobStatus.RUNNING))
        session.commit()
        assert read(session, "job") == _truth(session)
        session.execute(delete(Job).where(Job.status == JobStatus.SUCCEEDED))
        session.commit()
        assert (
            read(session, "job")
            == _truth(session)
            == {"queued": 3, "running": 4, "succeeded": 0, "failed": 0, "canceled": 0}
        )
        fold(session)
        session.commit()
        assert session.scalar(select(func.count()).select_from(StatusCountDelta)) == 0
        assert read(session, "job") == _truth(session)
        assert read(session, "run") == {s.value: 0 for s in JobStatus}


def test_the_migration_counts_rows_that_existed_before_it(db_url: str) -> None:
    from core.db import make_engine

    migrate.upgrade(db_url, "0002")
    engine = make_engine(db_url)
    with Session(engine) as session:
        session.execute(
            Job.__table__.insert(),
            [
                {
                    "id": uuid.uuid4(),
                    "prompt": "a red circle",
                    "negative_prompt": "",
                    "steps": 4,
                    "status": "succeeded",
                    "guidance": 3.0,
                    "sampler": "ddim",
                    "seed": 1,
                    "width": 32,
                    "height": 32,
                    "num_images": 1,
                    "owner": "o",
                    "attempts": 0,
                    "progress_step": 0,
                    "progress_total": 0,
                    "created_at": utcnow(),
                }
                for _ in range(5)
            ],
        )
        session.commit()
    migrate.upgrade(db_url)
    with Session(engine) as session:
        assert read(session, "job")["succeeded"] == 5
    engine.dispose()
