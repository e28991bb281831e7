"""The pure-PyTorch twin of every fastenc kernel: the ``"torch"`` backend.

This module *is* the ops interface. The encoder's forward pass (``encoder.py``) calls only the
functions below, through whichever backend was chosen at load; ``fastenc.kernels`` exports Triton
launchers with exactly these names, signatures and semantics. Tests compare every kernel with its twin
here and benchmarks time these as the baseline, so both speak of the same function.

Conventions shared by every backend:

* Activations are packed: one ``(tokens, features)`` row per real token, padding removed. Sequences
  are described by ``cu_seqlens`` (``(batch + 1,)`` int32 offsets into the token axis, on the device)
  and ``max_seqlen`` (a host ``int``), as in FlashAttention's varlen interface. A sequence may be empty.
* ``fused_qkv`` returns Q already multiplied by the softmax scale (``1 / sqrt(head_dim)`` unless the
  family says otherwise: DeBERTa's ``1 / sqrt(head_dim * scale_factor)``); ``attention`` applies no further scale.
* Heads are ``(heads, tokens, head_dim)`` slabs. With grouped-query attention K and V have
  ``kv_heads`` slabs (``heads % kv_heads == 0``) and query head ``h`` reads K/V head
  ``h // (heads // kv_heads)``, transformers' ``repeat_kv`` order; the kernels never expand them.
* Activation names are canonical: ``"gelu"`` (exact erf), ``"gelu_tanh"`` (the tanh approximation used
  by ``gelu_new``, ``gelu_pytorch_tanh`` and ``gelu_fast``), ``"relu"``, ``"silu"`` (``x * sigmoid(x)``,
  transformers' ``silu`` / ``swish``), or ``None``.
* A bias may be ``None`` wherever a family has none (ModernBERT's linears and LayerNorms, NomicBERT's
  linears): the kernels take the bias-free path then, not a zero vector.
* Positions (RoPE, relative bias, sliding window) are the ``(tokens,)`` position ids of the packed
  batch: the token's column in the caller's padded row, as transformers counts it. Where an op takes
  ``positions=None``, a token's position is its index within its sequence.
* The family-specific layouts are prepared once at load (``fastenc/family.py``): gated FFN weights
  with their two halves interleaved row by row, Q and K rows in rotary-pair order, RoPE as a
  ``(positions, head_dim)`` table of cosines and sines, MPNet's bucketed relative bias as a
  ``(heads, 2 * positions - 1)`` table by distance, DeBERTa's relative embeddings projected per layer
  (``(2 * span, heads, head_dim)``, the queries' already scaled) and its row of them for every distance
  (``(2 * positions - 1,)`` int32).
* RMSNorm (the decoder families) follows transformers' roundings, which differ between two forms:
  ``offset == 0`` is ``LlamaRMSNorm`` (also Mistral's, Qwen2's, Qwen3's), ``weight * (x * rstd).to(dtype)``;
  ``offset != 0`` is ``Gemma3RMSNorm``, ``(x * rstd * (offset + weight)).to(dtype)`` with ``offset = 1``.
  Statistics are float32 (float64 for float64 inputs, so that the twin can serve as the exact reference).
* FP8 (``*_fp8``): e4m3 GEMM operands with float32 scales, one per activation row (token) and one per
  weight row (output channel), applied with the bias, activation and residual in float32 after
  a float32 accumulation (``quantize_rows`` says how a row is quantized). The LayerNorms' ``*_fp8`` forms
  return their output and its quantization together; a GEMM given a 16/32-bit ``x`` quantizes it per row.
  This twin emulates the kernels exactly up to the float32 summation order: the same codes and scales, the
  same exact products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def apply_activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Apply a canonical activation (see the module docstring) out of place."""
    if name is None:
        return x
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} or None")


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
    """Gather word (+ position) (+ token type) rows, sum them and apply LayerNorm (unless ``weight`` is None).

    ``scale`` multiplies the word rows first, as transformers' ``Gemma3TextScaledWordEmbedding`` does it:
    the scale rounded to the table's dtype, the product rounded to it, so a decoder's embeddings
    (``weight=None``, no position or type table) equal transformers' bit for bit.
    """
    x = F.embedding(input_ids, word_emb)
    if scale is not None:  # the scale rounded to the table's dtype on the host (no device tensor)
        x = x * torch.tensor(scale, dtype=word_emb.dtype).item()
    if pos_emb is not None:
        x = x + F.embedding(position_ids, pos_emb)
    if type_emb is not None:
        x = x + F.embedding(token_type_ids, type_emb)
    return x if weight is None else F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def linear(
    x: torch.Tensor,  # (tokens, in)
    weight: torch.Tensor,  # (out, in)
    bias: torch.Tensor | None,  # (out,)
    activation: str | None = None,
    residual: torch.Tensor | None = None,  # (tokens, out)
) -> torch.Tensor:  # (tokens, out)
    """``act(x @ weight.T + bias) + residual``: a GEMM with the bias, activation and residual in its epilogue.

    The residual is the pre-LayerNorm blocks' skip connection (``x + Wo(attention)``).
    """
    out = apply_activation(_matmul(x, weight, bias), activation)
    return out if residual is None else out + residual


