"""Generation jobs through real worker processes (``dq worker``), on both topologies."""

from __future__ import annotations

import hashlib
import io

from PIL import Image as PILImage

from core.db import JobStatus
from tests.conftest import make_tiny_pipeline
from tests.worker.conftest import Stack


def test_submitted_jobs_succeed_with_pngs_in_storage(stack: Stack) -> None:
    stack.start_worker()
    one = stack.submit("a small red circle in the center", seed=11, steps=8)
    two = stack.submit("a large blue square in the top left", seed=7, steps=8, num_images=2)
    for job_id, n in ((one, 1), (two, 2)):
        job = stack.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED)
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert (job.progress_step, job.progress_total, job.attempts) == (8, 8, 1)
        assert job.worker_host and job.started_at and job.finished_at
        assert [im.index for im in job.images] == list(range(n))
        for im in job.images:
            assert im.storage_key == f"images/{job_id}/1/{im.index}.png"  # attempt 1
            data = stack.storage.get(im.storage_key)
            assert hashlib.sha256(data).hexdigest() == im.sha256 and len(data) == im.bytes
            png = PILImage.open(io.BytesIO(data))
            assert png.format == "PNG" and png.size == (im.width, im.height) == (32, 32)
            assert png.info["seed"] == str(im.seed) == str(job.seed + im.index)

    # The stored image is exactly what the model makes in-process for that prompt and seed.
    expected = make_tiny_pipeline().generate(
        ["a large blue square in the top left"], steps=8, seeds=[8], guidance=4.0
    )[0]
    stored = PILImage.open(io.BytesIO(stack.storage.get(f"images/{two}/1/1.png"))).convert("RGB")
    assert stored.tobytes() == expected.tobytes()


def test_compatible_waiting_jobs_run_as_one_batch_with_identical_images(
    production_stack: Stack,
) -> None:
    stack = production_stack
    batched = [stack.submit(f"a small {c} circle in the center", seed=100 + i, steps=6)
               for i, c in enumerate(["red", "blue", "green", "white"])]  # fmt: skip
    other = stack.submit("a small red circle in the center", seed=100, steps=5)
    worker = stack.start_worker()
    for job_id in [*batched, other]:
        job = stack.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED)
        assert job.status is JobStatus.SUCCEEDED, job.error
    log = stack.log_text(worker)
    assert "running 4 job(s), 4 image(s): dpmpp-2m × 6 steps" in log
    assert "running 1 job(s), 1 image(s): dpmpp-2m × 5 steps" in log
    # Each batched image is the image its job would get alone.
    alone = make_tiny_pipeline().generate(
        ["a small green circle in the center"], steps=6, seeds=[102]
    )
    stored = stack.storage.get(f"images/{batched[2]}/1/0.png")
    assert PILImage.open(io.BytesIO(stored)).convert("RGB").tobytes() == alone[0].tobytes()
    # The other jobs' own messages arrived after their jobs were taken: acknowledged, no work.
    # The last of them may still be in hand when the last job has succeeded: wait for it.
    idle = "is not queued; message acknowledged without work"
    stack.wait_until(lambda: stack.log_text(worker).count(idle) >= 3, 30, "the spare messages")
    assert stack.log_text(worker).count(idle) == 3


def test_a_duplicate_message_runs_the_job_once(embedded_stack: Stack) -> None:
    stack = embedded_stack
    job_id = stack.submit(seed=5, steps=4)
    from core.queue.dispatch import publish_job

    assert publish_job(stack.engine, stack.publisher(), job_id, force=True)  # a second message
    worker = stack.start_worker()
    job = stack.wait_status(job_id, JobStatus.SUCCEEDED)
    stack.wait_for_log(worker, "is not queued; message acknowledged without work", timeout=30)
    assert job.attempts == 1 and len(job.images) == 1
    assert list(stack.storage.list(f"images/{job_id}/")) == [f"images/{job_id}/1/0.png"]


def test_cancel_stops_a_running_job_within_a_few_steps(production_stack: Stack) -> None:
    import time

    from sqlalchemy.orm import Session

    from core.services.jobs import cancel_job, get_job

    stack = production_stack
    stack.start_worker()
    job_id = stack.submit(steps=800, sampler="ddpm", num_images=4, seed=3)
    stack.wait_until(lambda: stack.job(job_id).progress_step > 0, 60, "the job to start")
    with Session(stack.engine) as s, s.begin():
        job = cancel_job(s, get_job(s, job_id, owner="token:1"))
        assert job.cancel_requested and job.status is JobStatus.RUNNING
    asked = time.monotonic()
    job = stack.wait_status(job_id, JobStatus.CANCELED, JobStatus.SUCCEEDED, timeout=30)
    assert job.status is JobStatus.CANCELED
    assert time.monotonic() - asked < 3
    assert job.progress_step < 800 and job.images == [] and job.finished_at is not None
    assert list(stack.storage.list(f"images/{job_id}/")) == []
    # The worker goes on to the next job.
    after = stack.wait_status(stack.submit(steps=3), JobStatus.SUCCEEDED)
    assert after.attempts == 1


