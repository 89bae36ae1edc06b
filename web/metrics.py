"""Prometheus metrics, read from the database and the broker at each scrape.

The database is the source of truth, so the numbers are the same whichever gunicorn process
answers the scrape. A scrape costs the same at a thousand jobs as at ten million: the counts by
status come from ``status_counts``, which database triggers keep (:mod:`core.db.counts`), and the
latency histogram reads the newest succeeded jobs through the (status, finished_at) index (and
the figures per model, for a canary against the active version, those and the newest failed).
``dq_dependency_up`` says whether the database, the broker and storage answer, from a probe at
most 10 s old (:class:`web.dependencies.CachedProbe`). When the database is down the scrape still
answers, with that gauge and without the figures read from the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Row, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import counts
from core.db.models import Job, JobStatus, ModelVersion
from core.queue.dispatch import QUEUE_GENERATE, QUEUE_TRAIN
from core.queue.eta import live_workers_by_precision
from core.services.model_versions import DEFAULT_MODEL_NAME
from web.dependencies import CachedProbe
from web.services import Services

log = logging.getLogger(__name__)

# Seconds from submission to the last image: a few seconds on a GPU, minutes on a busy CPU.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
LATENCY_WINDOW = 1000  # the most recent succeeded jobs that the histogram describes


class QueueCollector(Collector):
    def __init__(self, svc: Services):
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._from_database()
        except SQLAlchemyError as e:  # dq_dependency_up says so; the rest of the scrape stands
            log.warning("metrics: the database did not answer: %s", e)

        gauge = GaugeMetricFamily(
            "dq_queue_depth",
            "Task messages waiting in the broker's queue (absent when the broker cannot tell).",
            labels=["queue"],
        )
        for queue in (QUEUE_GENERATE, QUEUE_TRAIN):
            depth = self.svc.publisher.queue_depth(queue)
            if depth is not None:
                gauge.add_metric([queue], depth)
        yield gauge

    def _from_database(self) -> list[Metric]:
        with Session(self.svc.engine) as session:
            jobs = counts.read(session, "job")
            runs = counts.read(session, "run")
            finished = _newest(session, JobStatus.SUCCEEDED)
            failed = _newest(session, JobStatus.FAILED)
            precisions = live_workers_by_precision(session)

        job_gauge = GaugeMetricFamily("dq_jobs", "Generation jobs by status.", labels=["status"])
        for status, count in jobs.items():
            job_gauge.add_metric([status], count)
        run_gauge = GaugeMetricFamily(
            "dq_training_runs", "Training runs by status.", labels=["status"]
        )
        for status, count in runs.items():
            run_gauge.add_metric([status], count)

        buckets, total = _buckets(_latencies(finished))
        latency = HistogramMetricFamily(
            "dq_job_latency_seconds",
            f"Submission to finish of the last {LATENCY_WINDOW} succeeded jobs "
            "(recomputed from the database at each scrape).",
            buckets=buckets,
            sum_value=total,
        )
        workers = GaugeMetricFamily(
            "dq_workers_live",
            "Generation workers seen in the last minute, by the precision their models run in "
            "(DQ_PRECISION resolved for their device; unknown before a worker loads a model).",
            labels=["precision"],
        )
        for precision in sorted({"fp32", "bf16", "fp16", *precisions}):
            workers.add_metric([precision], precisions.get(precision, 0))
        return [job_gauge, run_gauge, latency, workers, *_per_model(finished, failed)]


def _newest(session: Session, status: JobStatus) -> list[Row[Any]]:
    """The last LATENCY_WINDOW jobs that ended in ``status``, with their model's name and pick:
    a range of the (status, finished_at) index and a lookup of each one's version."""
    return list(
        session.execute(
            select(Job.created_at, Job.finished_at, ModelVersion.name, Job.model_pick)
            .outerjoin(ModelVersion, Job.model_version_id == ModelVersion.id)
            .where(Job.status == status, Job.finished_at.is_not(None))
            .order_by(Job.finished_at.desc())
            .limit(LATENCY_WINDOW)
        ).all()
    )


def _latencies(rows: list[Row[Any]]) -> list[float]:
    return sorted((row[1] - row[0]).total_seconds() for row in rows if row[0] and row[1])


def _buckets(latencies: list[float]) -> tuple[list[tuple[str, float]], float]:
    buckets: list[tuple[str, float]] = []
    for bound in LATENCY_BUCKETS:
        buckets.append((str(float(bound)), sum(1 for s in latencies if s <= bound)))
    buckets.append(("+Inf", len(latencies)))
    return buckets, sum(latencies)


def _per_model(finished: list[Row[Any]], failed: list[Row[Any]]) -> list[Metric]:
    """Latency and outcomes per model and pick (named, default, canary; "" for jobs from before
    picks were kept), over the same windows: what a canary is judged by."""
    by_model: dict[tuple[str, str], dict[str, list[Row[Any]]]] = {}
    for status, rows in (("succeeded", finished), ("failed", failed)):
        for row in rows:
            key = (row[2] or DEFAULT_MODEL_NAME, row[3] or "")
            by_model.setdefault(key, {"succeeded": [], "failed": []})[status].append(row)
    latency = HistogramMetricFamily(
        "dq_model_job_latency_seconds",
        f"Submission to finish of the last {LATENCY_WINDOW} succeeded jobs, per model and pick.",
        labels=["model", "pick"],
    )
    outcomes = GaugeMetricFamily(
        "dq_model_jobs_recent",
        f"Of the last {LATENCY_WINDOW} succeeded and the last {LATENCY_WINDOW} failed jobs, "
        "how many ran on each model, by pick and status.",
        labels=["model", "pick", "status"],
    )
    for (model, pick), rows in sorted(by_model.items()):
        buckets, total = _buckets(_latencies(rows["succeeded"]))
        latency.add_metric([model, pick], buckets, total)
        for status, found in rows.items():
            outcomes.add_metric([model, pick, status], len(found))
    return [latency, outcomes]


class DependencyCollector(Collector):
    def __init__(self, probe: CachedProbe):
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "dq_dependency_up",
            "1 when the dependency answered its last probe (at most 10 s old), else 0.",
            labels=["dependency"],
        )
        for name, state in self.probe.get().items():
            gauge.add_metric([name], 1 if state.ok else 0)
        yield gauge


def make_registry(svc: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(svc))
    registry.register(DependencyCollector(CachedProbe(svc)))
    return registry