def gated_linear(
    x: torch.Tensor,  # (tokens, in)
    weight: torch.Tensor,  # (2 * out, in): rows 2j (activated) and 2j + 1 (linear) interleaved
    bias: torch.Tensor | None,  # (2 * out,), interleaved the same way
    activation: str,
) -> torch.Tensor:  # (tokens, out)
    """The gated feed-forward input (GLU family): ``act(h[:, 0::2]) * h[:, 1::2]`` with ``h = x @ W.T + b``.

    SwiGLU (NomicBERT; the decoders' ``silu``), GeGLU (ModernBERT, GTE; Gemma's ``gelu_tanh``):
    ``fastenc.family.interleave_gate`` puts the two halves of a checkpoint's weight row by row, so that
    one GEMM tile holds both halves of its output columns. For the decoders' separate ``gate_proj`` and
    ``up_proj`` (transformers computes ``act(gate_proj(x)) * up_proj(x)``) the activated half is
    ``gate_proj``: ``interleave_gate(torch.cat([gate_proj.weight, up_proj.weight]))``.
    """
    # Two GEMMs over the even and the odd rows (strided views, no copy): each half comes out contiguous
    # for the activation and the product, and CPU BLAS runs two half-width GEMMs faster than one
    # double-width one at small token counts (measured: 8.4 against 12.2 ms at 128 x 768 x 6144, 2 threads).
    activated = _matmul(x, weight[0::2], None if bias is None else bias[0::2])
    linear = _matmul(x, weight[1::2], None if bias is None else bias[1::2])
    return apply_activation(activated, activation).mul_(linear)


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
    """One GEMM for Q, K and V, returned with the heads split, Q pre-scaled for the softmax.

    Returns ``(3, heads, tokens, head_dim)`` when every query head has its own K/V head, else the tuple
    ``q (heads, tokens, head_dim), k (kv_heads, ...), v (kv_heads, ...)``; ``q, k, v = fused_qkv(...)``
    reads both. The weight stacks ``heads`` Q heads, then ``kv_heads`` K heads, then ``kv_heads`` V heads
    of ``head_dim`` rows each (transformers' ``q_proj``, ``k_proj``, ``v_proj`` concatenated); a bias on
    these alone (Qwen2) is ``bias`` here, the output projection's is ``None``.

    In order, on the projection: with ``q_norm`` and ``k_norm`` (Qwen3, Gemma3's QK-norm) each head of Q
    and of K is RMS-normalised over its ``head_dim`` values (``rms_norm`` with ``norm_offset``);
    with ``rope``, Q and K are rotated: the pair of columns ``(2i, 2i + 1)`` of each head turns by the
    angle whose cosine and sine are ``rope[position, i]`` and ``rope[position, head_dim // 2 + i]`` (the
    interleaved layout; ``fastenc.family.rotary_pair_order`` brings rotate-half checkpoints to it at
    load, and the QK-norm weights must be permuted within the head the same way); then Q is multiplied
    by ``scale`` (Gemma3: ``query_pre_attn_scalar ** -0.5``; DeBERTa:
    ``1 / sqrt(head_dim * scale_factor)``). V is neither normalised nor rotated.
    """
    tokens, hidden = x.shape
    head_dim = hidden // num_heads if head_dim is None else head_dim
    return _qkv_heads(_matmul(x, weight, bias), num_heads, num_kv_heads, head_dim, positions, rope, q_norm, k_norm,
                      norm_eps, norm_offset, scale)


