"""``attention``: flash attention over packed variable-length sequences, bidirectional or causal.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691), in the style of the Triton fused-attention
tutorial, for the varlen layout of FlashAttention's ``flash_attn_varlen_func``. One program owns a
``BLOCK_M`` block of queries of one (sequence, head); it walks that sequence's keys in ``BLOCK_N``
blocks, keeping a running row maximum ``m``, a running denominator ``l`` and an unnormalised fp32
output accumulator (the online softmax), so the score matrix is never materialised. The softmax runs
in base 2 (``exp2``): ``log2(e)`` multiplies the fp32 scores inside the same FMA that subtracts the
running maximum, as in the Triton tutorial. It is deliberately not folded into the Q tile: for fp16
and bf16 that costs an extra rounding of Q (measured under the interpreter: max error up to 1.85x
torch's, against 1.00x this way). Full key blocks run without masks; only the sequence's last,
partial key block masks its keys (to ``-inf``).

Layout: ``q`` is ``(heads, tokens, head_dim)``, ``k`` and ``v`` are ``(kv_heads, tokens, head_dim)``, with
any head/token strides and a unit last stride (the Triton ``fused_qkv`` gives contiguous slabs, the
reference a permuted view). Grouped-query attention (``kv_heads < heads``, Qwen, Llama, Mistral,
Gemma): query head ``h`` reads K/V head ``h // (heads // kv_heads)`` (transformers' ``repeat_kv``); the
program of each query head loads its group's K and V tiles, which the other heads of the group read
from L2, so K and V are never expanded in memory. Sequences are ``cu_seqlens`` offsets; the grid is
``(batch * heads, cdiv(max_seqlen, BLOCK_M))`` with batch x heads on axis 0 because axes 1 and 2 stop at
65535. Query blocks past their sequence's end return at once; an empty sequence writes nothing. The output row ``t`` gets head ``h`` in columns
``h * head_dim .. (h + 1) * head_dim``.

Precision: scores, softmax statistics and the accumulator are fp32; the probabilities are cast to the
input dtype for the second ``tl.dot`` (as in FlashAttention). fp32 inputs use ``ieee`` products.
Every real query row sees at least one real key, so ``l >= 1``; the final division is guarded anyway
so that padding rows can never produce NaN. Approximate on the GPU, exact under the interpreter: ``exp2``
(``ex2.approx.ftz.f32``, as in FlashAttention and the Triton tutorial: relative error about 2^-22, far
below the fp16/bf16 rounding of P) and the final fp32 ``/`` by ``l`` (``div.full.f32``, within 2 ulp).

Batch invariance: a sequence's programs read only that sequence, and the block sizes depend only on
the head dim, dtype and GPU architecture, so a sequence gives bitwise the same output alone or inside
a batch.

Sliding window (``WINDOW``, ModernBERT's local layers): a query sees the keys within ``±window``
positions. A program walks only the key blocks that can hold such keys — from
``m0 - window`` to ``m0 + BLOCK_M - 1 + window`` for its query block starting at ``m0`` — and never
loads the others: that skipping is where local attention saves its time. Inside those blocks the
keys outside each query's window are masked (to ``-inf``) by position. Positions are the packed
batch's position ids (the caller's padded columns), which grow by at least one per token, so a key
farther than ``window`` tokens away is also farther than ``window`` positions away: the skipped blocks
never hold a key of the window. With a window a query row may see no key of some block, so that
path guards the online softmax against ``-inf - (-inf)``.

Relative position bias (``REL_BIAS``, MPNet): ``bias[head, key position - query position + P - 1]`` is
added to each fp32 score, read from the ``(heads, 2P - 1)`` table by distance built once at load
(``fastenc.family.relative_bias_by_distance``, transformers' own buckets); no ``(seq, seq)`` bias is
ever made. A window, a bias and DeBERTa's terms (below) are independent constexprs; plain BERT
attention compiles to what it was without any.

DeBERTa's disentangled attention (``C2P``, ``P2C``): each score also gets ``q_i · Kr[r]`` (content to
position) and ``k_j · Qr[r]`` (position to content), ``r = rel_index[pos_j - pos_i + P - 1]`` the row of
the pair's bucketed distance (``fastenc.family.relative_index_by_distance``), ``Kr`` and ``Qr`` the layer's
projected relative embeddings ``(2 * span, heads, head_dim)``, made once at load (``Qr`` carries the
softmax scale, as Q does). Per step, a program's ``BLOCK_M x BLOCK_N`` pairs span at most
``BLOCK_M + BLOCK_N - 1`` consecutive distances (positions grow by one per token; by more across the
holes of a mask, which only adds windows). ``_relative_scores`` loads the table rows of a window of
``REL_W`` consecutive distances (one int32 index each), scores the query tile and the key tile against
them with two more ``tl.dot`` — ``(BLOCK_M, REL_W)`` c2p and ``(BLOCK_N, REL_W)`` p2c — and picks each
pair's column with ``tl.gather`` along the diagonal ``distance - first distance``. Nothing of size
``tokens x tokens`` (nor ``tokens x buckets``) is ever written to memory; what is materialised is the
per-layer tables, ``2 * 2 * span * hidden`` values whatever the batch.

Its cost, per step of a ``BLOCK_M x BLOCK_N`` tile and head dim ``D``: ``QK^T`` and ``PV`` are
``2 * BLOCK_M * BLOCK_N * D`` multiply-adds; the relative terms add ``(BLOCK_M + BLOCK_N) * REL_W * D``
per window (and two register gathers of ``BLOCK_M * BLOCK_N``), ``ceil((BLOCK_M + BLOCK_N - 1) / REL_W)``
windows. With sm_90's ``64 x 64`` tiles and two windows of 64 that is twice the tile's own tensor-core
work: disentangled attention does about 3x plain attention's multiply-adds (4x with sm_8x's ``64 x 32``),
all on tensor cores, reading ``2 * REL_W`` table rows a window from L2 (the tables are 1.5 MiB a layer
for DeBERTa-v3-base in fp16).
The alternative — materialising every query's and key's scores against all ``2 * span`` rows,
``(heads, tokens, 2 * span)`` twice (transformers' c2p/p2c matrices before its gather, minus the
gather) — costs ``2 * 2 * span * D`` multiply-adds per token and head whatever the sequence length
(at span 256: 4x the whole attention of a 128-token sequence, 1x at 512) plus writing and reading
``2 * 2 * span`` values per token and head (48 KiB per token and layer in fp32 for 12 heads) and one
gathered load per term per score: memory-bound, and never cheaper here for head dim 64.

Causal attention (``CAUSAL``, the decoders): a query sees the keys at or before it in its sequence
(by index: positions do not enter causality). A program for the queries ``m0 .. m0 + BLOCK_M - 1``
walks the key blocks before ``m0`` without a mask (every key is at or before every query of the block:
``BLOCK_M`` is a multiple of ``BLOCK_N``), then the ``BLOCK_M / BLOCK_N`` blocks the diagonal crosses,
masked per (query, key); the blocks after its last query are never loaded, which halves the work of
a long sequence. With ``WINDOW`` too (Gemma3's local layers), the keys of ``[q - window, q]`` in
positions: the windowed walk stops at the block's last query. A prefix of a text gives its states
bitwise the same as the whole text's first states: a query's key blocks and their order do not
depend on what follows it (a masked block adds ``exp2(-inf) = 0`` and rescales by ``exp2(0) = 1``).

Limits: head dims 16 to 256 (any, padded to a power of two and masked; 129 to 256 with smaller query
blocks, see ``attention_config``); ``cu_seqlens`` is trusted (int32, non-decreasing, last entry ==
tokens, every length <= ``max_seqlen``): checking its values would need a device synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import INDEX_DTYPES, check_backend, check_tensor, on_device

LOG2E = tl.constexpr(1.4426950408889634)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


@triton.jit
def _load_rows(
    base_ptr,  # (rows, head_dim) rows of one (sequence, head), unit last stride
    rows,  # (BLOCK,) row indices within the sequence
    stride_row,
    offs_d,  # (BLOCK_D,)
    seqlen,
    HEAD_DIM: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Load a (BLOCK, BLOCK_D) tile, zero past the sequence end (MASK_ROWS) and past HEAD_DIM (not EVEN_D)."""
    ptrs = base_ptr + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=(rows < seqlen)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _relative_scores(
    q,  # (BLOCK_M, BLOCK_D) input dtype, scaled
    k,  # (BLOCK_N, BLOCK_D) input dtype
    pos_q,  # (BLOCK_M,) int32 query positions
    pos_k,  # (BLOCK_N,) int32 key positions
    first,  # int32: the smallest distance between a real query of the block and a real key of the step
    last,  # int32: the largest
    offs_d,
    RelK_base,  # this head's row 0 of the (R, heads, head_dim) c2p table, with C2P
    RelQ_base,  # this head's row 0 of the p2c table (scaled), with P2C
    RelIndex_center,  # the (2P - 1,) int32 row-by-distance table, at distance 0
    rel_center,  # P - 1: the largest distance the table holds
    stride_relk_row,
    stride_relq_row,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    REL_W: tl.constexpr,
    C2P: tl.constexpr,
    P2C: tl.constexpr,
):
    """DeBERTa's c2p + p2c scores of one tile, ``(BLOCK_M, BLOCK_N)`` fp32 (see the module docstring).

    Windows of ``REL_W`` consecutive distances from ``first`` to ``last`` (as many as a step's
    ``BLOCK_M + BLOCK_N - 1`` distances need; more only across the holes of a mask): the table rows of a
    window's distances are scored against the query tile (c2p) and the key tile (p2c) by ``tl.dot``, and
    each pair takes the column of its own distance.
    """
    column = pos_k[None, :] - pos_q[:, None] - first  # (BLOCK_M, BLOCK_N) int32: the pair's distance - first
    scores = tl.zeros(column.shape, dtype=tl.float32)
    for start in range(0, last - first + 1, REL_W):
        d = first + start + tl.arange(0, REL_W)  # (REL_W,) the window's distances
        rows = tl.load(RelIndex_center + tl.minimum(tl.maximum(d, -rel_center), rel_center)).to(tl.int64)
        local = column - start
        inside = (local >= 0) & (local < REL_W)
        local = tl.minimum(tl.maximum(local, 0), REL_W - 1)
        if C2P:
            rel_k = _load_rows(RelK_base, rows, stride_relk_row, offs_d, 0, HEAD_DIM, False, EVEN_D)  # (REL_W, D)
            c2p = tl.dot(q, tl.trans(rel_k), input_precision="ieee")  # (BLOCK_M, REL_W)
            scores += tl.where(inside, tl.gather(c2p, local, axis=1), 0.0)
        if P2C:
            rel_q = _load_rows(RelQ_base, rows, stride_relq_row, offs_d, 0, HEAD_DIM, False, EVEN_D)  # (REL_W, D)
            p2c = tl.dot(k, tl.trans(rel_q), input_precision="ieee")  # (BLOCK_N, REL_W)
            scores += tl.where(inside, tl.trans(tl.gather(p2c, tl.trans(local), axis=1)), 0.0)
    return scores


