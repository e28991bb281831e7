"""``fused_qkv``: one GEMM for Q, K and V that writes the heads already split, Q pre-scaled.

Algorithm: the tiled GEMM of ``gemm.py`` (same main loop, ``_gemm_tile``) over ``x (tokens, hidden)``
and the stacked ``((heads + 2 * kv_heads) * head_dim, hidden)`` weight: ``heads`` Q heads, then
``kv_heads`` K heads and as many V heads (``kv_heads == heads`` without grouped-query attention). The
epilogue adds the bias, multiplies the Q columns by the softmax scale (so attention applies none) and
stores every column straight into its place in the contiguous ``(heads + 2 * kv_heads, tokens,
head_dim)`` output: column ``n`` belongs to slab ``n // head_dim`` at ``d = n % head_dim``. This replaces
the split / transpose / ``.contiguous()`` copy of the usual implementation, and gives attention
unit-stride rows per head; K and V stay ``kv_heads`` slabs (attention reads them per group, never
expanded). The head dim is the checkpoint's (Qwen3 and Gemma3 do not have ``hidden / heads``).

Batch invariance and precision: as in ``gemm.py`` (no split-K, block sizes from N, K, the head dim and
the architecture only, fp32 accumulation, ``ieee`` products for fp32). Everything in the epilogue is
fp32, rounded once at the store.

QK-norm (``QK_NORM``, Qwen3, Gemma3): each head of Q and of K is RMS-normalised over its ``head_dim``
values and weighted by ``offset + weight`` (Gemma's ``1 + weight``), after the bias and before RoPE, as
transformers orders them. A head's statistics need all of its columns in one tile: ``qk_norm_config``
makes ``BLOCK_N`` a multiple of the head dim, which must be a power of two (16 to 256; tiles start at
multiples of ``BLOCK_N`` and heads at multiples of ``head_dim``, so a tile holds whole heads), and the
epilogue sums the squares over the last axis of the ``(BLOCK_M, BLOCK_N // head_dim, head_dim)`` view of
the tile. ``mean + eps`` and its reciprocal square root use the correctly rounded ``div_rn``/``sqrt_rn``.
Unlike transformers, the normalised value is not rounded to the input dtype before the weight and
RoPE: one rounding at the end, which only removes error.

RoPE (``ROPE``, ModernBERT, NomicBERT, GTE, the decoders): Q and K are rotated in the same epilogue,
before the scale, so rotated Q and K never make a trip through memory. The weight's Q and K rows are in
rotary-pair order (``fastenc.family.rotary_pair_order``; with QK-norm, the norm weights in the same
order): the pair ``(2i, 2i + 1)`` of a head turns by angle ``i`` of the token's position, and since a
head starts at an even column and tiles are even, both columns of a pair always sit in one tile. The
epilogue splits the tile into its even and odd columns (``tl.reshape`` + ``tl.split``), gathers the
cosines and sines of each row's position from the float32 table built at load
(``fastenc.family.rope_table``: transformers' own angles, no transcendental functions in the kernel),
rotates in fp32 and joins the halves back. V columns pass through (cosine 1, sine 0).

The Q scale is ``1 / sqrt(head_dim)`` unless the caller gives one (Gemma3's
``query_pre_attn_scalar ** -0.5``, DeBERTa's ``1 / sqrt(head_dim * scale_factor)``). Bias-free projections (ModernBERT, NomicBERT, Llama, Qwen3, Gemma3)
take ``HAS_BIAS=False``; Qwen2's bias on Q, K and V alone is this ``bias`` (its output projection has
none).

FP8 (``fused_qkv_fp8``, ``FP8=True``): the main loop is ``gemm.py``'s e4m3 one (``_gemm_tile_fp8``: the
row and channel scales applied to the fp32 tile before the bias), the epilogue the same.

Limits: without ``head_dim``, ``hidden`` must be a multiple of ``num_heads``; ``x`` and ``weight`` need a
unit stride in their last dimension; with RoPE the head dim is even and positions are below the
table's length (not checked on the device: the encoder validates sequence lengths first).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import INDEX_DTYPES, check_backend, check_tensor, on_device
from fastenc.kernels.gemm import (_gemm_tile, _gemm_tile_fp8, _tile_coords, check_fp8_operands, check_out_dtype,
                                  fp8_gemm_config, gemm_config)

# QK-norm: a GEMM tile must hold whole heads, so the head dim is a power of two (a tile's width).
MIN_QK_NORM_HEAD_DIM, MAX_QK_NORM_HEAD_DIM = 16, 256


@triton.jit
def _qk_norm(
    out,  # (BLOCK_M, BLOCK_N) fp32 tile of the stacked projection: whole heads
    QNorm_ptr,  # (HEAD_DIM,)
    KNorm_ptr,  # (HEAD_DIM,)
    offs_n,  # (BLOCK_N,) the tile's columns
    q_width,  # heads * HEAD_DIM: the Q columns
    qk_width,  # (heads + kv_heads) * HEAD_DIM: the Q and K columns
    eps,
    offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """RMSNorm over each head of the Q and K columns of a tile, weighted by ``offset + weight``; V passes through.

    The tile holds ``BLOCK_N // HEAD_DIM`` whole heads (the launcher's config makes ``BLOCK_N`` a multiple
    of the power-of-two head dim, and heads start at multiples of it), so a head's statistics are a sum
    over one axis of the ``(BLOCK_M, heads, HEAD_DIM)`` view of the tile.
    """
    heads = tl.reshape(out, (BLOCK_M, BLOCK_N // HEAD_DIM, HEAD_DIM))
    mean_square = tl.div_rn(tl.sum(heads * heads, axis=2), HEAD_DIM * 1.0)  # (BLOCK_M, BLOCK_N // HEAD_DIM)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
    normed = tl.reshape(heads * rstd[:, :, None], (BLOCK_M, BLOCK_N))
    d = offs_n % HEAD_DIM
    is_q = offs_n < q_width
    weight = tl.where(is_q, tl.load(QNorm_ptr + d), tl.load(KNorm_ptr + d)).to(tl.float32) + offset
    return tl.where((offs_n < qk_width)[None, :], normed * weight[None, :], out)


@triton.jit
def _rotate_pairs(
    out,  # (BLOCK_M, BLOCK_N) fp32 tile of the stacked projection
    Positions_ptr,  # (tokens,)
    Rope_ptr,  # (max_positions, HEAD_DIM) float32: cosines then sines
    stride_rope_row,
    pid_n,
    offs_m,
    M,
    qk_width,  # (heads + kv_heads) * HEAD_DIM: the Q and K columns
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rotate the Q and K pairs (columns 2j, 2j + 1) of a tile by their rows' angles; V passes through."""
    even, odd = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N // 2, 2)))  # (BLOCK_M, BLOCK_N // 2) each
    first = pid_n * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)  # the pair's first column
    angle = (first % HEAD_DIM) // 2  # (BLOCK_N // 2,) which angle of the head
    rotated = first < qk_width  # Q and K; not V (nor columns past the end)
    position = tl.load(Positions_ptr + offs_m % M).to(tl.int64)  # (BLOCK_M,) rows past M wrap, as in _gemm_tile
    row = Rope_ptr + position[:, None] * stride_rope_row + angle[None, :]
    cos = tl.load(row, mask=rotated[None, :], other=1.0)
    sin = tl.load(row + HEAD_DIM // 2, mask=rotated[None, :], other=0.0)
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK_M, BLOCK_N))


