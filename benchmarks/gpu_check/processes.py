"""Processes with time limits that end whole: a stage and everything it started, interrupted first.

Each stage runs as the leader of its own process group, and whatever it starts (pytest and its xdist
workers, compute-sanitizer and its target, the compile groups, the cold start) stays in that group.
Stopping a stage is two steps: SIGINT to the whole group (pytest then writes its JUnit XML, a stage
records what it has), then, after a grace period, SIGKILL to the whole group. When the leader exits on
its own, whatever it left in its group is killed too, before the leader is reaped (so the group id
cannot have been handed to another process): nothing of a stage outlives it and keeps the GPU.

Inside a stage, a sub-command has its own time limit (``run_member``): SIGINT to it alone, then SIGKILL;
its own children stay in the group, which the runner ends with the stage.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GRACE_S = 5.0  # from SIGINT to SIGKILL
POLL_S = 0.05


class CheckInterrupted(Exception):
    """The check itself got SIGINT or SIGTERM (raised in the runner's main thread by its signal handler)."""


@dataclasses.dataclass
class Outcome:
    returncode: int | None  # None: killed before it exited on its own
    seconds: float
    timed_out: bool = False  # stopped at its limit
    interrupted: bool = False  # its caller was interrupted while it ran
    output: str = ""  # with capture


def _running(pid: int) -> bool:
    """Whether ``pid`` (a child of this process) has not exited yet; an exited one is left unreaped."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_running(pid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``pid`` to exit (without reaping it); True if it is still running."""
    end = time.monotonic() + seconds
    while _running(pid):
        if time.monotonic() >= end:
            return True
        time.sleep(POLL_S)
    return False


def stop_group(pgid: int, grace: float = GRACE_S) -> None:
    """SIGINT to the group, up to ``grace`` seconds for its leader to exit, then SIGKILL to the group."""
    _signal_group(pgid, signal.SIGINT)
    _wait_running(pgid, grace)
    _signal_group(pgid, signal.SIGKILL)


def run_group(command: list[str], *, limit: float, cwd: Path, env: dict, stdout, grace: float = GRACE_S,
              tick: Callable[[], None] | None = None, tick_every: float = 15.0) -> Outcome:
    """Run ``command`` as the leader of a new process group for at most ``limit`` seconds (see the module
    docstring): SIGINT to the group at ``limit - grace``, SIGKILL at ``limit``. ``tick`` is called every
    ``tick_every`` seconds while it runs. An exception in the caller while waiting (``CheckInterrupted``,
    ``KeyboardInterrupt``) stops the group the same way, then propagates."""
    grace = min(grace, limit / 4)
    start = time.monotonic()
    interrupt_at, kill_at = start + limit - grace, start + limit
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                               process_group=0)
    timed_out, last_tick = False, start
    try:
        while _running(process.pid):
            now = time.monotonic()
            if now >= kill_at:
                _signal_group(process.pid, signal.SIGKILL)
                break
            if now >= interrupt_at and not timed_out:
                timed_out = True
                _signal_group(process.pid, signal.SIGINT)
            if tick is not None and now - last_tick >= tick_every:
                last_tick = now
                tick()
            time.sleep(POLL_S)
    except BaseException:
        stop_group(process.pid, grace)
        raise
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # whatever the leader left behind, before it is reaped
        process.wait()
    returncode = None if process.returncode < 0 and timed_out else process.returncode
    return Outcome(returncode, time.monotonic() - start, timed_out=timed_out)


def run_member(command: list[str], *, timeout: float, cwd: Path, env: dict | None = None, grace: float = GRACE_S,
               log: Path | None = None, capture: bool = False) -> Outcome:
    """Run ``command`` in the caller's process group for at most ``timeout`` seconds: then SIGINT to it, and
    SIGKILL after ``grace`` seconds. Its output goes to ``log`` (appended), or is returned (``capture``).

    A ``KeyboardInterrupt`` while waiting means the group got SIGINT, the child too: it gets ``grace``
    seconds to finish (pytest writes its JUnit XML), and the outcome says ``interrupted``."""
    start = time.monotonic()
    sink = open(log, "ab") if log is not None else tempfile.TemporaryFile()
    timed_out = interrupted = False
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)
        except KeyboardInterrupt:
            interrupted = True
        if process.returncode is None:
            try:
                process.wait(timeout=grace)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                process.kill()
                process.wait()
        output = ""
        if capture and log is None:
            sink.seek(0)
            output = sink.read().decode(errors="replace")
    finally:
        sink.close()
    returncode = None if timed_out and process.returncode < 0 else process.returncode
    return Outcome(returncode, time.monotonic() - start, timed_out=timed_out, interrupted=interrupted,
                   output=output)