@triton.jit
def _attention_step(
    q,  # (BLOCK_M, BLOCK_D) input dtype, scaled by 1 / sqrt(head_dim)
    acc,  # (BLOCK_M, BLOCK_D) fp32, unnormalised output
    m_i,  # (BLOCK_M,) fp32 running max of the scores (log2 units)
    l_i,  # (BLOCK_M,) fp32 running softmax denominator
    k_base,  # this (sequence, head)'s first key row
    v_base,  # this (sequence, head)'s first value row
    stride_k_token,
    stride_v_token,
    start_n,
    seqlen,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    EVEN_D: tl.constexpr,
    pos_q=None,  # (BLOCK_M,) int64 query positions, with WINDOW or REL_BIAS
    pos_base=None,  # this sequence's first position id, with WINDOW or REL_BIAS
    window=0,
    bias_row=None,  # this head's row of the (heads, 2P - 1) bias table, at distance 0, with REL_BIAS
    WINDOW: tl.constexpr = False,
    REL_BIAS: tl.constexpr = False,
    q_first=0,  # the smallest and largest position of the block's real queries, with C2P or P2C
    q_last=0,
    rel_k_base=None,  # DeBERTa's tables (see _relative_scores), with C2P or P2C
    rel_q_base=None,
    rel_index_center=None,
    rel_center=0,
    stride_relk_row=0,
    stride_relq_row=0,
    REL_W: tl.constexpr = 16,
    C2P: tl.constexpr = False,
    P2C: tl.constexpr = False,
    offs_m=None,  # (BLOCK_M,) query indices within the sequence, with CAUSAL
    CAUSAL: tl.constexpr = False,
):
    """Fold one block of keys into the online softmax; returns the updated (acc, m_i, l_i).

    ``MASK_KEYS`` masks the keys past the sequence end and, with ``CAUSAL``, the keys after each query.
    """
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, keys, stride_k_token, offs_d, seqlen, HEAD_DIM, MASK_KEYS, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N) fp32 scores
    if WINDOW or REL_BIAS:
        pos_k = tl.load(pos_base + keys, mask=keys < seqlen, other=0).to(tl.int64)  # (BLOCK_N,)
        distance = pos_k[None, :] - pos_q[:, None]  # (BLOCK_M, BLOCK_N): key position - query position
    if REL_BIAS:
        s += tl.load(bias_row + distance, mask=(keys < seqlen)[None, :], other=0.0)
    if C2P or P2C:  # int32 positions (below the model's limit): half the registers of int64 pairs
        pos_k32 = tl.load(pos_base + keys, mask=keys < seqlen, other=0).to(tl.int32)  # (BLOCK_N,)
        k_first = tl.min(tl.where(keys < seqlen, pos_k32, 2**30), axis=0)
        k_last = tl.max(tl.where(keys < seqlen, pos_k32, -(2**30)), axis=0)
        s += _relative_scores(q, k, pos_q.to(tl.int32), pos_k32, k_first - q_last, k_last - q_first, offs_d,
                              rel_k_base, rel_q_base, rel_index_center, rel_center, stride_relk_row, stride_relq_row,
                              HEAD_DIM, EVEN_D, REL_W, C2P, P2C)
    if WINDOW:
        visible = (keys < seqlen)[None, :] & (distance <= window) & (distance >= -window)
        if CAUSAL:
            visible = visible & (keys[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        # A row may see no key of this block: keep its statistics finite (exp2(-inf) = 0 adds nothing).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * LOG2E)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * LOG2E - m_safe[:, None])
    else:
        if MASK_KEYS:
            if CAUSAL:
                s = tl.where((keys < seqlen)[None, :] & (keys[None, :] <= offs_m[:, None]), s, float("-inf"))
            else:
                s = tl.where((keys < seqlen)[None, :], s, float("-inf"))
        # Statistics in log2 units: exp(s - m) == exp2(s * log2(e) - m'), one FMA per score.
        # Every row has seen a real key by the end of the first block it folds in (the first causal
        # diagonal block holds the key at the block's first query), so from then on m_new is finite and
        # nothing below is inf - inf; a later diagonal block that a row sees nothing of adds exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * LOG2E)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.exp2(s * LOG2E - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(v_base, keys, stride_v_token, offs_d, seqlen, HEAD_DIM, MASK_KEYS, EVEN_D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    Q_ptr,  # (heads, tokens, head_dim), pre-scaled
    K_ptr,  # (kv_heads, tokens, head_dim)
    V_ptr,  # (kv_heads, tokens, head_dim)
    Out_ptr,  # (tokens, heads * head_dim)
    CuSeqlens_ptr,  # (batch + 1,) int32
    num_heads,
    kv_group,  # heads // kv_heads: query head h reads K/V head h // kv_group
    stride_q_head,
    stride_q_token,
    stride_k_head,
    stride_k_token,
    stride_v_head,
    stride_v_token,
    stride_out_token,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,  # BLOCK_D == HEAD_DIM: no head-dim mask
    Positions_ptr=None,  # (tokens,) integer, with WINDOW or REL_BIAS
    Bias_ptr=None,  # (heads, 2P - 1) float32 bias by distance, with REL_BIAS
    stride_bias_head=0,
    bias_center=0,  # P - 1: the column of distance 0
    window=0,
    WINDOW: tl.constexpr = False,
    REL_BIAS: tl.constexpr = False,
    RelKeys_ptr=None,  # (R, heads, head_dim) DeBERTa's c2p table, with C2P
    RelQueries_ptr=None,  # (R, heads, head_dim) its p2c table (scaled), with P2C
    RelIndex_ptr=None,  # (2P - 1,) int32 the table row of each distance, with C2P or P2C
    stride_relk_row=0,
    stride_relk_head=0,
    stride_relq_row=0,
    stride_relq_head=0,
    rel_center=0,  # P - 1: the column of distance 0
    REL_W: tl.constexpr = 16,  # distances per window of the relative tables
    C2P: tl.constexpr = False,
    P2C: tl.constexpr = False,
    ROW_ALIGN: tl.constexpr = 1,  # every head and token stride is a multiple of it (elements)
    CAUSAL: tl.constexpr = False,
):
    if ROW_ALIGN > 1:  # (s // A) * A == s, but now the compiler knows A divides it: 16-byte vector loads
        stride_q_head = stride_q_head // ROW_ALIGN * ROW_ALIGN
        stride_q_token = stride_q_token // ROW_ALIGN * ROW_ALIGN
        stride_k_head = stride_k_head // ROW_ALIGN * ROW_ALIGN
        stride_k_token = stride_k_token // ROW_ALIGN * ROW_ALIGN
        stride_v_head = stride_v_head // ROW_ALIGN * ROW_ALIGN
        stride_v_token = stride_v_token // ROW_ALIGN * ROW_ALIGN
        stride_out_token = stride_out_token // ROW_ALIGN * ROW_ALIGN
    pid_bh = tl.program_id(0)  # sequence * num_heads + head
    pid_m = tl.program_id(1)
    seq = pid_bh // num_heads
    head = (pid_bh % num_heads).to(tl.int64)
    kv_head = head // kv_group
    start = tl.load(CuSeqlens_ptr + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens_ptr + seq + 1) - start).to(tl.int32)
    if pid_m * BLOCK_M >= seqlen:  # past this sequence's end (or an empty sequence): nothing to write
        return

    m0 = pid_m * BLOCK_M  # this block's first query
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q_ptr + head * stride_q_head + start * stride_q_token
    k_base = K_ptr + kv_head * stride_k_head + start * stride_k_token
    v_base = V_ptr + kv_head * stride_v_head + start * stride_v_token

    # log2(e) is applied to the fp32 scores, not folded into this tile: see the module docstring.
    q = _load_rows(q_base, offs_m, stride_q_token, offs_d, seqlen, HEAD_DIM, True, EVEN_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if WINDOW or REL_BIAS or C2P or P2C:
        pos_base = Positions_ptr + start
        pos_q = tl.load(pos_base + offs_m, mask=offs_m < seqlen, other=0).to(tl.int64)  # (BLOCK_M,)
        bias_row = Bias_ptr
        if REL_BIAS:
            bias_row = Bias_ptr + head * stride_bias_head + bias_center
        q_first, q_last = 0, 0
        rel_k_base, rel_q_base, rel_index_center = RelKeys_ptr, RelQueries_ptr, RelIndex_ptr
        if C2P or P2C:  # the extremes of the block's real query positions, and this head's tables
            q_first = tl.min(tl.where(offs_m < seqlen, pos_q, 2**30), axis=0).to(tl.int32)
            q_last = tl.max(tl.where(offs_m < seqlen, pos_q, -(2**30)), axis=0).to(tl.int32)
            rel_index_center = RelIndex_ptr + rel_center
            if C2P:
                rel_k_base = RelKeys_ptr + head * stride_relk_head
            if P2C:
                rel_q_base = RelQueries_ptr + head * stride_relq_head
        lo, hi = 0, seqlen
        if WINDOW:  # only the key blocks that can hold a key of some row's window: the others are never read
            lo = tl.maximum(m0 - window, 0) // BLOCK_N * BLOCK_N
            hi = tl.minimum(m0 + BLOCK_M + window, seqlen)
        if CAUSAL:  # nor the blocks after the block's last query
            hi = tl.minimum(hi, m0 + BLOCK_M)
        for start_n in range(lo, hi, BLOCK_N):  # every block masked: by the window and the sequence end
            acc, m_i, l_i = _attention_step(q, acc, m_i, l_i, k_base, v_base, stride_k_token, stride_v_token,
                                            start_n, seqlen, offs_d, HEAD_DIM, BLOCK_N, True, EVEN_D, pos_q,
                                            pos_base, window, bias_row, WINDOW, REL_BIAS, q_first, q_last,
                                            rel_k_base, rel_q_base, rel_index_center, rel_center, stride_relk_row,
                                            stride_relq_row, REL_W, C2P, P2C, offs_m, CAUSAL)
    elif CAUSAL:
        tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the key blocks before m0 end before m0
        for start_n in range(0, m0, BLOCK_N):  # wholly at or below the diagonal: every key seen, no mask
            acc, m_i, l_i = _attention_step(q, acc, m_i, l_i, k_base, v_base, stride_k_token, stride_v_token,
                                            start_n, seqlen, offs_d, HEAD_DIM, BLOCK_N, False, EVEN_D)
        # The blocks the diagonal crosses, masked; the blocks above it are never read.
        for start_n in range(m0, tl.minimum(m0 + BLOCK_M, seqlen), BLOCK_N):
            acc, m_i, l_i = _attention_step(q, acc, m_i, l_i, k_base, v_base, stride_k_token, stride_v_token,
                                            start_n, seqlen, offs_d, HEAD_DIM, BLOCK_N, True, EVEN_D,
                                            offs_m=offs_m, CAUSAL=True)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attention_step(q, acc, m_i, l_i, k_base, v_base, stride_k_token, stride_v_token,
                                            start_n, seqlen, offs_d, HEAD_DIM, BLOCK_N, False, EVEN_D)
        # The last, partial block: mask the keys past the end. A loop of at most one step rather than an
        # `if`: with the `if`, head dim 256 spilled 256-624 B (fp32; 16-bit on sm_86), with the loop nothing.
        for start_n in range(full_end, seqlen, BLOCK_N):
            acc, m_i, l_i = _attention_step(q, acc, m_i, l_i, k_base, v_base, stride_k_token, stride_v_token,
                                            start_n, seqlen, offs_d, HEAD_DIM, BLOCK_N, True, EVEN_D)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l_i >= 1 on real rows; never 0 / 0
    rows = start + offs_m.to(tl.int64)
    out_ptrs = Out_ptr + rows[:, None] * stride_out_token + head * HEAD_DIM + offs_d[None, :]
    mask = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=mask)


