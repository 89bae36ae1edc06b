"""Retention: what ``dq prune --older-than 30d`` and the reaper's DQ_RETENTION pass delete.

Work that ended before the cutoff (the database's clock, less ``older_than_seconds``) goes:

- finished jobs (succeeded, failed, canceled): every object under ``images/<job>/`` and
  ``previews/<job>`` (earlier attempts' too), then the job's rows (its image rows with it);
- uploads (images sent to edit) made before the cutoff that no job names any more: the object
  ``uploads/<id>.png``, then the row;
- the ``training_metrics`` rows of finished runs; the run rows stay;
- the objects under ``runs/<run>/`` of finished runs (training state, sample grid), except any
  that a model version's ``checkpoint_key`` points into;
- local scratch of this machine: ``DQ_WORK_DIR/runs/<run>/`` of finished runs, dataset caches
  under ``DQ_WORK_DIR/datasets/`` that no unfinished run reads, and model cache entries under
  ``DQ_MODEL_CACHE_DIR`` of versions that nothing is about to load, untouched since the cutoff.

Never: a queued or running job or run, whatever its age; a model version, or any object under a
version's ``checkpoint_key`` (an inactive version stays re-activatable); the cached files of the
active versions, of versions that queued or running work names, or of the autoencoder that the
active denoiser was trained on.

Objects go first, rows after. A crash between the two leaves the rows of an expired job whose
objects are gone, and the next prune finds those rows and ends the job. The other order would
leave objects that no row names, which no prune could ever find again.

Every batch is its own short transaction, and :class:`Pruner` can stop after a few batches and
go on later, so that the reaper never holds up re-queueing for long. This module imports no
framework and no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, not_, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.db.models import (
    Image,
    Job,
    JobStatus,
    ModelKind,
    ModelVersion,
    TrainingMetric,
    TrainingRun,
    Upload,
)
from core.db.session import session_scope
from core.db.transitions import db_now
from core.runtime.settings import Settings
from core.services import audit
from core.storage import Storage, StorageError

log = logging.getLogger(__name__)

ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
MAX_ERRORS_KEPT = 20

Sessions = Engine | sessionmaker[Session]
Progress = Callable[["PruneReport"], None]


@dataclass
class PruneReport:
    """What a prune removed (or, in a dry run, would remove)."""

    older_than_seconds: int
    dry_run: bool = False
    jobs: int = 0
    uploads: int = 0  # uploads/<id>.png with its row
    images: int = 0  # objects under images/<job>/
    previews: int = 0  # objects under previews/<job>
    metric_rows: int = 0
    run_objects: int = 0  # objects under runs/<run>/
    work_dirs: int = 0  # DQ_WORK_DIR/runs/<run>/ and dataset caches
    cache_dirs: int = 0  # DQ_MODEL_CACHE_DIR/<version>/
    bytes_freed: int = 0  # objects and local files
    errors: list[str] = field(default_factory=list)  # the first few; error_count has them all
    error_count: int = 0
    complete: bool = False

    COUNTED = (
        "jobs",
        "uploads",
        "images",
        "previews",
        "metric_rows",
        "run_objects",
        "work_dirs",
        "cache_dirs",
        "bytes_freed",
    )

    def counts(self) -> dict[str, int]:
        out = {name: int(getattr(self, name)) for name in self.COUNTED}
        out["errors"] = self.error_count
        return out

    @property
    def removed_anything(self) -> bool:
        return any(getattr(self, name) for name in self.COUNTED)

    def summary(self) -> str:
        return ", ".join(f"{n.replace('_', ' ')} {v}" for n, v in self.counts().items())


def _ended_before(model: type[Job] | type[TrainingRun], cutoff: datetime) -> Any:
    """Finished, and ended before ``cutoff`` (by ``created_at`` when ``finished_at`` is NULL)."""
    return and_(
        model.status.in_(ENDED),
        or_(
            model.finished_at < cutoff,
            and_(model.finished_at.is_(None), model.created_at < cutoff),
        ),
    )


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + "/") for p in prefixes)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += Path(dirpath, name).stat().st_size
            except OSError:
                continue
    return total


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                newest = max(newest, Path(dirpath, name).stat().st_mtime)
            except OSError:
                continue
    return newest


def dataset_cache_name(uri: str) -> str:
    """The directory under ``DQ_WORK_DIR/datasets/`` where a worker fetches an ``s3://``
    dataset (as ``worker.training.resolve_dataset`` names it)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