@triton.jit
def _fused_qkv_kernel(
    X_ptr,  # (tokens, hidden)
    W_ptr,  # ((heads + 2 * kv_heads) * head_dim, hidden)
    B_ptr,  # ((heads + 2 * kv_heads) * head_dim,)
    Out_ptr,  # (heads + 2 * kv_heads, tokens, head_dim), contiguous
    M,  # tokens
    N,  # (heads + 2 * kv_heads) * head_dim
    K,  # hidden
    stride_x_row,
    stride_w_row,
    q_width,  # heads * head_dim: Q's columns come first
    qk_width,  # (heads + kv_heads) * head_dim: then K's
    q_scale,  # 1 / sqrt(head_dim) by default
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    Positions_ptr=None,  # (tokens,) integer, None when not ROPE
    Rope_ptr=None,  # (max_positions, HEAD_DIM) float32: cosines then sines, None when not ROPE
    stride_rope_row=0,
    QNorm_ptr=None,  # (HEAD_DIM,), None when not QK_NORM
    KNorm_ptr=None,  # (HEAD_DIM,), None when not QK_NORM
    norm_eps=0.0,
    norm_offset=0.0,
    HAS_BIAS: tl.constexpr = True,
    ROPE: tl.constexpr = False,
    QK_NORM: tl.constexpr = False,
    XScale_ptr=None,  # (tokens,) float32 when FP8 and not QUANTIZE_X
    WScale_ptr=None,  # ((heads + 2 * kv_heads) * head_dim,) float32 when FP8
    FP8: tl.constexpr = False,
    QUANTIZE_X: tl.constexpr = False,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if FP8:
        acc = _gemm_tile_fp8(X_ptr, XScale_ptr, W_ptr, WScale_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M, N,
                             K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, QUANTIZE_X)
    else:
        acc = _gemm_tile(
            X_ptr, W_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K
        )
    col_ok = offs_n < N
    out = acc
    if HAS_BIAS:
        out += tl.load(B_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if QK_NORM:
        out = _qk_norm(out, QNorm_ptr, KNorm_ptr, offs_n, q_width, qk_width, norm_eps, norm_offset, HEAD_DIM,
                       BLOCK_M, BLOCK_N)
    if ROPE:
        out = _rotate_pairs(out, Positions_ptr, Rope_ptr, stride_rope_row, pid_n, offs_m, M, qk_width, HEAD_DIM,
                            BLOCK_M, BLOCK_N)
    col_scale = tl.where(offs_n < q_width, q_scale, 1.0)
    out = out * col_scale[None, :]

    # Column n -> element (n % HEAD_DIM) of slab (n // HEAD_DIM); row t -> t * HEAD_DIM within a slab.
    slab = (offs_n // HEAD_DIM).to(tl.int64)
    col_offset = slab * M * HEAD_DIM + offs_n % HEAD_DIM  # (BLOCK_N,)
    row_offset = offs_m.to(tl.int64) * HEAD_DIM  # (BLOCK_M,)
    out_ptrs = Out_ptr + row_offset[:, None] + col_offset[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & col_ok[None, :])


def qk_norm_config(dtype: torch.dtype, N: int, K: int, head_dim: int, arch: int = _target.DEFAULT_ARCH) -> dict:
    """``gemm_config`` with tiles that hold whole heads, for the QK-norm epilogue: ``BLOCK_N`` at least the
    (power-of-two) head dim, hence a multiple of it; from N, K, the head dim, the dtype and the
    architecture only.

    Where the head is wider than ``gemm_config``'s tile, the tile keeps an accumulator of the size it
    was measured at. 16-bit tiles on tensor cores take the 128 x 128 accumulator (8 warps) as
    ``128 * 128 / head_dim`` rows, whatever N chose: at head dim 256, 64 x 256 tiles use 181-186
    registers, and a narrower one would leave ``wgmma`` (64 rows a warpgroup) on sm_90; 128 x 256
    spilled 96-136 B there (``python -m fastenc.kernels.aot --models embeddinggemma-300m``, Triton 3.9).
    fp32 (CUDA cores) keeps the 64 x 64 tile's size: 32 x 128 and 16 x 256 use 128-129 registers (64 x 128:
    236-246). The stages are then cut to what the architecture's shared memory holds.
    """
    config = gemm_config(dtype, N, K, arch)
    if head_dim > config["BLOCK_N"]:
        if dtype != torch.float32 and arch >= 80:
            config.update(BLOCK_M=128 * 128 // head_dim, num_warps=8)
        else:
            config["BLOCK_M"] = config["BLOCK_M"] * config["BLOCK_N"] // head_dim
        config["BLOCK_N"] = head_dim
        # A stage holds a (BLOCK_M + BLOCK_N) x BLOCK_K slab of both operands, and the pipeline keeps
        # num_stages - 1 of them in shared memory; a wide tile needs more per stage than a square one.
        per_stage = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * dtype.itemsize
        fitting = 1 + _target.shared_memory_limit(arch) // per_stage
        config["num_stages"] = max(2, min(config["num_stages"], fitting))
    return config


def fused_qkv(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # ((heads + 2 * kv_heads) * head_dim, hidden): Q, K, V stacked
    bias: torch.Tensor | None,  # ((heads + 2 * kv_heads) * head_dim,)
    num_heads: int,
    positions: torch.Tensor | None = None,  # (tokens,) integer, with rope
    rope: torch.Tensor | None = None,  # (max_positions, head_dim) float32: cosines, then sines
    *,
    num_kv_heads: int | None = None,  # K and V heads (grouped-query attention); None: num_heads
    head_dim: int | None = None,  # None: hidden // num_heads
    q_norm: torch.Tensor | None = None,  # (head_dim,): RMSNorm weight over each head of Q, with k_norm
    k_norm: torch.Tensor | None = None,  # (head_dim,): RMSNorm weight over each head of K
    norm_eps: float = 1e-6,
    norm_offset: float = 0.0,  # the QK-norm's weight is offset + weight (Gemma: 1)
    scale: float | None = None,  # Q's factor; None: 1 / sqrt(head_dim)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GEMM for Q, K and V, returned with the heads split, Q pre-scaled for the softmax: a contiguous
    ``(3, heads, tokens, head_dim)`` tensor, or with fewer K/V heads the tuple of its ``q (heads, ...)``,
    ``k (kv_heads, ...)``, ``v (kv_heads, ...)`` slabs (one contiguous buffer). In the epilogue: the bias,
    then with ``q_norm``/``k_norm`` an RMSNorm over each head of Q and K, then with ``rope`` the rotation of
    the Q and K pairs ``2i, 2i + 1`` by their positions' angles, then Q times ``scale``."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    return _fused_qkv(x, None, weight, None, bias, num_heads, positions, rope, x.dtype, num_kv_heads, head_dim,
                      q_norm, k_norm, norm_eps, norm_offset, scale, device=device, fp8=False)


def fused_qkv_fp8(
    x: torch.Tensor,  # (tokens, hidden): float8_e4m3fn with x_scale, or 16/32-bit (quantized per row in the kernel)
    x_scale: torch.Tensor | None,  # (tokens,) float32, None for a 16/32-bit x
    weight: torch.Tensor,  # ((heads + 2 * kv_heads) * head_dim, hidden) float8_e4m3fn
    weight_scale: torch.Tensor,  # ((heads + 2 * kv_heads) * head_dim,) float32
    bias: torch.Tensor | None,  # ((heads + 2 * kv_heads) * head_dim,)
    num_heads: int,
    positions: torch.Tensor | None = None,  # (tokens,) integer, with rope
    rope: torch.Tensor | None = None,  # (max_positions, head_dim) float32: cosines, then sines
    *,
    out_dtype: torch.dtype,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    q_norm: torch.Tensor | None = None,  # (head_dim,)
    k_norm: torch.Tensor | None = None,  # (head_dim,)
    norm_eps: float = 1e-6,
    norm_offset: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_qkv`` with e4m3 operands and per-row / per-channel scales; the heads in ``out_dtype``."""
    device = check_backend("x", x)
    check_fp8_operands(x, x_scale, weight, weight_scale, None, device)
    return _fused_qkv(x, x_scale, weight, weight_scale, bias, num_heads, positions, rope, check_out_dtype(out_dtype),
                      num_kv_heads, head_dim, q_norm, k_norm, norm_eps, norm_offset, scale, device=device, fp8=True)


def _fused_qkv(x, x_scale, weight, weight_scale, bias, num_heads, positions, rope, out_dtype, num_kv_heads, head_dim,
               q_norm, k_norm, norm_eps, norm_offset, scale, *, device, fp8: bool):
    """Check the heads' arguments, launch, split the output (both launchers); ``x`` and the scales are checked."""
    tokens, hidden = x.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or num_heads % kv_heads:
        raise ValueError(f"num_kv_heads must be a positive int dividing num_heads={num_heads}, got {num_kv_heads!r}")
    if head_dim is None:
        if hidden % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing hidden={hidden}, got {num_heads!r} "
                             "(or give head_dim)")
        head_dim = hidden // num_heads
    elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
    slabs = num_heads + 2 * kv_heads
    params = out_dtype  # the bias and the norm weights: the model's 16/32-bit dtype
    check_tensor("weight", weight, (slabs * head_dim, hidden), dtypes=(weight.dtype if fp8 else x.dtype,),
                 device=device)
    if bias is not None:
        check_tensor("bias", bias, (slabs * head_dim,), dtypes=(params,), device=device)
    if rope is not None:
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        check_tensor("rope", rope, (None, head_dim), dtypes=(torch.float32,), device=device)
        if positions is None:
            raise ValueError("positions is required with rope")
        check_tensor("positions", positions, (tokens,), dtypes=INDEX_DTYPES, device=device)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together: give both or neither")
    if q_norm is not None:
        if head_dim & (head_dim - 1) or not MIN_QK_NORM_HEAD_DIM <= head_dim <= MAX_QK_NORM_HEAD_DIM:
            raise ValueError(f"q_norm needs a power-of-two head_dim from {MIN_QK_NORM_HEAD_DIM} to "
                             f"{MAX_QK_NORM_HEAD_DIM} (a GEMM tile holds whole heads), got {head_dim}")
        check_tensor("q_norm", q_norm, (head_dim,), dtypes=(params,), device=device)
        check_tensor("k_norm", k_norm, (head_dim,), dtypes=(params,), device=device)
        for name, value in (("norm_eps", norm_eps), ("norm_offset", norm_offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if norm_eps < 0:
            raise ValueError(f"norm_eps must be non-negative, got {norm_eps!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

    out = torch.empty((slabs, tokens, head_dim), device=device, dtype=out_dtype)
    if tokens > 0 and hidden > 0:
        N, K = slabs * head_dim, hidden
        arch = _target.device_arch(device)
        if fp8:
            config = fp8_gemm_config(x.dtype, N, K, arch)
            if q_norm is not None:
                config = qk_norm_config(weight.dtype, N, K, head_dim, arch)
        else:
            config = gemm_config(x.dtype, N, K, arch) if q_norm is None else qk_norm_config(x.dtype, N, K, head_dim,
                                                                                             arch)
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
                num_heads * head_dim,
                (num_heads + kv_heads) * head_dim,
                float(scale),
                HEAD_DIM=head_dim,
                **config,
                Positions_ptr=positions if rope is not None else None,
                Rope_ptr=rope,
                stride_rope_row=0 if rope is None else rope.stride(0),
                QNorm_ptr=q_norm,
                KNorm_ptr=k_norm,
                norm_eps=float(norm_eps) if q_norm is not None else 0.0,
                norm_offset=float(norm_offset) if q_norm is not None else 0.0,
                HAS_BIAS=bias is not None,
                ROPE=rope is not None,
                QK_NORM=q_norm is not None,
                XScale_ptr=x_scale,
                WScale_ptr=weight_scale,
                FP8=fp8,
                QUANTIZE_X=fp8 and x.dtype != weight.dtype,
            )
    if kv_heads == num_heads:
        return out.view(3, num_heads, tokens, head_dim)
    return out[:num_heads], out[num_heads: num_heads + kv_heads], out[num_heads + kv_heads:]
