"""``linear``: ``act(x @ weight.T + bias)`` as one tiled GEMM with the bias and activation in its epilogue.

Algorithm: the classic tiled GEMM of the Triton matrix-multiplication tutorial. Each program owns one
``BLOCK_M x BLOCK_N`` output tile, walks K in ``BLOCK_K`` steps accumulating in fp32 with ``tl.dot``,
then adds the bias, applies the activation and casts once at the store. Tiles are visited in groups of
``GROUP_M`` row blocks so that neighbouring programs reuse the same weight columns from L2.

Batch invariance: the K loop always runs in the same order with the same block sizes, there is no
split-K, and the block sizes depend only on the dtype, N, K and the GPU architecture, never on M (the
token count). A row's result is therefore the same whether it is computed alone or inside a larger
batch.

Precision: fp32 inputs use ``input_precision="ieee"``: exact fp32 products, so the fp32 path matches
torch's fp32 matmul (TF32 would not meet the fp32 tolerance). On a GPU this runs on CUDA cores, not
tensor cores; fp32 is the accuracy/debug path, fp16 and bf16 the fast one (the flag has no effect on
16-bit operands, whose products are exact in the fp32 accumulator). Approximate on the GPU, exact under
the interpreter: the tanh-GELU epilogue (``exp2`` compiles to ``ex2.approx.ftz.f32`` and its fp32 ``/`` to
``div.full.f32``, each within 2 ulp); erf-GELU uses libdevice's ``erf`` (within 2 ulp).

Bias-free layers (ModernBERT, NomicBERT) take ``HAS_BIAS=False`` rather than a zero vector. The
pre-LayerNorm blocks add their skip connection in the epilogue (``HAS_RESIDUAL``): ``x + Wo(a)`` costs
no extra pass over memory.

``gated_linear`` (GLU feed-forwards: GeGLU, SwiGLU) is the same GEMM over a weight whose two halves
are interleaved row by row (``fastenc.family.interleave_gate``): output column ``2j`` of a tile is the
activated half of feature ``j`` and column ``2j + 1`` its linear half, so every tile holds both halves
of ``BLOCK_N / 2`` features; the epilogue splits the tile into the two halves (``tl.reshape`` then
``tl.split``), multiplies ``act(a) * b`` in fp32 and stores a ``BLOCK_N / 2`` wide tile. The
``(tokens, 2 * intermediate)`` product never goes through memory.

FP8 (``linear_fp8``, ``gated_linear_fp8``; ``FP8=True``): the same kernels with e4m3 operands, the
weight quantized at load with one float32 scale per output channel and the activation with one per
token (``fastenc.reference.quantize_rows``). The main loop accumulates ``tl.dot`` of e4m3 tiles (``wgmma``
on sm_90, ``mma`` on sm_89; the products are exact) and the epilogue applies
``acc * x_scale[:, None] * w_scale[None, :]`` before the bias, activation and residual. Each ``BLOCK_K``
slab's dot starts from zero and is added to the float32 accumulator by the CUDA cores: Hopper's FP8
``wgmma`` keeps fewer accumulator bits than fp32 (DeepSeek-V3, arXiv:2412.19437, section 3.3.2: about
14), so the accumulator is promoted every 128 products instead of summing the whole of K inside the
tensor cores. The activation comes quantized (``x`` e4m3 with its ``(tokens,)`` scales: a LayerNorm's
``*_fp8`` output, written in the LayerNorm's own pass), or in 16 bits (``QUANTIZE_X``), when the kernel
that wrote it could not know the row's scale: attention's output and the GELU/gated output are written
by many programs per row (one per head or per ``BLOCK_N`` columns), and a per-token scale needs the
whole row's maximum. Then the GEMM quantizes in its prologue: one sweep over the program's rows finds
their absolute maxima (the rows are then in L2), and the main loop quantizes each ``x`` slab in registers
before its dot. No quantize kernel and no FP8 copy of the activation. Either way a row's codes and scale
are ``quantize_rows`` of that row alone, so batch invariance holds as for the 16-bit kernels.

Limits: ``x`` and ``weight`` need a unit stride in their last dimension (rows may be strided). The
helpers ``_tile_coords``, ``_gemm_tile``, ``_gemm_tile_fp8``, ``_apply_activation`` and the FP8 row
quantization are shared with ``qkv.py`` and ``layer_norm.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.errors import BackendError
from fastenc.kernels._checks import FLOAT_DTYPES, on_device, check_activation, check_backend, check_tensor
from fastenc.reference import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX

# Globals read inside @triton.jit functions must be constexpr.
FP8_LIMIT = tl.constexpr(FP8_MAX)
FP8_FLOOR = tl.constexpr(FP8_MIN_AMAX)
FP8_MIN_ARCH = 89  # FP8 tensor cores: sm_89 (Ada) and sm_90 (Hopper) on
LOG2E = tl.constexpr(1.4426950408889634)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), for erf-GELU
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), for tanh-GELU


@triton.jit
def _apply_activation(x, ACTIVATION: tl.constexpr):
    """Apply a canonical activation (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``"none"``) to an
    fp32 block."""
    if ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): one exp2 and no libdevice tanh (which the interpreter
        # lacks), and no cancellation in 1 + tanh(u) for very negative u.
        u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        x = x / (1.0 + tl.exp2(u * (-2.0 * LOG2E)))
    elif ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp2(x * (-LOG2E)))  # x * sigmoid(x); exp2 overflows to inf for x << 0: x / inf = -0
    return x


@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to (row block, column block), GROUP_M row blocks at a time (L2 reuse)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gemm_tile(
    X_ptr,  # (M, K)
    W_ptr,  # (N, K)
    stride_x_row,
    stride_w_row,
    offs_m,  # (BLOCK_M,) output rows of this tile
    offs_n,  # (BLOCK_N,) output columns of this tile
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Return the fp32 tile ``X[offs_m] @ W[offs_n].T`` (the main loop shared by linear and fused_qkv)."""
    # Rows and columns past the edge are wrapped onto valid ones instead of masked: the loads stay
    # unmasked (and vectorised) and the store masks those lanes out. Each output row still reads only
    # its own x row, so this changes nothing for batch invariance.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X_ptr + rows[:, None] * stride_x_row + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W_ptr + cols[None, :] * stride_w_row + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W's tile transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _row_quantization(amax):
    """``(inverse, scale)`` for rows whose largest magnitudes are ``amax`` (fp32): ``q = x * inverse`` then
    ``_to_fp8``, and ``x ≈ q * scale``; as ``fastenc.reference.quantize_rows``, correctly rounded."""
    amax = tl.maximum(amax, FP8_FLOOR)
    return tl.div_rn(FP8_LIMIT, amax), tl.div_rn(amax, FP8_LIMIT)


