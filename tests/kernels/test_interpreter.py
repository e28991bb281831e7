"""The interpreter's witness (``fastenc.kernels.interpreter``): a row's dot product has the same bits at
every position of a tile, bf16 operands are read exactly, and fp32 -> bf16 casts round to nearest even.

These hold on any host: the replaced ``tl.dot`` uses no BLAS. (Triton's own interpreter dot is the
host's BLAS, whose result for a row depends on the row's index in the tile: see the module docstring.)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastenc.kernels import _target, interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(not _target.INTERPRETED, reason="tests the Triton interpreter's replacement dot")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@triton.jit
def _dot_kernel(
    A_ptr,  # (M, K)
    B_ptr,  # (K, N)
    C_ptr,  # (M, N) fp32 accumulator in
    Out_ptr,  # (M, N) fp32
    M: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(B_ptr + rk[:, None] * N + rn[None, :])
    c = tl.load(C_ptr + rm[:, None] * N + rn[None, :])
    tl.store(Out_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, c, input_precision="ieee"))


@triton.jit
def _to_bf16_kernel(X_ptr, Out_ptr, N: tl.constexpr):  # (N,) fp32 -> (N,) bf16
    offs = tl.arange(0, N)
    tl.store(Out_ptr + offs, tl.load(X_ptr + offs).to(tl.bfloat16))


def _dot(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = torch.full(c.shape, float("nan"))
    _dot_kernel[(1,)](a, b, c, out, a.shape[0], a.shape[1], b.shape[1])
    return out


def test_the_suite_installed_the_witness():
    assert interpreter.installed()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_has_the_same_bits_at_every_position_of_a_tile(dtype):
    generator = torch.Generator().manual_seed(0)
    K, N = 64, 32
    b = torch.randn(K, N, generator=generator).to(dtype)
    row = torch.randn(K, generator=generator).to(dtype)
    c_row = torch.randn(N, generator=generator)
    alone = None
    for M in (16, 32, 64):
        for position in range(M):
            a = torch.randn(M, K, generator=generator).to(dtype)
            c = torch.randn(M, N, generator=generator)
            a[position], c[position] = row, c_row
            result = _dot(a, b, c)[position]
            if alone is None:
                alone = result
            assert torch.equal(result, alone), (M, position)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_dot_is_exact_before_its_single_rounding(dtype):
    """c + a @ b in float64 (exact for these operand types at this size), rounded once to fp32."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=generator).to(dtype)
    b = torch.randn(32, 16, generator=generator).to(dtype)
    c = torch.randn(16, 16, generator=generator)
    expected = (c.double() + a.double() @ b.double()).float()
    assert torch.equal(_dot(a, b, c), expected)


def test_fp32_to_bf16_rounds_to_nearest_even_like_torch():
    generator = torch.Generator().manual_seed(2)
    values = torch.cat([
        torch.randn(4096, generator=generator) * torch.logspace(-30, 30, 4096),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.0e38, -3.0e38, 1e-40, -1e-40]),
        # ties: the discarded half is exactly 0x8000; even and odd kept halves round differently
        torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000], dtype=torch.int64).to(torch.int32)
        .view(torch.float32),
    ])
    padded = triton.next_power_of_2(values.numel())
    source = torch.cat([values, torch.zeros(padded - values.numel())])
    result = torch.empty(padded, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](source, result, padded)
    out = result[: values.numel()]
    assert torch.equal(out.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


def test_nan_stays_nan_through_the_bf16_cast():
    bits = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0xFFFFFFFF], dtype=np.uint32)
    converted = interpreter.bf16_bits_to_float32(interpreter.float32_to_bf16_bits(bits.view(np.float32)))
    assert np.isnan(converted).all()
    assert list(np.signbit(converted)) == [False, True, False, True]


def test_uninstall_restores_triton_and_install_is_idempotent():
    from triton.runtime.interpreter import InterpreterBuilder

    replaced = InterpreterBuilder.create_dot
    interpreter.install()  # already installed: nothing changes
    assert InterpreterBuilder.create_dot is replaced
    interpreter.uninstall()
    try:
        assert not interpreter.installed() and InterpreterBuilder.create_dot is not replaced
    finally:
        interpreter.install()
    assert InterpreterBuilder.create_dot is replaced
