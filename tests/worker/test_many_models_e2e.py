"""Many models at once, end to end: two real workers (``dq worker``), three model versions and
mixed jobs against PostgreSQL, Redis and S3; each image comes from the version its job
recorded."""

from __future__ import annotations

import io
import json
import random

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from core.db import JobStatus, ModelKind, ModelVersion
from core.db.session import session_scope
from tests.conftest import make_tiny_pipeline
from tests.worker.conftest import Stack
from tests.worker.test_model_affinity import tiny_files

STEPS = 4
PROMPTS = ("a small red circle in the center", "a large blue square in the top left")


def test_two_workers_run_mixed_jobs_each_on_the_version_it_recorded(
    production_stack: Stack,
) -> None:
    stack = production_stack
    names = {seed: f"tiny-seed-{seed}" for seed in range(3)}
    with session_scope(stack.engine) as s:
        for seed, name in names.items():
            files = tiny_files(seed)  # three versions that differ in every weight
            for f, data in files.items():
                stack.storage.put(f"models/{name}/{f}", data)
            s.add(
                ModelVersion(
                    name=name,
                    kind=ModelKind.DENOISER,
                    checkpoint_key=f"models/{name}",
                    config=json.loads(files["model.json"]),
                )
            )
    # Each worker's budget holds two of the three versions, so the caches also evict.
    workers = stack.start_workers(2, extra_env={"DQ_WORKER_MODEL_MEMORY_MB": "3"})

    rng = random.Random(27)
    plan = [(rng.randrange(3), PROMPTS[i % 2], 50 + i) for i in range(12)]
    jobs = [
        stack.submit(prompt, model=names[seed], seed=job_seed, steps=STEPS, guidance=4.0)
        for seed, prompt, job_seed in plan
    ]
    assert {seed for seed, _, _ in plan} == {0, 1, 2}

    pipelines = {seed: make_tiny_pipeline(seed) for seed in names}
    # The versions make different images from one prompt and seed: a match names its version.
    firsts = [p.generate([PROMPTS[0]], steps=STEPS, seeds=[0])[0] for p in pipelines.values()]
    assert len({image.tobytes() for image in firsts}) == 3

    with Session(stack.engine) as s:
        version_ids = {v.name: v.id for v in s.query(ModelVersion)}
    for job_id, (seed, prompt, job_seed) in zip(jobs, plan, strict=True):
        job = stack.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED)
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.model_version_id == version_ids[names[seed]]  # the version it recorded
        (image,) = job.images
        png = PILImage.open(io.BytesIO(stack.storage.get(image.storage_key)))
        assert png.info["model"] == names[seed]
        stored = np.asarray(png.convert("RGB"), dtype=np.int16)
        # Its distance to what each version makes in-process for its prompt and seed: none to
        # its own (at most a step of rounding: this process runs other thread counts), far from
        # the others'.
        distance = {
            other: np.abs(stored - np.asarray(p.generate([prompt], steps=STEPS, seeds=[job_seed],
                                                        guidance=4.0)[0], dtype=np.int16))
            for other, p in pipelines.items()
        }  # fmt: skip
        assert distance[seed].max() <= 2, distance[seed].max()
        others = [float(d.mean()) for other, d in distance.items() if other != seed]
        assert min(others) > 10 * max(float(distance[seed].mean()), 0.1), (seed, others)

    logs = [stack.log_text(w) for w in workers]
    loaded = {name for name in names.values() for log in logs if f"'{name}' from" in log}
    assert loaded == set(names.values())
