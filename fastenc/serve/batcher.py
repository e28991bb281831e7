"""The queue between the HTTP handlers and the model: requests in, token-budget batches out.

Handlers ``put`` a ``Job`` (one request's tokenized sequences and the task to run on them); the worker
asks for ``next_batch`` whenever the model is free and gets the oldest waiting sequences, from as many
jobs as fit, up to ``max_batch_tokens`` real tokens (the packed form has no padding, so the budget is
the sum of the lengths; a sequence longer than the budget goes alone). A job may be split across
batches; jobs are served first in, first out. Batching is continuous, as in TEI's router
(``router/src/queue.rs``): there is no timer, whatever arrived while the model ran rides in the next
batch. Jobs whose client went away (``cancel``) are dropped before they reach the model.

Thread-safe: ``put`` runs on the event loop, ``next_batch`` on the worker thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

log = logging.getLogger("fastenc.serve")


class Closed(Exception):
    """The batcher takes no more jobs: the server is shutting down."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's sequences (anything with ``ids`` and ``type_ids``) and the ``task`` to compute on them.

    ``on_done`` is called once, from the worker thread, with the list of per-sequence results in order,
    or with the exception that failed the job.
    """

    rows: Sequence[Any]
    task: Hashable
    on_done: Callable[[list | BaseException], None]
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)
    started: float | None = None  # when its first sequence entered a batch
    cancelled: bool = False
    _results: list = dataclasses.field(init=False, repr=False)
    _pending: int = dataclasses.field(init=False, repr=False)
    _taken: int = dataclasses.field(default=0, init=False, repr=False)  # sequences handed to batches so far
    _finished: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self):
        self._results = [None] * len(self.rows)
        self._pending = len(self.rows)

    def cancel(self) -> None:
        """Drop the sequences not yet batched; results of a batch already running are discarded."""
        self.cancelled = True

    def deliver(self, index: int, result) -> None:
        self._results[index] = result
        self._pending -= 1
        if self._pending == 0:
            self._finish(self._results)

    def fail(self, error: BaseException) -> None:
        self._finish(error)

    def _finish(self, outcome) -> None:
        if not self._finished:
            self._finished = True
            try:
                self.on_done(outcome)
            except Exception:  # a receiver that is gone (its event loop closed) must not stop the worker
                log.exception("a finished job could not be handed back")


@dataclasses.dataclass
class Batch:
    """Sequences from one or more jobs, grouped by task: each group's rows are contiguous."""

    entries: list[tuple[Job, int]]  # (job, index of the sequence in job.rows), grouped by task
    groups: list[tuple[Hashable, int, int]]  # (task, first entry, end entry)

    @property
    def rows(self) -> list:
        return [job.rows[index] for job, index in self.entries]

    @property
    def lengths(self) -> list[int]:
        return [len(job.rows[index].ids) for job, index in self.entries]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_jobs(self) -> int:
        return len({id(job) for job, _ in self.entries})

    def fail(self, error: BaseException) -> None:
        for job in {id(job): job for job, _ in self.entries}.values():
            job.fail(error)


class Batcher:
    """A FIFO of jobs cut into batches of at most ``max_batch_tokens`` tokens and ``max_batch_size`` sequences."""

    def __init__(self, max_batch_tokens: int, max_batch_size: int | None = None,
                 on_cancelled: Callable[[int], None] | None = None):
        if max_batch_tokens < 1 or (max_batch_size is not None and max_batch_size < 1):
            raise ValueError("max_batch_tokens and max_batch_size must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._jobs: collections.deque[Job] = collections.deque()
        self._waiting = 0  # sequences queued and not yet batched
        self._cond = threading.Condition()
        self._closed = False
        self.cancelled_sequences = 0  # dropped because their job was cancelled before they ran
        self._on_cancelled = on_cancelled  # told how many sequences each dropped job had left

    @property
    def closed(self) -> bool:
        """``close`` was called (what is queued may still be draining)."""
        return self._closed

    @property
    def depth(self) -> int:
        """Sequences waiting for a batch."""
        return self._waiting

    def put(self, job: Job) -> None:
        if not job.rows:  # nothing to run: done at once
            job._finish([])
            return
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            self._jobs.append(job)
            self._waiting += len(job.rows)
            self._cond.notify()

    def close(self) -> None:
        """Take no more jobs; ``next_batch`` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch, waiting for work; None once closed and drained (or after ``timeout`` seconds idle)."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._jobs:
                    break
                if self._closed or not self._cond.wait(timeout):
                    return None
            return self._take()

    def _drop_cancelled(self) -> None:
        while self._jobs and self._jobs[0].cancelled:
            job = self._jobs.popleft()
            left = len(job.rows) - job._taken
            self._waiting -= left
            self.cancelled_sequences += left
            if left and self._on_cancelled is not None:
                self._on_cancelled(left)

    def _take(self) -> Batch:
        """Pop sequences first in, first out, while they fit the budget (called with the lock held)."""
        now = time.perf_counter()
        by_task: dict[Hashable, list[tuple[Job, int]]] = {}
        tokens = count = 0
        while self._jobs:
            job = self._jobs[0]
            if job.cancelled:
                self._drop_cancelled()
                continue
            n = len(job.rows[job._taken].ids)
            full = self.max_batch_size is not None and count == self.max_batch_size
            if count and (full or tokens + n > self.max_batch_tokens):
                break
            if job.started is None:
                job.started = now
            by_task.setdefault(job.task, []).append((job, job._taken))
            job._taken += 1
            tokens += n
            count += 1
            self._waiting -= 1
            if job._taken == len(job.rows):
                self._jobs.popleft()
        entries, groups = [], []
        for task, members in by_task.items():
            groups.append((task, len(entries), len(entries) + len(members)))
            entries += members
        return Batch(entries, groups)