def _qkv_heads(proj, num_heads, num_kv_heads, head_dim, positions, rope, q_norm, k_norm, norm_eps, norm_offset,
               scale):
    """``fused_qkv``'s epilogue on the ``(tokens, (heads + 2 * kv_heads) * head_dim)`` projection, in its dtype."""
    tokens = proj.shape[0]
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    proj = proj.view(tokens, num_heads + 2 * kv_heads, head_dim)
    qk = proj[:, : num_heads + kv_heads]  # (tokens, heads + kv_heads, head_dim)
    if q_norm is not None:
        proj[:, :num_heads] = _rms_norm(proj[:, :num_heads], q_norm, norm_eps, norm_offset)
        proj[:, num_heads: num_heads + kv_heads] = _rms_norm(proj[:, num_heads: num_heads + kv_heads], k_norm,
                                                             norm_eps, norm_offset)
    if rope is not None:
        half = head_dim // 2
        table = rope[positions.long()]  # (tokens, head_dim)
        cos, sin = (t[:, None, :].to(proj.dtype) for t in (table[:, :half], table[:, half:]))
        pairs = qk.unflatten(-1, (half, 2))  # (tokens, heads + kv_heads, half, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        qk.copy_(torch.stack((first * cos - second * sin, second * cos + first * sin), -1).flatten(-2))
    proj[:, :num_heads].mul_(1.0 / math.sqrt(head_dim) if scale is None else scale)
    slabs = proj.transpose(0, 1)  # (heads + 2 * kv_heads, tokens, head_dim)
    if kv_heads == num_heads:
        return slabs.unflatten(0, (3, num_heads))
    return slabs[:num_heads], slabs[num_heads: num_heads + kv_heads], slabs[num_heads + kv_heads:]


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
    """Attention within each packed sequence: bidirectional, or causal.

    Every token of a sequence is a key, or with ``window`` the keys within ``window`` positions of the
    query (ModernBERT's local layers: ``window = local_attention // 2``). ``causal`` keeps the keys at or
    before the query (by index in the sequence); with ``window`` too, the keys with
    ``query position - window <= key position <= query position``. In transformers' terms
    (``masking_utils``, Gemma3's local layers) ``window = config.sliding_window - 1``, causal or not:
    a causal ``sliding_window`` of ``S`` keeps ``q - S < k <= q``, and a bidirectional Gemma3
    (``use_bidirectional_attention``, whose config turns ``S`` into ``S // 2 + 1``) keeps
    ``|q - k| < config.sliding_window``. ``bias`` adds ``bias[head, key position - query position + P - 1]``
    to each score (MPNet's relative position bias). With fewer K/V heads than query heads
    (grouped-query attention), query head ``h`` reads K/V head ``h // (heads // kv_heads)``.

    DeBERTa's disentangled attention: with ``r = rel_index[key position - query position + P - 1]``, the
    score of query ``i`` and key ``j`` gets ``q_i · rel_keys[r, head]`` (content-to-position, c2p) and
    ``k_j · rel_queries[r, head]`` (position-to-content, p2c), either table ``None`` for a model without
    that term. Q comes scaled (``fused_qkv``'s ``scale``) and so do ``rel_queries``
    (``fastenc.family.disentangled_tables``), so the three terms are added unscaled.

    Runs torch's ``scaled_dot_product_attention`` on a padded copy with a key-padding mask (padding
    is added and removed here, and only here, so the rest of the encoder stays packed); a window, a
    bias or the relative terms become a ``(batch, heads, seq, seq)`` float mask here, which only this
    twin builds (the c2p and p2c scores as transformers computes them: each query or key against the
    relative rows its sequences can reach, then gathered). K and V are expanded to every query head here,
    which only this twin does.
    """
    heads, tokens, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    if tokens == 0:
        return q.new_zeros(0, heads * head_dim)
    if k.shape[0] != heads:  # grouped-query attention: transformers' repeat_kv
        k, v = (t.repeat_interleave(heads // t.shape[0], dim=0) for t in (k, v))
    relative = (rel_keys, rel_queries, rel_index) if rel_keys is not None or rel_queries is not None else None
    if window is not None or bias is not None or relative is not None:
        return _attention_with_positions(q, k, v, cu_seqlens, max_seqlen, positions, window, bias, causal, relative)
    if tokens == batch * max_seqlen:  # every sequence is full: no padding to add
        def pad(t):  # (heads, tokens, D) -> (batch, heads, seq, D)
            return t.reshape(heads, batch, max_seqlen, head_dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), scale=1.0, is_causal=causal)
        return out.permute(0, 2, 1, 3).reshape(tokens, heads * head_dim)

    cu = cu_seqlens.to(torch.long)
    token = torch.arange(tokens, device=q.device)
    seq = torch.searchsorted(cu[1:], token, right=True)  # (tokens,) which sequence
    slot = seq * max_seqlen + (token - cu[seq])  # (tokens,) place in the padded layout

    def pad(t):  # (heads, tokens, D) -> (batch, heads, seq, D)
        padded = t.new_zeros(heads, batch * max_seqlen, head_dim)
        padded[:, slot] = t
        return padded.view(heads, batch, max_seqlen, head_dim).transpose(0, 1)

    if causal:  # a real query sees only earlier keys, all real: right padding needs no key mask
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), scale=1.0, is_causal=True)
    else:
        lengths = cu[1:] - cu[:-1]
        keep = torch.arange(max_seqlen, device=q.device) < lengths[:, None]  # (batch, seq)
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], scale=1.0)
    out = out.permute(0, 2, 1, 3).reshape(batch * max_seqlen, heads * head_dim)  # (B*S, hidden)
    return out[slot]


