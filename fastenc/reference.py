"""The pure-PyTorch twin of every fastenc kernel: the ``"torch"`` backend.

This module *is* the ops interface. The encoder's forward pass (``encoder.py``) calls only the
functions below, through whichever backend was chosen at load; ``fastenc.kernels`` exports Triton
launchers with exactly these names, signatures and semantics. Tests compare every kernel with its twin
here and benchmarks time these as the baseline, so both speak of the same function.

Conventions shared by every backend:

* Activations are packed: one ``(tokens, features)`` row per real token, padding removed. Sequences
  are described by ``cu_seqlens`` (``(batch + 1,)`` int32 offsets into the token axis, on the device)
  and ``max_seqlen`` (a host ``int``), as in FlashAttention's varlen interface. A sequence may be empty.
* ``fused_qkv`` returns Q already multiplied by ``1 / sqrt(head_dim)``; ``attention`` applies no
  further scale.
* Activation names are canonical: ``"gelu"`` (exact erf), ``"gelu_tanh"`` (the tanh approximation used
  by ``gelu_new``, ``gelu_pytorch_tanh`` and ``gelu_fast``), ``"relu"``, or ``None``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


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
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} or None")


def embeddings(
    input_ids: torch.Tensor,  # (tokens,) integer
    position_ids: torch.Tensor,  # (tokens,) integer
    token_type_ids: torch.Tensor | None,  # (tokens,) integer, None when type_emb is None
    word_emb: torch.Tensor,  # (vocab, emb)
    pos_emb: torch.Tensor,  # (max_positions, emb)
    type_emb: torch.Tensor | None,  # (type_vocab, emb), None for DistilBERT
    weight: torch.Tensor,  # (emb,)
    bias: torch.Tensor,  # (emb,)
    eps: float,
) -> torch.Tensor:  # (tokens, emb)
    """Gather word + position (+ token type) rows, sum them and apply LayerNorm."""
    x = F.embedding(input_ids, word_emb) + F.embedding(position_ids, pos_emb)
    if type_emb is not None:
        x = x + F.embedding(token_type_ids, type_emb)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(
    x: torch.Tensor,  # (tokens, in)
    weight: torch.Tensor,  # (out, in)
    bias: torch.Tensor,  # (out,)
    activation: str | None = None,
) -> torch.Tensor:  # (tokens, out)
    """``act(x @ weight.T + bias)``: a GEMM with the bias (and activation) in its epilogue."""
    return apply_activation(torch.addmm(bias, x, weight.t()), activation)


def fused_qkv(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (3 * hidden, hidden): Q, K, V stacked
    bias: torch.Tensor,  # (3 * hidden,)
    num_heads: int,
) -> torch.Tensor:  # (3, heads, tokens, head_dim), Q scaled by 1/sqrt(head_dim)
    """One GEMM for Q, K and V, returned with the heads split, Q pre-scaled for the softmax."""
    tokens = x.shape[0]
    head_dim = weight.shape[0] // (3 * num_heads)
    qkv = torch.addmm(bias, x, weight.t()).view(tokens, 3, num_heads, head_dim)
    qkv[:, 0].mul_(1.0 / math.sqrt(head_dim))
    return qkv.permute(1, 2, 0, 3)


def attention(
    q: torch.Tensor,  # (heads, tokens, head_dim), pre-scaled
    k: torch.Tensor,  # (heads, tokens, head_dim)
    v: torch.Tensor,  # (heads, tokens, head_dim)
    cu_seqlens: torch.Tensor,  # (batch + 1,) int32
    max_seqlen: int,
) -> torch.Tensor:  # (tokens, heads * head_dim)
    """Bidirectional attention within each packed sequence; every token of a sequence is a key.

    Runs torch's ``scaled_dot_product_attention`` on a padded copy with a key-padding mask (padding
    is added and removed here, and only here, so the rest of the encoder stays packed).
    """
    heads, tokens, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    if tokens == 0:
        return q.new_zeros(0, heads * head_dim)
    if tokens == batch * max_seqlen:  # every sequence is full: no padding to add
        def pad(t):  # (heads, tokens, D) -> (batch, heads, seq, D)
            return t.reshape(heads, batch, max_seqlen, head_dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), scale=1.0)
        return out.permute(0, 2, 1, 3).reshape(tokens, heads * head_dim)

    cu = cu_seqlens.to(torch.long)
    token = torch.arange(tokens, device=q.device)
    seq = torch.searchsorted(cu[1:], token, right=True)  # (tokens,) which sequence
    slot = seq * max_seqlen + (token - cu[seq])  # (tokens,) place in the padded layout

    def pad(t):  # (heads, tokens, D) -> (batch, heads, seq, D)
        padded = t.new_zeros(heads, batch * max_seqlen, head_dim)
        padded[:, slot] = t
        return padded.view(heads, batch, max_seqlen, head_dim).transpose(0, 1)

    lengths = cu[1:] - cu[:-1]
    keep = torch.arange(max_seqlen, device=q.device) < lengths[:, None]  # (batch, seq)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], scale=1.0)
    out = out.permute(0, 2, 1, 3).reshape(batch * max_seqlen, heads * head_dim)  # (B*S, hidden)
    return out[slot]


def add_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    residual: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor,  # (hidden,)
    eps: float,
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(x + residual)``: the post-LN residual of every BERT-family block."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def gelu_layer_norm(
    x: torch.Tensor,  # (tokens, hidden)
    weight: torch.Tensor,  # (hidden,)
    bias: torch.Tensor,  # (hidden,)
    eps: float,
    activation: str = "gelu",
) -> torch.Tensor:  # (tokens, hidden)
    """``LayerNorm(act(x))``: the transform of the masked-LM head."""
    return F.layer_norm(apply_activation(x, activation), (x.shape[-1],), weight, bias, eps)


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
    bias: torch.Tensor,  # (vocab,)
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
        logits = torch.addmm(bias[start:end], x, weight[start:end].t()).to(out_dtype)  # (tokens, chunk)
        if pooling == "max":
            pooled = logits.new_full((batch, end - start), float("-inf"))
            pooled.scatter_reduce_(0, text[:, None].expand_as(logits), logits, "amax")
            out[:, start:end] = splade_activation(pooled, activation)
        else:
            pooled = logits.new_zeros(batch, end - start)
            out[:, start:end] = pooled.index_add_(0, text, splade_activation(logits, activation))
    return out