@triton.jit
def _to_fp8(x):
    """fp32 values already scaled into e4m3's range -> e4m3, rounded to nearest even."""
    return tl.minimum(tl.maximum(x, -FP8_LIMIT), FP8_LIMIT).to(tl.float8e4nv)


@triton.jit
def _gemm_tile_fp8(
    X_ptr,  # (M, K): e4m3, or 16/32-bit when QUANTIZE_X
    XScale_ptr,  # (M,) float32, None when QUANTIZE_X
    W_ptr,  # (N, K) e4m3
    WScale_ptr,  # (N,) float32
    stride_x_row,
    stride_w_row,
    offs_m,  # (BLOCK_M,) output rows of this tile
    offs_n,  # (BLOCK_N,) output columns of this tile
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANTIZE_X: tl.constexpr,
):
    """Return the fp32 tile ``(X_q[offs_m] @ W_q[offs_n].T) * x_scale * w_scale`` (see the module docstring)."""
    rows = (offs_m % M).to(tl.int64)  # wrapped, as in _gemm_tile
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X_ptr + rows[:, None] * stride_x_row + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W_ptr + cols[None, :] * stride_w_row + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W's tile transposed
    if QUANTIZE_X:  # the rows' absolute maxima first: the scales must be known before the first dot
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs + k0)
            else:
                x = tl.load(x_ptrs + k0, mask=(offs_k < K - k0)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x).to(tl.float32), axis=1))
        inverse, x_scale = _row_quantization(amax)
    else:
        x_scale = tl.load(XScale_ptr + rows)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if QUANTIZE_X:
            x = _to_fp8(x.to(tl.float32) * inverse[:, None])
        acc += tl.dot(x, w)  # promoted to the fp32 accumulator every BLOCK_K products
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    w_scale = tl.load(WScale_ptr + cols)
    return acc * x_scale[:, None] * w_scale[None, :]


