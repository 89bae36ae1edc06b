"""Running training runs: claim, fetch data, train with checkpoints in object storage, register
the result as a model version.

A run checkpoints to ``runs/<id>/<attempt>/train_state/`` in object storage as it goes, and
points the run's ``checkpoint_keys`` at it. When its worker dies, the reaper re-queues it and the
next worker, on any machine, fetches that state and goes on from the last checkpoint, not from
step 0; the batches it then sees are exactly those an unbroken run would have seen
(core/diffusion/training/datasets.py). A run past DQ_TRAIN_TIME_LIMIT_SECONDS checkpoints and
goes back to the queue the same way.

Every write carries the claim's fencing token (``core.db.transitions``). A trainer that stalled
past its lease and lost the run writes no metric, no checkpoint pointer and no model version; its
files go under its own attempt's keys and directory, so they never replace the holder's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from core.db.models import JobStatus, ModelKind, ModelVersion, TrainingMetric, TrainingRun
from core.db.session import session_scope
from core.db.transitions import (
    Lease,
    LeaseLost,
    claim,
    db_now,
    finish,
    requeue,
    still_held,
    update_held,
)
from core.queue.dispatch import publish_run
from core.services.audit import record
from core.services.model_rollout import GateBounds, GateRefused, activate_checked
from core.services.model_versions import DEFAULT_MODEL_DIR
from core.services.training_runs import CONFIG_DIR
from core.storage import S3Storage, Storage
from core.storage.checkpoints import CHECKPOINT_FILES, fetch_checkpoint
from worker.context import WorkerContext
from worker.generation import TRANSIENT

log = logging.getLogger(__name__)

STATE_FILES = ("train_state/model.json", "train_state/model.safetensors")
METRICS = ("loss", "lr", "grad_norm", "samples_per_s")


class TrainingCanceled(Exception):
    pass


@dataclass
class RunSpec:
    lease: Lease
    kind: ModelKind
    config: dict[str, Any]
    dataset: dict[str, Any]
    autoencoder_version_id: uuid.UUID | None
    total_steps: int
    checkpoint_keys: list[str]

    @property
    def id(self) -> uuid.UUID:
        return self.lease.id

    @property
    def attempts(self) -> int:
        return self.lease.token

    @property
    def prefix(self) -> str:
        """This attempt's objects: a trainer that lost the run cannot touch the holder's."""
        return f"runs/{self.id}/{self.attempts}"


def claim_run(ctx: WorkerContext, run_id: uuid.UUID) -> RunSpec | None:
    with session_scope(ctx.engine) as s:
        lease = claim(
            s,
            TrainingRun,
            run_id,
            host=ctx.host,
            lease_seconds=ctx.settings.job_lease_seconds,
            time_limit_seconds=ctx.settings.train_time_limit_seconds,
            started_at=func.coalesce(TrainingRun.started_at, db_now()),
        )
        if lease is None:
            return None
        run = s.get(TrainingRun, run_id)
        assert run is not None
        return RunSpec(
            lease=lease,
            kind=run.kind,
            config=dict(run.config),
            dataset=dict(run.dataset),
            autoencoder_version_id=run.autoencoder_version_id,
            total_steps=run.total_steps,
            checkpoint_keys=list(run.checkpoint_keys or []),
        )


# --- data -------------------------------------------------------------------------------------


def resolve_dataset(ctx: WorkerContext, spec: RunSpec) -> dict[str, Any]:
    """The ``[data]`` table for the run's dataset; remote image folders are fetched first."""
    ds = spec.dataset
    if ds["kind"] == "shapes":
        return {k: v for k, v in ds.items()}
    if ds["kind"] == "path":
        root = Path(ctx.settings.data_root).resolve()
        path = (root / ds["path"]).resolve()
        if root not in path.parents and path != root:
            raise ValueError(f"dataset path {ds['path']!r} leaves the data root")
        if not (path / "metadata.jsonl").is_file():
            raise ValueError(
                f"dataset path {ds['path']!r} holds no metadata.jsonl under the data root"
            )
        return {"kind": "imagefolder", "path": str(path)}
    if ds["kind"] == "s3":
        bucket, _, prefix = ds["uri"][len("s3://") :].partition("/")
        source = S3Storage(
            bucket,
            prefix,
            endpoint_url=ctx.settings.s3_endpoint_url,
            region=ctx.settings.s3_region,
        )
        dest = (
            Path(ctx.settings.work_dir)
            / "datasets"
            / hashlib.sha256(ds["uri"].encode()).hexdigest()[:16]
        )
        fetch_folder(source, dest)
        if not (dest / "metadata.jsonl").is_file():
            raise ValueError(f"{ds['uri']} holds no metadata.jsonl")
        return {"kind": "imagefolder", "path": str(dest)}
    raise ValueError(f"unknown dataset kind {ds['kind']!r}")