def _attention_with_positions(q, k, v, cu_seqlens, max_seqlen, positions, window, bias, causal, relative=None):
    """``attention`` with a window, a position bias or DeBERTa's relative terms: an explicit mask over the
    padded layout."""
    heads, tokens, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.long)
    full = tokens == batch * max_seqlen  # every sequence is full: no padding to add
    token = torch.arange(tokens, device=q.device)
    seq = token // max_seqlen if full else torch.searchsorted(cu[1:], token, right=True)  # (tokens,) which sequence
    slot = seq * max_seqlen + (token - cu[seq])  # (tokens,) place in the padded layout
    position = (token - cu[seq]) if positions is None else positions.to(torch.long)

    def pad(t):  # (..., tokens, rest) -> (..., batch * seq, rest)
        if full:
            return t
        padded = t.new_zeros((*t.shape[:-2], batch * max_seqlen, t.shape[-1]))
        padded[..., slot, :] = t
        return padded

    q, k, v = (pad(t).reshape(heads, batch, max_seqlen, head_dim).transpose(0, 1) for t in (q, k, v))
    pos = pad(position[:, None]).view(batch, max_seqlen)
    distance = pos[:, None, :] - pos[:, :, None]  # (batch, query, key): key position - query position
    keep = None  # (batch, query, key) bool, None: every key
    if causal:
        order = torch.arange(max_seqlen, device=q.device)
        keep = (order[None, :] <= order[:, None])[None].expand(batch, -1, -1)  # key index <= query index
    if window is not None:
        near = distance.abs() <= window
        keep = near if keep is None else keep & near
    if not full:
        real = torch.arange(max_seqlen, device=q.device) < (cu[1:] - cu[:-1])[:, None]  # (batch, seq)
        real_keys = real[:, None, :] if keep is None else real[:, None, :] & keep
        keep = real_keys | ~real[:, :, None]  # padding rows attend to everything: finite, dropped below
    mask = None if keep is None else keep[:, None]  # (batch, 1, query, key)
    if bias is not None:
        span = (bias.shape[1] - 1) // 2
        index = (distance + span).clamp(0, bias.shape[1] - 1)  # padding's distances are never read
        scores = bias.to(q.dtype)[:, index].permute(1, 0, 2, 3)  # (batch, heads, query, key)
        mask = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    if relative is not None:
        scores = _disentangled_scores(q, k, distance, *relative)  # (batch, heads, query, key)
        if mask is None or mask.dtype != torch.bool:  # a bias's scores (-inf where masked) add up
            mask = scores if mask is None else mask + scores
        else:
            mask = scores.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    out = out.permute(0, 2, 1, 3).reshape(batch * max_seqlen, heads * head_dim)  # (B*S, hidden)
    return out if full else out[slot]