class Pruner:
    """One prune, run in batches: :meth:`step` runs some (or all) of the remaining batches."""

    def __init__(
        self,
        sessions: Sessions,
        storage: Storage,
        settings: Settings,
        older_than_seconds: int,
        *,
        dry_run: bool = False,
        batch_size: int = 500,
        progress: Progress | None = None,
    ):
        if older_than_seconds < 1:
            raise ValueError("older_than_seconds must be positive")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self._sessions = sessions
        self.storage = storage
        self.settings = settings
        self.batch_size = batch_size
        self.progress = progress
        self.report = PruneReport(older_than_seconds, dry_run=dry_run)
        self.cutoff: datetime | None = None  # the database's clock, set by the first step
        self._work = self._batches()

    # --- driving -------------------------------------------------------------------------

    def step(self, max_batches: int | None = None) -> bool:
        """Run up to ``max_batches`` more batches (all of them when None). True once the prune
        is complete; an exception (the database is down) ends this prune."""
        for done, _ in enumerate(self._work, start=1):
            if self.progress is not None:
                self.progress(self.report)
            if max_batches is not None and done >= max_batches:
                return False
        self.report.complete = True
        return True

    def record(self, actor: str) -> None:
        """The audit row of this prune (none for a dry run)."""
        if self.report.dry_run:
            return
        with self._transaction() as s:
            audit.record(
                s,
                actor,
                "prune",
                target=f"older than {self.report.older_than_seconds}s",
                detail=self.report.counts(),
            )

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        if isinstance(self._sessions, Engine):
            with session_scope(self._sessions) as s:
                yield s
        else:
            with self._sessions() as s, s.begin():
                yield s

    def _error(self, message: str) -> None:
        log.warning("prune: %s", message)
        self.report.error_count += 1
        if len(self.report.errors) < MAX_ERRORS_KEPT:
            self.report.errors.append(message)

    # --- the batches ---------------------------------------------------------------------

    def _batches(self) -> Iterator[None]:
        with self._transaction() as s:
            now = s.scalar(select(db_now()))
        assert now is not None
        self.cutoff = now - timedelta(seconds=self.report.older_than_seconds)
        # Local files are judged by this machine's clock, as their mtimes are.
        self.wall_cutoff = time.time() - self.report.older_than_seconds
        yield from self._prune_jobs()
        yield from self._prune_uploads()
        yield from self._prune_runs()
        yield from self._prune_dataset_caches()
        yield from self._prune_model_cache()

    def _expired(self, model: type[Job] | type[TrainingRun]) -> Iterator[list[uuid.UUID]]:
        """Batches of ids of rows that ended before the cutoff, oldest first.

        One status at a time, by keyset on (finished_at, id), so that each query walks the
        (status, finished_at) index for one batch instead of sorting every expired row.
        """
        assert self.cutoff is not None
        for status in ENDED:
            after: tuple[datetime, uuid.UUID] | None = None
            while True:
                query = select(model.id, model.finished_at).where(
                    model.status == status, model.finished_at < self.cutoff
                )
                if after is not None:
                    query = query.where(
                        or_(
                            model.finished_at > after[0],
                            and_(model.finished_at == after[0], model.id > after[1]),
                        )
                    )
                with self._transaction() as s:
                    rows = list(
                        s.execute(
                            query.order_by(model.finished_at, model.id).limit(self.batch_size)
                        )
                    )
                if not rows:
                    break
                yield [row.id for row in rows]
                last = rows[-1]
                assert last.finished_at is not None
                after = (last.finished_at, last.id)
            # finish() always sets finished_at; a row ended by hand or by an old release may
            # lack it, and then its age is its created_at.
            after_id: uuid.UUID | None = None
            while True:
                query = select(model.id, model.finished_at).where(
                    model.status == status,
                    model.finished_at.is_(None),
                    model.created_at < self.cutoff,
                )
                if after_id is not None:
                    query = query.where(model.id > after_id)
                with self._transaction() as s:
                    rows = list(s.execute(query.order_by(model.id).limit(self.batch_size)))
                if not rows:
                    break
                yield [row.id for row in rows]
                after_id = rows[-1].id

    def _prune_jobs(self) -> Iterator[None]:
        dry = self.report.dry_run
        for job_ids in self._expired(Job):
            cleared: list[uuid.UUID] = []
            for job_id in job_ids:
                try:
                    images = list(self.storage.list_sizes(f"images/{job_id}/"))
                    # No trailing slash: also the previews/<job>.png of older releases.
                    previews = list(self.storage.list_sizes(f"previews/{job_id}"))
                    if not dry:
                        self.storage.delete_many(key for key, _ in (*images, *previews))
                except StorageError as e:
                    # The rows stay, so the next prune tries this job again.
                    self._error(f"job {job_id}: objects not deleted: {e}")
                    continue
                self.report.images += len(images)
                self.report.previews += len(previews)
                self.report.bytes_freed += sum(size for _, size in (*images, *previews))
                cleared.append(job_id)
            if dry:
                self.report.jobs += len(cleared)
            elif cleared:
                with self._transaction() as s:
                    # Explicitly, not only by ON DELETE CASCADE: a SQLite connection made
                    # elsewhere may not have foreign keys on.
                    s.execute(delete(Image).where(Image.job_id.in_(cleared)))
                    result = s.execute(
                        delete(Job).where(Job.id.in_(cleared), Job.status.in_(ENDED))
                    )
                    self.report.jobs += result.rowcount  # type: ignore[attr-defined]
            yield

    def _prune_uploads(self) -> Iterator[None]:
        """Uploads made before the cutoff that no job still to be kept names (their jobs were
        pruned above, or never came), by keyset on (created_at, id): the object, then the row,
        which is deleted only while still unnamed."""
        assert self.cutoff is not None
        dry = self.report.dry_run
        # A job that this prune keeps: unfinished, or ended since the cutoff (a dry run has not
        # deleted the expired ones, and must count as the real run does).
        kept = or_(
            Job.status.not_in(ENDED),
            func.coalesce(Job.finished_at, Job.created_at) >= self.cutoff,
        )
        named = or_(
            select(Job.id).where(Job.init_upload_id == Upload.id, kept).exists(),
            select(Job.id).where(Job.mask_upload_id == Upload.id, kept).exists(),
        )
        after: tuple[datetime, uuid.UUID] | None = None
        while True:
            query = select(Upload.id, Upload.created_at, Upload.storage_key, Upload.bytes).where(
                Upload.created_at < self.cutoff, not_(named)
            )
            if after is not None:
                query = query.where(
                    or_(
                        Upload.created_at > after[0],
                        and_(Upload.created_at == after[0], Upload.id > after[1]),
                    )
                )
            with self._transaction() as s:
                rows = list(
                    s.execute(query.order_by(Upload.created_at, Upload.id).limit(self.batch_size))
                )
            if not rows:
                return
            after = (rows[-1].created_at, rows[-1].id)
            if not dry:
                try:
                    self.storage.delete_many(row.storage_key for row in rows)
                except StorageError as e:
                    self._error(f"uploads: objects not deleted: {e}")
                    yield
                    continue
                with self._transaction() as s:
                    result = s.execute(
                        delete(Upload).where(Upload.id.in_([r.id for r in rows]), not_(named))
                    )
                    self.report.uploads += result.rowcount  # type: ignore[attr-defined]
            else:
                self.report.uploads += len(rows)
            self.report.bytes_freed += sum(int(r.bytes) for r in rows)
            yield

    def _checkpoint_prefixes(self) -> list[str]:
        with self._transaction() as s:
            keys = s.scalars(select(ModelVersion.checkpoint_key)).all()
        return [k.strip("/") for k in keys if k.strip("/")]

    def _prune_runs(self) -> Iterator[None]:
        dry = self.report.dry_run
        work_runs = Path(self.settings.work_dir) / "runs"
        for run_ids in self._expired(TrainingRun):
            # Metric rows, in batches of their own: a long run logs thousands.
            if dry:
                with self._transaction() as s:
                    self.report.metric_rows += (
                        s.scalar(
                            select(func.count())
                            .select_from(TrainingMetric)
                            .where(TrainingMetric.run_id.in_(run_ids))
                        )
                        or 0
                    )
            else:
                while True:
                    with self._transaction() as s:
                        ids = s.scalars(
                            select(TrainingMetric.id)
                            .where(TrainingMetric.run_id.in_(run_ids))
                            .limit(self.batch_size)
                        ).all()
                        if ids:
                            s.execute(delete(TrainingMetric).where(TrainingMetric.id.in_(ids)))
                    self.report.metric_rows += len(ids)
                    if len(ids) < self.batch_size:
                        break
                    yield
            # Read per batch: a version registered meanwhile is protected too.
            protected = self._checkpoint_prefixes()
            for run_id in run_ids:
                try:
                    objects = [
                        (key, size)
                        for key, size in self.storage.list_sizes(f"runs/{run_id}/")
                        if not _covered(key, protected)
                    ]
                    if not dry:
                        self.storage.delete_many(key for key, _ in objects)
                except StorageError as e:
                    self._error(f"run {run_id}: objects not deleted: {e}")
                    continue
                self.report.run_objects += len(objects)
                self.report.bytes_freed += sum(size for _, size in objects)
                self._remove_local(work_runs / str(run_id), "work_dirs")
            yield

    def _remove_local(self, path: Path, counter: str) -> bool:
        """Delete a local directory (or count it, in a dry run) under ``counter`` of the
        report; False when it is not there."""
        if not path.exists():
            return False
        try:
            size = _tree_bytes(path)
            if not self.report.dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as e:
            self._error(f"{path} not removed: {e}")
            return False
        self.report.bytes_freed += size
        setattr(self.report, counter, getattr(self.report, counter) + 1)
        return True

    def _old_and_unused(self, path: Path) -> bool:
        try:
            return _newest_mtime(path) < self.wall_cutoff
        except OSError:  # removed meanwhile
            return False

    def _prune_dataset_caches(self) -> Iterator[None]:
        """Dataset folders fetched from s3:// that no unfinished or recent run reads."""
        root = Path(self.settings.work_dir) / "datasets"
        if root.is_dir():
            assert self.cutoff is not None
            with self._transaction() as s:
                datasets = s.scalars(
                    select(TrainingRun.dataset).where(not_(_ended_before(TrainingRun, self.cutoff)))
                ).all()
            in_use = {
                dataset_cache_name(d["uri"])
                for d in datasets
                if isinstance(d, dict) and d.get("kind") == "s3" and "uri" in d
            }
            for entry in sorted(root.iterdir()):
                if entry.name not in in_use and self._old_and_unused(entry):
                    self._remove_local(entry, "work_dirs")
        yield

    def _prune_model_cache(self) -> Iterator[None]:
        """Cached copies of model versions that nothing is about to load, untouched since the
        cutoff. A removed entry costs a worker one fetch, should the version come back."""
        root = Path(self.settings.model_cache_dir)
        if root.is_dir():
            keep = self._versions_in_use()
            for entry in sorted(root.iterdir()):
                # <version id>, or <version id>.tmp-xxxxxxxx that a fetch left behind.
                try:
                    version_id = uuid.UUID(entry.name.split(".tmp-")[0])
                except ValueError:
                    continue  # not ours
                if version_id not in keep and self._old_and_unused(entry):
                    self._remove_local(entry, "cache_dirs")
        yield

    def _versions_in_use(self) -> set[uuid.UUID]:
        """Active versions; versions that queued or running jobs name; autoencoders that
        queued or running runs train on, or that the active denoiser was trained on."""
        with self._transaction() as s:
            keep = set(s.scalars(select(ModelVersion.id).where(ModelVersion.is_active)))
            keep |= set(
                s.scalars(
                    select(Job.model_version_id)
                    .where(Job.status.in_(UNFINISHED), Job.model_version_id.is_not(None))
                    .distinct()
                )
            )
            keep |= set(
                s.scalars(
                    select(TrainingRun.autoencoder_version_id).where(
                        TrainingRun.autoencoder_version_id.is_not(None),
                        or_(
                            TrainingRun.status.in_(UNFINISHED),
                            TrainingRun.model_version_id.in_(
                                select(ModelVersion.id).where(
                                    ModelVersion.is_active,
                                    ModelVersion.kind == ModelKind.DENOISER,
                                )
                            ),
                        ),
                    )
                )
            )
        return keep


def prune(
    session_factory_or_engine: Sessions,
    storage: Storage,
    settings: Settings,
    older_than_seconds: int,
    dry_run: bool = False,
    batch_size: int = 500,
    progress: Progress | None = None,
    *,
    actor: str = "cli",
) -> PruneReport:
    """Delete everything that ended more than ``older_than_seconds`` ago (see the module's
    docstring), in batches, and record one audit row by ``actor``; a dry run only counts."""
    pruner = Pruner(
        session_factory_or_engine,
        storage,
        settings,
        older_than_seconds,
        dry_run=dry_run,
        batch_size=batch_size,
        progress=progress,
    )
    pruner.step()
    pruner.record(actor)
    return pruner.report