def fetch_folder(source: Storage, dest: Path) -> None:
    """Copy every object of ``source`` into ``dest`` (keys are validated, so none escapes)."""
    dest.mkdir(parents=True, exist_ok=True)
    for key in source.list(""):
        target = dest / key
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.write_bytes(source.get(key))
        tmp.replace(target)


# --- the run ---------------------------------------------------------------------------------


class RunRecorder:
    """Metrics rows, cancel checks and checkpoint uploads of one run, from the training loop."""

    def __init__(self, ctx: WorkerContext, spec: RunSpec, out: Path, every: int):
        self.ctx = ctx
        self.spec = spec
        self.out = out
        self.every = every
        self.pending: list[TrainingMetric] = []

    def _check_lease(self) -> None:
        if self.spec.id in self.ctx.heartbeat.lost():
            raise LeaseLost(self.spec.lease)

    def on_metrics(self, last: dict[str, float]) -> None:
        self._check_lease()
        step = int(last["step"])
        if step % self.every and step != self.spec.total_steps:
            return
        rows = [
            TrainingMetric(run_id=self.spec.id, step=step, name=name, value=float(last[name]))
            for name in METRICS
            if name in last
        ]
        with session_scope(self.ctx.engine) as s:
            if not update_held(s, self.spec.lease, step=step):
                raise LeaseLost(self.spec.lease)  # rolls back: no metric rows either
            s.add_all(rows)
            cancel = s.scalar(
                select(TrainingRun.cancel_requested).where(TrainingRun.id == self.spec.id)
            )
        if cancel:
            raise TrainingCanceled

    def pause_requested(self) -> bool:
        """Past the time limit: the loop checkpoints, and the run goes back to the queue."""
        return self.ctx.watchdog.past_deadline()

    def on_checkpoint(self, step: int) -> None:
        self._check_lease()
        with session_scope(self.ctx.engine) as s:
            if not still_held(s, self.spec.lease):
                raise LeaseLost(self.spec.lease)
        storage = self.ctx.storage
        keys = []
        for rel in (*STATE_FILES, *CHECKPOINT_FILES):
            path = self.out / rel
            if path.is_file():
                key = f"{self.spec.prefix}/{rel}"
                storage.put(key, path.read_bytes())
                keys.append(key)
        with session_scope(self.ctx.engine) as s:
            # The pointer moves only while this attempt holds the run.
            if not update_held(s, self.spec.lease, checkpoint_keys=keys, step=step):
                raise LeaseLost(self.spec.lease)
        log.info("run %s: checkpoint at step %d uploaded", self.spec.id, step)


def fetch_state(ctx: WorkerContext, spec: RunSpec, out: Path) -> int:
    """Bring the run's last checkpoint from storage to ``out`` (another machine may have made it),
    from where the run's ``checkpoint_keys`` point. Returns the step it holds, 0 when none."""
    state = out / "train_state" / "model.json"
    pointed = {key.split("/", 3)[3]: key for key in spec.checkpoint_keys if key.count("/") >= 3}
    if not state.is_file() and all(rel in pointed for rel in STATE_FILES):
        for rel in STATE_FILES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(ctx.storage.get(pointed[rel]))
    if not state.is_file():
        return 0
    return int(json.loads(state.read_text()).get("step", 0))


