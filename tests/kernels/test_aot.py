"""The kernels compiled for real GPUs without one: ``fastenc.kernels.aot`` (Triton's compiler and ptxas).

What the interpreter cannot show: that every kernel of a BERT-base forward (and of the other families',
the decoders' included) compiles for sm_90 (H100) and sm_86 (A10, RTX 30xx, the smallest shared memory of
the tensor-core GPUs), fits the architecture's shared memory, spills no registers, and runs its matrix
products on tensor cores behind pipelined asynchronous copies. The compiler runs in a subprocess: this process has the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastenc.kernels import _target

MATMUL_KERNELS = {"linear", "gated_linear", "fused_qkv", "attention", "splade_pool"}
SWEEP_ARCHS = (90, 86)


def _compile_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _compile(tmp_path_factory, dtypes: str, models: str) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = _compile_env()
    command = [sys.executable, "-m", "fastenc.kernels.aot", "--arch", "90,86", "--dtype", dtypes,
               "--models", models, "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())["builds"]


@pytest.fixture(scope="module")
def bert_builds(tmp_path_factory):
    return _compile(tmp_path_factory, "fp16,bf16", "bert-base")


# The families after BERT add kernel variants: ModernBERT's forward has them all but MPNet's (RoPE in the
# QKV epilogue, the windowed attention, the GeGLU epilogue, the residual epilogue, bias-free GEMMs, norms
# and embeddings); MPNet's relative-bias attention is in positional_builds (its other kernels are BERT's).
# fp16 only: bf16 compiles to the same instructions (checked by hand: python -m fastenc.kernels.aot
# --dtype fp16,bf16 --models modernbert-base,mpnet-base,nomic-embed,gte-base, benchmarks/results).
@pytest.fixture(scope="module")
def family_builds(tmp_path_factory):
    return _compile(tmp_path_factory, "fp16", "modernbert-base")


# The windowed, relative-bias and disentangled attention at head dim 64 (ModernBERT's, MPNet's, DeBERTa's)
# and at the head dims where BERT's configs would spill with them (see attention.positional_config; the
# whole sweep: python -m fastenc.kernels.aot --sweep --positional).
@pytest.fixture(scope="module")
def positional_builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "positional.json"
    script = ("import dataclasses, json, sys; from fastenc.kernels import aot; "
              "builds = aot.positional_sweep_report((90, 86), ('fp16',), (32, 64, 96)); "
              "json.dump([dataclasses.asdict(b) for b in builds], open(sys.argv[1], 'w'))")
    result = subprocess.run([sys.executable, "-c", script, str(out)], env=_compile_env(), capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    builds = json.loads(out.read_text())
    assert {(b["arch"], b["shape"]) for b in builds} == {(arch, f"HEAD_DIM={d} {flag}") for arch in (90, 86)
                                                         for d in (32, 64, 96)
                                                         for flag in ("WINDOW=True", "REL_BIAS=True",
                                                                      "C2P=True P2C=True")}
    return builds


# The decoder families' kernels: one layer of Qwen3-0.6B (causal grouped-query attention at head dim 128,
# QK-norm and RoPE in the QKV epilogue, RMSNorm, SwiGLU, the residual epilogue, norm-free embeddings) and of
# EmbeddingGemma-300M (head dim 256, Gemma's 1 + weight norms and sandwich step, bidirectional local
# attention, GELU-tanh gate, scaled embeddings). The other head dims and widths: --sweep --decoder.
@pytest.fixture(scope="module")
def decoder_builds(tmp_path_factory):
    return _compile(tmp_path_factory, "fp16", "qwen3-0.6b,embeddinggemma-300m")


@pytest.fixture(scope="module", params=["bert", "family", "positional", "decoder"])
def builds(request):
    return request.getfixturevalue(f"{request.param}_builds")


def test_every_kernel_of_the_forward_compiles(bert_builds, family_builds):
    builds = bert_builds
    for arch in (90, 86):
        for dtype in ("fp16", "bf16"):
            kernels = {b["kernel"] for b in builds if b["arch"] == arch and b["dtype"] == dtype}
            assert kernels == {"embeddings", "fused_qkv", "attention", "linear", "add_layer_norm",
                               "gelu_layer_norm", "splade_pool"}, (arch, dtype)
    ffn = {b["shape"] for b in builds if b["kernel"] == "linear"}
    assert ffn == {"K=768 N=768", "K=768 N=3072 ACTIVATION=gelu", "K=3072 N=768"}
    # A 128-token batch (the latency goal) launches a few dozen tiles per GEMM, not 6 (128 x 128 tiles at N 768).
    tiles = {(b["kernel"], b["shape"]): b["tiles_128"] for b in builds if b["tiles_128"] is not None}
    assert tiles == {("linear", "K=768 N=768"): 24, ("linear", "K=768 N=3072 ACTIVATION=gelu"): 48,
                     ("linear", "K=3072 N=768"): 24, ("fused_qkv", "K=768 N=2304 HEAD_DIM=64"): 36}
    splade = {b["shape"] for b in builds if b["kernel"] == "splade_pool"}
    assert splade == {"K=768 N=30522 ACTIVATION=relu POOLING=max", "K=768 N=30522 ACTIVATION=log1p_relu POOLING=sum"}
    for arch in (90, 86):
        shapes = {(b["model"], b["kernel"], b["shape"]) for b in family_builds if b["arch"] == arch}
        assert shapes >= {
            ("modernbert-base", "fused_qkv", "K=768 N=2304 HEAD_DIM=64 HAS_BIAS=False ROPE=True"),
            ("modernbert-base", "attention", "HEAD_DIM=64 WINDOW=True"),
            ("modernbert-base", "attention", "HEAD_DIM=64"),
            ("modernbert-base", "gated_linear", "K=768 N=1152 ACTIVATION=gelu HAS_BIAS=False"),
            ("modernbert-base", "linear", "K=1152 N=768 HAS_BIAS=False HAS_RESIDUAL=True"),
            ("modernbert-base", "gelu_layer_norm", "n_cols=768 HAS_BIAS=False"),
            ("modernbert-base", "embeddings", "n_cols=768 HAS_BIAS=False HAS_POSITIONS=False"),
        }, arch


def test_every_decoder_kernel_compiles(decoder_builds):
    for arch in (90, 86):
        shapes = {(b["model"], b["kernel"], b["shape"]) for b in decoder_builds if b["arch"] == arch}
        assert shapes >= {
            ("qwen3-0.6b", "embeddings", "n_cols=1024 HAS_BIAS=False HAS_POSITIONS=False HAS_NORM=False"),
            ("qwen3-0.6b", "rms_norm", "n_cols=1024"),
            ("qwen3-0.6b", "fused_qkv", "K=1024 N=4096 HEAD_DIM=128 HAS_BIAS=False ROPE=True QK_NORM=True"),
            ("qwen3-0.6b", "attention", "HEAD_DIM=128 CAUSAL=True"),
            ("qwen3-0.6b", "linear", "K=2048 N=1024 HAS_BIAS=False HAS_RESIDUAL=True"),
            ("qwen3-0.6b", "gated_linear", "K=1024 N=3072 ACTIVATION=silu HAS_BIAS=False"),
            ("embeddinggemma-300m", "embeddings",
             "n_cols=768 HAS_BIAS=False HAS_POSITIONS=False HAS_NORM=False HAS_SCALE=True"),
            ("embeddinggemma-300m", "rms_norm", "n_cols=768 OFFSET=True"),
            ("embeddinggemma-300m", "fused_qkv", "K=768 N=1280 HEAD_DIM=256 HAS_BIAS=False ROPE=True QK_NORM=True"),
            ("embeddinggemma-300m", "attention", "HEAD_DIM=256 CAUSAL=True"),
            ("embeddinggemma-300m", "attention", "HEAD_DIM=256 WINDOW=True"),
            ("embeddinggemma-300m", "sandwich_rms_norm", "n_cols=768 OFFSET=True"),
            ("embeddinggemma-300m", "gated_linear", "K=768 N=1152 ACTIVATION=gelu_tanh HAS_BIAS=False"),
        }, arch


def test_shared_memory_fits_and_nothing_spills(builds):
    for b in builds:
        assert b["shared"] <= b["shared_limit"] == _target.shared_memory_limit(b["arch"]), b
        assert b["spilled"] == 0, b
        assert b["registers"] <= 255, b


def test_matrix_products_run_on_pipelined_tensor_cores(builds):
    for b in builds:
        if b["kernel"] in MATMUL_KERNELS:
            assert b["tensor_cores"] == ("wgmma" if b["arch"] == 90 else "mma"), b
            assert b["async_copies"], b
            # More than one stage of tiles in shared memory: the loads of the next K block overlap the products.
            block = b["config"]
            if b["kernel"] != "attention":
                stage = (block["BLOCK_M"] + block["BLOCK_N"]) * block["BLOCK_K"] * 2
                assert b["shared"] >= 2 * stage, b
        else:
            assert b["tensor_cores"] == "none", b


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``--sweep`` for sm_90 and sm_86 in fp16, bf16 and fp32: one compiler process per architecture, in parallel."""
    folder = tmp_path_factory.mktemp("sweep")
    runs = {}
    for arch in SWEEP_ARCHS:
        command = [sys.executable, "-m", "fastenc.kernels.aot", "--sweep", "--arch", str(arch), "--dtype",
                   "fp16,bf16,fp32", "--json", str(folder / f"{arch}.json")]
        runs[arch] = subprocess.Popen(command, env=_compile_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    results = {}
    for arch, process in runs.items():
        output, _ = process.communicate(timeout=900)
        results[arch] = (process.returncode, output, json.loads((folder / f"{arch}.json").read_text()))
    return results


def test_no_config_spills_at_any_head_dim_or_width(sweep):
    """Attention at head dims 16 to 256 and the row kernels at widths up to the largest supported, per dtype:
    every build also keeps register headroom (none uses all 255 registers)."""
    from fastenc.kernels.aot import SWEEP_HEAD_DIMS

    for arch, (returncode, output, report) in sweep.items():
        assert report["problems"] == [], report["problems"]
        assert returncode == 0, output
        assert report["tight"] == [], report["tight"]
        builds = report["builds"]
        if arch == 90:  # rows of 24 or 40 elements are 16-byte aligned too: every head dim is pipelined
            unpipelined = [b["shape"] for b in builds if b["kernel"] == "attention" and b["dtype"] != "fp32"
                           and not b["async_copies"]]
            assert unpipelined == [], unpipelined
        for dtype in ("fp16", "bf16", "fp32"):
            head_dims = sorted(int(b["shape"].split("=")[1]) for b in builds
                               if b["kernel"] == "attention" and b["dtype"] == dtype)
            assert head_dims == sorted(SWEEP_HEAD_DIMS), (arch, dtype, head_dims)
            widths = {b["shape"] for b in builds if b["kernel"] == "add_layer_norm" and b["dtype"] == dtype}
            assert "n_cols=16384" in widths, (arch, dtype, widths)


def test_maxsim_streams_documents_through_pipelined_tensor_cores(sweep):
    """MaxSim at the multi-vector dims (ColBERT's 48-128, BGE-M3's 1024): 16-bit on tensor cores behind
    asynchronous copies, fp32 on CUDA cores; no spill and shared memory within the limit (the test above)."""
    from fastenc.kernels.aot import SWEEP_MAXSIM_DIMS

    for arch, (_, _, report) in sweep.items():
        for dtype in ("fp16", "bf16", "fp32"):
            builds = [b for b in report["builds"] if b["kernel"] == "maxsim" and b["dtype"] == dtype]
            assert sorted(int(b["shape"].removeprefix("K=")) for b in builds) == sorted(SWEEP_MAXSIM_DIMS), builds
            for b in builds:
                expected = "none" if dtype == "fp32" else "wgmma" if arch == 90 else "mma"
                assert b["tensor_cores"] == expected and b["async_copies"], b


def test_the_sweep_reports_a_regression():
    """``problems`` names a spill and a build over the shared memory limit; ``tight`` one at the register cap."""
    from fastenc.kernels.aot import KernelBuild, problems, tight

    def build(**changes):
        fields = dict(kernel="attention", shape="HEAD_DIM=80", arch=90, dtype="fp16", model="sweep", config={},
                      shared=1024, shared_limit=2048, registers=128, spilled=0, tensor_cores="wgmma",
                      async_copies=True)
        return KernelBuild(**{**fields, **changes})

    assert problems([build()]) == [] and tight([build()]) == []
    builds = [build(spilled=64, registers=255), build(registers=255), build(shared=4096)]
    assert problems(builds) == ["sm_90 fp16 attention HEAD_DIM=80: spills 64 B a thread",
                                "sm_90 fp16 attention HEAD_DIM=80: 4 KiB of shared memory, over the limit of 2 KiB"]
    assert tight(builds) == ["sm_90 fp16 attention HEAD_DIM=80: uses all 255 registers"]


def test_configs_are_chosen_per_architecture():
    from fastenc.kernels.attention import attention_config, positional_config
    from fastenc.kernels.gemm import gemm_config
    from fastenc.kernels.qkv import qk_norm_config

    assert _target.shared_memory_limit(90) == 227 * 1024
    assert _target.shared_memory_limit(91) == _target.shared_memory_limit(90)  # unknown: its older kind's
    assert _target.shared_memory_limit(70) == min(_target.SHARED_MEMORY.values())
    assert attention_config(64, torch.float16, 90)["num_warps"] == 4
    assert attention_config(64, torch.float16, 86)["num_warps"] == 8  # 4 warps spill on sm_86
    assert attention_config(40, torch.float16, 90)["num_warps"] == 8  # masked head dim: 4 warps use all 255 registers
    assert attention_config(128, torch.float32, 90)["BLOCK_M"] == 16  # CUDA-core tiles: 32 rows spilled 728 B
    assert attention_config(256, torch.bfloat16, 90)["BLOCK_M"] == 64  # 128 rows: 192 KiB and all 255 registers
    assert attention_config(256, torch.bfloat16, 86)["BLOCK_N"] == 32  # 64 keys: over sm_86's shared memory
    assert positional_config(64, torch.float16, 90, causal=True)["num_warps"] == 8  # 4 warps: 254 registers
    assert qk_norm_config(torch.bfloat16, 1280, 768, 256, 90)["BLOCK_M"] == 64  # 128 x 256 spilled
    assert qk_norm_config(torch.float32, 4096, 1024, 128, 90)["BLOCK_N"] == 128  # a tile holds a whole head
    assert gemm_config(torch.float16, 3072, 768, 75)["BLOCK_M"] == 64  # no tensor cores: CUDA-core tiles
    # Tensor-core tiles follow N: the largest that gives a 128-token batch 32 tiles, else the smallest.
    shapes = {n: (c["BLOCK_M"], c["BLOCK_N"]) for n in (768, 2304, 30522)
              for c in [gemm_config(torch.float16, n, 768, 90)]}
    assert shapes == {768: (64, 64), 2304: (64, 128), 30522: (128, 128)}
    with _target.compiling_for(86):
        assert _target.device_arch(torch.device("cpu")) == 86 and _target.compiling()
    assert _target.device_arch(torch.device("cpu")) == _target.DEFAULT_ARCH and not _target.compiling()


def test_compile_only_refuses_the_interpreter():
    from fastenc.kernels import aot

    if not _target.INTERPRETED:
        pytest.skip("this process runs the compiler")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), aot.compile_only(90):
        pass


def test_the_kernels_import_nothing_above_them():
    """The kernels package (the compile target included) is the bottom layer: its modules import only
    ``fastenc.kernels``, the errors and the torch twin they mirror (``fastenc.reference``, which imports
    nothing of fastenc but the errors); the one exception is ``python -m fastenc.kernels.aot``'s entry, under its
    ``__main__`` guard, which runs the model-level report of ``fastenc.bench.compile``."""
    import ast
    import pathlib

    import fastenc.kernels

    found = {}
    for path in pathlib.Path(fastenc.kernels.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {id(node) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
                   for node in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "fastenc" else [f"fastenc.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            above = [n for n in names if n.startswith("fastenc") and not n.startswith("fastenc.kernels")
                     and n not in ("fastenc.errors", "fastenc.reference")]
            if above:
                found.setdefault(path.name, []).extend(above)
    assert found == {}, found
