"""CUDA graphs for small work: capture the packed forward once per bucket, then replay it.

A batch-1, 128-token forward is ~100 kernel launches of a few microseconds of work each: launch
latency dominates. A CUDA graph replays the whole forward with one launch. Graphs need fixed shapes
and fixed addresses, so each graph is captured for a bucket ``(tokens, max_seqlen)`` — powers of two,
``max_seqlen`` capped at the model's limit — over static input tensors:

* the token tensors hold ``tokens_bucket`` rows; a batch's real tokens are copied into the first rows;
* ``cu_seqlens`` always has ``max_batch + 1`` entries; the real offsets come first and the unused
  sequences are empty (every later entry equals the real token count);
* the rows past the real tokens belong to no sequence: attention never writes them and every other op
  works row by row, so what they hold never reaches a real row. The output's real rows are copied out.

Because every Triton kernel is batch invariant (no block size chosen from the number of rows, no
split-K, one program per sequence block in attention), a replay gives bitwise the eager result.

All graphs share one memory pool (they never run concurrently), the number of graphs is bounded (the
least recently used one is dropped first), and ``capture_all`` captures every bucket up front so the
first real call is not the slow one. Only the Triton backend on CUDA uses graphs.

Two rules keep replays safe wherever they are called from:

* the static buffers are made, and the graph captured, with inference mode off: the pipelines run the
  encoder inside ``torch.inference_mode()``, and a buffer made there would be an inference tensor that a
  later replay outside it (``embed()``, ``encoder(...)``) may not update in place;
* a bucket's sequence length never exceeds its token count (with a ``max_tokens`` that is not a power of
  two, the next sequence bucket can be larger than the token bucket): such a batch runs eagerly, since
  warming up and capturing one sequence of ``seqlen`` tokens would read and write past the buffers.

Capture and replay happen under the model's device (``torch.cuda.device``), so a model on
``cuda:1`` captures and replays there whichever device is current.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch

from .packing import PackedBatch

MIN_TOKENS = 64
MIN_SEQLEN = 32


def _powers_of_two(low: int, high: int) -> list[int]:
    values, value = [], low
    while value < high:
        values.append(value)
        value *= 2
    return values + [high]


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (tokens_bucket,) static
    position_ids: torch.Tensor  # (tokens_bucket,) static
    token_type_ids: torch.Tensor | None  # (tokens_bucket,) static
    cu_seqlens: torch.Tensor  # (max_batch + 1,) int32 static
    output: torch.Tensor  # (tokens_bucket, hidden) static, written by each replay


class GraphRunner:
    """Captures and replays ``model.forward`` (a ``fastenc.model.Model``) per (tokens, max_seqlen) bucket."""

    def __init__(self, model, *, max_tokens: int = 2048, max_batch: int = 64, max_graphs: int = 24):
        self._model = model
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.token_buckets = _powers_of_two(MIN_TOKENS, max_tokens)
        limit = model.config.max_length
        self.seqlen_buckets = _powers_of_two(min(MIN_SEQLEN, limit), limit)
        self._pool = None
        self._graphs: collections.OrderedDict[tuple[int, int], _Graph] = collections.OrderedDict()

    def fits(self, batch) -> bool:
        if not (0 < batch.num_tokens <= self.max_tokens and len(batch.lengths) <= self.max_batch):
            return False
        tokens, seqlen = self.bucket(batch)
        return seqlen <= tokens

    def bucket(self, batch) -> tuple[int, int]:
        """``(tokens, seqlen)`` buckets of a batch; ``fits`` runs a batch whose seqlen bucket is larger eagerly."""
        tokens = next(b for b in self.token_buckets if b >= batch.num_tokens)
        seqlen = next(b for b in self.seqlen_buckets if b >= batch.max_seqlen)
        return tokens, seqlen

    def _on_device(self):
        device = self._model.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    @property
    def captured(self) -> list[tuple[int, int]]:
        return list(self._graphs)

    def run(self, batch) -> torch.Tensor:
        """The packed forward of ``batch`` from its bucket's graph: a fresh ``(tokens, hidden)`` tensor."""
        key = self.bucket(batch)
        if key[1] > key[0]:
            raise ValueError(f"batch of {batch.num_tokens} tokens in bucket {key}: its sequence bucket exceeds "
                             "its token bucket (fits() is False; run it eagerly)")
        with self._on_device():
            return self._replay(self._graphs.get(key) or self._capture(*key), key, batch)

    def _replay(self, graph: _Graph, key: tuple[int, int], batch) -> torch.Tensor:
        self._graphs.move_to_end(key)
        tokens = batch.num_tokens
        graph.input_ids[:tokens].copy_(batch.input_ids)
        graph.position_ids[:tokens].copy_(batch.position_ids)
        if graph.token_type_ids is not None:
            graph.token_type_ids[:tokens].copy_(batch.token_type_ids)
        offsets = [0]
        for length in batch.lengths:
            offsets.append(offsets[-1] + length)
        offsets += [tokens] * (self.max_batch + 1 - len(offsets))
        graph.cu_seqlens.copy_(torch.tensor(offsets, dtype=torch.int32), non_blocking=True)
        graph.graph.replay()
        return graph.output[:tokens].clone()

    def capture_all(self) -> None:
        """Capture every bucket now (bounded by ``max_graphs``), smallest first."""
        for tokens in self.token_buckets:
            for seqlen in self.seqlen_buckets:
                if seqlen <= tokens and (tokens, seqlen) not in self._graphs:
                    with self._on_device():
                        self._capture(tokens, seqlen)

    @torch.inference_mode(False)  # static buffers that replays may update outside inference mode too
    def _capture(self, tokens: int, seqlen: int) -> _Graph:
        if seqlen > tokens:
            raise ValueError(f"bucket ({tokens}, {seqlen}): one sequence of {seqlen} tokens does not fit "
                             f"{tokens} token rows")
        model = self._model
        device = model.device
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)  # its memory returns to the shared pool
        ids = torch.zeros(tokens, dtype=torch.long, device=device)
        positions = torch.zeros(tokens, dtype=torch.long, device=device)
        types = torch.zeros(tokens, dtype=torch.long, device=device) if model.config.type_vocab_size else None
        cu_seqlens = torch.full((self.max_batch + 1,), seqlen, dtype=torch.int32, device=device)
        cu_seqlens[0] = 0  # one full-length sequence while warming up and capturing
        static = PackedBatch(input_ids=ids, position_ids=positions, token_type_ids=types, cu_seqlens=cu_seqlens,
                             lengths=(seqlen,), max_seqlen=seqlen)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for _ in range(2):
                model.forward(static)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = model.forward(static)
        captured = _Graph(graph, ids, positions, types, cu_seqlens, output)
        self._graphs[(tokens, seqlen)] = captured
        return captured
