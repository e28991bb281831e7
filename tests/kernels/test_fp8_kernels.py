"""The FP8 kernels against their twins in ``fastenc.reference``, under the interpreter (or compiled on CUDA).

The interpreter runs e4m3 through ``fastenc.kernels.interpreter``: exact e4m3 dot operands and torch's
round-to-nearest-even, saturating conversions (Triton's own interpreter rounds e4m3 wrongly). So:

* a GEMM on given e4m3 operands is checked by the tolerance rule of ``test_kernels.py``: the float64
  product of the same operands (dequantized, which is exact) is the reference, and the kernel's error is at
  most twice the twin's (float32 products and sums);
* a GEMM that quantizes its 16-bit ``x`` itself must produce the very codes of ``quantize_rows``: the same
  reference, on the twin's codes, catches any code that differs (one e4m3 step is far above the bound);
* a LayerNorm's codes and scales must be ``quantize_rows`` of its own stored output, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastenc.reference as reference  # noqa: E402
from fastenc import fp8, kernels  # noqa: E402
from fastenc.errors import BackendError  # noqa: E402
from fastenc.kernels import interpreter  # noqa: E402

from test_kernels import DEVICE, assert_matches, f64, norm_params, rand  # noqa: E402

E4M3 = torch.float8_e4m3fn
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """As in test_kernels.py: seeded, and every floating-point ``torch.empty`` NaN (e4m3 too: its NaN code)."""
    torch.manual_seed(0)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def quantized(rows: int, cols: int, scale: float = 1.0):
    """Random rows, quantized per row: ``(codes, scales)``."""
    return reference.quantize_rows(rand(rows, cols, dtype=torch.float32, scale=scale))


def dequantized(codes, scales):
    """Exact float64 values of quantized rows."""
    return codes.double() * scales.double()[:, None]


def gemm_case(M: int, K: int, N: int):
    x, x_scale = quantized(M, K)
    weight, weight_scale = quantized(N, K, scale=K**-0.5)
    return x, x_scale, weight, weight_scale


# --- quantize_rows ------------------------------------------------------------------------------


def test_quantize_rows_rounds_to_nearest_within_e4m3():
    x = rand(9, 70, dtype=torch.float32, scale=3.0)
    x[3] = 0.0  # an all-zero row: zero codes, a finite scale
    x[5, 11] = 1e4  # an outlier: its row's other values lose resolution, the other rows do not
    codes, scales = reference.quantize_rows(x)
    assert codes.dtype == E4M3 and scales.dtype == torch.float32 and scales.shape == (9,)
    values = codes.float()
    assert torch.isfinite(values).all() and values.abs().max() <= 448
    assert (values[3] == 0).all() and scales[3] > 0
    nonzero = [r for r in range(9) if r != 3]
    assert (values[nonzero].abs().amax(1) == 448).all()  # each row's maximum maps to e4m3's largest value
    # Round to nearest: within half a step of e4m3 (3 mantissa bits; subnormal steps of 2^-9) of x / scale.
    target = x.double() / scales.double()[:, None]
    step = torch.exp2(torch.floor(torch.log2(target.abs().clamp_min(2.0**-6))) - 3)
    assert ((values.double() - target).abs() <= step / 2 * (1 + 1e-6)).all()


def test_interpreter_e4m3_conversions_match_torch():
    values = torch.cat([torch.randn(500) * 100, torch.tensor([0.0, -0.0, 448.0, 464.0, 1e6, -1e6, 2.0**-10, 0.0137])])
    codes = interpreter.float32_to_e4m3_bits(values.numpy())
    expected = values.clamp(-448, 448).to(E4M3).view(torch.uint8).numpy()
    assert (codes == expected).all()
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = torch.from_numpy(interpreter.e4m3_bits_to_float64(every.numpy()))
    real = every.view(E4M3).double()
    assert torch.equal(decoded.isnan(), real.isnan()) and torch.equal(decoded[~real.isnan()], real[~real.isnan()])


# --- the GEMMs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("activation, with_residual", [(None, True), ("gelu", False)])
@pytest.mark.parametrize("M, K, N", [(7, 96, 40), (70, 128, 48)])  # K ragged / K one full slab
def test_linear_fp8(out_dtype, activation, with_residual, M, K, N):
    x, x_scale, weight, weight_scale = gemm_case(M, K, N)
    bias = rand(N, dtype=out_dtype)
    residual = rand(M, N, dtype=out_dtype) if with_residual else None
    out = kernels.linear_fp8(x, x_scale, weight, weight_scale, bias, activation, residual, out_dtype=out_dtype)
    expected = reference.linear(dequantized(x, x_scale), dequantized(weight, weight_scale), *f64(bias), activation,
                                *f64(residual))
    twin = reference.linear_fp8(x, x_scale, weight, weight_scale, bias, activation, residual, out_dtype=out_dtype)
    assert_matches(out, expected, twin, "linear_fp8")


@pytest.mark.parametrize("x_dtype", OUT_DTYPES, ids=str)
def test_linear_fp8_quantizes_a_16_bit_x_per_row(x_dtype):
    M, K, N = 37, 160, 24
    x = rand(M, K, dtype=x_dtype, pad=8)  # strided rows, NaN past column K
    x[4] *= 50  # rows of very different ranges: each gets its own scale
    x[9] = 0.0
    weight, weight_scale = quantized(N, K, scale=K**-0.5)
    out = kernels.linear_fp8(x, None, weight, weight_scale, None, "relu", out_dtype=x_dtype)
    codes, scales = reference.quantize_rows(x)  # the codes the kernel must have used
    expected = reference.linear(dequantized(codes, scales), dequantized(weight, weight_scale), None, "relu")
    twin = reference.linear_fp8(x, None, weight, weight_scale, None, "relu", out_dtype=x_dtype)
    assert_matches(out, expected, twin, "linear_fp8 (x quantized in the kernel)")


def test_linear_fp8_rows_are_batch_invariant():
    x = rand(70, 96, dtype=torch.float16)
    weight, weight_scale = quantized(40, 96, scale=0.1)
    bias = rand(40, dtype=torch.float16)
    full = kernels.linear_fp8(x, None, weight, weight_scale, bias, "gelu", out_dtype=torch.float16)
    for rows in (slice(0, 3), slice(64, 70)):
        alone = kernels.linear_fp8(x[rows].clone(), None, weight, weight_scale, bias, "gelu", out_dtype=torch.float16)
        assert torch.equal(alone, full[rows])


@pytest.mark.parametrize("quantize_x", [False, True], ids=["fp8-x", "16-bit-x"])
def test_gated_linear_fp8(quantize_x):
    M, K, N = 9, 64, 40
    dtype = torch.bfloat16
    x, x_scale, weight, weight_scale = gemm_case(M, K, 2 * N)
    bias = rand(2 * N, dtype=dtype)
    if quantize_x:
        x16 = rand(M, K, dtype=dtype)
        x, x_scale = reference.quantize_rows(x16)
    out = kernels.gated_linear_fp8(x16 if quantize_x else x, None if quantize_x else x_scale, weight, weight_scale,
                                   bias, "gelu_tanh", out_dtype=dtype)
    expected = reference.gated_linear(dequantized(x, x_scale), dequantized(weight, weight_scale), *f64(bias),
                                      "gelu_tanh")
    twin = reference.gated_linear_fp8(x, x_scale, weight, weight_scale, bias, "gelu_tanh", out_dtype=dtype)
    assert_matches(out, expected, twin, "gated_linear_fp8")


@pytest.mark.parametrize("quantize_x, rope", [(False, False), (True, True)], ids=["fp8-x", "16-bit-x-rope"])
def test_fused_qkv_fp8(quantize_x, rope):
    tokens, hidden, heads = 11, 64, 2  # head dim 32
    dtype = torch.float16
    x, x_scale, weight, weight_scale = gemm_case(tokens, hidden, 3 * hidden)
    bias = rand(3 * hidden, dtype=dtype)
    if quantize_x:
        x16 = rand(tokens, hidden, dtype=dtype)
        x, x_scale = reference.quantize_rows(x16)
    positions, table = None, None
    if rope:
        positions = torch.randint(0, 40, (tokens,), device=DEVICE)
        angles = torch.arange(40, device=DEVICE)[:, None] * torch.rand(16, device=DEVICE)[None, :]
        table = torch.cat([angles.cos(), angles.sin()], dim=1)  # (40, head_dim)
    out = kernels.fused_qkv_fp8(x16 if quantize_x else x, None if quantize_x else x_scale, weight, weight_scale, bias,
                                heads, positions, table, out_dtype=dtype)
    assert out.shape == (3, heads, tokens, hidden // heads) and out.dtype == dtype
    expected = reference.fused_qkv(dequantized(x, x_scale), dequantized(weight, weight_scale), *f64(bias), heads,
                                   positions, None if table is None else table.double())
    twin = reference.fused_qkv_fp8(x, x_scale, weight, weight_scale, bias, heads, positions, table, out_dtype=dtype)
    assert_matches(out, expected, twin, "fused_qkv_fp8")


def test_fp8_gemm_argument_errors():
    x, x_scale, weight, weight_scale = gemm_case(4, 32, 8)
    with pytest.raises(ValueError, match="needs its"):
        kernels.linear_fp8(x, None, weight, weight_scale, None, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="x_scale=None"):
        kernels.linear_fp8(x.float(), x_scale, weight, weight_scale, None, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="weight has dtype"):
        kernels.linear_fp8(x, x_scale, weight.float(), weight_scale, None, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        kernels.linear_fp8(x, x_scale, weight, weight_scale[:4], None, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.linear_fp8(x, x_scale, weight, weight_scale, None, out_dtype=E4M3)


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(BackendError, match=r"FP8 tensor cores \(sm_89.*A100 is sm_80"):
        fp8.check_device(torch.device("cuda"), "triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    fp8.check_device(torch.device("cuda"), "triton")  # an L4: fine


# --- the LayerNorms that quantize their output --------------------------------------------------


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["add_layer_norm_fp8", "layer_norm_fp8"])
def test_layer_norm_fp8(dtype, with_residual):
    tokens, hidden = 7, 120
    x, residual = rand(tokens, hidden, dtype=dtype, pad=4), rand(tokens, hidden, dtype=dtype)
    weight, bias = norm_params(hidden, dtype)
    if with_residual:
        out, codes, scales = kernels.add_layer_norm_fp8(x, residual, weight, bias, 1e-12)
        expected = reference.add_layer_norm(*f64(x, residual, weight, bias), 1e-12)
        twin, _, _ = reference.add_layer_norm_fp8(x, residual, weight, bias, 1e-12)
    else:
        out, codes, scales = kernels.layer_norm_fp8(x, weight, bias, 1e-12)
        expected = reference.layer_norm(*f64(x, weight, bias), 1e-12)
        twin, _, _ = reference.layer_norm_fp8(x, weight, bias, 1e-12)
    assert_matches(out, expected, twin, "layer norm output")
    same_codes, same_scales = reference.quantize_rows(out)
    assert codes.dtype == E4M3 and torch.isfinite(codes.float()).all() and torch.isfinite(scales).all()
    assert torch.equal(codes.view(torch.uint8), same_codes.view(torch.uint8))  # bit for bit
    assert torch.equal(scales, same_scales)
