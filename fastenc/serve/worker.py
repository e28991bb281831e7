"""The one thread that owns the model: it takes a batch from the batcher, runs it, hands back results.

A batch is packed (``Encoder._pack_encodings``: real tokens only), run once through the encoder
(``Encoder._run``: the packed forward pass, a CUDA graph replay when one fits) and each task group of
the batch is computed on its own contiguous slice of the token states, with the same functions the
Python API uses: ``pooling.pool`` (``embed()``), ``heads.sequence_logits`` (the text-classification and
rerank pipelines), ``encoder._token_vectors`` (``embed_tokens()``) and ``Encoder._sparse_vectors``
(``embed_sparse()``). So a text's vector is ``embed()``'s whatever else rode in its batch (bitwise on
the Triton backend), and requests with different tasks or prompts share batches.

Only this thread runs the model, so the device never sees two batches at once; tokenization runs on
the handlers' side (its own thread), so the next requests are tokenized while this one computes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from .. import heads as task_heads
from ..encoder import _token_vectors
from ..pooling import pool
from .batcher import Batch, Batcher

log = logging.getLogger("fastenc.serve")


@dataclasses.dataclass(frozen=True)
class EmbedTask:
    """Pooled sentence vectors, as ``embed(pooling=..., normalize=...)``; ``dimensions`` keeps the first
    ``dimensions`` components (Matryoshka) and normalizes after cutting, as TEI does."""

    pooling: str
    normalize: bool
    dimensions: int | None = None
    skip: int = 0  # leading prompt tokens left out of the pooling (the pooling config's include_prompt: false)

    name = "embed"

    def compute(self, encoder, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.dimensions is None:
            return pool(hidden, lengths, self.pooling, normalize=self.normalize, skip=self.skip).cpu()
        vectors = pool(hidden, lengths, self.pooling, normalize=False, skip=self.skip)[:, :self.dimensions].contiguous()
        if self.normalize:
            for row in vectors:  # as pool() normalizes: one row at a time
                row /= row.norm().clamp_min(1e-12)
        return vectors.cpu()


@dataclasses.dataclass(frozen=True)
class ScoreTask:
    """Sequence-classification logits ``(n, num_labels)``, float32, as the text-classification pipeline's."""

    name = "score"

    def compute(self, encoder, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return task_heads.sequence_logits(encoder, hidden, lengths).float().cpu()


@dataclasses.dataclass(frozen=True)
class TokensTask:
    """Token vectors: per sequence its float32 ``(n_i, hidden)`` last hidden states, as ``embed_tokens()``."""

    name = "tokens"

    def compute(self, encoder, hidden: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        return _token_vectors(hidden, lengths)


@dataclasses.dataclass(frozen=True)
class SparseTask:
    """SPLADE vectors, as ``embed_sparse(top_k=top_k)``: per sequence ``(indices, values)``, its active words in
    increasing order (int64) and their float32 values (zeros are not active)."""

    top_k: int | None = None  # resolved and checked by the caller (Encoder._sparse_top_k)

    name = "sparse"

    def compute(self, encoder, hidden: torch.Tensor, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu_seqlens[1:])
        vectors = encoder._sparse_vectors(hidden, cu_seqlens.to(hidden.device), self.top_k)  # (n, vocab) float32
        rows, cols = vectors.nonzero(as_tuple=True)  # row-major: each row's words in increasing order
        values = vectors[rows, cols].cpu()
        counts = torch.bincount(rows, minlength=len(lengths)).tolist()
        return list(zip(cols.cpu().split(counts), values.split(counts)))


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
            packed = self.encoder._pack_encodings(batch.rows)
            outputs = []
            with torch.inference_mode():
                hidden = self.encoder._run(packed)  # (tokens, hidden)
                offsets = [0]
                for n in lengths:
                    offsets.append(offsets[-1] + n)
                for task, first, end in batch.groups:
                    states = hidden[offsets[first]:offsets[end]]
                    outputs.append(task.compute(self.encoder, states, lengths[first:end]))
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