def test_two_workers_on_one_queue_share_the_jobs(production_stack: Stack) -> None:
    stack = production_stack
    stack.start_workers(2, extra_env={"DQ_MAX_BATCH_SIZE": "1"})
    # Both are waiting on the queue: while one runs a job, the next message goes to the other.
    jobs = [stack.submit(steps=50, sampler="ddim", seed=i) for i in range(6)]
    hosts = {stack.wait_status(j, JobStatus.SUCCEEDED).worker_host for j in jobs}
    assert len(hosts) == 2


def test_a_pickled_message_is_refused_and_the_worker_goes_on(production_stack: Stack) -> None:
    stack = production_stack
    worker = stack.start_worker()
    job_id = stack.submit(steps=3, publish=False)
    app = stack.publisher().app
    app.send_task(
        "dq.generate", kwargs={"job_id": str(job_id)}, queue="generate", serializer="pickle"
    )
    stack.wait_for_log(worker, "untrusted content of type pickle", timeout=30)
    assert stack.job(job_id).status is JobStatus.QUEUED  # never ran
    from core.queue.dispatch import publish_job

    assert publish_job(stack.engine, stack.publisher(), job_id)  # the JSON message runs it
    assert stack.wait_status(job_id, JobStatus.SUCCEEDED).attempts == 1


def test_a_job_whose_worker_is_killed_succeeds_exactly_once(stack: Stack) -> None:
    import signal

    stack.start_reaper(wait=False)  # it starts while the worker does
    first = stack.start_worker()
    job_id = stack.submit(steps=300, sampler="ddpm", num_images=3, seed=9)
    stack.wait_until(lambda: stack.job(job_id).progress_step > 0, 60, "the job to start")
    stack.kill(first, signal.SIGKILL)
    assert stack.job(job_id).status is JobStatus.RUNNING  # the dead worker still holds it
    # Its lease runs out (2 s here), the reaper re-queues and re-publishes it, and a new worker
    # on any machine finishes it.
    stack.start_worker()
    job = stack.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED, timeout=120)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert [im.index for im in job.images] == [0, 1, 2]
    assert list(stack.storage.list(f"images/{job_id}/")) == [
        f"images/{job_id}/2/{i}.png" for i in range(3)
    ]


def test_a_model_version_without_a_checkpoint_fails_the_job_in_words(embedded_stack: Stack) -> None:
    from core.db import ModelKind, ModelVersion
    from core.db.session import session_scope
    from core.services.model_versions import activate_version

    stack = embedded_stack
    with session_scope(stack.engine) as s:
        broken = ModelVersion(name="broken", kind=ModelKind.DENOISER, checkpoint_key="models/gone",
                              config={"image_size": 32})  # fmt: skip
        s.add(broken)
        s.flush()
        activate_version(s, broken.id)
    stack.start_worker()
    job = stack.wait_status(stack.submit(steps=3), JobStatus.FAILED, JobStatus.SUCCEEDED)
    assert job.status is JobStatus.FAILED
    assert (
        job.error is not None and "model version 'broken' has no checkpoint in storage" in job.error
    )
    assert job.attempts == 1  # not retried: retrying cannot help


def test_activating_another_version_swaps_the_model_without_a_restart(
    embedded_stack: Stack,
) -> None:
    import json
    import uuid

    from core.db import ModelKind, ModelVersion
    from core.db.session import session_scope
    from core.services.model_versions import activate_version

    stack = embedded_stack
    stack.start_worker()
    before = stack.wait_status(stack.submit(seed=1, steps=4), JobStatus.SUCCEEDED)
    d = stack.tmp / "tiny2"
    make_tiny_pipeline(seed=1).save(d)
    for f in ("model.json", "model.safetensors"):
        stack.storage.put(f"models/tiny2/{f}", (d / f).read_bytes())
    with session_scope(stack.engine) as s:
        v = ModelVersion(id=uuid.uuid4(), name="tiny2", kind=ModelKind.DENOISER,
                         checkpoint_key="models/tiny2",
                         config=json.loads((d / "model.json").read_text()))  # fmt: skip
        s.add(v)
        s.flush()
        activate_version(s, v.id)
    after = stack.wait_status(stack.submit(seed=1, steps=4), JobStatus.SUCCEEDED)
    assert (before.model_version_id, after.model_version_id) == (stack.model_version_id, v.id)
    expected = make_tiny_pipeline(seed=1).generate(
        ["a small red circle in the center"], steps=4, seeds=[1]
    )[0]
    got = PILImage.open(io.BytesIO(stack.storage.get(after.images[0].storage_key))).convert("RGB")
    assert got.tobytes() == expected.tobytes()
    old = PILImage.open(io.BytesIO(stack.storage.get(before.images[0].storage_key))).convert("RGB")
    assert old.tobytes() != expected.tobytes()
