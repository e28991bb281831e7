"""DeBERTa's disentangled attention: the load-time tables and the twin against transformers' own modules,
then the fused kernel against the twin (the tolerance rule of test_kernels.py) in fp32, fp16 and bf16,
with ragged tails, an odd head dim, distances far past the position buckets, c2p and p2c alone and
together, and positions with holes; bitwise batch invariance; the Q scale of ``fused_qkv``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastenc.reference as reference  # noqa: E402
from fastenc import family  # noqa: E402
from fastenc import kernels  # noqa: E402
from test_family_kernels import _positions  # noqa: E402
from test_kernels import (  # noqa: E402,F401  (the autouse fixture seeds and poisons torch.empty)
    DEVICE, DTYPES, _seed_and_poison, assert_matches, cu_seqlens_of, f64, rand,
)

LENGTHS = [1, 7, 0, 45, 70]  # tiny, empty, ragged tails past 16-, 32- and 64-row blocks; distances up to 69
BUCKETS = 8  # exact within ±4, log-bucketed beyond: nearly every pair of these sequences is past them
MAX_POSITIONS = 200  # positions with holes reach about 150


def _tables(heads: int, head_dim: int, dtype: torch.dtype, c2p: bool = True, p2c: bool = True, buckets: int = BUCKETS,
            max_distance: int = 96):
    """Random c2p / p2c tables ``(2 * span, heads, head_dim)`` and transformers' row of each distance."""
    spec = family.Disentangled(c2p=c2p, p2c=p2c, buckets=buckets, max_distance=max_distance)
    rows = 2 * spec.span
    keys = rand(rows, heads, head_dim, dtype=dtype) if c2p else None
    queries = rand(rows, heads, head_dim, dtype=dtype, scale=head_dim**-0.5) if p2c else None
    return keys, queries, family.relative_index_by_distance(spec, MAX_POSITIONS).to(DEVICE)


# --- the tables and the twin against transformers ------------------------------------------------------