def attention_config(head_dim: int, dtype: torch.dtype, arch: int = _target.DEFAULT_ARCH) -> dict:
    """Fixed block sizes from the head dim, dtype and GPU architecture only (never the sequence lengths).

    Chosen from what ``python -m fastenc.kernels.aot --sweep`` reports (registers and spills at head dims
    16 to 256, sm_90 and sm_86, Triton 3.6 and 3.9; 256 under 3.9 only), to be timed and tuned on a GPU:

    * 16-bit inputs on sm_80 and newer: 128 queries x 64 keys per step. On sm_90 one warpgroup (4 warps)
      issues ``wgmma`` for the 128 rows when the head dim is a power of two up to 64; a masked head dim
      (24, 40, 48) with 4 warps needs up to all 255 registers, so it and every 128-wide head block take
      8 warps (two warpgroups). On sm_8x ``mma`` keeps the accumulator in each warp's registers, and with
      4 warps a head dim of 64 needs all 255 registers (spilling on sm_86): 8 warps there; a 128-wide head
      block takes 32 keys a step (64 spilled 16 B at head dims 80 and 96; 32 use 185-194 registers, all
      255 at 80 and 96 while the last partial key block was an ``if`` rather than a loop).
    * 16-bit at head dims 129 to 256 (Gemma's 256): 64 queries a step with 8 warps and 2 stages, 64 keys on
      sm_90 (160 KiB of shared memory, 219 registers under Triton 3.9), 32 on sm_8x (68 KiB of its 99).
      128 queries need 192 KiB and all 255 registers on sm_90 and are over sm_86's shared memory; 4 warps
      spill (208 B on sm_90 at 64 x 64, 16 B on sm_86 at 64 x 32); a third stage on sm_90 takes 224 KiB
      and spills 8 B.
    * fp32, and GPUs older than sm_80, run on CUDA cores (``ieee`` FMA products), where Triton holds the
      operand tiles in registers: the tile per thread must stay small. 32 x 16 blocks with 4 warps up to a
      32-wide head block, 8 warps at 64 (4 spilled 200 B), and 16 x 16 with 8 warps from 128 (32 x 16
      spilled 728 to 1400 B at 128; at 256 the 16 x 16 blocks use 80-94 registers with 8 warps, and 4 warps
      spill 8 B). These are the accuracy path, not the fast one.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    even_d = block_d == head_dim
    if dtype == torch.float32 or arch < 80:  # CUDA-core FMA path: keep the per-thread tiles small
        block_m, warps = (32, 4) if block_d <= 32 else (32, 8) if block_d == 64 else (16, 8)
        return dict(BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=block_m, BLOCK_N=16, num_warps=warps, num_stages=2,
                    **_target.COMPILE_OPTIONS)
    if block_d == 256:  # the tiles of 128 queries do not fit: see the docstring
        return dict(BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=64, BLOCK_N=64 if arch >= 90 else 32, num_warps=8,
                    num_stages=2, **_target.COMPILE_OPTIONS)
    one_warpgroup = arch >= 90 and (block_d <= 32 or (block_d == 64 and even_d))
    block_n = 32 if arch < 90 and block_d == 128 else 64
    return dict(BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=128, BLOCK_N=block_n, num_warps=4 if one_warpgroup else 8,
                num_stages=3, **_target.COMPILE_OPTIONS)


def positional_config(head_dim: int, dtype: torch.dtype, arch: int = _target.DEFAULT_ARCH, *, window: bool = False,
                      rel_bias: bool = False, causal: bool = False, disentangled: bool = False) -> dict:
    """``attention_config`` for the windowed (``WINDOW``), relative-bias (``REL_BIAS``), causal (``CAUSAL``) and
    disentangled (``C2P``, ``P2C``) kernels, which also hold a block of positions (and of bias, or query
    indices) in registers. Where BERT's config would spill with them (``python -m fastenc.kernels.aot
    --sweep --positional`` and ``--decoder``, Triton 3.9 and 3.6, fp16 and bf16):

    * sm_90, relative bias, head blocks up to 32 (one warpgroup): 255 registers and 40-136 B spilled with
      4 warps; 8 warps use 168-223.
    * sm_8x, window, head blocks up to 32: 8-16 B spilled with 64 keys a step; 32 keys use about 100.
    * sm_8x, relative bias, 128-wide head blocks (head dims 80-128): 16 B spilled with 128 queries and
      8 warps; 64 queries with 8 warps still spill 16 B under Triton 3.6 (ptxas holds them to 128
      registers); 64 queries with 4 warps use 184 (3.6) to 228 (3.9).
    * sm_90, causal, one warpgroup (head dims 16 to 64): 236 to 254 registers with 4 warps (Triton 3.9),
      no headroom for another compiler; 8 warps use 119-125 at head dim 64.
    * Head dim 256, window (Gemma3's local layers): sm_90's 64 x 64 blocks use all 255 registers with a
      causal window under Triton 3.6; 64 x 32 use 172-189 (3.6) and 165-178 (3.9). sm_86's 64 x 32 use 254
      (3.6); 32 x 64 spill 8 B bidirectional (3.9); 32 x 32 with 8 warps and 3 stages use 126-146 in 82 KiB.
    * Causal, Triton 3.6 (Triton 3.9 has room in every case): on sm_8x 64 keys a step spill 64 B at head
      dim 40 (32 keys: 185 registers) and use all 255 with a window at 48 and 64 (32 keys: 230); on sm_90
      a causal window uses all 255 at head dims 80 to 128 (32 keys: 192). fp32 with 8 warps (which
      Triton 3.6 holds to 64 registers) spills 8-16 B at head dims 40 to 128; 16 x 16 blocks with 4 warps
      use 60-78 at 40 to 64 and 126 at 128.

    The other fp32 and pre-sm_80 configs have room (the sweep finds no spill).

    DeBERTa's relative terms (``disentangled``) hold two more score tiles, ``(BLOCK_M, REL_W)`` and
    ``(BLOCK_N, REL_W)`` fp32, for each window of ``REL_W`` distances, besides int32 pair indices
    (``python -m fastenc.kernels.aot --sweep --positional``, Triton 3.9): 16-bit inputs take 64-query tiles,
    8 warps, windows of 64 distances and 2 stages (64 x 64 tiles with windows of 128 spill 48-192 B on
    sm_90 with 8 warps, 488-1088 B with 4; 3 stages need 115 KiB of shared memory at head dim 64, over
    sm_86's 99 KiB). sm_90 takes 64 keys a step (127 distances: two windows), sm_8x 32 (64 keys spill
    88-96 B at head dim 64 there). The relative terms then cost twice (sm_90) or three times (sm_8x) the
    tile's own multiply-adds. fp32 and pre-sm_80 keep their tiles, with windows of 32 distances, 8 warps
    and, up to 64-wide head blocks, one stage (one window of 64 spills 24-48 B at head dims 21-40 on sm_90
    with 4 warps; two stages of 32 spill 8-16 B at head dim 40 with 8 warps; one stage spills 176-232 B
    with 128-wide head blocks, two none).
    """
    config = attention_config(head_dim, dtype, arch)
    if disentangled:
        if dtype != torch.float32 and arch >= 80:
            config.update(BLOCK_M=64, BLOCK_N=64 if arch >= 90 else 32, num_warps=8, num_stages=2, REL_W=64)
        else:
            config.update(num_warps=8, num_stages=1 if config["BLOCK_D"] <= 64 else 2, REL_W=32)
        return config
    if not (window or rel_bias or causal):
        return config
    if dtype == torch.float32 or arch < 80:
        if causal and config["BLOCK_D"] in (64, 128):
            config.update(BLOCK_M=16, num_warps=4)
        return config
    if causal and (arch < 90 or window) and config["BLOCK_D"] <= 128:
        config["BLOCK_N"] = 32
    if (rel_bias or causal) and arch >= 90 and config["num_warps"] == 4:
        config["num_warps"] = 8
    if window and arch < 90 and config["BLOCK_D"] <= 32:
        config["BLOCK_N"] = 32
    if window and config["BLOCK_D"] == 256:
        config.update(BLOCK_N=32) if arch >= 90 else config.update(BLOCK_M=32, BLOCK_N=32, num_stages=3)
    if rel_bias and arch < 90 and config["BLOCK_D"] == 128:
        config.update(BLOCK_M=64, num_warps=4)
    return config


def attention(
    q: torch.Tensor,  # (heads, tokens, head_dim), pre-scaled
    k: torch.Tensor,  # (kv_heads, tokens, head_dim)
    v: torch.Tensor,  # (kv_heads, tokens, head_dim)
    cu_seqlens: torch.Tensor,  # (batch + 1,) int32
    max_seqlen: int,
    positions: torch.Tensor | None = None,  # (tokens,) integer; None: the index within the sequence
    window: int | None = None,  # a query sees the keys with |key position - query position| <= window
    bias: torch.Tensor | None = None,  # (heads, 2 * P - 1) float32: score bias by distance, P positions
    *,
    causal: bool = False,  # a query sees only the keys at or before it in its sequence
    rel_keys: torch.Tensor | None = None,  # (R, heads, head_dim): c2p, DeBERTa's projected relative keys
    rel_queries: torch.Tensor | None = None,  # (R, heads, head_dim): p2c, its projected relative queries, scaled
    rel_index: torch.Tensor | None = None,  # (2 * P - 1,) int32: the row of both for each distance
) -> torch.Tensor:  # (tokens, heads * head_dim)
    """Attention within each packed sequence, bidirectional or ``causal``: every key of the sequence (up to
    the query's own), or those within ``window`` positions; ``bias[head, key position - query position
    + P - 1]`` added to the scores; DeBERTa's ``q_i · rel_keys[r, head]`` and ``k_j · rel_queries[r, head]``
    with ``r = rel_index[key position - query position + P - 1]`` (``rel_index`` is trusted: every entry a
    row of the tables); query head ``h`` reads K/V head ``h // (heads // kv_heads)``."""
    device = check_backend("q", q)
    check_tensor("q", q, (None, None, None))
    heads, tokens, head_dim = q.shape
    check_tensor("k", k, (None, tokens, head_dim), dtypes=(q.dtype,), device=device)
    kv_heads = k.shape[0]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k has {kv_heads} heads, which must divide q's {heads} (grouped-query attention)")
    check_tensor("v", v, (kv_heads, tokens, head_dim), dtypes=(q.dtype,), device=device)
    check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold at least one offset (batch + 1 entries)")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {head_dim}; the attention kernel supports {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be a non-negative int or None, got {window!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if bias is not None:
        check_tensor("bias", bias, (heads, None), dtypes=(torch.float32,), device=device)
        if bias.shape[1] % 2 == 0:
            raise ValueError(f"bias must have an odd number of columns (2 * positions - 1), got {bias.shape[1]}")
    disentangled = rel_keys is not None or rel_queries is not None
    if disentangled:
        if rel_index is None:
            raise ValueError("rel_index is required with rel_keys or rel_queries")
        check_tensor("rel_index", rel_index, (None,), dtypes=(torch.int32,), device=device)
        if rel_index.shape[0] % 2 == 0:
            raise ValueError(f"rel_index must have an odd length (2 * positions - 1), got {rel_index.shape[0]}")
        rows = (rel_keys if rel_keys is not None else rel_queries).shape[0]
        for name, table in (("rel_keys", rel_keys), ("rel_queries", rel_queries)):
            if table is not None:
                check_tensor(name, table, (rows, heads, head_dim), dtypes=(q.dtype,), device=device)
    elif rel_index is not None:
        raise ValueError("rel_index is given without rel_keys or rel_queries")
    if positions is not None:
        check_tensor("positions", positions, (tokens,), dtypes=INDEX_DTYPES, device=device)
    elif window is not None or bias is not None or disentangled:  # the index within each sequence
        positions = _sequence_positions(cu_seqlens, tokens)

    out = torch.empty((tokens, heads * head_dim), device=device, dtype=q.dtype)
    batch = cu_seqlens.numel() - 1
    if tokens == 0 or batch == 0 or heads == 0 or max_seqlen == 0:
        return out
    config = positional_config(head_dim, q.dtype, _target.device_arch(device), window=window is not None,
                               rel_bias=bias is not None, causal=causal, disentangled=disentangled)
    grid = (batch * heads, triton.cdiv(max_seqlen, config["BLOCK_M"]))
    if grid[1] > 65535:
        raise ValueError(f"max_seqlen {max_seqlen} is too long: at most {65535 * config['BLOCK_M']} tokens")
    with on_device(device):
        _attention_kernel[grid](
            q,
            k,
            v,
            out,
            cu_seqlens,
            heads,
            heads // kv_heads,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            HEAD_DIM=head_dim,
            **config,
            Positions_ptr=positions if window is not None or bias is not None or disentangled else None,
            Bias_ptr=bias,
            stride_bias_head=0 if bias is None else bias.stride(0),
            bias_center=0 if bias is None else (bias.shape[1] - 1) // 2,
            window=0 if window is None else window,
            WINDOW=window is not None,
            REL_BIAS=bias is not None,
            RelKeys_ptr=rel_keys,
            RelQueries_ptr=rel_queries,
            RelIndex_ptr=rel_index,
            stride_relk_row=0 if rel_keys is None else rel_keys.stride(0),
            stride_relk_head=0 if rel_keys is None else rel_keys.stride(1),
            stride_relq_row=0 if rel_queries is None else rel_queries.stride(0),
            stride_relq_head=0 if rel_queries is None else rel_queries.stride(1),
            rel_center=0 if rel_index is None else (rel_index.shape[0] - 1) // 2,
            C2P=rel_keys is not None,
            P2C=rel_queries is not None,
            ROW_ALIGN=_row_align(q.element_size(), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                                 v.stride(1), out.stride(0)),
            CAUSAL=causal,
        )
    return out


def _row_align(itemsize: int, *strides: int) -> int:
    """The largest power of two, at most 16 bytes' worth of elements, that divides every stride (elements).

    Triton specialises an integer argument only on divisibility by 16: a row of 24 or 40 fp16 elements
    (48 or 80 bytes) is then read element by element, which rules out the asynchronous copies of the
    software pipeline (``python -m fastenc.kernels.aot`` shows "async copies: no"). The strides say
    what the rows really allow; the loads are the same loads, so the results are the same bits.
    """
    align = 16 // itemsize
    while align > 1 and any(stride % align for stride in strides):
        align //= 2
    return align


def _sequence_positions(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each token's index within its sequence, ``(tokens,)`` int32 (``positions=None``)."""
    token = torch.arange(tokens, device=cu_seqlens.device, dtype=torch.int32)
    sequence = torch.searchsorted(cu_seqlens[1:], token, right=True)
    return token - cu_seqlens[sequence]
