"""The database: SQLAlchemy models, engines and sessions, and the one state-transition function.

Nothing here imports torch, Flask or Celery.
"""

from core.db import counts, events, fair_keys  # noqa: F401 -- install their triggers on create_all
from core.db.models import (
    ApiToken,
    Base,
    Image,
    Job,
    JobStatus,
    ModelKind,
    ModelVersion,
    Role,
    TrainingMetric,
    TrainingRun,
    Upload,
    utcnow,
)
from core.db.session import (
    check_database,
    dispose_engines,
    get_engine,
    make_engine,
    read_only_engine,
    session_factory,
    session_scope,
)
from core.db.transitions import InvalidTransition, transition, transition_job, transition_run

__all__ = [
    "ApiToken",
    "Base",
    "Image",
    "InvalidTransition",
    "Job",
    "JobStatus",
    "ModelKind",
    "ModelVersion",
    "Role",
    "TrainingMetric",
    "TrainingRun",
    "Upload",
    "check_database",
    "dispose_engines",
    "get_engine",
    "make_engine",
    "read_only_engine",
    "session_factory",
    "session_scope",
    "transition",
    "transition_job",
    "transition_run",
    "utcnow",
]
