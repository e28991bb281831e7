"""What every process of the check shares: the tree's root, its clock, its log lines and the stage records.

A record is a stage's results as JSON, rewritten whole (to a temporary name, then renamed) at every
update, so that whatever the stage found survives its end however it ends, and a reader never sees half
a file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = time.time()  # this process's start, near enough: the stage deadlines count from it


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {message}", flush=True)


def remaining(deadline: float) -> float:
    return deadline - time.time()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a process killed at any moment leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Record:
    """A stage's results as JSON, rewritten whole at every update: what the stage found survives its end."""

    def __init__(self, path: Path, **fields):
        self.path, self.data = path, {"status": "running", **fields}
        self.save()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, default=str) + "\n")


def stage_command(stage: str, work: Path, limit: float, data: Path, dry: bool, *extra: str) -> list[str]:
    """The command of one stage's process (or of a helper process a stage starts: ``--stage`` names it)."""
    return [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage, "--work", str(work), "--limit",
            f"{limit:.1f}", "--data", str(data), *(["--dry-run"] if dry else []), *extra]


class Stage:
    """What a stage's process gets: its record, its deadline, the device, the bundle, its options."""

    def __init__(self, name: str, work: Path, limit: float, dry: bool, data: Path, **options):
        self.name, self.work, self.dry, self.data = name, Path(work), dry, Path(data)
        self.limit, self.deadline = limit, START + limit
        self.options = options
        self.record = Record(self.work / f"{name}.json", dry_run=dry)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    def command(self, stage: str, limit: float, *extra: str) -> list[str]:
        return stage_command(stage, self.work, limit, self.data, self.dry, *extra)
