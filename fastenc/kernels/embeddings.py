"""``embeddings``: word + position (+ token type) gather, sum and LayerNorm in one pass.

Algorithm: one token per program. The program reads its three ids, gathers the matching rows of the
word, position and (when the model has them) token-type tables, sums them in fp32 and normalises the
sum with ``_layer_norm_row`` from ``layer_norm.py``; the result is cast once at the store. The sum
never goes through memory, which is the point of the fusion (the unfused path reads and writes the
``(tokens, emb)`` activation three times).

``HAS_TYPES`` (a constexpr) drops the token-type table for DistilBERT, whose ``type_emb`` is ``None``;
``HAS_POSITIONS`` drops the position table of the families without absolute positions (RoPE:
ModernBERT, NomicBERT, GTE, the decoders), and ``HAS_BIAS`` the norm's bias (ModernBERT).
``HAS_NORM=False`` drops the LayerNorm (the decoders normalise in their blocks), and ``HAS_SCALE`` multiplies
the word row by a factor first (Gemma's ``sqrt(hidden)``), as transformers' ``Gemma3TextScaledWordEmbedding``
does it: the factor rounded to the table's dtype, the product rounded to it. A decoder's embeddings
are then transformers' bit for bit (a gather, and one exact product and rounding).

Batch invariance: a token reads only its own rows; the reduction order depends only on ``emb``.

Limits: the ids are not range-checked here (that would need a device synchronisation); the encoder
validates them before any kernel runs (API.md, ``InputError``). Table rows may be strided, the last
stride must be 1; the LayerNorm weight and bias have the tables' dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastenc.kernels._checks import INDEX_DTYPES, check_backend, check_tensor, on_device
from fastenc.kernels.layer_norm import MAX_HIDDEN, _layer_norm_row, row_config


@triton.jit
def _embeddings_kernel(
    InputIds_ptr,  # (tokens,)
    PositionIds_ptr,  # (tokens,)
    TokenTypeIds_ptr,  # (tokens,), None when not HAS_TYPES
    WordEmb_ptr,  # (vocab, emb)
    PosEmb_ptr,  # (max_positions, emb), None when not HAS_POSITIONS
    TypeEmb_ptr,  # (type_vocab, emb), None when not HAS_TYPES
    W_ptr,  # (emb,), None when not HAS_NORM
    B_ptr,  # (emb,)
    Out_ptr,  # (tokens, emb)
    stride_word_row,
    stride_pos_row,
    stride_type_row,
    stride_out_row,
    n_cols,
    eps,
    HAS_TYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_POSITIONS: tl.constexpr = True,
    HAS_BIAS: tl.constexpr = True,
    scale=1.0,  # the word rows' factor, already rounded to the table's dtype, with HAS_SCALE
    HAS_NORM: tl.constexpr = True,
    HAS_SCALE: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    word = tl.load(InputIds_ptr + token).to(tl.int64)
    x = tl.load(WordEmb_ptr + word * stride_word_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:  # exact in fp32 for 16-bit tables, then rounded once, as torch's product in the table's dtype
        x = (x * scale).to(Out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_POSITIONS:
        position = tl.load(PositionIds_ptr + token).to(tl.int64)
        x += tl.load(PosEmb_ptr + position * stride_pos_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPES:
        token_type = tl.load(TokenTypeIds_ptr + token).to(tl.int64)
        x += tl.load(TypeEmb_ptr + token_type * stride_type_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        x = _layer_norm_row(x, mask, W_ptr, B_ptr, offs, n_cols, eps, HAS_BIAS)
    tl.store(Out_ptr + token * stride_out_row + offs, x.to(Out_ptr.dtype.element_ty), mask=mask)


def embeddings(
    input_ids: torch.Tensor,  # (tokens,) integer
    position_ids: torch.Tensor,  # (tokens,) integer
    token_type_ids: torch.Tensor | None,  # (tokens,) integer, None when type_emb is None
    word_emb: torch.Tensor,  # (vocab, emb)
    pos_emb: torch.Tensor | None,  # (max_positions, emb), None without absolute positions (RoPE, MPNet's bias)
    type_emb: torch.Tensor | None,  # (type_vocab, emb), None for DistilBERT
    weight: torch.Tensor | None,  # (emb,), None: no LayerNorm (the decoder families)
    bias: torch.Tensor | None,  # (emb,)
    eps: float,
    scale: float | None = None,  # the word rows' factor (Gemma: sqrt(hidden)), None: 1
) -> torch.Tensor:  # (tokens, emb)
    """Gather word (+ position) (+ token type) rows (the word rows times ``scale``, in the table's dtype), sum
    them and apply LayerNorm (unless ``weight`` is None)."""
    device = check_backend("word_emb", word_emb)
    check_tensor("word_emb", word_emb, (None, None))
    dtype, emb = word_emb.dtype, word_emb.shape[1]
    if not 0 < emb <= MAX_HIDDEN:
        raise ValueError(f"word_emb has embedding size {emb}; the kernel supports 1 to {MAX_HIDDEN}")
    check_tensor("input_ids", input_ids, (None,), dtypes=INDEX_DTYPES, device=device)
    tokens = input_ids.shape[0]
    has_positions = pos_emb is not None
    if has_positions:
        check_tensor("position_ids", position_ids, (tokens,), dtypes=INDEX_DTYPES, device=device)
        check_tensor("pos_emb", pos_emb, (None, emb), dtypes=(dtype,), device=device)
    has_types = type_emb is not None
    if has_types:
        check_tensor("type_emb", type_emb, (None, emb), dtypes=(dtype,), device=device)
        if token_type_ids is None:
            raise ValueError("token_type_ids is required when type_emb is given")
        check_tensor("token_type_ids", token_type_ids, (tokens,), dtypes=INDEX_DTYPES, device=device)
    if weight is not None:
        check_tensor("weight", weight, (emb,), dtypes=(dtype,), device=device)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if bias is not None:
        if weight is None:
            raise ValueError("bias is the LayerNorm's: give weight too, or neither")
        check_tensor("bias", bias, (emb,), dtypes=(dtype,), device=device)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
        scale = torch.tensor(scale, dtype=dtype).item()  # rounded to the table's dtype, as transformers does

    out = torch.empty((tokens, emb), device=device, dtype=dtype)
    if tokens == 0:
        return out
    with on_device(device):
        _embeddings_kernel[(tokens,)](
            input_ids,
            position_ids if has_positions else None,
            token_type_ids if has_types else None,
            word_emb,
            pos_emb,
            type_emb,
            weight,
            bias,
            out,
            word_emb.stride(0),
            pos_emb.stride(0) if has_positions else 0,
            type_emb.stride(0) if has_types else 0,
            out.stride(0),
            emb,
            float(eps) if weight is not None else 0.0,
            HAS_TYPES=has_types,
            **row_config(emb),
            HAS_POSITIONS=has_positions,
            HAS_BIAS=bias is not None,
            scale=1.0 if scale is None else scale,
            HAS_NORM=weight is not None,
            HAS_SCALE=scale is not None,
        )
    return out
