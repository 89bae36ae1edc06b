"""Training runs through a real worker on the ``train`` queue: metrics, checkpoints, model
versions, resume after a kill, and a trained version serving jobs."""

from __future__ import annotations

import signal
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import JobStatus, ModelKind, ModelVersion, TrainingMetric, TrainingRun
from core.db.session import session_scope
from core.queue.dispatch import publish_run
from core.services.training_runs import submit_training_run
from tests.worker.conftest import Stack

TINY_AE = {"model": {"channels": [8, 16], "groups": 4}}
TINY_DENOISER = {
    "text": {"width": 32, "layers": 1, "heads": 2, "max_length": 16},
    "unet": {
        "channels": [16, 32],
        "attention_levels": [False, True],
        "heads": 2,
        "context_width": 32,
        "groups": 8,
    },
}


def submit_run(stack: Stack, kind: str, train: dict[str, Any], **kw: Any) -> uuid.UUID:
    tables = TINY_AE if kind == "autoencoder" else TINY_DENOISER
    with session_scope(stack.engine) as s:
        run = submit_training_run(
            s,
            stack.settings,
            kind=kind,
            dataset={"kind": "shapes", "image_size": 32, "seed": 3},
            config={"train": {"batch_size": 8, "warmup_steps": 2, **train}, **tables},
            created_by="token:admin",
            **kw,
        )
        run_id = run.id
    stack.publish(TrainingRun, run_id)
    return run_id


def metric_steps(stack: Stack, run_id: uuid.UUID, name: str = "loss") -> list[int]:
    with Session(stack.engine) as s:
        return list(
            s.scalars(
                select(TrainingMetric.step)
                .where(TrainingMetric.run_id == run_id, TrainingMetric.name == name)
                .order_by(TrainingMetric.step)
            )
        )


def wait_run(stack: Stack, run_id: uuid.UUID, timeout: float = 180) -> Any:
    done = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
    stack.wait_until(lambda: stack.run(run_id).status in done, timeout, "the run to end")
    return stack.run(run_id)


def test_trained_versions_register_and_the_activated_one_serves_jobs(stack: Stack) -> None:
    stack.start_worker(queues="generate,train")
    ae_run = submit_run(stack, "autoencoder", {"steps": 30, "checkpoint_every": 10})
    run = wait_run(stack, ae_run)
    assert run.status is JobStatus.SUCCEEDED, run.error
    assert metric_steps(stack, ae_run) == list(range(1, 31))  # every step of a 30-step run
    assert f"runs/{ae_run}/1/train_state/model.safetensors" in run.checkpoint_keys
    assert run.step == run.total_steps == 30 and run.attempts == 1
    with Session(stack.engine) as s:
        ae = s.get(ModelVersion, run.model_version_id)
        assert ae is not None and ae.kind is ModelKind.AUTOENCODER and not ae.is_active
        assert 0 < ae.metrics["heldout_psnr_db"] < 60 and ae.metrics["latent_scale_factor"] > 0
        recon = ae.metrics["eval"]  # its quick eval: reconstruction FID and PSNR
        assert recon["kind"] == "reconstruction" and recon["n"] == 8 and recon["fid"] >= 0
        assert recon["reference"] == "shapes held-out split, seed 3" and recon["psnr_db"] > 0
        assert stack.storage.exists(f"{ae.checkpoint_key}/model.safetensors")

    # A denoiser on that autoencoder, activated at the end: new jobs run on it. It trains with
    # the shipped config's binding options (layout head, text-side grounding), its text
    # pretraining cut short.
    den_run = submit_run(
        stack, "denoiser", {"steps": 20, "checkpoint_every": 10, "text_pretrain_steps": 20},
        autoencoder_version_id=ae.id, activate=True,
    )  # fmt: skip
    run = wait_run(stack, den_run)
    assert run.status is JobStatus.SUCCEEDED, run.error
    assert stack.storage.exists(f"runs/{den_run}/samples.png")
    with Session(stack.engine) as s:
        den = s.get(ModelVersion, run.model_version_id)
        assert den is not None and den.is_active and den.metrics["final_loss"] > 0
        assert den.config["text_encoder"]["layout"] and den.config["unet"]["layout_bias"]
        assert den.metrics["eval"]["n"] == 8  # DQ_TRAIN_EVAL_IMAGES in these tests
        assert den.metrics["eval"]["reference"] == "shapes eval stream, seed 0"
        assert 0 <= den.metrics["eval"]["adherence"] <= 1 and den.metrics["eval"]["fid"] > 0
    job = stack.wait_status(stack.submit(steps=4, seed=2), JobStatus.SUCCEEDED, JobStatus.FAILED)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.model_version_id == den.id and job.images[0].width == 32

    # A fine-tune of that version, its text encoder frozen: the new version records its base
    # and ends with its own quick eval; its architecture is the base's.
    with session_scope(stack.engine) as s:
        ft = submit_training_run(
            s, stack.settings, kind="denoiser",
            dataset={"kind": "shapes", "image_size": 32, "seed": 4},
            config={"train": {"steps": 4, "batch_size": 8, "warmup_steps": 1}},
            created_by="token:admin", base_version=den.name, freeze_text_encoder=True,
        )  # fmt: skip
        ft_id = ft.id
    stack.publish(TrainingRun, ft_id)
    run = wait_run(stack, ft_id)
    assert run.status is JobStatus.SUCCEEDED, run.error
    with Session(stack.engine) as s:
        tuned = s.get(ModelVersion, run.model_version_id)
        assert tuned is not None and tuned.metrics["finetune"]["base_version"] == den.name
        assert tuned.metrics["eval"]["n"] == 8 and tuned.config["training"]["finetune"]
        assert tuned.config["text_encoder"] == den.config["text_encoder"]