@triton.jit
def _linear_kernel(
    X_ptr,  # (M, K)
    W_ptr,  # (N, K)
    B_ptr,  # (N,), None when not HAS_BIAS
    Out_ptr,  # (M, N)
    M,
    N,
    K,
    stride_x_row,
    stride_w_row,
    stride_out_row,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    Residual_ptr=None,  # (M, N), None when not HAS_RESIDUAL
    stride_residual_row=0,
    HAS_BIAS: tl.constexpr = True,
    HAS_RESIDUAL: tl.constexpr = False,
    XScale_ptr=None,  # (M,) float32 when FP8 and not QUANTIZE_X
    WScale_ptr=None,  # (N,) float32 when FP8
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
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = _apply_activation(acc, ACTIVATION)
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < M)[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        out += tl.load(Residual_ptr + rows * stride_residual_row + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out_ptr + rows * stride_out_row + offs_n[None, :], out.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_linear_kernel(
    X_ptr,  # (M, K)
    W_ptr,  # (2 * N, K): rows (activated, linear) interleaved
    B_ptr,  # (2 * N,) interleaved, None when not HAS_BIAS
    Out_ptr,  # (M, N)
    M,
    N,  # output features: half the weight's rows
    K,
    stride_x_row,
    stride_w_row,
    stride_out_row,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per tile: BLOCK_N // 2 output features
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    XScale_ptr=None,  # (M,) float32 when FP8 and not QUANTIZE_X
    WScale_ptr=None,  # (2 * N,) float32 when FP8, interleaved as the weight
    FP8: tl.constexpr = False,
    QUANTIZE_X: tl.constexpr = False,
):
    pid_m, pid_n = _tile_coords(M, 2 * N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows
    if FP8:
        acc = _gemm_tile_fp8(X_ptr, XScale_ptr, W_ptr, WScale_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M,
                             2 * N, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, QUANTIZE_X)
    else:
        acc = _gemm_tile(
            X_ptr, W_ptr, stride_x_row, stride_w_row, offs_m, offs_n, M, 2 * N, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K
        )
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_n, mask=offs_n < 2 * N, other=0.0).to(tl.float32)[None, :]
    # Columns 2j and 2j + 1 of the tile are the two halves of feature pid_n * BLOCK_N / 2 + j.
    activated, linear = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
    out = _apply_activation(activated, ACTIVATION) * linear
    offs_f = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    out_ptrs = Out_ptr + offs_m.to(tl.int64)[:, None] * stride_out_row + offs_f[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_f < N)[None, :])


# The 16-bit tensor-core tiles (BLOCK_M, BLOCK_N, warps, stages), largest first. A GEMM takes the first that
# gives a batch of SMALL_BATCH_TOKENS tokens at least MIN_TILES tiles; the last when none does.
TENSOR_CORE_TILES = ((128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4))
SMALL_BATCH_TOKENS = 128  # one 128-token sequence: the latency goal's batch
MIN_TILES = 32  # a quarter of an H100's / H200's 132 SMs


def gemm_config(dtype: torch.dtype, N: int, K: int, arch: int = _target.DEFAULT_ARCH) -> dict:
    """Fixed tile sizes from the dtype, N, K and the GPU architecture only (never M: batch invariance).

    sm_80 and newer run 16-bit tiles on tensor cores (``wgmma`` on sm_90, ``mma`` on sm_8x), ``BLOCK_K``
    64. The tile shape follows N: 128 x 128 (8 warps, 3 stages) where that already gives a 128-token
    batch ``MIN_TILES`` tiles (a vocabulary projection), else 64 x 128 (one warpgroup, 3 stages: the
    QKV and FFN-in projections of base-size encoders, N 2304 and 3072, 36 and 48 tiles), else 64 x 64
    (4 stages: N 768 gives 24 tiles where 128 x 128 gave 6, each a quarter of the work). Large batches
    have tiles to spare at any of these shapes; a small one would leave most SMs idle with the largest
    (``python -m fastenc.kernels.aot`` lists each GEMM's tiles at 128 tokens, its shared memory and
    registers). fp32, and 16-bit on GPUs older than sm_80 (Triton gives them no tensor-core code), run
    on CUDA cores in 64 x 64 x 32 tiles that spill no registers.
    """
    if dtype == torch.float32 or arch < 80:  # CUDA-core FMA path; 16-bit operands spill there with 4 warps
        block_m, block_n, block_k = 64, 64, 32
        warps, stages = (4 if dtype == torch.float32 else 8), (3 if arch >= 80 else 2)
    else:  # tensor cores; e4m3 slabs of 128 bytes a row, as 16-bit ones of 64 elements
        block_k = 128 if dtype == FP8_DTYPE else 64
        for block_m, block_n, warps, stages in TENSOR_CORE_TILES:
            if tiles_at(SMALL_BATCH_TOKENS, N, block_m, block_n) >= MIN_TILES:
                break
    # Narrow outputs (classifier heads) and short reductions do not need the full tile (an e4m3 dot
    # needs K of at least 32).
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    block_k = min(block_k, max(32 if dtype == FP8_DTYPE else 16, triton.next_power_of_2(K)))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        EVEN_K=K % block_k == 0,
        num_warps=warps,
        num_stages=stages,
        **_target.COMPILE_OPTIONS,
    )


