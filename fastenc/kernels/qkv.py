"""``fused_qkv``: one GEMM for Q, K and V that writes the heads already split, Q pre-scaled.

Algorithm: the tiled GEMM of ``gemm.py`` (same main loop, ``_gemm_tile``) over ``x (tokens, hidden)``
and the stacked ``(3 * hidden, hidden)`` weight. The epilogue adds the bias, multiplies the Q columns by
``1 / sqrt(head_dim)`` (so attention applies no scale) and stores every column straight into its
place in the contiguous ``(3, heads, tokens, head_dim)`` output: column ``n`` belongs to slab
``n // head_dim`` of the ``(3 * heads, tokens, head_dim)`` view (``which = n // hidden``,
``head = (n % hidden) // head_dim``) at ``d = n % head_dim``. This replaces the split / transpose /
``.contiguous()`` copy of the usual implementation, and gives attention unit-stride rows per head.

Batch invariance and precision: as in ``gemm.py`` (no split-K, block sizes from N, K and the
architecture only, fp32 accumulation, ``ieee`` products for fp32). The Q scale is applied in fp32
before the single rounding to the output dtype.

Limits: ``hidden`` must be a multiple of ``num_heads``; ``x`` and ``weight`` need a unit stride in
their last dimension.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import on_device, check_backend, check_tensor
from fastenc.kernels.gemm import _gemm_tile, _tile_coords, gemm_config


@triton.jit
def _fused_qkv_kernel(
    X_ptr,  # (tokens, hidden)
    W_ptr,  # (3 * hidden, hidden)
    B_ptr,  # (3 * hidden,)
    Out_ptr,  # (3 * heads, tokens, head_dim), contiguous
    M,  # tokens
    N,  # 3 * hidden
    K,  # hidden
    stride_x_row,
    stride_w_row,
    q_scale,  # 1 / sqrt(head_dim)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile(
        X_ptr, W_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K
    )
    col_ok = offs_n < N
    bias = tl.load(B_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    # Q occupies the first `hidden` (== K) columns of the stacked projection.
    col_scale = tl.where(offs_n < K, q_scale, 1.0)
    out = (acc + bias[None, :]) * col_scale[None, :]

    # Column n -> element (n % HEAD_DIM) of slab (n // HEAD_DIM); row t -> t * HEAD_DIM within a slab.
    slab = (offs_n // HEAD_DIM).to(tl.int64)
    col_offset = slab * M * HEAD_DIM + offs_n % HEAD_DIM  # (BLOCK_N,)
    row_offset = offs_m.to(tl.int64) * HEAD_DIM  # (BLOCK_M,)
    out_ptrs = Out_ptr + row_offset[:, None] + col_offset[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & col_ok[None, :])


def fused_qkv(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (3 * hidden, hidden): Q, K, V stacked
    bias: torch.Tensor,  # (3 * hidden,)
    num_heads: int,
) -> torch.Tensor:  # (3, heads, tokens, head_dim) contiguous, Q scaled by 1/sqrt(head_dim)
    """One GEMM for Q, K and V, returned with the heads split, Q pre-scaled for the softmax."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    tokens, hidden = x.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or hidden % num_heads != 0:
        raise ValueError(f"num_heads must be a positive int dividing hidden={hidden}, got {num_heads!r}")
    check_tensor("weight", weight, (3 * hidden, hidden), dtypes=(x.dtype,), device=device)
    check_tensor("bias", bias, (3 * hidden,), dtypes=(x.dtype,), device=device)
    head_dim = hidden // num_heads

    out = torch.empty((3, num_heads, tokens, head_dim), device=device, dtype=x.dtype)
    if tokens == 0 or hidden == 0:
        return out
    N, K = 3 * hidden, hidden
    config = gemm_config(x.dtype, N, K, _target.device_arch(device))
    grid = (triton.cdiv(tokens, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    with on_device(device):
        _fused_qkv_kernel[grid](
            x,
            weight,
            bias,
            out,
            tokens,
            N,
            K,
            x.stride(0),
            weight.stride(0),
            1.0 / math.sqrt(head_dim),
            HEAD_DIM=head_dim,
            **config,
        )
    return out
