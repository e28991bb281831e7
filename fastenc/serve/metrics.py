"""Prometheus metrics of one server (its own registry, so several servers in one process never mix).

``fastenc_requests_total{route,status}``, ``fastenc_requests_in_flight``, ``fastenc_queue_depth``
(sequences waiting for a batch), ``fastenc_sequences_total{task}``, ``fastenc_cancelled_sequences_total``
(dropped because their client went away), per batch ``fastenc_batch_tokens``, ``fastenc_batch_sequences``
and ``fastenc_batch_requests``, and ``fastenc_stage_seconds{stage}`` for ``tokenize``, ``queue``,
``inference`` and the whole ``request``. The workers: ``fastenc_workers`` (configured),
``fastenc_workers_up`` (running and ready), ``fastenc_worker_batches_total{worker}``,
``fastenc_worker_deaths_total{worker}`` and
``fastenc_worker_restarts_total{worker}``. The connections: ``fastenc_connections_dropped_total{reason}``
(``header_timeout``, ``header_too_large``, ``too_many_connections``, ``write_timeout``,
``body_timeout``) and ``fastenc_skipped_requests_total{stage}`` (requests whose client left before they
were tokenized).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_POWERS_OF_TWO = tuple(float(2 ** i) for i in range(17))  # 1 .. 65536
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("fastenc_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.in_flight = Gauge("fastenc_requests_in_flight", "requests admitted and not yet answered",
                               registry=registry)
        self.queue_depth = Gauge("fastenc_queue_depth", "sequences waiting for a batch", registry=registry)
        self.sequences = Counter("fastenc_sequences", "sequences run through the model, by task", ["task"],
                                 registry=registry)
        self.cancelled = Counter("fastenc_cancelled_sequences", "queued sequences dropped because their client "
                                 "disconnected", registry=registry)
        self.batch_tokens = Histogram("fastenc_batch_tokens", "real tokens per batch", buckets=_POWERS_OF_TWO,
                                      registry=registry)
        self.batch_sequences = Histogram("fastenc_batch_sequences", "sequences per batch", buckets=_POWERS_OF_TWO,
                                         registry=registry)
        self.batch_requests = Histogram("fastenc_batch_requests", "requests sharing a batch",
                                        buckets=_POWERS_OF_TWO, registry=registry)
        self.workers = Gauge("fastenc_workers", "model workers configured", registry=registry)
        self.workers_up = Gauge("fastenc_workers_up", "model workers running and ready", registry=registry)
        self.worker_batches = Counter("fastenc_worker_batches", "batches run, by worker", ["worker"], registry=registry)
        self.worker_deaths = Counter("fastenc_worker_deaths", "model worker processes that died (killed, out of "
                                     "memory, a CUDA error)", ["worker"], registry=registry)
        self.worker_restarts = Counter("fastenc_worker_restarts", "model worker processes started again after a "
                                       "death", ["worker"], registry=registry)
        self.connections_dropped = Counter("fastenc_connections_dropped", "connections closed by the server's "
                                           "limits, by reason", ["reason"], registry=registry)
        self.skipped = Counter("fastenc_skipped_requests", "requests dropped because their client left, by the stage "
                               "they had not reached", ["stage"], registry=registry)
        self.stage = Histogram("fastenc_stage_seconds", "latency per stage: tokenize, queue, inference, request",
                               ["stage"], buckets=_SECONDS, registry=registry)

    def track(self, batcher) -> None:
        """Read the queue depth from ``batcher`` at scrape time."""
        self.queue_depth.set_function(lambda: batcher.depth)

    def observe_batch(self, batch, seconds: float, worker: int = 0) -> None:
        self.worker_batches.labels(str(worker)).inc()
        self.batch_tokens.observe(batch.num_tokens)
        self.batch_sequences.observe(len(batch.entries))
        self.batch_requests.observe(batch.num_jobs)
        for task, first, end in batch.groups:
            self.sequences.labels(task.name).inc(end - first)

    def render(self) -> bytes:
        return generate_latest(self.registry)
