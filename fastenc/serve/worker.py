"""Model workers: each takes a batch from the one batcher when it is idle, runs it, hands back the results.

A batch is packed on the host (``Tokenization.pack``: real tokens only), run once through the model (a
CUDA graph replay when one fits) and each task group of the batch is computed on its own contiguous
slice of the token states by its task object (``fastenc.tasks``), the very objects the Python API
computes with. So a text's vector is ``embed()``'s whatever else rode in its batch (bitwise on the
Triton backend), and requests with different tasks or prompts share batches.

Two kinds of worker, the same loop:

* ``ProcessWorker`` (``fastenc serve``'s): a child process per device that loads the checkpoint itself
  (``Encoder.from_pretrained(path, device=...)``) and runs ``task.compute(model, hidden, lengths)``; a
  thread of the server process feeds it one batch at a time over a pipe (the host ``PackedBatch``
  and the picklable task objects in, the results out). The server process keeps the HTTP side,
  tokenization and JSON; the child holds the device, so the two never fight over one interpreter
  lock, several devices (or CPU workers with their share of the cores) serve one queue, and a worker
  that dies (killed for memory, a CUDA error) takes only its batch with it: the batch's requests are
  failed with ``WorkerDied`` and the worker is started again.
* ``Worker``: the same loop on a thread of the calling process, over an ``Encoder`` already loaded
  (``create_app(encoder)`` in tests and embedding applications; ``fastenc serve --in-process``).

Each worker runs one batch at a time, so a device never sees two batches at once; a worker asks the
batcher for the next batch only when it is idle, so a batch goes to the first idle worker.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable

import torch

from .batcher import Batch, Batcher

log = logging.getLogger("fastenc.serve")

_READY_TIMEOUT = 600.0  # seconds a child may take to import torch, load the checkpoint and warm up
_WATCH_INTERVAL = 0.25  # seconds between checks that an idle worker's child is alive


class WorkerDied(Exception):
    """The worker process running a batch exited before answering it (killed, out of memory, a CUDA error)."""


def _offsets(lengths: list[int]) -> list[int]:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return offsets


def compute(model, packed, groups, lengths: list[int]) -> list:
    """Run one packed batch through ``model`` and each ``(task, first, end)`` group's task on its slice of
    the hidden states: one list of per-sequence results per group."""
    offsets = _offsets(lengths)
    outputs = []
    with torch.inference_mode():
        hidden = model(packed)  # (tokens, hidden)
        for task, first, end in groups:
            span = slice(offsets[first], offsets[end])
            ids = packed.input_ids[span] if task.needs_ids else None  # lexical weights, ColBERT's skiplist
            outputs.append(task.compute(model, hidden[span], lengths[first:end], ids))
    return outputs


def _deliver(batch: Batch, outputs: list) -> None:
    for (task, first, end), values in zip(batch.groups, outputs):
        for (job, index), value in zip(batch.entries[first:end], values):
            job.deliver(index, value)


class Worker:
    """Runs batches from ``batcher`` on ``encoder`` in one thread of this process until the batcher is closed
    and drained."""

    def __init__(self, encoder, batcher: Batcher, metrics=None, *, warmup: bool = True):
        self.encoder = encoder
        self.batcher = batcher
        self.metrics = metrics
        self.warmup = warmup
        self.name = f"{encoder.device} (in-process)"
        self.ready = threading.Event()
        self.error: BaseException | None = None  # why the thread stopped, if it did not stop cleanly
        self._thread = threading.Thread(target=self._loop, name="fastenc-worker", daemon=True)

    @property
    def up(self) -> bool:
        return self.ready.is_set() and self.error is None and self._thread.is_alive()

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
            outputs = compute(self.encoder.model, packed, batch.groups, lengths)
        except Exception as exc:  # a failed batch fails its requests, not the server
            log.exception("batch of %d sequences failed", len(lengths))
            batch.fail(exc)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(batch, time.perf_counter() - start)
        _deliver(batch, outputs)


# ---------------------------------------------------------------------------------------- worker processes
@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process loads: the checkpoint directory, its device, dtype and backend, torch's threads
    (None: torch's default) and whether to warm up (compile, capture CUDA graphs) before taking work."""

    path: str
    device: str
    dtype: str | None = None
    backend: str | None = None
    threads: int | None = None
    warmup: bool = True