def test_a_killed_training_run_resumes_from_its_checkpoint(stack: Stack) -> None:
    stack.start_reaper(wait=False)  # it starts while the worker does
    first = stack.start_worker(queues="train")
    # Killed within moments of its first checkpoint (step 20), the first worker is far from
    # the end; the second one trains the rest.
    run_id = submit_run(stack, "autoencoder", {"steps": 100, "checkpoint_every": 20})
    stack.wait_until(lambda: bool(stack.run(run_id).checkpoint_keys), 120, "a first checkpoint")
    stack.kill(first, signal.SIGKILL)
    checkpointed = stack.run(run_id).step
    second = stack.start_worker(queues="train")
    run = wait_run(stack, run_id, timeout=240)
    assert run.status is JobStatus.SUCCEEDED, run.error
    assert run.attempts == 2
    log = stack.log_text(second)
    resumed = int(log.split(f"run {run_id} resumes from step ")[1].split()[0])
    assert resumed >= 20 and resumed % 20 == 0 and resumed <= checkpointed + 20
    with Session(stack.engine) as s:
        version = s.get(ModelVersion, run.model_version_id)
        assert version is not None and version.metrics["resumed_from_step"] == resumed
    steps = metric_steps(stack, run_id)
    assert steps == sorted(set(steps)) and steps[-1] == 100  # no step recorded twice


def test_cancel_stops_a_training_run(embedded_stack: Stack) -> None:
    stack = embedded_stack
    stack.start_worker(queues="train")
    run_id = submit_run(stack, "autoencoder", {"steps": 5000, "checkpoint_every": 1000})
    stack.wait_until(lambda: stack.run(run_id).step > 0, 120, "the run to start")
    with session_scope(stack.engine) as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        run.cancel_requested = True
    run = wait_run(stack, run_id, timeout=60)
    assert run.status is JobStatus.CANCELED and run.step < 5000 and run.model_version_id is None


def test_a_bad_dataset_path_fails_the_run_in_words(embedded_stack: Stack) -> None:
    stack = embedded_stack
    stack.start_worker(queues="train")
    with session_scope(stack.engine) as s:
        run = submit_training_run(
            s, stack.settings, kind="autoencoder", dataset={"kind": "path", "path": "nothing/here"},
            config={"train": {"steps": 5}, **TINY_AE}, created_by="token:admin",
        )  # fmt: skip
        run_id = run.id
    publish_run(stack.engine, stack.publisher(), run_id)
    run = wait_run(stack, run_id, timeout=60)
    assert run.status is JobStatus.FAILED
    assert run.error == (
        "the run's configuration or data was refused: "
        "dataset path 'nothing/here' holds no metadata.jsonl under the data root"
    )
