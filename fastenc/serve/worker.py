"""The one thread that owns the model: it takes a batch from the batcher, runs it, hands back results.

A batch is packed (``Tokenization.pack``: real tokens only), run once through the model (a CUDA graph
replay when one fits) and each task group of the batch is computed on its own contiguous slice of the
token states by its task object (``fastenc.tasks``), the very objects the Python API computes with. So
a text's vector is ``embed()``'s whatever else rode in its batch (bitwise on the Triton backend), and
requests with different tasks or prompts share batches.

Only this thread runs the model, so the device never sees two batches at once; tokenization runs on
the handlers' side (its own thread), so the next requests are tokenized while this one computes.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .batcher import Batch, Batcher

log = logging.getLogger("fastenc.serve")


class Worker:
    """Runs batches from ``batcher`` on ``encoder`` in one thread until the batcher is closed and drained."""

    def __init__(self, encoder, batcher: Batcher, metrics=None, *, warmup: bool = True):
        self.encoder = encoder
        self.batcher = batcher
        self.metrics = metrics
        self.warmup = warmup
        self.ready = threading.Event()
        self.error: BaseException | None = None  # why the thread stopped, if it did not stop cleanly
        self._thread = threading.Thread(target=self._loop, name="fastenc-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            if self.warmup:
                self.encoder.warmup()
        except BaseException as exc:  # the server must not start on a model that cannot run
            self.error = exc
            self.ready.set()
            raise
        self.ready.set()
        while (batch := self.batcher.next_batch()) is not None:
            self.run(batch)

    def run(self, batch: Batch) -> None:
        """Run one batch and deliver every result (or the error) to its job."""
        start = time.perf_counter()
        lengths = batch.lengths
        try:
            packed = self.encoder.text.pack(batch.rows)
            outputs = []
            model = self.encoder.model
            with torch.inference_mode():
                hidden = model(packed)  # (tokens, hidden)
                offsets = [0]
                for n in lengths:
                    offsets.append(offsets[-1] + n)
                for task, first, end in batch.groups:
                    states = hidden[offsets[first]:offsets[end]]
                    outputs.append(task.compute(model, states, lengths[first:end]))
        except Exception as exc:  # a failed batch fails its requests, not the server
            log.exception("batch of %d sequences failed", len(lengths))
            batch.fail(exc)
            return
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_batch(batch, elapsed)
        for (task, first, end), values in zip(batch.groups, outputs):
            for (job, index), value in zip(batch.entries[first:end], values):
                job.deliver(index, value)
