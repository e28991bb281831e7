"""``maxsim``: late-interaction (ColBERT MaxSim) scores of one query against many packed documents.

What it computes: for each document ``d`` of a packed batch, ``sum over query tokens i of max over d's
tokens j of <query_i, doc_j>`` (Khattab and Zaharia, ColBERT, SIGIR 2020, arXiv:2004.12832). The query is
``(query_tokens, dim)``; the documents' token vectors are packed ``(doc_tokens, dim)`` with ``cu_seqlens``
offsets, as the encoder's activations are. An empty document scores 0, as in PyLate's ``colbert_scores``
(whose masked tokens score 0); sentence-transformers' ``util.maxsim`` gives one ``-1e9`` instead, and
FlagEmbedding's ``colbert_score`` raises.

Algorithm: one program per document. It walks the query in blocks of ``BLOCK_Q`` tokens; for each query
block it walks the document's tokens in blocks of ``BLOCK_N``, computes the ``BLOCK_N x BLOCK_Q`` tile of
dot products with ``tl.dot`` (fp32 accumulation; document tokens on the M axis, so that sm_90's ``wgmma``
gets its 64 rows from any query length) and folds it into a running ``BLOCK_N x BLOCK_Q`` maximum held in
registers, element by element: no reduction inside the loop. After the document's last block the
running maximum is reduced over its rows once, and the query block's maxima, padding lanes set to 0, are
added to the document's score. The ``(query tokens x all document tokens)`` products never reach memory;
what is written is one fp32 score per document. When the vectors fit one ``BLOCK_K`` step (``ONE_K``:
ColBERT's 48 to 128 dims in fp16/bf16) the query block is loaded once and stays on chip (registers, or
shared memory for ``wgmma``) for the whole document; wider vectors (BGE-M3's 1024, and fp32 past 32 dims)
walk the dim in ``BLOCK_K`` steps with the GEMM tile of ``gemm.py`` (``_gemm_tile``), reloading the
query block, which stays in L1/L2.

The work is memory-bound: each document token is read once (``dim`` values) for ``2 * query_tokens * dim``
FLOPs, 32 FLOPs per byte for a 32-token fp16 query, far under a GPU's ratio of matmul to memory
throughput. The tiles are sized for streaming the documents, not for the products.

Rows past a document's end are not masked: their addresses wrap onto the document's own rows (``%
length``), whose products are already in the maximum, so the maximum is unchanged and the loads stay
unmasked. Query lanes past the query's end wrap the same way and are left out of the sum.

Batch invariance: a document's program reads only its own tokens, starting at its own first token; the
query blocks, document blocks and dim steps run in a fixed order; there is no split over programs and
no atomics; the block sizes depend only on the dtype, the dim and the GPU architecture, never on the token
counts. A document's score is bitwise the same alone or among any others.

Limits: ``query`` and ``documents`` need a unit stride in their last dimension and the same dtype; ``dim``
at least 1; ``cu_seqlens`` is trusted (int32, non-decreasing, first entry 0, last == doc_tokens): checking
its values would need a device synchronisation. One program per document: a handful of very long
documents leaves most of a GPU idle. Queries longer than ``BLOCK_Q`` re-read each document once per
query block (from L2 on a GPU). The output is float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastenc.kernels import _target
from fastenc.kernels._checks import check_backend, check_tensor, on_device
from fastenc.kernels.gemm import _gemm_tile


@triton.jit
def _maxsim_kernel(
    Q_ptr,  # (query_tokens, K): the query's token vectors
    D_ptr,  # (doc_tokens, K): every document's token vectors, packed
    CuSeqlens_ptr,  # (docs + 1,) int32
    Out_ptr,  # (docs,) fp32
    n_query,
    K,  # the vectors' dim
    stride_q_row,
    stride_d_row,
    BLOCK_Q: tl.constexpr,  # query tokens per block
    BLOCK_N: tl.constexpr,  # document tokens per step
    BLOCK_K: tl.constexpr,  # dims per step
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no dim mask
    ONE_K: tl.constexpr,  # K <= BLOCK_K: the query block is loaded once per document
):
    doc = tl.program_id(0)
    start = tl.load(CuSeqlens_ptr + doc)
    length = tl.load(CuSeqlens_ptr + doc + 1) - start
    D_doc = D_ptr + start.to(tl.int64) * stride_d_row  # this document's first token
    q_end = tl.where(length > 0, n_query, 0)  # an empty document runs no query block: it scores 0
    offs_k = tl.arange(0, BLOCK_K)
    score = tl.sum(tl.zeros((BLOCK_Q,), dtype=tl.float32), axis=0)  # fp32 scalar
    for q0 in range(0, q_end, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        best = tl.full((BLOCK_N, BLOCK_Q), float("-inf"), dtype=tl.float32)  # running max, element by element
        if ONE_K:
            # The query block transposed, (BLOCK_K, BLOCK_Q); lanes past the query wrap onto its own rows.
            q_rows = (offs_q % n_query).to(tl.int64)
            q_ptrs = Q_ptr + q_rows[None, :] * stride_q_row + offs_k[:, None]
            if EVEN_K:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=(offs_k < K)[:, None], other=0.0)
            for n0 in range(0, length, BLOCK_N):
                rows = ((n0 + tl.arange(0, BLOCK_N)) % length).to(tl.int64)  # past the end: the document's own rows
                d_ptrs = D_doc + rows[:, None] * stride_d_row + offs_k[None, :]
                if EVEN_K:
                    d = tl.load(d_ptrs)
                else:
                    d = tl.load(d_ptrs, mask=(offs_k < K)[None, :], other=0.0)
                best = tl.maximum(best, tl.dot(d, q, input_precision="ieee"))
        else:
            for n0 in range(0, length, BLOCK_N):
                s = _gemm_tile(D_doc, Q_ptr, stride_d_row, stride_q_row, n0 + tl.arange(0, BLOCK_N), offs_q, length,
                               n_query, K, BLOCK_N, BLOCK_Q, BLOCK_K, EVEN_K)
                best = tl.maximum(best, s)
        score += tl.sum(tl.where(offs_q < n_query, tl.max(best, axis=0), 0.0), axis=0)
    tl.store(Out_ptr + doc, score)


def maxsim_config(dtype: torch.dtype, K: int, arch: int = _target.DEFAULT_ARCH) -> dict:
    """Fixed tile sizes from the dtype, the dim K and the architecture (never the token counts: batch
    invariance).

    32 query tokens a block: ColBERT's queries are 32 tokens (padded with [MASK] expansion tokens), and
    ``wgmma`` takes N = 32 (the document tokens are its M). 16-bit on sm_80+: 64 document tokens a step
    on tensor cores, the whole dim in one step up to 128 (ColBERT's dims), 64-dim steps beyond (BGE-M3's
    1024), 4 warps, 3 stages (sm_90: 28-56 KiB of shared memory and 64-80 registers; sm_86: 20-40 KiB and
    93-128 registers). fp32 (and GPUs before sm_80): CUDA-core FMA tiles of 32 document tokens x 32 dims
    with 8 warps (70-72 registers); 4 warps spilled 16 B on sm_86 at dim 48. Chosen from ``python -m
    fastenc.kernels.aot --sweep`` (no spills, shared memory within sm_86's limit), to be timed on a GPU.
    """
    block_d = max(16, triton.next_power_of_2(K))
    if dtype == torch.float32 or arch < 80:
        block_n, block_k, warps, stages = 32, min(block_d, 32), 8, (3 if arch >= 80 else 2)
    else:
        block_n, block_k, warps, stages = 64, (block_d if block_d <= 128 else 64), 4, 3
    return dict(BLOCK_Q=32, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, ONE_K=K <= block_k,
                num_warps=warps, num_stages=stages, **_target.COMPILE_OPTIONS)


def maxsim(
    query: torch.Tensor,  # (query_tokens, dim)
    documents: torch.Tensor,  # (doc_tokens, dim): every document's token vectors, packed
    cu_seqlens: torch.Tensor,  # (docs + 1,) int32
) -> torch.Tensor:  # (docs,) float32
    """Late-interaction scores: for each packed document, the sum over the query's tokens of their largest
    dot product with the document's tokens; an empty document scores 0."""
    device = check_backend("query", query)
    check_tensor("query", query, (None, None))
    dim = query.shape[1]
    if dim == 0:
        raise ValueError("query has dim 0: the vectors need at least one dimension")
    check_tensor("documents", documents, (None, dim), dtypes=(query.dtype,), device=device)
    check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold at least one offset (docs + 1 entries)")
    docs = cu_seqlens.numel() - 1
    out = torch.empty(docs, device=device, dtype=torch.float32)
    if docs == 0:
        return out
    if documents.shape[0] == 0 or query.shape[0] == 0:  # every score is an empty sum (and the data pointer null)
        return out.zero_()
    config = maxsim_config(query.dtype, dim, _target.device_arch(device))
    with on_device(device):
        _maxsim_kernel[(docs,)](query, documents, cu_seqlens, out, query.shape[0], dim, query.stride(0),
                                documents.stride(0), **config)
    return out