def _dumps(obj) -> bytes:
    # plain pickle, not multiprocessing's: torch would otherwise move every tensor through shared memory,
    # one segment and one file descriptor per tensor, which costs more than copying these small batches
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _worker_main(conn, spec: WorkerSpec) -> None:
    """The child process: load the checkpoint, say ready, then answer batches until told to stop (an empty
    message) or until the server process is gone (the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    from ..encoder import Encoder

    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        encoder = Encoder.from_pretrained(spec.path, device=spec.device, dtype=spec.dtype, backend=spec.backend)
        if spec.warmup:
            encoder.warmup()
    except BaseException as exc:
        conn.send_bytes(_dumps(("failed", f"{type(exc).__name__}: {exc}")))
        return
    model = encoder.model
    conn.send_bytes(_dumps(("ready", {"device": str(encoder.device), "backend": encoder.backend,
                                      "threads": torch.get_num_threads()})))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the server process is gone
            return
        if not message:
            return
        packed, groups, lengths = pickle.loads(message)
        try:
            reply = ("ok", compute(model, packed, groups, lengths))
        except Exception as exc:  # the batch's requests fail; a device left broken ends this process
            if encoder.device.type == "cuda" and "CUDA error" in str(exc):
                conn.send_bytes(_dumps(("fatal", f"{type(exc).__name__}: {exc}")))
                os._exit(70)  # a CUDA error poisons the context: a fresh process is the only way back
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send_bytes(_dumps(reply))


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class ProcessWorker:
    """A child process on one device fed by a thread of this process: the thread takes a batch from the
    batcher when the child is idle, packs it, sends it, waits for the results and delivers them.

    A child that dies is noticed at once (its end of the pipe closes): the batch it held fails with
    ``WorkerDied``, ``on_death`` is called, and a new child is started, after a pause that doubles
    (up to ``max_backoff`` seconds) while starts keep failing. While no worker of the server is up
    (``alive()`` says), queued jobs are failed rather than left waiting for a child that may not come.
    """

    def __init__(self, index: int, spec: WorkerSpec, batcher: Batcher, pack: Callable, metrics=None, *,
                 alive: Callable[[], bool] = lambda: False, max_backoff: float = 30.0):
        self.index = index
        self.spec = spec
        self.batcher = batcher
        self.pack = pack
        self.metrics = metrics
        self.alive = alive
        self.max_backoff = max_backoff
        self.name = f"worker {index} ({spec.device})"
        self.ready = threading.Event()  # set once the first child is ready, or failed to start
        self.error: str | None = None  # why the first child could not start
        self.info: dict = {}
        self.restarts = 0
        self._up = False
        self._process = None
        self._conn = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"fastenc-worker-{index}", daemon=True)

    @property
    def up(self) -> bool:
        """A child is running and ready for batches."""
        return self._up

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --------------------------------------------------------------------------------------- the child
    def _spawn(self) -> str | None:
        """Start a child and wait until it is ready; None, or why it did not become ready."""
        context = multiprocessing.get_context("spawn")  # never fork a process that holds threads or CUDA
        if self.spec.device == "cpu":
            # OpenMP threads that spin between the model's ops take the cores from the rest of the worker
            # and from the server process: measured on a 2-core machine under load, one short text took
            # 550 ms with spinning threads and 40 ms with sleeping ones. The child reads this at start.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=_worker_main, args=(theirs, self.spec), name=f"fastenc-worker-{self.index}",
                                  daemon=True)
        process.start()
        theirs.close()  # only the child holds its end: its death closes the pipe
        self._process, self._conn = process, ours
        try:
            if not ours.poll(_READY_TIMEOUT):
                raise TimeoutError(f"not ready after {_READY_TIMEOUT:.0f} s")
            kind, detail = pickle.loads(ours.recv_bytes())
        except (EOFError, OSError, TimeoutError) as exc:
            self._reap()
            return f"the worker process did not start ({_exit_reason(process.exitcode) if isinstance(exc, EOFError) else exc})"
        if kind != "ready":
            self._reap()
            return detail
        self.info = detail
        self._up = True
        if self.metrics is not None:
            self.metrics.workers_up.inc()
        return None

    def _reap(self) -> int | None:
        """Close the pipe and wait for the child (killing it if it lingers); its exit code."""
        if self._up:
            self._up = False
            if self.metrics is not None:
                self.metrics.workers_up.dec()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        process = self._process
        if process is None:
            return None
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        return process.exitcode

    def _fail_queued(self, reason: str) -> None:
        """No worker can serve: fail what is queued now instead of letting it wait."""
        while not self.alive() and (batch := self.batcher.next_batch(timeout=0)) is not None:
            batch.fail(WorkerDied(reason))

    # ---------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        problem = self._spawn()
        if problem is not None:
            self.error = problem
            self.ready.set()
            return
        self.ready.set()
        backoff = 0.5
        while True:
            batch = self.batcher.next_batch(timeout=_WATCH_INTERVAL)
            if batch is not None:
                death = self.run(batch)
            elif self.batcher.closed:
                break
            else:  # idle: a child that dies between batches is noticed here, not by the next batch
                death = self._idle_death()
            if death is None:
                continue
            log.error("fastenc serve: %s died (%s); restarting it", self.name, death)
            while not self._stopping:
                problem = self._spawn()
                if problem is None:
                    self.restarts += 1
                    if self.metrics is not None:
                        self.metrics.worker_restarts.labels(str(self.index)).inc()
                    log.warning("fastenc serve: %s restarted", self.name)
                    backoff = 0.5
                    break
                log.error("fastenc serve: %s could not restart: %s", self.name, problem)
                self._fail_queued(f"no model worker is running: {problem}")
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        self._stop_child()

    def _idle_death(self) -> str | None:
        process = self._process
        if process is None or process.is_alive():
            return None
        code = self._reap()
        if self.metrics is not None:
            self.metrics.worker_deaths.labels(str(self.index)).inc()
        return _exit_reason(code)

    def _stop_child(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send_bytes(b"")
            except OSError:
                pass
        self._reap()

    def stop(self) -> None:
        """Stop restarting (the batcher is closed: the loop ends once it is drained)."""
        self._stopping = True

    def run(self, batch: Batch) -> str | None:
        """Run one batch on the child and deliver its results (or its error); None, or why the child died."""
        start = time.perf_counter()
        lengths = batch.lengths
        if self._conn is None:  # stopping while no child runs: what is still queued cannot be served
            batch.fail(WorkerDied(f"the model {self.name} is not running (the server is shutting down)"))
            return None
        try:
            packed = self.pack(batch.rows)
            message = _dumps((packed, batch.groups, lengths))
        except Exception as exc:  # a batch the host cannot pack fails its requests, not the server
            log.exception("batch of %d sequences could not be packed", len(lengths))
            batch.fail(exc)
            return None
        try:
            self._conn.send_bytes(message)
            kind, detail = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self._reap()
            reason = _exit_reason(code) if isinstance(exc, EOFError) or code is not None else str(exc)
            if self.metrics is not None:
                self.metrics.worker_deaths.labels(str(self.index)).inc()
            batch.fail(WorkerDied(f"the model {self.name} died while running this request ({reason}); it is "
                                  "being restarted: retry the request"))
            return reason
        if kind == "fatal":  # the child hit a CUDA error and is ending itself
            code = self._reap()
            if self.metrics is not None:
                self.metrics.worker_deaths.labels(str(self.index)).inc()
            batch.fail(WorkerDied(f"the model {self.name} failed ({detail}) and is being restarted: retry the "
                                  "request"))
            return f"{detail}; {_exit_reason(code)}"
        if kind != "ok":
            log.error("batch of %d sequences failed on %s: %s", len(lengths), self.name, detail)
            batch.fail(RuntimeError(detail))
            return None
        if self.metrics is not None:
            self.metrics.observe_batch(batch, time.perf_counter() - start, self.index)
        _deliver(batch, detail)
        return None
