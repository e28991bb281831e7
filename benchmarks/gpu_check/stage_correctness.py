"""The ``correctness`` stage: the GPU's subset of the test suite through pytest (per-test timeout, JUnit XML,
parallel xdist workers when pytest-xdist is there).

The subset is every test marked ``cuda`` (GPU-only: BERT-base and the families at base shapes, CUDA
graphs) or ``gpu`` (the fp16/bf16 cases of the kernel tests, which pick CUDA when it is there: every
kernel variant, ragged tails, the SPLADE kernel, batch invariance; the whole model in fp16 and bf16 for
one family per kind of attention). The report lists it per test function, which is per kernel variant.

The dry run runs the same command with the same subset, but records each launch at the tests' own shapes
instead of running it (``launches``: the Triton specialisations the GPU will compile); each test is then
reported skipped (no kernel ran), and the CUDA-marked ones skip without a GPU. The JUnit report is written
as on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .launches import LOG_ENV, PLAN_ENV, SUBSET_ENV, read_keys
from .plan import CORRECTNESS_WORKERS
from .processes import GRACE_S, run_member
from .records import ROOT, Stage, log, remaining

MARKERS = "cuda or gpu"
TEST_TIMEOUT_S = 90


def test_files() -> list[str]:
    """The test modules that mark any test ``cuda`` or ``gpu``: the others hold nothing to run here."""
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                  if "mark.cuda" in (text := f.read_text()) or "mark.gpu" in text)


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed, uncollected = [], []
    for case in root.iter("testcase"):
        for child in case:
            if child.tag not in ("failure", "error"):
                continue
            message = (child.get("message") or "")[:300]
            if "collection failure" in message:  # a test module that does not import here: not a test's verdict
                uncollected.append(case.get("name") or case.get("classname"))
            else:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": child.tag,
                               "message": message})
    counts["errors"] -= len(uncollected)
    counts["tests"] -= len(uncollected)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:30]
    counts["uncollected"] = uncollected
    return counts


def pytest_command(files: list[str], junit: Path, markers: str, workers: int) -> tuple[list[str], list[str]]:
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_check.launches", "-m", markers, *files, "-q",
               "-rfE", f"--junitxml={junit}", "--continue-on-collection-errors"]
    notes = []
    if importlib.util.find_spec("pytest_timeout"):
        command.append(f"--timeout={TEST_TIMEOUT_S}")
    else:
        notes.append("pytest-timeout is not installed: no per-test timeout")
    if workers > 1 and importlib.util.find_spec("xdist"):
        command += ["-n", str(workers)]
    return command, notes


def run(stage: Stage) -> None:
    files = test_files()
    if not files:
        stage.record.update(status="failed", note="no test module under tests/ marks a test cuda or gpu")
        return
    junit, subset_path = stage.work / "junit.xml", stage.work / "gpu-subset.json"
    workers = 0 if stage.dry else min(CORRECTNESS_WORKERS, max(1, (os.cpu_count() or 2) // 2))
    command, notes = pytest_command(files, junit, MARKERS, workers)
    env = dict(os.environ, **{SUBSET_ENV: str(subset_path)})
    keys_path = stage.work / "correctness-plan.jsonl"
    if stage.dry:  # the plan: every launch recorded, none run; the tests are reported skipped
        env.update({LOG_ENV: str(keys_path), PLAN_ENV: "1"})
        command += ["--tb=short", "-p", "no:randomly"]
    stage.record.update(command=" ".join(command[1:]))
    log("correctness: " + " ".join(command[1:]))
    outcome = run_member(command, timeout=max(remaining(stage.deadline) - GRACE_S - 2, 5), cwd=ROOT, env=env)
    returncode = None if outcome.timed_out or outcome.interrupted else outcome.returncode
    if returncode is None:
        notes.append("pytest stopped at the stage's limit: the JUnit report holds the tests finished by then")
    counts = parse_junit(junit) if junit.exists() else {}
    subset = json.loads(subset_path.read_text()) if subset_path.exists() else {}
    clean = bool(counts) and not counts["failures"] and not counts["errors"]
    # pytest exits 1 when a module failed to collect even if every collected test passed; 5: nothing collected
    status = "ok" if clean and (returncode in (0, 5) or (returncode == 1 and counts["uncollected"])) else "failed"
    if returncode is None:
        status = "timeout"
    summary = (f"{counts.get('passed', 0)} passed, {counts.get('failures', 0)} failed, {counts.get('errors', 0)} "
               f"errors, {counts.get('skipped', 0)} skipped" if counts else "no JUnit report")
    if counts.get("uncollected"):
        notes.append(f"{len(counts['uncollected'])} test module(s) could not be imported here: "
                     + ", ".join(counts["uncollected"]))
    fields = dict(returncode=returncode, **counts, subset=subset, subset_tests=sum(len(v) for v in subset.values()))
    if stage.dry:
        keys = [item["key"] for item in read_keys(keys_path)]
        cuda_only = sum(1 for ids in subset.values() for i in ids if i.endswith(" cuda"))
        fields["plan_keys"] = keys
        notes.append(f"dry run: the GPU subset's {fields['subset_tests']} tests in {len(subset)} test functions "
                     f"collected and their launches recorded without running a kernel ({len(keys)} Triton "
                     f"specialisations; the {cuda_only} CUDA-only tests skip on the CPU and are not counted)")
    stage.record.update(**fields, status=status, note="; ".join([summary] + notes))