def fp8_gemm_config(x_dtype: torch.dtype, N: int, K: int, arch: int = _target.DEFAULT_ARCH) -> dict:
    """``gemm_config`` for e4m3 operands (``BLOCK_K`` 128), its stages cut to the architecture's shared memory
    when ``x`` is 16-bit (quantized in the kernel: its slabs take twice the bytes). From the dtypes, N, K and
    the architecture only."""
    config = gemm_config(FP8_DTYPE, N, K, arch)
    per_stage = (config["BLOCK_M"] * x_dtype.itemsize + config["BLOCK_N"]) * config["BLOCK_K"]
    fitting = 1 + _target.shared_memory_limit(arch) // per_stage
    config["num_stages"] = max(2, min(config["num_stages"], fitting))
    return config


def check_fp8_operands(x: torch.Tensor, x_scale, weight: torch.Tensor, weight_scale, rows: int | None,
                       device: torch.device) -> bool:
    """Check an FP8 GEMM's operands; returns whether ``x`` is to be quantized in the kernel (16/32-bit ``x``).

    ``x`` ``(M, K)`` is e4m3 with ``x_scale`` ``(M,)`` float32, or 16/32-bit with ``x_scale=None``; ``weight``
    ``(rows, K)`` e4m3 (``rows=None``: any) with ``weight_scale`` ``(rows,)`` float32. On a GPU, the
    architecture must have FP8 tensor cores.
    """
    check_tensor("x", x, (None, None), dtypes=(FP8_DTYPE, *FLOAT_DTYPES))
    M, K = x.shape
    quantize_x = x.dtype != FP8_DTYPE
    if quantize_x:
        if x_scale is not None:
            raise ValueError(f"x_scale goes with a {FP8_DTYPE} x; a {x.dtype} x is quantized in the kernel "
                             "(pass x_scale=None)")
    else:
        if x_scale is None:
            raise ValueError(f"a {FP8_DTYPE} x needs its ({M},) float32 x_scale")
        check_tensor("x_scale", x_scale, (M,), dtypes=(torch.float32,), device=device)
    check_tensor("weight", weight, (rows, K), dtypes=(FP8_DTYPE,), device=device)
    check_tensor("weight_scale", weight_scale, (weight.shape[0],), dtypes=(torch.float32,), device=device)
    arch = _target.device_arch(device)
    if device.type == "cuda" and arch < FP8_MIN_ARCH:
        raise BackendError(f"the FP8 kernels need a GPU with FP8 tensor cores (sm_89: L4, L40, RTX 40xx; sm_90: "
                           f"H100, H200); {torch.cuda.get_device_name(device)} is sm_{arch}")
    return quantize_x


def check_out_dtype(out_dtype) -> torch.dtype:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {out_dtype!r}")
    return out_dtype


def tiles_at(M: int, N: int, block_m: int, block_n: int) -> int:
    """The output tiles (programs) of an ``M x N`` GEMM in ``block_m x block_n`` tiles."""
    return triton.cdiv(M, block_m) * triton.cdiv(N, block_n)


