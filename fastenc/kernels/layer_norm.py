"""``add_layer_norm``, ``gelu_layer_norm`` and ``layer_norm``: LayerNorm fused with what precedes it.

Algorithm: one row per program, the whole row in registers (``BLOCK`` = the next power of two of the
hidden size, masked). The row is formed in fp32 (``x + residual``, or ``act(x)``), then
``_layer_norm_row`` computes the mean, then the variance of the centred row (two passes over
registers, which is exact where the one-pass ``E[x^2] - E[x]^2`` cancels), and applies
``(x - mean) * rstd * weight + bias``; the result is cast once at the store. This is the forward of the
Triton layer-norm tutorial and Liger-Kernel's ``layer_norm``, without the backward's saved statistics.

Precision: statistics in fp32; the mean, the variance and ``rstd`` use the correctly rounded
``div_rn``/``sqrt_rn`` (three per row, so free) rather than fp32 ``/``, which the GPU compiles to an
approximate divide (``div.full.f32``), and ``rsqrt``. What stays approximate on the GPU: the tanh-GELU
of ``gelu_layer_norm`` (``exp2`` is ``ex2.approx.ftz`` and its ``/`` approximate, as in the GEMM
epilogue; erf-GELU uses libdevice's ``erf``). The interpreter computes all of these exactly. The residual sum and the activation are not rounded to
the input dtype before the norm (the reference rounds them), which only removes error.

Batch invariance: a row reads only itself; the reduction order depends only on the hidden size.

``layer_norm`` is the plain norm of the pre-LN blocks (ModernBERT), whose residual add happens in the
preceding GEMM's epilogue (``linear(..., residual=)``). Norms without a bias (ModernBERT's) take
``HAS_BIAS=False``.

FP8 (``add_layer_norm_fp8``, ``layer_norm_fp8``; ``QUANTIZE``): the row is in registers already, so the
same program also writes it quantized for the next GEMM: the output rounded to its dtype, its absolute
maximum, then e4m3 codes and one float32 scale for the row (``fastenc.reference.quantize_rows`` of the
output row, bit for bit). One pass writes the residual stream and the FP8 operand.

Limits: hidden sizes up to 16384 (a row must fit one program's registers: wider rows spill; no
BERT-family encoder comes near it); rows may be strided, the last stride
must be 1; ``weight`` and ``bias`` have the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import on_device, check_activation, check_backend, check_tensor
from fastenc.kernels.gemm import _apply_activation, _row_quantization, _to_fp8
from fastenc.reference import FP8_DTYPE

# A row must fit one program's registers: at 32768 fp32 values a row spills even with 32 warps (the
# register file allows 64 a thread there), so wider rows are refused (the torch backend takes any width).
MAX_HIDDEN = 16384


@triton.jit
def _layer_norm_row(
    x,  # (BLOCK,) fp32 row
    mask,  # (BLOCK,) lanes < n_cols
    W_ptr,  # (n_cols,)
    B_ptr,  # (n_cols,)
    offs,  # (BLOCK,)
    n_cols,
    eps,
    HAS_BIAS: tl.constexpr = True,
):
    """LayerNorm of one fp32 row held in registers; masked lanes are ignored and come back as 0."""
    x = tl.where(mask, x, 0.0)
    width = n_cols.to(tl.float32)
    # div_rn: fp32 `/` compiles to an approximate divide on the GPU (div.full.f32, up to 2 ulp).
    mean = tl.div_rn(tl.sum(x, axis=0), width)
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.div_rn(tl.sum(centred * centred, axis=0), width)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    weight = tl.load(W_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(B_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = centred * rstd * weight + bias
    else:
        y = centred * rstd * weight
    return y


@triton.jit
def _store_row(
    y,  # (BLOCK,) fp32 row
    mask,  # (BLOCK,) lanes < n_cols
    offs,  # (BLOCK,)
    Out_row_ptr,  # (n_cols,): the row's place in the output
    Q_row_ptr,  # (n_cols,) e4m3, None when not QUANTIZE
    Scale_row_ptr,  # (1,) float32, None when not QUANTIZE
    QUANTIZE: tl.constexpr,
):
    """Store a row in the output's dtype and, with ``QUANTIZE``, that stored row's e4m3 codes and scale."""
    out = y.to(Out_row_ptr.dtype.element_ty)
    tl.store(Out_row_ptr + offs, out, mask=mask)
    if QUANTIZE:
        value = out.to(tl.float32)
        inverse, scale = _row_quantization(tl.max(tl.where(mask, tl.abs(value), 0.0), axis=0))
        tl.store(Q_row_ptr + offs, _to_fp8(value * inverse), mask=mask)
        tl.store(Scale_row_ptr, scale)


@triton.jit
def _add_layer_norm_kernel(
    X_ptr,  # (tokens, hidden)
    Residual_ptr,  # (tokens, hidden)
    W_ptr,  # (hidden,)
    B_ptr,  # (hidden,)
    Out_ptr,  # (tokens, hidden)
    stride_x_row,
    stride_residual_row,
    stride_out_row,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr = True,
    Q_ptr=None,  # (tokens, hidden) e4m3, contiguous, when QUANTIZE
    Scale_ptr=None,  # (tokens,) float32 when QUANTIZE
    QUANTIZE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X_ptr + row * stride_x_row + offs, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(Residual_ptr + row * stride_residual_row + offs, mask=mask, other=0.0).to(tl.float32)
    y = _layer_norm_row(x + residual, mask, W_ptr, B_ptr, offs, n_cols, eps, HAS_BIAS)
    if QUANTIZE:
        _store_row(y, mask, offs, Out_ptr + row * stride_out_row, Q_ptr + row * n_cols, Scale_ptr + row, True)
    else:
        _store_row(y, mask, offs, Out_ptr + row * stride_out_row, None, None, False)


@triton.jit
def _gelu_layer_norm_kernel(
    X_ptr,  # (tokens, hidden)
    W_ptr,  # (hidden,)
    B_ptr,  # (hidden,)
    Out_ptr,  # (tokens, hidden)
    stride_x_row,
    stride_out_row,
    n_cols,
    eps,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr = True,
    Q_ptr=None,  # (tokens, hidden) e4m3, contiguous, when QUANTIZE
    Scale_ptr=None,  # (tokens,) float32 when QUANTIZE
    QUANTIZE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X_ptr + row * stride_x_row + offs, mask=mask, other=0.0).to(tl.float32)
    y = _layer_norm_row(_apply_activation(x, ACTIVATION), mask, W_ptr, B_ptr, offs, n_cols, eps, HAS_BIAS)
    if QUANTIZE:
        _store_row(y, mask, offs, Out_ptr + row * stride_out_row, Q_ptr + row * n_cols, Scale_ptr + row, True)
    else:
        _store_row(y, mask, offs, Out_ptr + row * stride_out_row, None, None, False)


def row_config(hidden: int) -> dict:
    """One row per program: the block covers the row; more warps for wide rows."""
    block = triton.next_power_of_2(hidden)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return dict(BLOCK=block, num_warps=warps, **_target.COMPILE_OPTIONS)


def _check_norm_args(x, weight, bias, eps) -> torch.device:
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    hidden = x.shape[1]
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"x has hidden size {hidden}; the LayerNorm kernels support 1 to {MAX_HIDDEN}")
    check_tensor("weight", weight, (hidden,), dtypes=(x.dtype,), device=device)
    if bias is not None:
        check_tensor("bias", bias, (hidden,), dtypes=(x.dtype,), device=device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return device


def add_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    residual: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(x + residual)``: the post-LN residual of every BERT-family block."""
    device = _check_norm_args(x, weight, bias, eps)
    check_tensor("residual", residual, tuple(x.shape), dtypes=(x.dtype,), device=device)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    if tokens == 0:
        return out
    with on_device(device):
        _add_layer_norm_kernel[(tokens,)](
            x,
            residual,
            weight,
            bias,
            out,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            hidden,
            float(eps),
            **row_config(hidden),
            HAS_BIAS=bias is not None,
        )
    return out


def layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(x)``: the pre-LN blocks' norms and ModernBERT's final norm."""
    return gelu_layer_norm(x, weight, bias, eps, None)


def gelu_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
    activation: str = "gelu",
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(act(x))``: the transform of the masked-LM head."""
    device = _check_norm_args(x, weight, bias, eps)
    act = check_activation("activation", activation)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    if tokens == 0:
        return out
    with on_device(device):
        _gelu_layer_norm_kernel[(tokens,)](
            x, weight, bias, out, x.stride(0), out.stride(0), hidden, float(eps), ACTIVATION=act, **row_config(hidden),
            HAS_BIAS=bias is not None,
        )
    return out


def _fp8_outputs(tokens: int, hidden: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((tokens, hidden), device=device, dtype=FP8_DTYPE),
            torch.empty((tokens,), device=device, dtype=torch.float32))


def add_layer_norm_fp8(
    x: torch.Tensor,  # (tokens, hidden)
    residual: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (tokens, hidden), (tokens, hidden) fp8, (tokens,) fp32
    """``add_layer_norm``, and its output quantized per row (e4m3 codes, float32 scales) from the same pass."""
    device = _check_norm_args(x, weight, bias, eps)
    check_tensor("residual", residual, tuple(x.shape), dtypes=(x.dtype,), device=device)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    q, scale = _fp8_outputs(tokens, hidden, device)
    if tokens == 0:
        return out, q, scale
    with on_device(device):
        _add_layer_norm_kernel[(tokens,)](
            x, residual, weight, bias, out, x.stride(0), residual.stride(0), out.stride(0), hidden, float(eps),
            **row_config(hidden), HAS_BIAS=bias is not None, Q_ptr=q, Scale_ptr=scale, QUANTIZE=True,
        )
    return out, q, scale


def layer_norm_fp8(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (tokens, hidden), (tokens, hidden) fp8, (tokens,) fp32
    """``layer_norm``, and its output quantized per row from the same pass."""
    device = _check_norm_args(x, weight, bias, eps)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    q, scale = _fp8_outputs(tokens, hidden, device)
    if tokens == 0:
        return out, q, scale
    with on_device(device):
        _gelu_layer_norm_kernel[(tokens,)](
            x, weight, bias, out, x.stride(0), out.stride(0), hidden, float(eps), ACTIVATION="none",
            **row_config(hidden), HAS_BIAS=bias is not None, Q_ptr=q, Scale_ptr=scale, QUANTIZE=True,
        )
    return out, q, scale
