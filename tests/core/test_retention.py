"""Retention: ``dq prune`` and the reaper's DQ_RETENTION pass remove exactly the work that ended
before the cutoff, and nothing still referenced: not a running job, not a model version's
checkpoint, not the cache of the active version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import (
    Base,
    Image,
    Job,
    JobStatus,
    ModelKind,
    ModelVersion,
    TrainingMetric,
    TrainingRun,
    Upload,
    make_engine,
    session_scope,
    utcnow,
)
from core.db.models import AuditEvent, StatusCountDelta
from core.runtime.settings import Settings
from core.storage import LocalStorage, S3Storage, Storage
from core.upkeep.retention import Pruner, dataset_cache_name, prune

REPO = Path(__file__).resolve().parents[2]
DAY = 86400
THIRTY_DAYS = 30 * DAY
SECRET = "f3b9c2d47a1e8f6b0c5d9e2a7b4f1c8d"


def settings_for(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        work_dir=str(tmp_path / "work"),
        model_cache_dir=str(tmp_path / "models"),
        storage_url=f"file://{tmp_path / 'objects'}",
        secret_key=SECRET,
        **kw,
    )


@dataclass
class World:
    """Old and new, finished and unfinished work, with its objects and local files."""

    keys_gone: set[str] = field(default_factory=set)
    keys_kept: set[str] = field(default_factory=set)
    jobs_gone: list[uuid.UUID] = field(default_factory=list)
    jobs_kept: list[uuid.UUID] = field(default_factory=list)
    runs_stripped: list[uuid.UUID] = field(default_factory=list)  # metrics go, the row stays
    runs_kept: list[uuid.UUID] = field(default_factory=list)  # metrics stay
    uploads_kept: list[uuid.UUID] = field(default_factory=list)
    paths_gone: list[Path] = field(default_factory=list)
    paths_kept: list[Path] = field(default_factory=list)
    bytes_gone: int = 0


def _job(status: JobStatus, created: datetime, finished: datetime | None, attempts: int) -> Job:
    return Job(
        id=uuid.uuid4(),
        status=status,
        prompt="a red circle",
        steps=3,
        guidance=3.0,
        sampler="ddim",
        seed=1,
        width=32,
        height=32,
        num_images=2,
        owner="token:1",
        created_at=created,
        started_at=None if status is JobStatus.QUEUED else created,
        finished_at=finished,
        attempts=attempts,
    )


def _old_file(path: Path, data: bytes, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = time.time() - age
    for p in (path, path.parent):
        os.utime(p, (stamp, stamp))


def build_world(engine: Engine, storage: Storage, settings: Settings) -> World:
    now = utcnow()
    old, recent = now - timedelta(days=40), now - timedelta(days=1)
    w = World()

    def put(key: str, gone: bool, data: bytes = b"x" * 10) -> None:
        storage.put(key, data)
        (w.keys_gone if gone else w.keys_kept).add(key)
        if gone:
            w.bytes_gone += len(data)

    with session_scope(engine) as s:
        # Jobs: three ended long ago (one without finished_at), one lately, one running and one
        # queued since long ago.
        for status, created, finished, gone in (
            (JobStatus.SUCCEEDED, old, old, True),
            (JobStatus.FAILED, old, old + timedelta(minutes=1), True),
            (JobStatus.CANCELED, old, None, True),
            (JobStatus.SUCCEEDED, recent, recent, False),
            (JobStatus.RUNNING, old, None, False),
            (JobStatus.QUEUED, old, None, False),
        ):
            job = _job(status, created, finished, attempts=2)
            s.add(job)
            (w.jobs_gone if gone else w.jobs_kept).append(job.id)
            if status is JobStatus.QUEUED:
                continue
            if status in (JobStatus.SUCCEEDED, JobStatus.RUNNING):
                for i in range(2):
                    put(f"images/{job.id}/2/{i}.png", gone)
                    s.add(
                        Image(
                            job_id=job.id,
                            index=i,
                            storage_key=f"images/{job.id}/2/{i}.png",
                            width=32,
                            height=32,
                            seed=1 + i,
                            sha256="0" * 64,
                            bytes=10,
                        )
                    )
                put(f"images/{job.id}/1/0.png", gone)  # a half-stored earlier attempt
            put(f"previews/{job.id}/1.png", gone)
            put(f"previews/{job.id}/2.png", gone)
        s.flush()

        # Uploads: old ones named by a job that goes, by a queued job, and by none; a new one
        # named by none.
        def upload(created: datetime, gone: bool) -> uuid.UUID:
            upload_id = uuid.uuid4()
            key = f"uploads/{upload_id}.png"
            put(key, gone)
            s.add(Upload(id=upload_id, owner="token:1", storage_key=key, width=8, height=8,
                         bytes=10, sha256="0" * 64, created_at=created))  # fmt: skip
            if not gone:
                w.uploads_kept.append(upload_id)
            return upload_id

        s.get_one(Job, w.jobs_gone[0]).init_upload_id = upload(old, True)
        queued = s.get_one(Job, w.jobs_kept[2])
        assert queued.status is JobStatus.QUEUED
        queued.mask_upload_id = upload(old, False)
        upload(old, True)
        upload(recent, False)
        s.flush()

        # Model versions: the active denoiser, an inactive one, and the autoencoder the active
        # one was trained on, whose checkpoint lies under its run's prefix.
        ae_run, active_run, running_run, recent_run = (uuid.uuid4() for _ in range(4))
        active = ModelVersion(
            name="denoiser-active",
            kind=ModelKind.DENOISER,
            checkpoint_key="models/denoiser-active/1",
            is_active=True,
        )
        inactive = ModelVersion(
            name="denoiser-old", kind=ModelKind.DENOISER, checkpoint_key="models/denoiser-old/1"
        )
        ae = ModelVersion(
            name="autoencoder-1",
            kind=ModelKind.AUTOENCODER,
            checkpoint_key=f"runs/{ae_run}/1/final/",
        )
        s.add_all([active, inactive, ae])
        s.flush()
        for version in (active, inactive, ae):
            for f in ("model.json", "model.safetensors"):
                put(f"{version.checkpoint_key.rstrip('/')}/{f}", False)

        def run(
            run_id: uuid.UUID,
            status: JobStatus,
            finished: datetime | None,
            uri: str,
            **kw: Any,
        ) -> None:
            s.add(
                TrainingRun(
                    id=run_id,
                    status=status,
                    kind=kw.pop("kind", ModelKind.DENOISER),
                    created_by="token:1",
                    dataset={"kind": "s3", "uri": uri},
                    created_at=old,
                    finished_at=finished,
                    attempts=1,
                    **kw,
                )
            )
            s.flush()
            s.add_all(
                TrainingMetric(run_id=run_id, step=step, name="loss", value=1.0 / step)
                for step in range(1, 6)
            )

        run(ae_run, JobStatus.SUCCEEDED, old, "s3://data/ae", kind=ModelKind.AUTOENCODER)
        run(
            active_run,
            JobStatus.SUCCEEDED,
            old,
            "s3://data/old",
            model_version_id=active.id,
            autoencoder_version_id=ae.id,
        )
        run(running_run, JobStatus.RUNNING, None, "s3://data/live", autoencoder_version_id=ae.id)
        run(recent_run, JobStatus.SUCCEEDED, recent, "s3://data/recent")
        w.runs_stripped += [ae_run, active_run]
        w.runs_kept += [running_run, recent_run]
    for run_id, gone in ((ae_run, True), (active_run, True), (running_run, False)):
        put(f"runs/{run_id}/1/train_state/model.json", gone)
        put(f"runs/{run_id}/1/train_state/model.safetensors", gone, b"y" * 100)
    put(f"runs/{active_run}/samples.png", True)
    put(f"runs/{recent_run}/samples.png", False)

    # Local scratch: run directories, dataset caches and cached versions, all untouched for 40
    # days; what goes is what belongs to finished, old, unreferenced things.
    work, cache, age = Path(settings.work_dir), Path(settings.model_cache_dir), 40 * DAY

    def local(path: Path, gone: bool) -> None:
        _old_file(path / "state.bin", b"z" * 1000, age)
        (w.paths_gone if gone else w.paths_kept).append(path)
        if gone:
            w.bytes_gone += 1000

    local(work / "runs" / str(active_run), True)
    local(work / "runs" / str(running_run), False)
    local(work / "datasets" / dataset_cache_name("s3://data/old"), True)
    local(work / "datasets" / dataset_cache_name("s3://data/live"), False)
    local(work / "datasets" / dataset_cache_name("s3://data/recent"), False)
    local(cache / str(inactive.id), True)
    local(cache / str(active.id), False)
    local(cache / str(ae.id), False)  # the autoencoder of the active denoiser
    _old_file(cache / str(uuid.uuid4()) / "model.json", b"new", 0)  # used lately
    return w


def all_keys(storage: Storage) -> set[str]:
    return {key for key, _ in storage.list_sizes("")}


def assert_pruned(engine: Engine, storage: Storage, w: World) -> None:
    keys = all_keys(storage)
    assert keys & w.keys_gone == set()
    assert w.keys_kept <= keys
    with Session(engine) as s:
        jobs = set(s.scalars(select(Job.id)))
        assert jobs == set(w.jobs_kept)
        assert s.scalar(select(func.count()).select_from(Image).where(Image.job_id.in_(jobs))) == 4
        assert s.scalar(select(func.count()).select_from(Image)) == 4  # none left orphaned
        runs = set(s.scalars(select(TrainingRun.id)))
        assert runs == {*w.runs_stripped, *w.runs_kept}  # run rows always stay
        with_metrics = set(s.scalars(select(TrainingMetric.run_id).distinct()))
        assert with_metrics == set(w.runs_kept)
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 3
        assert set(s.scalars(select(Upload.id))) == set(w.uploads_kept)
    assert [p for p in w.paths_gone if p.exists()] == []
    assert [p for p in w.paths_kept if not p.exists()] == []


def expected_counts(w: World) -> dict[str, int]:
    return {
        "jobs": 3,
        "uploads": 2,
        "images": 3,  # two of this attempt, one of the first
        "previews": 6,
        "metric_rows": 10,
        "run_objects": 5,
        "work_dirs": 2,  # one run directory, one dataset cache
        "cache_dirs": 1,
        "bytes_freed": w.bytes_gone,
        "errors": 0,
    }


def test_prune_removes_what_ended_before_the_cutoff_and_nothing_still_referenced(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    storage = LocalStorage(tmp_path / "objects", secret=SECRET)
    w = build_world(engine, storage, settings)
    report = prune(engine, storage, settings, THIRTY_DAYS)
    assert report.complete and report.errors == []
    assert report.counts() == expected_counts(w)
    assert_pruned(engine, storage, w)
    # The emptied job directories go too, not only the files.
    assert not any((tmp_path / "objects" / "images" / str(j)).exists() for j in w.jobs_gone)
    with Session(engine) as s:
        events = s.scalars(select(AuditEvent)).all()
    assert [(e.actor, e.action, e.target) for e in events] == [
        ("cli", "prune", f"older than {THIRTY_DAYS}s")
    ]
    assert events[0].detail == expected_counts(w)
    # A second prune finds nothing more, and says so in its own audit row.
    again = prune(engine, storage, settings, THIRTY_DAYS)
    assert not again.removed_anything
    assert_pruned(engine, storage, w)


def test_a_dry_run_deletes_nothing_and_counts_what_the_real_run_removes(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    storage = LocalStorage(tmp_path / "objects", secret=SECRET)
    w = build_world(engine, storage, settings)
    keys_before = all_keys(storage)
    files_before = sorted(p for p in tmp_path.rglob("*") if "objects" not in p.parts)
    dry = prune(engine, storage, settings, THIRTY_DAYS, dry_run=True)
    assert all_keys(storage) == keys_before
    assert sorted(p for p in tmp_path.rglob("*") if "objects" not in p.parts) == files_before
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 6
        assert s.scalar(select(func.count()).select_from(TrainingMetric)) == 20
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 0  # no audit row
    real = prune(engine, storage, settings, THIRTY_DAYS)
    assert dry.counts() == real.counts() == expected_counts(w)


def test_a_prune_in_steps_of_one_small_batch_ends_where_one_big_pass_does(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    storage = LocalStorage(tmp_path / "objects", secret=SECRET)
    w = build_world(engine, storage, settings)
    pruner = Pruner(engine, storage, settings, THIRTY_DAYS, batch_size=1)
    steps = 1
    while not pruner.step(max_batches=1):
        steps += 1
    # 3 jobs, then per run 5 metric rows in 1-row batches plus the batch's objects, then the
    # dataset caches and the model cache: many steps, none of them big.
    assert steps > 10
    pruner.record("reaper")
    assert pruner.report.counts() == expected_counts(w)
    assert_pruned(engine, storage, w)


def test_prune_on_s3_over_http_leaves_what_is_referenced(
    tmp_path: Path, moto_endpoint: str
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    Base.metadata.create_all(engine)
    bucket = f"dq-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage = S3Storage(bucket, "prod", endpoint_url=moto_endpoint)
    settings = settings_for(tmp_path)
    w = build_world(engine, storage, settings)
    report = prune(engine, storage, settings, THIRTY_DAYS)
    assert report.counts() == expected_counts(w)
    assert_pruned(engine, storage, w)
    engine.dispose()


def test_s3_deletes_many_keys_in_requests_of_at_most_1000(moto_endpoint: str) -> None:
    bucket = f"dq-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage = S3Storage(bucket, "p", endpoint_url=moto_endpoint)
    for key in ("images/a/0.png", "images/a/1.png", "previews/a/1.png"):
        storage.put(key, b"x")
    sizes: list[int] = []
    delete_objects = storage.client.delete_objects

    def counted(**kw: Any) -> Any:
        sizes.append(len(kw["Delete"]["Objects"]))
        return delete_objects(**kw)

    storage.client.delete_objects = counted
    # Absent keys are no error: 1,001 keys, three of them there.
    storage.delete_many(
        ["images/a/0.png", *(f"images/b/{i}.png" for i in range(998)), "images/a/1.png", "x"]
    )
    assert sizes == [1000, 1]
    assert list(storage.list_sizes("")) == [("previews/a/1.png", 1)]


def test_the_reaper_prunes_when_retention_is_set_and_folds_status_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.db import dispose_engines
    from core.upkeep.reaper import run_reaper

    url = f"sqlite:///{tmp_path / 'dq.sqlite3'}"
    settings = settings_for(
        tmp_path,
        database_url=url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        retention=THIRTY_DAYS,
    )
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    storage = LocalStorage(tmp_path / "objects", secret=SECRET)
    w = build_world(engine, storage, settings)
    monkeypatch.chdir(tmp_path)
    try:
        run_reaper(settings, once=True)
    finally:
        dispose_engines()
    assert_pruned(engine, storage, w)
    with Session(engine) as s:
        events = s.scalars(select(AuditEvent)).all()
        assert [(e.actor, e.action) for e in events] == [("reaper", "prune")]
        assert events[0].detail == expected_counts(w)
        assert s.scalar(select(func.count()).select_from(StatusCountDelta)) == 0  # folded
    engine.dispose()


def test_the_reaper_starts_a_prune_at_most_hourly_and_spreads_it_over_passes(
    tmp_path: Path,
) -> None:
    from core.upkeep.reaper import RetentionSchedule

    engine = make_engine(f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    Base.metadata.create_all(engine)
    settings = settings_for(tmp_path, retention=THIRTY_DAYS)
    w = build_world(engine, LocalStorage(tmp_path / "objects", secret=SECRET), settings)
    schedule = RetentionSchedule(settings, engine)
    passes = 1
    while (report := schedule.run_pass(max_batches=1)) is None:
        passes += 1
    assert passes > 2 and report.counts() == expected_counts(w)
    assert schedule.run_pass() is None  # within the hour: no new prune
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 1
    assert RetentionSchedule(settings_for(tmp_path), engine).run_pass() is None  # retention off
    engine.dispose()


# --- the command --------------------------------------------------------------------------------


def dq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env |= {
        "DQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dq.sqlite3'}",
        "DQ_STORAGE_URL": f"file://{tmp_path / 'objects'}",
        "DQ_WORK_DIR": str(tmp_path / "work"),
        "DQ_MODEL_CACHE_DIR": str(tmp_path / "models"),
        "DQ_SECRET_KEY": SECRET,
    }
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_dq_prune_dry_run_prints_what_would_go_and_a_bad_duration_is_one_line(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    Base.metadata.create_all(engine)
    storage = LocalStorage(tmp_path / "objects", secret=SECRET)
    w = build_world(engine, storage, settings_for(tmp_path))
    keys_before = all_keys(storage)
    done = dq(tmp_path, "prune", "--older-than", "30d", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "would remove (finished more than 30d ago):"
    table = {line[:15].strip(): line[15:].split()[0] for line in lines[1:]}
    assert table == {
        "jobs": "3",
        "images": "3",
        "previews": "6",
        "metric rows": "10",
        "run objects": "5",
        "work dirs": "2",
        "cache dirs": "1",
        "bytes": str(w.bytes_gone),
    }
    assert all_keys(storage) == keys_before
    bad = dq(tmp_path, "prune", "--older-than", "30x")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "dq: error: --older-than '30x' is not valid: must be a duration such as 30d, 12h, 90m "
        "or 3600s"
    ]
    engine.dispose()


def test_the_lifecycle_rule_in_the_deploy_guide_is_accepted_by_s3(moto_endpoint: str) -> None:
    import json
    import re

    guide = (REPO / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", guide, re.S)
    rules = next(json.loads(b) for b in blocks if '"Rules"' in b)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"dq-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rules)
    got = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    expiry = {r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in got}
    assert expiry == {"prod/previews/": 1, "prod/images/": 30}
    for days, prefix in ((1, "prod/previews/"), (30, "prod/images/")):
        assert f'--prefix "{prefix}" --expire-days {days} local/dq-objects' in guide