def _disentangled_scores(q, k, distance, rel_keys, rel_queries, rel_index):
    """DeBERTa's c2p + p2c scores ``(batch, heads, query, key)`` over the padded layout. ``q``, ``k``:
    ``(batch, heads, seq, head_dim)``; ``distance``: ``(batch, query, key)``, key position - query position.

    As transformers does, every query (c2p) and key (p2c) is scored against the relative rows and the
    scores are gathered by each pair's row; only the rows the sequences' distances can reach are scored
    (a contiguous range: the row is monotone in the distance), not all ``2 * span``.
    """
    center = (rel_index.shape[0] - 1) // 2  # the column of distance 0
    index = rel_index.long()[(distance + center).clamp(0, 2 * center)]  # (batch, query, key)
    reach = min(center, int(distance.abs().max()))  # padding's distances too: a superset of the real ones
    lo = int(rel_index[center - reach:center + reach + 1].min())
    hi = int(rel_index[center - reach:center + reach + 1].max()) + 1
    index = (index - lo).clamp(0, hi - lo - 1)[:, None]  # (batch, 1, query, key)
    batch, heads, seq, head_dim = q.shape

    def against_rows(x, table):  # (batch, heads, seq, D) x (rows, heads, D) -> (batch, heads, seq, rows)
        per_head = x.transpose(0, 1).reshape(heads, batch * seq, head_dim)  # one (B*S, D) GEMM per head
        out = torch.bmm(per_head, table[lo:hi].to(x.dtype).permute(1, 2, 0))  # (heads, B*S, rows)
        return out.view(heads, batch, seq, hi - lo).transpose(0, 1)

    scores = None
    if rel_keys is not None:
        scores = against_rows(q, rel_keys).gather(-1, index.expand(batch, heads, seq, seq))
    if rel_queries is not None:
        p2c = against_rows(k, rel_queries).gather(-1, index.transpose(-1, -2).expand(batch, heads, seq, seq))
        scores = p2c.transpose(-1, -2) if scores is None else scores.add_(p2c.transpose(-1, -2))
    return scores


