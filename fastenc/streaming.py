"""Embedding streams: ``Encoder.embed_iter``'s iterator, reading ahead in a thread, the progress bar.

``embed`` and ``embed_iter`` take texts ``window`` at a time. While the encoder runs one window, a
worker thread reads and tokenizes the next (the tokenizers library and torch's operators release the
GIL, so the two overlap); at most two windows of texts and tokens are held at once, whatever the
length of the stream.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
_DONE = object()
PROGRESS_MIN_TEXTS = 256  # below this, a progress bar is noise


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of ``items`` in order; the next one is produced in a worker thread while the caller
    works on the current one. An exception raised producing an item is raised here, in its turn.

    The worker is a daemon thread, one per item: a caller that stops (an error, Ctrl-C) never waits
    for it, even when it is blocked reading a pipe that will not close.
    """
    def fetch(slot: list) -> None:
        try:
            slot.append((True, next(items, _DONE)))
        except BaseException as exc:  # handed to the caller, raised there
            slot.append((False, exc))

    def start() -> tuple[threading.Thread, list]:
        slot: list = []
        thread = threading.Thread(target=fetch, args=(slot,), name="fastenc-read-ahead", daemon=True)
        thread.start()
        return thread, slot

    thread, slot = start()
    while True:
        thread.join()
        ok, item = slot[0]
        if not ok:
            raise item
        if item is _DONE:
            return
        thread, slot = start()
        yield item


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _malloc_trim()


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class HeapTrimmer:
    """Gives the C heap's free pages back to the system when resident memory has grown by ``slack``.

    Each window frees tensors of new shapes, and glibc keeps such freed chunks in its heap: without a
    trim, a stream's resident memory creeps up window after window although nothing is leaked
    (measured: +3.5 MiB per window of 1,024 short texts; ``malloc_trim`` took it back to the start).
    Trimming after every window costs page faults (+25% CPU time on that test), so trim only when
    resident memory passes its level after the window that followed the last trim (or the first
    window) by ``slack``: it stays within ``slack`` of that steady state, trimmed every few dozen windows.
    Elsewhere than glibc on Linux, nothing is done.
    """

    def __init__(self, slack: int = 64 << 20):
        self.slack = slack
        self.steady: int | None = None  # resident bytes after a window (working set included); None: measure next

    def __call__(self) -> None:
        """Call after each window."""
        if _MALLOC_TRIM is None:
            return
        resident = _resident_bytes()
        if self.steady is None:
            self.steady = resident
        elif resident > self.steady + self.slack:
            _MALLOC_TRIM(0)
            self.steady = None  # the next window rebuilds its working set: measure the level again then


class Progress:
    """Texts and tokens embedded so far; a tqdm bar on stderr with texts/s and tokens/s when enabled.

    ``enabled=None`` decides at the first window: a bar when stderr is a terminal and the window holds
    at least ``PROGRESS_MIN_TEXTS`` texts (so a long stream gets one and a handful of texts does not).
    """

    def __init__(self, enabled: bool | None, *, total: int | None = None, desc: str = "embed"):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.texts = 0
        self.tokens = 0
        self._bar = None
        self._start = time.perf_counter()

    def window(self, texts: int) -> None:
        """Called when a window of ``texts`` texts starts running."""
        if self.enabled is None:
            self.enabled = texts >= PROGRESS_MIN_TEXTS and sys.stderr.isatty()
        if self.enabled and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="texts", file=sys.stderr, dynamic_ncols=True)
            self._start = time.perf_counter()

    def batch(self, texts: int, tokens: int) -> None:
        self.texts += texts
        self.tokens += tokens
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s", refresh=False)
            self._bar.update(texts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EmbedStream(Iterator[torch.Tensor]):
    """What ``Encoder.embed_iter`` returns: one vector per text, in input order.

    ``windows()`` gives the rest of the stream as whole ``(n, width)`` windows instead (what a writer
    wants). ``texts`` and ``tokens`` count what has been embedded so far; ``calibration`` holds the int8
    ranges in use (``(2, dim)``; from the caller, or from the first window) once known, else ``None``.
    """

    def __init__(self, windows: Iterator[torch.Tensor], storage, progress: Progress):
        self._windows = windows
        self._storage = storage
        self._progress = progress
        self._current: torch.Tensor | None = None
        self._next_row = 0

    def __iter__(self) -> "EmbedStream":
        return self

    def __next__(self) -> torch.Tensor:
        while self._current is None or self._next_row >= len(self._current):
            self._current = next(self._windows)  # StopIteration ends the stream
            self._next_row = 0
        row = self._current[self._next_row]
        self._next_row += 1
        return row

    def windows(self) -> Iterator[torch.Tensor]:
        """The rest of the stream, a window at a time."""
        if self._current is not None and self._next_row < len(self._current):
            rest, self._current = self._current[self._next_row:], None
            yield rest
        self._current = None
        yield from self._windows

    def close(self) -> None:
        """Stop early: the worker thread finishes the window it is reading, and the stream ends."""
        self._windows.close()

    @property
    def texts(self) -> int:
        return self._progress.texts

    @property
    def tokens(self) -> int:
        return self._progress.tokens

    @property
    def calibration(self) -> torch.Tensor | None:
        return self._storage.ranges
