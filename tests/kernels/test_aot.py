"""The kernels compiled for real GPUs without one: ``fastenc.kernels.aot`` (Triton's compiler and ptxas).

What the interpreter cannot show: that every kernel of a BERT-base forward compiles for sm_90 (H100) and
sm_86 (A10, RTX 30xx, the smallest shared memory of the tensor-core GPUs), fits the architecture's
shared memory, spills no registers, and runs its matrix products on tensor cores behind pipelined
asynchronous copies. The compiler runs in a subprocess: this process has the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastenc.kernels import _target

MATMUL_KERNELS = {"linear", "fused_qkv", "attention", "splade_pool"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastenc.kernels.aot", "--arch", "90,86", "--dtype", "fp16,bf16",
               "--models", "bert-base", "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())["builds"]


def test_every_kernel_of_the_forward_compiles(builds):
    for arch in (90, 86):
        for dtype in ("fp16", "bf16"):
            kernels = {b["kernel"] for b in builds if b["arch"] == arch and b["dtype"] == dtype}
            assert kernels == {"embeddings", "fused_qkv", "attention", "linear", "add_layer_norm",
                               "gelu_layer_norm", "splade_pool"}, (arch, dtype)
    ffn = {b["shape"] for b in builds if b["kernel"] == "linear"}
    assert ffn == {"K=768 N=768", "K=768 N=3072 ACTIVATION=gelu", "K=3072 N=768"}
    splade = {b["shape"] for b in builds if b["kernel"] == "splade_pool"}
    assert splade == {"K=768 N=30522 ACTIVATION=relu POOLING=max", "K=768 N=30522 ACTIVATION=log1p_relu POOLING=sum"}


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


def test_configs_are_chosen_per_architecture():
    from fastenc.kernels.attention import attention_config
    from fastenc.kernels.gemm import gemm_config

    assert _target.shared_memory_limit(90) == 227 * 1024
    assert _target.shared_memory_limit(91) == _target.shared_memory_limit(90)  # unknown: its older kind's
    assert _target.shared_memory_limit(70) == min(_target.SHARED_MEMORY.values())
    assert attention_config(64, torch.float16, 90)["num_warps"] == 4
    assert attention_config(64, torch.float16, 86)["num_warps"] == 8  # 4 warps spill on sm_86
    assert gemm_config(torch.float16, 3072, 768, 75)["BLOCK_M"] == 64  # no tensor cores: CUDA-core tiles
    with _target.compiling_for(86):
        assert _target.device_arch(torch.device("cpu")) == 86 and _target.compiling()
    assert _target.device_arch(torch.device("cpu")) == _target.DEFAULT_ARCH and not _target.compiling()


def test_compile_only_refuses_the_interpreter():
    from fastenc.kernels import aot

    if not _target.INTERPRETED:
        pytest.skip("this process runs the compiler")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), aot.compile_only(90):
        pass
