"""``rms_norm`` and ``sandwich_rms_norm``: the decoder families' RMSNorm, alone and fused with the residual.

Algorithm: one row per program, the whole row in registers (``BLOCK`` = the next power of two of the
hidden size, masked), as the LayerNorm kernels (``layer_norm.py``). ``_rms_norm_row`` forms
``mean(x^2)`` in fp32 and ``rstd = 1 / sqrt(mean + eps)`` with the correctly rounded ``div_rn`` and
``sqrt_rn`` (fp32 ``/`` compiles to an approximate divide on the GPU; torch's CPU ``rsqrt`` is a
correctly rounded divide of a correctly rounded square root), then weights ``x * rstd``.

Roundings: transformers' own, so that on equal statistics the kernels give transformers' bits in every
dtype (``fastenc.reference``'s module docstring). ``OFFSET=False`` is ``LlamaRMSNorm`` (Mistral's, Qwen2's
and Qwen3's are the same code): ``x * rstd`` is rounded to the input dtype, then multiplied by the weight
and rounded again. ``OFFSET=True`` is ``Gemma3RMSNorm``: ``x * rstd * (offset + weight)`` in fp32, rounded
once. In fp32 the two are the same arithmetic. What can still differ from torch: the order of the sum
of squares (a tree here, torch's vectorised cascade on the CPU), so the kernels equal the twin bit for
bit where that sum is exact, and within a few ulp of it elsewhere.

``sandwich_rms_norm`` is the residual step of Gemma's "sandwich" blocks (a norm before and after each
sub-block): ``r = residual + rms_norm(x, weight)``, ``h = rms_norm(r, next_weight)``, in one pass that
reads ``x`` and ``residual`` once and writes ``r`` and ``h``. The post-norm's output and the sum are
rounded to the input dtype before the next step, as transformers' module boundaries round them, and ``h``
normalises the ``r`` that is stored: the fused op is the unfused sequence ``rms_norm``, add, ``rms_norm``,
not an approximation of it. The pre-norm decoders (Llama, Qwen, Mistral) need no such op: their
residual add rides in the output projection's epilogue (``linear(..., residual=)``), then ``rms_norm``.

Batch invariance: a row reads only itself; the reduction order depends only on the hidden size.

Limits: hidden sizes up to ``MAX_HIDDEN`` (16384, as the LayerNorms: a row must fit one program's
registers); rows may be strided, the last stride must be 1; the weights have the input's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastenc.kernels._checks import check_backend, check_tensor, on_device
from fastenc.kernels.layer_norm import MAX_HIDDEN, row_config


@triton.jit
def _rms_norm_row(
    x,  # (BLOCK,) fp32 row
    mask,  # (BLOCK,) lanes < n_cols
    W_ptr,  # (n_cols,)
    offs,  # (BLOCK,)
    n_cols,
    eps,
    offset,
    OUT_DTYPE: tl.constexpr,  # the input's dtype: LlamaRMSNorm rounds to it before weighting
    OFFSET: tl.constexpr,
):
    """RMSNorm of one fp32 row held in registers, in fp32 (rounded to OUT_DTYPE where transformers rounds,
    but not at the end: the caller's store casts); masked lanes come back as 0."""
    x = tl.where(mask, x, 0.0)
    mean_square = tl.div_rn(tl.sum(x * x, axis=0), n_cols.to(tl.float32))
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
    weight = tl.load(W_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:  # Gemma3RMSNorm: weighted in fp32
        y = x * rstd * (offset + weight)
    else:  # LlamaRMSNorm: weight * (x * rstd).to(dtype)
        y = weight * (x * rstd).to(OUT_DTYPE).to(tl.float32)
    return y


@triton.jit
def _rms_norm_kernel(
    X_ptr,  # (tokens, hidden)
    W_ptr,  # (hidden,)
    Out_ptr,  # (tokens, hidden)
    stride_x_row,
    stride_out_row,
    n_cols,
    eps,
    offset,
    BLOCK: tl.constexpr,
    OFFSET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X_ptr + row * stride_x_row + offs, mask=mask, other=0.0).to(tl.float32)
    y = _rms_norm_row(x, mask, W_ptr, offs, n_cols, eps, offset, Out_ptr.dtype.element_ty, OFFSET)
    tl.store(Out_ptr + row * stride_out_row + offs, y.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sandwich_rms_norm_kernel(
    X_ptr,  # (tokens, hidden): the sub-block's output
    Residual_ptr,  # (tokens, hidden)
    W_ptr,  # (hidden,): the post-norm
    NextW_ptr,  # (hidden,): the next pre-norm
    OutResidual_ptr,  # (tokens, hidden)
    OutH_ptr,  # (tokens, hidden)
    stride_x_row,
    stride_residual_row,
    stride_out_row,  # both outputs (contiguous, the same shape)
    n_cols,
    eps,
    offset,
    BLOCK: tl.constexpr,
    OFFSET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = OutH_ptr.dtype.element_ty
    x = tl.load(X_ptr + row * stride_x_row + offs, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(Residual_ptr + row * stride_residual_row + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded where transformers' modules round: the post-norm's output, then the sum.
    post = _rms_norm_row(x, mask, W_ptr, offs, n_cols, eps, offset, dtype, OFFSET).to(dtype).to(tl.float32)
    r = (residual + post).to(dtype)
    tl.store(OutResidual_ptr + row * stride_out_row + offs, r, mask=mask)
    h = _rms_norm_row(r.to(tl.float32), mask, NextW_ptr, offs, n_cols, eps, offset, dtype, OFFSET)
    tl.store(OutH_ptr + row * stride_out_row + offs, h.to(dtype), mask=mask)


def sandwich_config(hidden: int) -> dict:
    """``row_config`` with 8 columns a thread up to 32 warps (``BLOCK / 256`` warps, at least 4): the sandwich
    kernel holds two rows and two weights, and with ``row_config``'s 16 columns a thread (4 warps at 2048,
    8 at 4096) it spilled 8-24 B a thread on sm_90 and sm_86 in fp16 and bf16 (Triton 3.9,
    ``python -m fastenc.kernels.aot --sweep --decoder``)."""
    config = row_config(hidden)
    config["num_warps"] = min(32, max(4, config["BLOCK"] // 256))
    return config


def _check_rms_args(x, weight, eps, offset) -> torch.device:
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    hidden = x.shape[1]
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"x has hidden size {hidden}; the RMSNorm kernels support 1 to {MAX_HIDDEN}")
    check_tensor("weight", weight, (hidden,), dtypes=(x.dtype,), device=device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite float, got {offset!r}")
    return device


def rms_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    eps: float,
    offset: float = 0.0,  # the weight is offset + weight: Gemma's 1
) -> torch.Tensor:  # (tokens, hidden)
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` with transformers' roundings: Llama's, Mistral's and
    Qwen's RMSNorm (``offset=0``), Gemma3's (``offset=1``)."""
    device = _check_rms_args(x, weight, eps, offset)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    if tokens == 0:
        return out
    with on_device(device):
        _rms_norm_kernel[(tokens,)](
            x, weight, out, x.stride(0), out.stride(0), hidden, float(eps), float(offset), **row_config(hidden),
            OFFSET=offset != 0,
        )
    return out


def sandwich_rms_norm(
    x: torch.Tensor,  # (tokens, hidden): a sub-block's output
    residual: torch.Tensor,  # (tokens, hidden): the residual stream
    weight: torch.Tensor,  # (hidden,): the sub-block's post-norm
    next_weight: torch.Tensor,  # (hidden,): the next sub-block's pre-norm
    eps: float,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (tokens, hidden) each
    """``r = residual + rms_norm(x, weight)`` and ``h = rms_norm(r, next_weight)`` in one pass; returns ``(r, h)``
    (Gemma's sandwich blocks: the post-norm, the residual add and the next sub-block's pre-norm)."""
    device = _check_rms_args(x, weight, eps, offset)
    tokens, hidden = x.shape
    check_tensor("residual", residual, (tokens, hidden), dtypes=(x.dtype,), device=device)
    check_tensor("next_weight", next_weight, (hidden,), dtypes=(x.dtype,), device=device)
    r = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    h = torch.empty((tokens, hidden), device=device, dtype=x.dtype)
    if tokens > 0:
        with on_device(device):
            _sandwich_rms_norm_kernel[(tokens,)](
                x, residual, weight, next_weight, r, h, x.stride(0), residual.stride(0), r.stride(0), hidden,
                float(eps), float(offset), **sandwich_config(hidden), OFFSET=offset != 0,
            )
    return r, h