def add_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    residual: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(x + residual)``: the post-LN residual of every BERT-family block."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(x)``: the pre-LN blocks' norms and ModernBERT's final norm."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
    activation: str = "gelu",
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(act(x))``: the transform of the masked-LM head."""
    return F.layer_norm(apply_activation(x, activation), (x.shape[-1],), weight, bias, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm over the last dimension with transformers' operations and roundings (the module docstring)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0:  # LlamaRMSNorm: the normalised row is rounded to x's dtype, then weighted
        return weight * h.to(x.dtype)
    return (h * (offset + weight.to(h.dtype))).to(x.dtype)  # Gemma3RMSNorm: weighted in fp32, rounded once


def rms_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    eps: float,
    offset: float = 0.0,  # the weight is offset + weight: Gemma's 1
) -> torch.Tensor:  # (tokens, hidden)
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)``: the decoder families' norm.

    ``offset=0`` is Llama's, Mistral's, Qwen2's and Qwen3's RMSNorm, ``offset=1`` Gemma3's; the
    roundings of each are transformers' (see the module docstring), so that this twin gives transformers'
    bits in every dtype.
    """
    return _rms_norm(x, weight, eps, offset)


def sandwich_rms_norm(
    x: torch.Tensor,  # (tokens, hidden): a sub-block's output
    residual: torch.Tensor,  # (tokens, hidden): the residual stream
    weight: torch.Tensor,  # (hidden,): the sub-block's post-norm
    next_weight: torch.Tensor,  # (hidden,): the next sub-block's pre-norm
    eps: float,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (tokens, hidden) each
    """The "sandwich" norm's residual step (Gemma2/3): ``r = residual + rms_norm(x, weight)``, then
    ``h = rms_norm(r, next_weight)``; returns ``(r, h)``, the new residual stream and the next input.

    In a Gemma3 block it runs twice: after attention (``x = o_proj(a)``, ``weight`` the
    ``post_attention_layernorm``, ``next_weight`` the ``pre_feedforward_layernorm``) and after the
    feed-forward (``x = down_proj(f)``, ``post_feedforward_layernorm``, then the next layer's
    ``input_layernorm`` or, after the last layer, the final norm). Each step is transformers' own, with
    its roundings: the post-norm's output and the sum are in x's dtype, and ``h`` normalises the ``r``
    that is returned.
    """
    residual = residual + _rms_norm(x, weight, eps, offset)
    return residual, _rms_norm(residual, next_weight, eps, offset)


# ------------------------------------------------------------------------------------------------- FP8
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-12  # a row's absolute maximum is taken at least this: an all-zero row quantizes to zeros


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization: ``(rows, cols)`` -> ``(q, scale)``, ``q`` float8_e4m3fn ``(rows, cols)`` and
    ``scale`` float32 ``(rows,)`` with ``x ≈ q * scale[:, None]``.

    A row's largest magnitude maps to 448, e4m3's largest finite value: in float32,
    ``amax = max(max|x|, FP8_MIN_AMAX)``, ``q = clamp(x * (448 / amax), -448, 448)`` rounded to nearest even
    into e4m3, ``scale = amax / 448``; every operation is one correctly rounded float32 operation, so the
    Triton kernels, which quantize the same way, give the same codes for the same input row. A row's codes
    and scale depend on that row only (batch invariance). Used for activations (one scale per token) and,
    at load, for weights (one scale per output channel: a weight's rows).
    """
    x = x.float()
    amax = x.abs().amax(dim=1).clamp_min(FP8_MIN_AMAX) if x.shape[1] else x.new_full((x.shape[0],), FP8_MIN_AMAX)
    q = (x * (FP8_MAX / amax)[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, amax / FP8_MAX


def _fp8_matmul(x, x_scale, weight, weight_scale) -> torch.Tensor:
    """``(x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :]`` in float32 ``(tokens, out)``; a 16/32-bit ``x``
    (``x_scale`` None) is quantized per row first. The products of e4m3 values are exact in float32."""
    if x.dtype != FP8_DTYPE:
        if x_scale is not None:
            raise ValueError("x_scale goes with a float8_e4m3fn x; a 16/32-bit x is quantized here (x_scale=None)")
        x, x_scale = quantize_rows(x)
    elif x_scale is None:
        raise ValueError("a float8_e4m3fn x needs its (tokens,) float32 x_scale")
    return (x.float() @ weight.float().t()) * x_scale.float()[:, None] * weight_scale.float()[None, :]


def linear_fp8(
    x: torch.Tensor,  # (tokens, in): float8_e4m3fn with x_scale, or 16/32-bit (quantized per row here)
    x_scale: torch.Tensor | None,  # (tokens,) float32, None for a 16/32-bit x
    weight: torch.Tensor,  # (out, in) float8_e4m3fn
    weight_scale: torch.Tensor,  # (out,) float32: one scale per output channel
    bias: torch.Tensor | None,  # (out,)
    activation: str | None = None,
    residual: torch.Tensor | None = None,  # (tokens, out)
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # (tokens, out) out_dtype
    """``linear`` with e4m3 operands: ``act(x_q @ w_q.T * x_scale * w_scale + bias) + residual``, float32
    throughout, rounded once to ``out_dtype``.

    ``x`` comes quantized (a LayerNorm's ``*_fp8`` output) or in 16/32 bits, which are quantized per row
    with ``quantize_rows`` (as the kernel does in its prologue): either way the operand is the same
    function of the row's value.
    """
    out = _fp8_matmul(x, x_scale, weight, weight_scale)
    if bias is not None:
        out = out + bias.float()
    out = apply_activation(out, activation)
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype)


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
    h = _fp8_matmul(x, x_scale, weight, weight_scale)
    if bias is not None:
        h = h + bias.float()
    return (apply_activation(h[:, 0::2], activation) * h[:, 1::2]).to(out_dtype)


def fused_qkv_fp8(
    x: torch.Tensor,  # (tokens, hidden): float8_e4m3fn with x_scale, or 16/32-bit
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
    """``fused_qkv`` with e4m3 operands: the projection as in ``linear_fp8``, then QK-norm, RoPE and Q's
    scale in float32, the heads rounded once to ``out_dtype``. Returns what ``fused_qkv`` returns."""
    head_dim = x.shape[1] // num_heads if head_dim is None else head_dim
    proj = _fp8_matmul(x, x_scale, weight, weight_scale)
    if bias is not None:
        proj = proj + bias.float()
    heads = _qkv_heads(proj, num_heads, num_kv_heads, head_dim, positions, rope, q_norm, k_norm, norm_eps,
                       norm_offset, scale)
    if isinstance(heads, tuple):
        return tuple(h.to(out_dtype) for h in heads)
    return heads.to(out_dtype)


def add_layer_norm_fp8(
    x: torch.Tensor,  # (tokens, hidden)
    residual: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (tokens, hidden), (tokens, hidden) fp8, (tokens,) fp32
    """``add_layer_norm`` that also returns its output quantized per row (``quantize_rows`` of the output in
    x's dtype): the residual stream for the next block and the FP8 operand of the next GEMM, from one pass."""
    out = add_layer_norm(x, residual, weight, bias, eps)
    return (out, *quantize_rows(out))


def layer_norm_fp8(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor | None,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (tokens, hidden), (tokens, hidden) fp8, (tokens,) fp32
    """``layer_norm`` that also returns its output quantized per row, as ``add_layer_norm_fp8``."""
    out = layer_norm(x, weight, bias, eps)
    return (out, *quantize_rows(out))


SPLADE_VOCAB_CHUNK = 4096  # words per chunk of splade_pool's twin: its scratch is (tokens, 4096), not (tokens, vocab)


def splade_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """SpladePooling's activation: ``log1p(relu(x))`` (``"relu"``) or ``log1p(log1p(relu(x)))`` (``"log1p_relu"``)."""
    x = torch.log1p(torch.relu(x))
    if activation == "log1p_relu":
        return torch.log1p(x)
    if activation != "relu":
        raise ValueError(f"unknown SPLADE activation {activation!r}; expected 'relu' or 'log1p_relu'")
    return x


def splade_pool(
    x: torch.Tensor,  # (tokens, hidden): the MLM transform's output
    weight: torch.Tensor,  # (vocab, hidden): the MLM decoder (the word embeddings when tied)
    bias: torch.Tensor | None,  # (vocab,), None for a decoder without a bias
    cu_seqlens: torch.Tensor,  # (batch + 1,) int32
    pooling: str = "max",
    activation: str = "relu",
) -> torch.Tensor:  # (batch, vocab) float32 (float64 for float64 inputs)
    """SPLADE vectors: ``pool_over_tokens(act(x @ weight.T + bias))`` per packed sequence, ``pool`` max or sum.

    The vocabulary is processed in chunks of ``SPLADE_VOCAB_CHUNK`` words, as the Triton kernel walks it
    in tiles, so the ``(tokens, vocab)`` logits are never held whole. The activation is monotone, so max
    pooling pools the logits first and activates the pooled row (an empty sequence pools to 0).
    """
    if pooling not in ("max", "sum"):
        raise ValueError(f"unknown SPLADE pooling {pooling!r}; expected 'max' or 'sum'")
    batch, vocab = cu_seqlens.numel() - 1, weight.shape[0]
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    text = torch.repeat_interleave(torch.arange(batch, device=x.device), lengths)  # (tokens,) which text
    out = torch.empty(batch, vocab, dtype=out_dtype, device=x.device)
    for start in range(0, vocab, SPLADE_VOCAB_CHUNK):
        end = min(start + SPLADE_VOCAB_CHUNK, vocab)
        logits = (x @ weight[start:end].t() if bias is None
                  else torch.addmm(bias[start:end], x, weight[start:end].t())).to(out_dtype)  # (tokens, chunk)
        if pooling == "max":
            pooled = logits.new_full((batch, end - start), float("-inf"))
            pooled.scatter_reduce_(0, text[:, None].expand_as(logits), logits, "amax")
            out[:, start:end] = splade_activation(pooled, activation)
        else:
            pooled = logits.new_zeros(batch, end - start)
            out[:, start:end] = pooled.index_add_(0, text, splade_activation(logits, activation))
    return out


MAXSIM_CHUNK = 1 << 19  # elements of maxsim's twin's (document tokens, query tokens) products held at once


def maxsim(
    query: torch.Tensor,  # (query_tokens, dim)
    documents: torch.Tensor,  # (doc_tokens, dim): every document's token vectors, packed
    cu_seqlens: torch.Tensor,  # (docs + 1,) int32
) -> torch.Tensor:  # (docs,) float32 (float64 for float64 inputs)
    """Late-interaction (ColBERT MaxSim) scores: for each packed document, the sum over the query's tokens
    of their largest dot product with the document's tokens; an empty document scores 0.

    The products are torch's matmul in the inputs' dtype; the maxima and the sum are float32. The documents'
    tokens go through in chunks of ``MAXSIM_CHUNK // query_tokens`` rows, each chunk's products max-scattered
    into a ``(docs, query_tokens)`` running maximum: no padded ``(docs, longest, dim)`` copy is made and the
    whole ``(doc_tokens, query_tokens)`` product is never held. A maximum is exact, so where the chunks cut
    (through a document, too) changes nothing.
    """
    docs, n_query = cu_seqlens.numel() - 1, query.shape[0]
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    owner = torch.repeat_interleave(torch.arange(docs, device=documents.device), lengths,
                                    output_size=documents.shape[0])  # (doc_tokens,) which document
    best = torch.full((docs, n_query), float("-inf"), dtype=out_dtype, device=documents.device)
    rows = max(1, MAXSIM_CHUNK // max(1, n_query))
    for start in range(0, documents.shape[0], rows):
        products = (documents[start:start + rows] @ query.t()).to(out_dtype)  # (chunk, query_tokens)
        best.scatter_reduce_(0, owner[start:start + rows, None].expand_as(products), products, "amax")
    return best.sum(1).masked_fill_(lengths == 0, 0.0)
