"""``fastenc bench`` on the CPU: the whole suite at --quick shapes, the result schema, the FLOP counter,
and the rule that a provider that raises or computes a wrong answer is reported, never timed.

Without CUDA the test process runs the Triton kernels under the interpreter (conftest.py), so the kernel
suite's ``fastenc`` rows and ``test_triton_backend_end_to_end`` exercise the code path a GPU run takes
(on a GPU machine they run the real kernels).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fastenc import bench
from fastenc.bench.kernels import _identity
from fastenc.cli import main
from fastenc.encoder import triton_interpreter_on

ROW_KEYS = {"suite", "case", "provider", "dtype", "batch", "seq", "metric", "value", "p20", "p80"}
METRICS = {"ms", "tokens/s", "TFLOP/s", "GB/s"}
TINY = bench.ModelSpec("bert-tiny", layers=2, hidden=32, heads=2, intermediate=64, vocab=200)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def one_thread():
    """Timings here are smoke tests; one thread keeps them fast on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    e2e = {(r["model"], r["case"], r["provider"], r["metric"]) for r in rows if r["suite"] == "e2e"}
    for model in ("minilm", "bert-base-2l"):
        for case in ("1x16", "2x32", "var4x8-32"):
            for provider in ("fastenc", "fastenc-packed", "hf-eager", "hf-sdpa"):
                for metric in ("ms", "tokens/s", "TFLOP/s"):
                    assert (model, case, provider, metric) in e2e
    tflops = [r for r in rows if r["metric"] == "TFLOP/s" and r["suite"] == "e2e"]
    assert all(r["share_of_peak"] > 0 for r in tflops)
    var = next(r for r in rows if r["case"] == "var4x8-32" and r["metric"] == "ms")
    assert var["tokens"] < var["batch"] * var["seq"]  # real tokens only

    kernels = {(r["kernel"], r["provider"], r["metric"]) for r in rows if r["suite"] == "kernel"}
    assert ("attention", "sdpa", "TFLOP/s") in kernels and ("add_layer_norm", "torch", "GB/s") in kernels
    assert {r["case"] for r in rows if r.get("kernel") == "attention"} == {"attention hd64", "attention-var hd64"}
    if triton_interpreter_on():  # the kernels' launchers, run by the interpreter
        for kernel in ("attention", "fused_qkv", "linear", "add_layer_norm", "gelu_layer_norm", "embeddings"):
            assert (kernel, "fastenc", "ms") in kernels, kernel

    skipped = {(s["suite"], s["provider"]): s["reason"] for s in result["skipped"]}
    assert "--quick" in skipped[("e2e", "hf-compile")]
    assert "CUDA" in skipped[("kernel", "sdpa-varlen")]

    md = path.with_suffix(".md").read_text()
    assert "| model | case | dtype | provider |" in md and "## Kernels" in md and "## Not measured" in md
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
    plan.models, plan.shapes = [TINY], [bench.Shape(2, 8)]
    plan.providers = ["hf-sdpa", "load-raises", "call-raises", "wrong"]
    case = bench.add_layer_norm_case(2, 8, 32)
    case.providers = {"torch": case.providers["torch"],
                      "kernel-raises": lambda inputs: (lambda: 1 / 0, _identity),
                      "kernel-wrong": lambda inputs: (lambda: case.reference(inputs) * 2, _identity)}
    plan.kernel_cases = [case]
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
def test_triton_backend_end_to_end(one_thread):
    """The GPU path (fastenc on its Triton backend), checked against hf-sdpa on a tiny model."""
    plan, _ = bench.make_plan("e2e", DEVICE, quick=True, providers="fastenc,fastenc-packed,hf-sdpa",
                              backend="triton", repeats=1)
    plan.models, plan.shapes = [TINY], [bench.Shape(2, 8), bench.Shape(3, 16, var_min=2)]
    report = bench.run(plan, quiet=True)
    assert report.skipped == []
    assert report.env["fastenc_backend"] == "triton"
    measured = {(r["case"], r["provider"]) for r in report.rows}
    assert measured == {(case, p) for case in ("2x8", "var3x2-16") for p in ("fastenc", "fastenc-packed", "hf-sdpa")}


# ------------------------------------------------------------------------------------------ results
def fake_report(suite: str, dtype: str, provider: str, time: str = "2026-11-24T10:00:00+00:00") -> bench.Report:
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "triton": "3", "commit": "abc", "time": time,
           "device": "cuda", "quick": False}
    report = bench.Report(env, {"matmul_tflops": 700.0, "copy_gbps": 3000.0}, quiet=True)
    model = "bert-base" if suite == "e2e" else None
    report.scope.add((suite, dtype, model))
    base = {"suite": suite, "case": "32x128" if suite == "e2e" else "add_layer_norm h768", "provider": provider,
            "dtype": dtype, "batch": 32, "seq": 128}
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
    assert result["env"]["kept_rows_from"] == ["2026-11-24T10:00:00+00:00 abc"]
    bench.write_results(fake_report("kernel", "fp16", "torch"), tmp_path)  # same scope: replaced, not kept
    rows = json.loads(first["json"].read_text())["rows"]
    assert {(r["suite"], r["provider"]) for r in rows} == {("e2e", "hf-sdpa"), ("kernel", "torch")}
    gbps = next(r for r in rows if r["metric"] == "GB/s")
    # 2e9 bytes in 1 ms: 2000 GB/s; p20/p80 are the rates at the p80/p20 times
    assert gbps["value"] == pytest.approx(2000)
    assert gbps["p20"] == pytest.approx(2000 / 1.2) and gbps["p80"] == pytest.approx(2000 / 0.9)
    assert gbps["share_of_peak"] == pytest.approx(2000 / 3000)


def test_render_rewrites_markdown_and_readme(tmp_path):
    paths = bench.write_results(fake_report("kernel", "fp16", "fastenc"), tmp_path)
    paths["md"].unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.README_START}\n{bench.README_END}\n")
    bench.render(paths["json"], readme)
    assert "| add_layer_norm h768 | 32x128 | fp16 | fastenc |" in paths["md"].read_text()
    assert "| add_layer_norm h768 | 32x128 | fp16 | fastenc |" in readme.read_text()


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
