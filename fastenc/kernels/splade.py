"""``splade_pool``: a SPLADE head's vocabulary projection, activation and per-text pooling in one kernel.

What it computes (sentence-transformers' ``SpladePooling`` on an MLM's logits): for each packed text,
``pool over its tokens of act(x @ weight.T + bias)``, with ``x`` the MLM transform's output
``(tokens, hidden)``, ``weight`` the decoder ``(vocab, hidden)`` (the word embeddings when tied), ``bias``
its ``(vocab,)`` bias or None (a decoder without one, ModernBERT's ``decoder_bias: false``: ``HAS_BIAS``
off, as in ``gemm.py``), ``act``
``log1p(relu)`` (``"relu"``) or ``log1p(log1p(relu))`` (``"log1p_relu"``) and ``pool`` max or sum.

Algorithm: one program per (text, vocabulary tile of ``BLOCK_N`` words). The program walks its text's
tokens in blocks of ``BLOCK_M``; each block's logits tile ``BLOCK_M x BLOCK_N`` is the GEMM tile of
``gemm.py`` (``_gemm_tile``, fp32 accumulation, K in ``BLOCK_K`` steps), gets the bias, and is reduced
over its rows into a running ``BLOCK_N`` vector in registers, which is stored once at the end. The
``(tokens, vocab)`` logits never reach memory: at 16k tokens x 30,522 words in fp16 they would be 1 GB;
what is written is the ``(batch, vocab)`` fp32 result. The activation is monotone, so max pooling keeps
the running max of the raw logits and activates the pooled row once (no per-element log on the hot
path); sum pooling activates every element before summing.

The MLM transform (``LayerNorm(act(dense(h)))``) runs before, once per token, as the encoder's own
``linear`` and ``gelu_layer_norm`` kernels into a ``(tokens, hidden)`` buffer the size of the hidden
states. Fusing it here would recompute it for every vocabulary tile (239 times for BERT's vocabulary,
about six times the cost of the projection itself) to save a buffer that is not the memory problem.

``log1p`` is computed as ``log(u) * x / (u - 1)`` with ``u = 1 + x`` (Goldberg's / Kahan's form, a few
ulps): Triton has no ``log1p`` but libdevice's, which the interpreter cannot run.

Batch invariance: a text's row reads only its own tokens, its token blocks start at its own first token,
the reduction order is fixed, there is no split-K and no atomics, and the block sizes depend only on the
dtype, the vocabulary and hidden sizes and the GPU architecture, never on the token count. Grid: texts
on axis 0, vocabulary tiles on axis 1, so neighbouring programs read the same decoder tile from L2.

Limits: ``x`` and ``weight`` need a unit stride in their last dimension; at most 65,535 vocabulary
tiles (8 million words); the output is float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import check_backend, check_tensor, on_device
from fastenc.kernels.gemm import _gemm_tile

POOLING = ("max", "sum")
ACTIVATIONS = ("relu", "log1p_relu")
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for ``x >= 0`` without losing small ``x`` to the rounding of ``1 + x``."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _splade_activation(x, ACTIVATION: tl.constexpr):
    x = _log1p(tl.maximum(x, 0.0))
    if ACTIVATION == "log1p_relu":
        x = _log1p(x)
    return x


@triton.jit
def _splade_pool_kernel(
    X_ptr,  # (tokens, K): the MLM transform's output, packed
    W_ptr,  # (N, K): the decoder, one row per word
    B_ptr,  # (N,), None when not HAS_BIAS
    CuSeqlens_ptr,  # (batch + 1,) int32
    Out_ptr,  # (batch, N) fp32
    N,
    K,
    stride_x_row,
    stride_w_row,
    stride_out_row,
    POOLING: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per block
    BLOCK_N: tl.constexpr,  # words per tile
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr = True,
):
    text = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(CuSeqlens_ptr + text)
    length = tl.load(CuSeqlens_ptr + text + 1) - start
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    if HAS_BIAS:
        bias = tl.load(B_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    X_text = X_ptr + start.to(tl.int64) * stride_x_row  # this text's first token
    if POOLING == "max":
        pooled = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    else:
        pooled = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, length, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Rows past the text wrap onto its own rows (unmasked loads) and are left out of the reduction.
        logits = _gemm_tile(
            X_text, W_ptr, stride_x_row, stride_w_row, offs_m, offs_n, length, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
            EVEN_K
        ) + bias[None, :]
        row_ok = (offs_m < length)[:, None]
        if POOLING == "max":
            pooled = tl.maximum(pooled, tl.max(tl.where(row_ok, logits, float("-inf")), axis=0))
        else:
            pooled += tl.sum(tl.where(row_ok, _splade_activation(logits, ACTIVATION), 0.0), axis=0)
    if POOLING == "max":  # act is monotone: act(max) == max(act); an empty text gives act(-inf) = 0
        pooled = _splade_activation(pooled, ACTIVATION)
    tl.store(Out_ptr + text.to(tl.int64) * stride_out_row + offs_n, pooled, mask=col_ok)


def splade_config(dtype: torch.dtype, N: int, K: int, arch: int = _target.DEFAULT_ARCH) -> dict:
    """Fixed tile sizes from the dtype, the vocabulary N, the hidden size K and the architecture (never the
    token count: batch invariance).

    16-bit on sm_80+: 64 tokens x 128 words x 64 on tensor cores, 3 stages (72 KiB of shared memory,
    under sm_86's 99 KiB), 8 warps. 64 token rows, not 128: most texts a retriever sees are shorter
    than that, and the rows past a text's end are wasted work. fp32 (and GPUs before sm_80): CUDA-core
    tiles of 64 x 64 x 32, as ``gemm_config``.
    """
    if dtype == torch.float32 or arch < 80:
        block_m, block_n, block_k = 64, 64, 32
        warps, stages = (4 if dtype == torch.float32 else 8), (3 if arch >= 80 else 2)
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 3
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=warps,
                num_stages=stages, **_target.COMPILE_OPTIONS)


def splade_pool(
    x: torch.Tensor,  # (tokens, hidden): the MLM transform's output
    weight: torch.Tensor,  # (vocab, hidden): the MLM decoder (the word embeddings when tied)
    bias: torch.Tensor | None,  # (vocab,), None for a decoder without a bias
    cu_seqlens: torch.Tensor,  # (batch + 1,) int32
    pooling: str = "max",
    activation: str = "relu",
) -> torch.Tensor:  # (batch, vocab) float32
    """SPLADE vectors: ``pool_over_tokens(act(x @ weight.T + bias))`` per packed sequence, ``pool`` max or sum."""
    device = check_backend("x", x)
    check_tensor("x", x, (None, None))
    K = x.shape[1]
    check_tensor("weight", weight, (None, K), dtypes=(x.dtype,), device=device)
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N,), dtypes=(x.dtype,), device=device)
    check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    batch = cu_seqlens.numel() - 1
    config = splade_config(x.dtype, N, K, _target.device_arch(device))
    tiles = triton.cdiv(N, config["BLOCK_N"])
    if tiles > MAX_GRID_Y:
        raise ValueError(f"weight has {N} rows: over the {MAX_GRID_Y * config['BLOCK_N']} words splade_pool supports")
    out = torch.empty((batch, N), device=device, dtype=torch.float32)
    if batch == 0 or N == 0:
        return out
    with on_device(device):
        _splade_pool_kernel[(batch, tiles)](
            x, weight, bias, cu_seqlens, out, N, K, x.stride(0), weight.stride(0), out.stride(0), POOLING=pooling,
            ACTIVATION=activation, HAS_BIAS=bias is not None, **config
        )
    return out