@pytest.mark.parametrize("buckets, max_relative_positions", [(8, -1), (256, -1), (-1, 20)])
def test_relative_index_is_transformers_c2p_and_p2c_index(buckets, max_relative_positions):
    """transformers' c2p index ``clamp(r + span)`` and its p2c index ``clamp(-r + span)`` (transposed) for
    ``r = build_relative_position``: one table by distance gives both (the bucket is odd)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    seq, max_positions = 520, 512  # distances past max_relative_positions too
    max_distance = max_relative_positions if max_relative_positions > 0 else max_positions
    spec = family.Disentangled(c2p=True, p2c=True, buckets=max(buckets, 0), max_distance=max_distance)
    span = spec.span
    relative = build_relative_position(torch.zeros(seq, 1), torch.zeros(seq, 1), bucket_size=buckets,
                                       max_position=max_distance)[0]  # (query, key)
    c2p = torch.clamp(relative + span, 0, 2 * span - 1)
    p2c = torch.clamp(-relative + span, 0, 2 * span - 1).t()  # transformers gathers it by key, then transposes
    distance = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]  # key - query
    ours = family.relative_index_by_distance(spec, seq)[distance + seq - 1].long()
    assert torch.equal(ours, c2p) and torch.equal(ours, p2c)
    assert ours.min() >= 0 and ours.max() < 2 * span


@pytest.mark.parametrize("shared, kinds", [(True, ("c2p", "p2c")), (False, ("c2p", "p2c")), (False, ("c2p",)),
                                           (True, ("p2c",))])
def test_twin_is_transformers_disentangled_attention(shared, kinds):
    """transformers' DisentangledSelfAttention (its own weights, relative embeddings and buckets) against
    fastenc's tables (``family.disentangled_tables``), scaled ``fused_qkv`` and the twin's attention."""
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

    hidden, heads, seq = 42, 2, 70
    config = DebertaV2Config(hidden_size=hidden, num_attention_heads=heads, relative_attention=True,
                             position_buckets=BUCKETS, max_relative_positions=-1, max_position_embeddings=96,
                             pos_att_type=list(kinds), share_att_key=shared)
    module = DisentangledSelfAttention(config).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    rel = torch.randn(2 * BUCKETS, hidden)
    x = torch.randn(1, seq, hidden)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool)
    with torch.no_grad():
        relative = build_relative_position(x, x, bucket_size=BUCKETS, max_position=96)
        expected = module(x, mask, relative_pos=relative, rel_embeddings=rel)[0][0]  # (seq, hidden)

    spec = family.Disentangled(c2p="c2p" in kinds, p2c="p2c" in kinds, buckets=BUCKETS, max_distance=96,
                               shared_keys=shared)
    fam = family.Family(positions="relative", disentangled=spec, scale_factor=1 + len(kinds))
    qkv_weight = torch.cat([module.query_proj.weight, module.key_proj.weight, module.value_proj.weight]).detach()
    qkv_bias = torch.cat([module.query_proj.bias, module.key_proj.bias, module.value_proj.bias]).detach()
    tensors = {"relative.embeddings": rel, "layers.0.qkv.weight": qkv_weight, "layers.0.qkv.bias": qkv_bias}
    for name, projection in (("pos_key", "pos_key_proj"), ("pos_query", "pos_query_proj")):
        if hasattr(module, projection):
            tensors[f"layers.0.{name}.weight"] = getattr(module, projection).weight.detach()
            tensors[f"layers.0.{name}.bias"] = getattr(module, projection).bias.detach()
    tables = family.disentangled_tables(tensors, fam, heads, 1, 1e-7)
    assert not any(name.startswith(("relative.", "layers.0.pos_")) for name in tables)  # consumed
    q, k, v = reference.fused_qkv(x[0], qkv_weight, qkv_bias, heads, scale=(hidden // heads * fam.scale_factor) ** -0.5)
    out = reference.attention(q, k, v, cu_seqlens_of([seq]).cpu(), seq, rel_keys=tables.get("layers.0.rel.keys"),
                              rel_queries=tables.get("layers.0.rel.queries"),
                              rel_index=family.relative_index_by_distance(spec, 96))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-5)
    # the relative terms matter here: without them the result is far off
    plain = reference.attention(q, k, v, cu_seqlens_of([seq]).cpu(), seq)
    assert (plain - expected).abs().max() > 1e-2


# --- the kernel against the twin -------------------------------------------------------------------------


def _qkv(heads: int, tokens: int, head_dim: int, dtype: torch.dtype):
    q, k, v = rand(3, heads, tokens, head_dim, dtype=dtype).unbind(0)
    q.mul_((3 * head_dim) ** -0.5)  # DeBERTa's scale with c2p and p2c
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, c2p, p2c, gaps", [(21, True, True, False), (64, True, False, True),
                                                       (32, False, True, True)])
def test_attention_disentangled(dtype, head_dim, c2p, p2c, gaps):
    heads, tokens = 2, sum(LENGTHS)
    q, k, v = _qkv(heads, tokens, head_dim, dtype)
    keys, queries, index = _tables(heads, head_dim, dtype, c2p, p2c)
    cu_seqlens, positions = cu_seqlens_of(LENGTHS), _positions(LENGTHS, gaps=gaps)
    out = kernels.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, rel_keys=keys, rel_queries=queries,
                            rel_index=index)
    expected = reference.attention(*f64(q, k, v), cu_seqlens, max(LENGTHS), positions, rel_keys=f64(keys)[0],
                                   rel_queries=f64(queries)[0], rel_index=index)
    torch_out = reference.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, rel_keys=keys, rel_queries=queries,
                                    rel_index=index)
    assert_matches(out, expected, torch_out, f"attention c2p={c2p} p2c={p2c}")


@pytest.mark.parametrize("dtype, position", [(torch.float32, 0), (torch.bfloat16, 2), (torch.float16, 4)])
def test_disentangled_attention_is_batch_invariant(dtype, position):
    lengths = [70, 7, 1, 0]
    lengths.insert(position, 45)
    heads, head_dim = 2, 40
    q, k, v = _qkv(heads, sum(lengths), head_dim, dtype)
    keys, queries, index = _tables(heads, head_dim, dtype)
    positions = _positions(lengths, gaps=False)
    batched = kernels.attention(q, k, v, cu_seqlens_of(lengths), max(lengths), positions, rel_keys=keys,
                                rel_queries=queries, rel_index=index)
    start = sum(lengths[:position])
    rows = slice(start, start + 45)
    alone = kernels.attention(*(t[:, rows].clone() for t in (q, k, v)), cu_seqlens_of([45]), 45, None,
                              rel_keys=keys, rel_queries=queries, rel_index=index)
    assert torch.isfinite(alone).all()
    assert torch.equal(batched[rows], alone)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_qkv_scale(dtype):
    tokens, hidden, heads = 33, 42, 2  # head dim 21
    x = rand(tokens, hidden, dtype=dtype, pad=4)
    weight, bias = rand(3 * hidden, hidden, dtype=dtype, scale=hidden**-0.5), rand(3 * hidden, dtype=dtype)
    scale = (21 * 3) ** -0.5
    out = kernels.fused_qkv(x, weight, bias, heads, scale=scale)
    expected = reference.fused_qkv(*f64(x, weight, bias), heads, scale=scale)
    assert_matches(out, expected, reference.fused_qkv(x, weight, bias, heads, scale=scale), "fused_qkv scale")
    default = reference.fused_qkv(*f64(x, weight, bias), heads)
    torch.testing.assert_close(expected[0] * 63**0.5, default[0] * 21**0.5)  # only Q is scaled
    assert torch.equal(expected[1:], default[1:])


def _bad_calls() -> dict:
    f32 = torch.float32
    q, cu = rand(2, 5, 16, dtype=f32), cu_seqlens_of([5])
    keys, index = rand(16, 2, 16, dtype=f32), torch.zeros(9, dtype=torch.int32, device=DEVICE)
    x, w = rand(4, 32, dtype=f32), rand(96, 32, dtype=f32)
    return {
        "no index": (lambda: kernels.attention(q, q, q, cu, 5, rel_keys=keys), "rel_index"),
        "index without tables": (lambda: kernels.attention(q, q, q, cu, 5, rel_index=index), "rel_index"),
        "index dtype": (lambda: kernels.attention(q, q, q, cu, 5, rel_keys=keys, rel_index=index.long()), "rel_index"),
        "index length": (lambda: kernels.attention(q, q, q, cu, 5, rel_keys=keys, rel_index=index[:8]), "rel_index"),
        "keys heads": (lambda: kernels.attention(q, q, q, cu, 5, rel_keys=keys[:, :1], rel_index=index), "rel_keys"),
        "queries rows": (lambda: kernels.attention(q, q, q, cu, 5, rel_keys=keys, rel_queries=keys[:8],
                                                   rel_index=index), "rel_queries"),
        "queries dtype": (lambda: kernels.attention(q, q, q, cu, 5, rel_queries=keys.half(), rel_index=index),
                          "rel_queries"),
        "scale": (lambda: kernels.fused_qkv(x, w, None, 2, scale=float("nan")), "scale"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_launcher_names_the_bad_argument(case):
    call, argument = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()