def linear(
    x: torch.Tensor,  # (tokens, in)
    weight: torch.Tensor,  # (out, in)
    bias: torch.Tensor | None,  # (out,)
    activation: str | None = None,
    residual: torch.Tensor | None = None,  # (tokens, out)
) -> torch.Tensor:  # (tokens, out)
    """``act(x @ weight.T + bias) + residual``: a GEMM with the bias, activation and residual in its epilogue."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    M, K = x.shape
    check_tensor("weight", weight, (None, K), dtypes=(x.dtype,), device=device)
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N,), dtypes=(x.dtype,), device=device)
    if residual is not None:
        check_tensor("residual", residual, (M, N), dtypes=(x.dtype,), device=device)
    act = check_activation("activation", activation)

    out = torch.empty((M, N), device=device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    config = gemm_config(x.dtype, N, K, _target.device_arch(device))
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    with on_device(device):
        _linear_kernel[grid](
            x, weight, bias, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), ACTIVATION=act, **config,
            Residual_ptr=residual, stride_residual_row=0 if residual is None else residual.stride(0),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        )
    return out


def gated_linear(
    x: torch.Tensor,  # (tokens, in)
    weight: torch.Tensor,  # (2 * out, in): rows 2j (activated) and 2j + 1 (linear) interleaved
    bias: torch.Tensor | None,  # (2 * out,), interleaved the same way
    activation: str,
) -> torch.Tensor:  # (tokens, out)
    """The gated feed-forward input (GLU family): ``act(h[:, 0::2]) * h[:, 1::2]`` with ``h = x @ W.T + b``."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    M, K = x.shape
    check_tensor("weight", weight, (None, K), dtypes=(x.dtype,), device=device)
    rows = weight.shape[0]
    if rows % 2:
        raise ValueError(f"weight must have an even number of rows (two interleaved halves), got {rows}")
    if bias is not None:
        check_tensor("bias", bias, (rows,), dtypes=(x.dtype,), device=device)
    act = check_activation("activation", activation)

    N = rows // 2
    out = torch.empty((M, N), device=device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    config = gemm_config(x.dtype, rows, K, _target.device_arch(device))  # the GEMM's N: the weight's rows
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(rows, config["BLOCK_N"]),)
    with on_device(device):
        _gated_linear_kernel[grid](
            x, weight, bias, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), ACTIVATION=act,
            HAS_BIAS=bias is not None, **config,
        )
    return out


def linear_fp8(
    x: torch.Tensor,  # (tokens, in): float8_e4m3fn with x_scale, or 16/32-bit (quantized per row in the kernel)
    x_scale: torch.Tensor | None,  # (tokens,) float32, None for a 16/32-bit x
    weight: torch.Tensor,  # (out, in) float8_e4m3fn
    weight_scale: torch.Tensor,  # (out,) float32: one scale per output channel
    bias: torch.Tensor | None,  # (out,)
    activation: str | None = None,
    residual: torch.Tensor | None = None,  # (tokens, out)
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # (tokens, out) out_dtype
    """``act(x_q @ w_q.T * x_scale * w_scale + bias) + residual`` with e4m3 operands, rounded once to ``out_dtype``."""
    device = check_backend("x", x)
    quantize_x = check_fp8_operands(x, x_scale, weight, weight_scale, None, device)
    out_dtype = check_out_dtype(out_dtype)
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N,), device=device)
    if residual is not None:
        check_tensor("residual", residual, (M, N), device=device)
    act = check_activation("activation", activation)

    out = torch.empty((M, N), device=device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    config = fp8_gemm_config(x.dtype, N, K, _target.device_arch(device))
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    with on_device(device):
        _linear_kernel[grid](
            x, weight, bias, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), ACTIVATION=act, **config,
            Residual_ptr=residual, stride_residual_row=0 if residual is None else residual.stride(0),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, XScale_ptr=x_scale,
            WScale_ptr=weight_scale, FP8=True, QUANTIZE_X=quantize_x,
        )
    return out


def gated_linear_fp8(
    x: torch.Tensor,  # (tokens, in): float8_e4m3fn with x_scale, or 16/32-bit
    x_scale: torch.Tensor | None,  # (tokens,) float32, None for a 16/32-bit x
    weight: torch.Tensor,  # (2 * out, in) float8_e4m3fn: rows 2j (activated) and 2j + 1 (linear) interleaved
    weight_scale: torch.Tensor,  # (2 * out,) float32
    bias: torch.Tensor | None,  # (2 * out,), interleaved the same way
    activation: str,
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # (tokens, out) out_dtype
    """``gated_linear`` with e4m3 operands: ``act(h[:, 0::2]) * h[:, 1::2]``, ``h`` as in ``linear_fp8``."""
    device = check_backend("x", x)
    quantize_x = check_fp8_operands(x, x_scale, weight, weight_scale, None, device)
    out_dtype = check_out_dtype(out_dtype)
    M, K = x.shape
    rows = weight.shape[0]
    if rows % 2:
        raise ValueError(f"weight must have an even number of rows (two interleaved halves), got {rows}")
    if bias is not None:
        check_tensor("bias", bias, (rows,), device=device)
    act = check_activation("activation", activation)

    N = rows // 2
    out = torch.empty((M, N), device=device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    config = fp8_gemm_config(x.dtype, rows, K, _target.device_arch(device))
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(rows, config["BLOCK_N"]),)
    with on_device(device):
        _gated_linear_kernel[grid](
            x, weight, bias, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0), ACTIVATION=act,
            HAS_BIAS=bias is not None, **config, XScale_ptr=x_scale, WScale_ptr=weight_scale, FP8=True,
            QUANTIZE_X=quantize_x,
        )
    return out