def train(ctx: WorkerContext, spec: RunSpec) -> None:
    import torch

    from core.diffusion.training.config import (
        AutoencoderTrainConfig,
        DenoiserTrainConfig,
        load_config,
    )

    # A directory per attempt: a stalled trainer of an earlier attempt on this machine never
    # writes into the holder's files.
    out = Path(ctx.settings.work_dir) / "runs" / str(spec.id) / str(spec.attempts)
    out.mkdir(parents=True, exist_ok=True)
    resumed_at = fetch_state(ctx, spec, out)
    with session_scope(ctx.engine) as s:
        if not update_held(s, spec.lease, step=resumed_at):
            raise LeaseLost(spec.lease)
        # Metrics past the checkpoint are recorded again as the run repeats those steps.
        s.execute(
            delete(TrainingMetric).where(
                TrainingMetric.run_id == spec.id, TrainingMetric.step > resumed_at
            )
        )
    if resumed_at:
        log.info("run %s resumes from step %d", spec.id, resumed_at)

    overrides = {k: v for k, v in spec.config.items() if isinstance(v, dict)}
    overrides["data"] = {**overrides.get("data", {}), **resolve_dataset(ctx, spec)}
    device = torch.device(ctx.settings.device) if ctx.settings.device else None
    recorder = RunRecorder(ctx, spec, out, every=max(1, min(10, spec.total_steps // 20)))
    hooks: dict[str, Any] = dict(
        resume=True,
        on_metrics=recorder.on_metrics,
        progress=False,
        device=device,
        on_checkpoint=recorder.on_checkpoint,
        pause_requested=recorder.pause_requested,
    )
    if spec.kind is ModelKind.AUTOENCODER:
        from core.diffusion.training.autoencoder import train_autoencoder

        cfg = load_config(AutoencoderTrainConfig, CONFIG_DIR / "autoencoder.toml", overrides)
        result, summary = train_autoencoder(cfg, out, **hooks)
        summary = {**summary, **end_of_run_eval(ctx, spec, out, cfg.data)}
    else:
        from core.diffusion.training.denoiser import train_denoiser

        finetune = spec.config.get("finetune")
        if finetune:
            cfg = load_config(DenoiserTrainConfig, CONFIG_DIR / "finetune.toml", overrides)
            base_dir = fetch_base(ctx, spec.config.get("base_version_id"))
            result, summary = train_denoiser(cfg, None, out, base_dir=base_dir, **hooks)
        else:
            cfg = load_config(DenoiserTrainConfig, CONFIG_DIR / "denoiser.toml", overrides)
            result, summary = train_denoiser(cfg, autoencoder_dir(ctx, spec), out, **hooks)
        summary = {**summary, **end_of_run_eval(ctx, spec, out, overrides["data"])}
    summary = {
        **summary,
        "final_loss": result.last_metrics.get("loss"),
        "resumed_from_step": resumed_at,
    }
    register(ctx, spec, out, summary)


def autoencoder_dir(ctx: WorkerContext, spec: RunSpec) -> Path:
    """The autoencoder a from-scratch denoiser run trains on: the run's version, or the
    default model's."""
    ae_dir = DEFAULT_MODEL_DIR
    if spec.autoencoder_version_id is not None:
        with session_scope(ctx.engine) as s:
            ae = s.get(ModelVersion, spec.autoencoder_version_id)
            if ae is None:
                raise ValueError("the run's autoencoder version no longer exists")
            prefix = ae.checkpoint_key
        ae_dir = fetch_checkpoint(
            ctx.storage, prefix, Path(ctx.settings.model_cache_dir) / str(ae.id)
        )
    return ae_dir


def fetch_base(ctx: WorkerContext, version_id: str | None) -> Path:
    """The checkpoint a fine-tune starts from: the shipped default (``None``) or a version's."""
    if version_id is None:
        return DEFAULT_MODEL_DIR
    with session_scope(ctx.engine) as s:
        base = s.get(ModelVersion, uuid.UUID(str(version_id)))
        if base is None:
            raise ValueError("the run's base version no longer exists")
        prefix = base.checkpoint_key
    return fetch_checkpoint(ctx.storage, prefix, Path(ctx.settings.model_cache_dir) / str(base.id))


def end_of_run_eval(ctx: WorkerContext, spec: RunSpec, out: Path, data: Any) -> dict[str, Any]:
    """The quick eval of the new model (``core.diffusion.eval.quick``: a denoiser's FID and
    adherence, an autoencoder's reconstruction FID and PSNR) as ``{"eval": ...}`` for the
    version's metrics, or ``{"eval_error": ...}`` when its data cannot give one (an image
    folder of one image): the run still succeeds, and activation sees no eval. ``data`` is the
    run's ``[data]`` table for a denoiser, its ``DataConfig`` for an autoencoder."""
    from core.diffusion.eval import quick

    reference = spec.dataset.get("uri") or spec.dataset.get("path")
    device = ctx.settings.device or None
    try:
        n = ctx.settings.train_eval_images
        if spec.kind is ModelKind.AUTOENCODER:
            figures = quick.autoencoder_quick_eval(out, data, reference, n=n, device=device)
        else:
            figures = quick.quick_eval(out, data, reference, n=n, device=device)
    except ValueError as e:
        log.warning("run %s: no quick eval: %s", spec.id, e)
        return {"eval_error": str(e)}
    log.info("run %s: quick eval %s", spec.id, figures)
    return {"eval": figures}


def register(ctx: WorkerContext, spec: RunSpec, out: Path, summary: dict[str, Any]) -> None:
    """Upload the final checkpoint as a model version and finish the run."""
    name = f"{spec.kind.value}-{spec.id.hex[:8]}"
    prefix = f"models/{name}/{spec.attempts}"
    with session_scope(ctx.engine) as s:
        if not still_held(s, spec.lease):
            raise LeaseLost(spec.lease)
    for f in CHECKPOINT_FILES:
        ctx.storage.put(f"{prefix}/{f}", (out / f).read_bytes())
    config = json.loads((out / "model.json").read_text())
    try:
        with session_scope(ctx.engine) as s:
            # The fenced UPDATE first: it locks the run's row, so of two trainers that both
            # reach the end, only the holder registers a version.
            if not finish(s, spec.lease, JobStatus.SUCCEEDED, step=spec.total_steps):
                raise _NotRegistered
            version = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if version is None:  # a retry after a crash right here finds it registered
                version = ModelVersion(
                    id=uuid.uuid4(),
                    name=name,
                    kind=spec.kind,
                    checkpoint_key=prefix,
                    config=config,
                    metrics={k: v for k, v in summary.items() if v is not None},
                )
                s.add(version)
                s.flush()
            if spec.config.get("activate"):
                _activate_behind_the_gate(ctx, s, spec, version)
            s.execute(
                update(TrainingRun)
                .where(TrainingRun.id == spec.id)
                .values(model_version_id=version.id)
                .execution_options(synchronize_session=False)
            )
    except _NotRegistered:
        log.info("run %s was canceled or lost at the very end; no version kept", spec.id)
        return
    log.info("run %s registered model version %s", spec.id, name)
    # The sample grid has one well-known key per run, so it is written only now that this worker
    # has committed the run's end: a trainer that lost the run never gets here.
    if (out / "samples.png").is_file():
        try:
            ctx.storage.put(
                f"runs/{spec.id}/samples.png", (out / "samples.png").read_bytes(), "image/png"
            )
        except TRANSIENT:
            log.warning("run %s: the sample grid could not be stored", spec.id, exc_info=True)


class _NotRegistered(Exception):
    pass


def _activate_behind_the_gate(
    ctx: WorkerContext, session: Session, spec: RunSpec, version: ModelVersion
) -> None:
    """A run submitted with ``activate`` serves its version only if the eval gate passes it,
    as an admin's activation would (core.services.model_rollout); otherwise the version stays
    registered and inactive, and what the gate found is kept on it (metrics.activation) and in
    the audit log, for an admin to activate with force."""
    try:
        _, result = activate_checked(session, version.id, GateBounds.of(ctx.settings))
    except GateRefused as refused:
        version.metrics = {
            **(version.metrics or {}),
            "activation": {"refused": True, "findings": refused.result.findings},
        }
        log.warning("run %s: version %s not activated: %s", spec.id, version.name, refused)
        result = refused.result
    record(
        session,
        "worker",
        "model.activate",
        f"model:{version.id}",
        detail={
            "name": version.name,
            "kind": version.kind.value,
            "run": str(spec.id),
            "activated": result.passed,
            "forced": False,
            "gate": result.as_dict(),
        },
    )


def finish_run(ctx: WorkerContext, spec: RunSpec, status: JobStatus, error: str | None) -> None:
    with session_scope(ctx.engine) as s:
        if not finish(s, spec.lease, status, error=error):
            log.warning("lost run %s before it could be marked %s", spec.id, status.value)


def requeue_run(ctx: WorkerContext, spec: RunSpec) -> None:
    """Back to the queue, to resume from the checkpoint its ``checkpoint_keys`` point at."""
    with session_scope(ctx.engine) as s:
        moved = requeue(s, spec.lease)
    if moved:
        try:
            publish_run(ctx.engine, ctx.publisher, spec.id)
        except Exception:
            log.warning("could not re-publish run %s; the relay will", spec.id, exc_info=True)


def retry_or_fail_run(ctx: WorkerContext, spec: RunSpec, error: Exception) -> None:
    if spec.attempts >= ctx.settings.job_max_attempts:
        finish_run(ctx, spec, JobStatus.FAILED, f"failed after {spec.attempts} attempts: {error}")
    else:
        requeue_run(ctx, spec)


def run_training(ctx: WorkerContext, run_id: uuid.UUID) -> bool:
    """The body of the ``dq.train`` task. Returns False when the message had nothing to do."""
    from core.diffusion.checkpoint import CheckpointError
    from core.diffusion.training.loop import TrainingPaused

    spec = claim_run(ctx, run_id)
    if spec is None:
        log.info("run %s is not queued; message acknowledged without work", run_id)
        return False
    ctx.heartbeat.hold(spec.lease)
    limit = ctx.settings.train_time_limit_seconds
    # Stuck for good past the limit: back to the queue from the last checkpoint.
    ctx.watchdog.begin(f"training run {spec.id}", limit, lambda: requeue_run(ctx, spec))
    try:
        train(ctx, spec)
    except LeaseLost as e:
        log.warning("%s: another worker holds the run now; this one stops and writes nothing", e)
    except TrainingPaused as e:
        log.warning(
            "run %s ran past its %d s time limit; checkpointed at step %d and re-queued",
            spec.id,
            limit,
            e.step,
        )
        requeue_run(ctx, spec)
    except TrainingCanceled:
        finish_run(ctx, spec, JobStatus.CANCELED, None)
    except TRANSIENT as e:
        log.warning("run %s hit a transient error: %s", spec.id, e)
        retry_or_fail_run(ctx, spec, e)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        finish_run(ctx, spec, JobStatus.FAILED, f"the run's configuration or data was refused: {e}")
    except FloatingPointError as e:
        finish_run(
            ctx, spec, JobStatus.FAILED, f"training diverged: {e}; try a lower learning rate"
        )
    except Exception as e:
        log.exception("run %s failed", spec.id)
        finish_run(
            ctx, spec, JobStatus.FAILED, f"internal error in the worker: {type(e).__name__}: {e}"
        )
    finally:
        ctx.watchdog.end()
        ctx.heartbeat.release(spec.id)
    return True
