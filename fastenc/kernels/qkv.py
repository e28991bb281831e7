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

RoPE (``ROPE``, ModernBERT, NomicBERT, GTE): Q and K are rotated in the same epilogue, before the
scale, so rotated Q and K never make a trip through memory. The weight's Q and K rows are in
rotary-pair order (``fastenc.family.rotary_pair_order``): the pair ``(2i, 2i + 1)`` of a head turns by
angle ``i`` of the token's position, and since a head starts at an even column and tiles are even,
both columns of a pair always sit in one tile. The epilogue splits the tile into its even and odd
columns (``tl.reshape`` + ``tl.split``), gathers the cosines and sines of each row's position from the
float32 table built at load (``fastenc.family.rope_table``: transformers' own angles, no
transcendental functions in the kernel), rotates in fp32 and joins the halves back. V columns pass
through (cosine 1, sine 0).

Bias-free projections (ModernBERT, NomicBERT) take ``HAS_BIAS=False``. The Q scale is
``1 / sqrt(head_dim)`` unless the caller gives one (DeBERTa's ``1 / sqrt(head_dim * scale_factor)``).

Limits: ``hidden`` must be a multiple of ``num_heads``; ``x`` and ``weight`` need a unit stride in
their last dimension; with RoPE the head dim is even and positions are below the table's length (not
checked on the device: the encoder validates sequence lengths first).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import INDEX_DTYPES, check_backend, check_tensor, on_device
from fastenc.kernels.gemm import _gemm_tile, _tile_coords, gemm_config


@triton.jit
def _rotate_pairs(
    out,  # (BLOCK_M, BLOCK_N) fp32 tile of the stacked projection
    Positions_ptr,  # (tokens,)
    Rope_ptr,  # (max_positions, HEAD_DIM) float32: cosines then sines
    stride_rope_row,
    pid_n,
    offs_m,
    M,
    hidden,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rotate the Q and K pairs (columns 2j, 2j + 1) of a tile by their rows' angles; V passes through."""
    even, odd = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N // 2, 2)))  # (BLOCK_M, BLOCK_N // 2) each
    first = pid_n * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)  # the pair's first column
    angle = (first % HEAD_DIM) // 2  # (BLOCK_N // 2,) which angle of the head
    rotated = first < 2 * hidden  # Q and K; not V (nor columns past the end)
    position = tl.load(Positions_ptr + offs_m % M).to(tl.int64)  # (BLOCK_M,) rows past M wrap, as in _gemm_tile
    row = Rope_ptr + position[:, None] * stride_rope_row + angle[None, :]
    cos = tl.load(row, mask=rotated[None, :], other=1.0)
    sin = tl.load(row + HEAD_DIM // 2, mask=rotated[None, :], other=0.0)
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK_M, BLOCK_N))


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
    Positions_ptr=None,  # (tokens,) integer, None when not ROPE
    Rope_ptr=None,  # (max_positions, HEAD_DIM) float32: cosines then sines, None when not ROPE
    stride_rope_row=0,
    HAS_BIAS: tl.constexpr = True,
    ROPE: tl.constexpr = False,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile(
        X_ptr, W_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K
    )
    col_ok = offs_n < N
    out = acc
    if HAS_BIAS:
        out += tl.load(B_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        out = _rotate_pairs(out, Positions_ptr, Rope_ptr, stride_rope_row, pid_n, offs_m, M, K, HEAD_DIM, BLOCK_M,
                            BLOCK_N)
    # Q occupies the first `hidden` (== K) columns of the stacked projection.
    col_scale = tl.where(offs_n < K, q_scale, 1.0)
    out = out * col_scale[None, :]

    # Column n -> element (n % HEAD_DIM) of slab (n // HEAD_DIM); row t -> t * HEAD_DIM within a slab.
    slab = (offs_n // HEAD_DIM).to(tl.int64)
    col_offset = slab * M * HEAD_DIM + offs_n % HEAD_DIM  # (BLOCK_N,)
    row_offset = offs_m.to(tl.int64) * HEAD_DIM  # (BLOCK_M,)
    out_ptrs = Out_ptr + row_offset[:, None] + col_offset[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & col_ok[None, :])


def fused_qkv(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (3 * hidden, hidden): Q, K, V stacked
    bias: torch.Tensor | None,  # (3 * hidden,)
    num_heads: int,
    positions: torch.Tensor | None = None,  # (tokens,) integer, with rope
    rope: torch.Tensor | None = None,  # (max_positions, head_dim) float32: cosines, then sines
    *,
    scale: float | None = None,  # Q's factor; None: 1 / sqrt(head_dim)
) -> torch.Tensor:  # (3, heads, tokens, head_dim) contiguous, Q scaled by 1/sqrt(head_dim)
    """One GEMM for Q, K and V, returned with the heads split, Q pre-scaled for the softmax (by ``scale``
    when given); with ``rope``, Q and K rotated (pairs ``2i, 2i + 1``) by the angles of their positions."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    tokens, hidden = x.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or hidden % num_heads != 0:
        raise ValueError(f"num_heads must be a positive int dividing hidden={hidden}, got {num_heads!r}")
    check_tensor("weight", weight, (3 * hidden, hidden), dtypes=(x.dtype,), device=device)
    if bias is not None:
        check_tensor("bias", bias, (3 * hidden,), dtypes=(x.dtype,), device=device)
    head_dim = hidden // num_heads
    if rope is not None:
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        check_tensor("rope", rope, (None, head_dim), dtypes=(torch.float32,), device=device)
        if positions is None:
            raise ValueError("positions is required with rope")
        check_tensor("positions", positions, (tokens,), dtypes=INDEX_DTYPES, device=device)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

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
            1.0 / math.sqrt(head_dim) if scale is None else float(scale),
            HEAD_DIM=head_dim,
            **config,
            Positions_ptr=positions if rope is not None else None,
            Rope_ptr=rope,
            stride_rope_row=0 if rope is None else rope.stride(0),
            HAS_BIAS=bias is not None,
            ROPE=rope is not None,
        )
    return out
