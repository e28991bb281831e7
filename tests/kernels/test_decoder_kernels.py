"""The kernels the decoder families need (Qwen3, Qwen2, Mistral, Llama, Gemma3), against float64 references
(the tolerance rule of test_kernels.py) and, where the twin claims it, transformers' own modules bit for bit:
causal and grouped-query attention (with Gemma3's sliding window, head dims up to 256), the fused QKV with
grouped-query heads, QK-norm and a Q scale, RMSNorm in both of transformers' forms and Gemma's sandwich step,
the scaled embeddings, the gated feed-forwards against transformers' MLPs, and last-token pooling.
Shapes stay tiny: this runs under the interpreter on the CPU.
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
from fastenc.kernels.attention import positional_config  # noqa: E402
from fastenc.pooling import pool  # noqa: E402
from test_kernels import (  # noqa: E402,F401  (the autouse fixture seeds and poisons torch.empty)
    DEVICE, DTYPES, _seed_and_poison, assert_matches, cu_seqlens_of, f64, rand,
)

LENGTHS = [1, 7, 0, 97, 129]  # tiny, empty, and lengths across the query and key blocks' edges


def lengths_for(dtype: torch.dtype) -> list[int]:
    """fp32 attention runs blocks of 16 or 32 queries and 16 keys (CUDA-core tiles), which the interpreter
    walks slowly: shorter texts cross its edges as well."""
    return [1, 7, 0, 37, 70] if dtype == torch.float32 else LENGTHS


def _qkv(heads: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype):
    q = rand(heads, tokens, head_dim, dtype=dtype, scale=head_dim**-0.5)  # as fused_qkv pre-scales it
    k, v = rand(2, kv_heads, tokens, head_dim, dtype=dtype).unbind(0)
    return q, k, v


def naive_attention(q, k, v, lengths, causal, window=None, positions=None):
    """Float64 attention one (sequence, head) at a time, with the masks written out: the reference that
    does not share the twin's padding and SDPA."""
    q, k, v = (t.double() for t in (q, k, v))
    heads, tokens, head_dim = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(tokens, heads * head_dim, dtype=torch.float64, device=q.device)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        index = torch.arange(n, device=q.device)
        pos = index if positions is None else positions[rows].long()
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            keep &= index[None, :] <= index[:, None]
        if window is not None:
            keep &= (pos[None, :] - pos[:, None]).abs() <= window
        for h in range(heads):
            scores = (q[h, rows] @ k[h // group, rows].t()).masked_fill(~keep, float("-inf"))
            out[rows, h * head_dim:(h + 1) * head_dim] = scores.softmax(-1) @ v[h // group, rows]
        start += n
    return out


def _positions(lengths: list[int], gaps: bool) -> torch.Tensor:
    """Each sequence's positions: 0, 1, 2, … or, with gaps, a start offset and holes, always increasing."""
    generator = torch.Generator().manual_seed(len(lengths))
    out = []
    for n in lengths:
        steps = torch.ones(n, dtype=torch.long)
        if gaps and n:
            steps = 1 + (torch.rand(n, generator=generator) < 0.2).long() * torch.randint(1, 4, (n,), generator=generator)
            steps[0] = 3
        out.append(torch.cumsum(steps, 0) - 1)
    return torch.cat(out).to(DEVICE)


# --- attention: causal, grouped-query, head dims to 256 -------------------------------------------------

# (head_dim, heads, kv_heads, causal): query heads per K/V head 1, 2 and 4; Qwen3's 128, Gemma3's 256;
# bidirectional grouped-query attention (EmbeddingGemma's global layers). A masked head dim: the batch test.
ATTENTION_CASES = [(64, 2, 2, True), (64, 2, 1, True), (128, 4, 1, True), (256, 2, 1, True), (64, 2, 1, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, heads, kv_heads, causal", ATTENTION_CASES)
def test_decoder_attention(dtype, head_dim, heads, kv_heads, causal):
    lengths = lengths_for(dtype)
    q, k, v = _qkv(heads, kv_heads, sum(lengths), head_dim, dtype)
    cu_seqlens = cu_seqlens_of(lengths)
    out = kernels.attention(q, k, v, cu_seqlens, max(lengths), causal=causal)
    expected = naive_attention(q, k, v, lengths, causal)
    assert_matches(out, expected, reference.attention(q, k, v, cu_seqlens, max(lengths), causal=causal),
                   f"attention causal={causal} {heads}/{kv_heads} heads")


# (head_dim, heads, kv_heads, window, causal, gaps): Gemma3's causal local layers (window = sliding_window - 1),
# a window of the query alone, EmbeddingGemma's bidirectional local layers, positions with holes.
WINDOW_CASES = [(64, 2, 1, 5, True, False), (32, 2, 2, 0, True, True), (256, 2, 1, 40, True, False),
                (64, 2, 1, 9, False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, heads, kv_heads, window, causal, gaps", WINDOW_CASES)
def test_decoder_attention_sliding_window(dtype, head_dim, heads, kv_heads, window, causal, gaps):
    lengths = lengths_for(dtype)
    q, k, v = _qkv(heads, kv_heads, sum(lengths), head_dim, dtype)
    cu_seqlens, positions = cu_seqlens_of(lengths), _positions(lengths, gaps)
    out = kernels.attention(q, k, v, cu_seqlens, max(lengths), positions, window, causal=causal)
    expected = naive_attention(q, k, v, lengths, causal, window, positions)
    torch_out = reference.attention(q, k, v, cu_seqlens, max(lengths), positions, window, causal=causal)
    assert_matches(out, expected, torch_out, f"attention window={window} causal={causal}")


def test_window_is_transformers_sliding_window():
    """``window = config.sliding_window - 1`` keeps transformers' Gemma3 local keys, causal and bidirectional."""
    from transformers import Gemma3TextConfig
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    n, q, k, v = 40, *_qkv(1, 1, 40, 16, torch.float64)
    index = torch.arange(n)
    for bidirectional in (False, True):
        config = Gemma3TextConfig(sliding_window=12, use_bidirectional_attention=bidirectional)
        if bidirectional:  # Gemma3TextModel's or_mask over the causal sliding mask
            keep = _bidirectional_window_overlay(config.sliding_window)(0, 0, index[:, None], index[None, :])
        else:
            keep = sliding_window_causal_mask_function(config.sliding_window)(0, 0, index[:, None], index[None, :])
        scores = (q[0] @ k[0].t()).masked_fill(~keep, float("-inf"))
        theirs = scores.softmax(-1) @ v[0]
        ours = reference.attention(q, k, v, cu_seqlens_of([n]), n, None, config.sliding_window - 1,
                                   causal=not bidirectional)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        assert kernels.attention(q.float(), k.float(), v.float(), cu_seqlens_of([n]), n, None,
                                 config.sliding_window - 1, causal=not bidirectional).allclose(ours.float(), atol=1e-6)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_attention_never_reads_the_key_blocks_after_a_query_block(dtype):
    """Keys and values from token 200 on are NaN: had a program read a block of them (and masked it after
    computing), 0 * NaN would reach its queries. The queries of a block that ends before token 200 see
    none of them; the queries after it do. Their outputs equal the clean run's, bit for bit."""
    n, head_dim = 260, 32
    q, k, v = _qkv(1, 1, n, head_dim, dtype)
    cu_seqlens = cu_seqlens_of([n])
    clean = kernels.attention(q, k, v, cu_seqlens, n, causal=True)
    k[:, 200:], v[:, 200:] = float("nan"), float("nan")
    out = kernels.attention(q, k, v, cu_seqlens, n, causal=True)
    block_m = positional_config(head_dim, dtype, causal=True)["BLOCK_M"]  # the interpreter runs sm_90's configs
    before = 200 // block_m * block_m
    assert before >= 128
    assert torch.isfinite(out[:before]).all() and torch.equal(out[:before], clean[:before])
    assert not torch.isfinite(out[200:]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_prefix_states_equal_the_full_texts_first_states(dtype):
    """A text's first p states do not depend on what follows them: bitwise, at prefix lengths on and off
    the block edges, grouped-query."""
    n, prefixes = (75, (1, 32, 37, 74)) if dtype == torch.float32 else (150, (1, 97, 128, 149))  # on and off blocks
    q, k, v = _qkv(2, 1, n, 64, dtype)
    full = kernels.attention(q, k, v, cu_seqlens_of([n]), n, causal=True)
    for p in prefixes:
        prefix = kernels.attention(*(t[:, :p].clone() for t in (q, k, v)), cu_seqlens_of([p]), p, causal=True)
        assert torch.equal(prefix, full[:p]), p


@pytest.mark.parametrize("dtype, window, position", [(torch.float32, None, 4), (torch.float16, None, 0),
                                                     (torch.float16, None, 2), (torch.bfloat16, 6, 0),
                                                     (torch.bfloat16, 6, 4)], ids=str)  # first, middle, last
def test_causal_gqa_attention_is_batch_invariant(dtype, window, position):
    lengths = [129, 7, 1, 0]
    lengths.insert(position, 97)
    heads, kv_heads, head_dim = 2, 1, 40
    q, k, v = _qkv(heads, kv_heads, sum(lengths), head_dim, dtype)
    positions = _positions(lengths, gaps=False) if window is not None else None
    batched = kernels.attention(q, k, v, cu_seqlens_of(lengths), max(lengths), positions, window, causal=True)
    start = sum(lengths[:position])
    rows = slice(start, start + 97)
    alone = kernels.attention(*(t[:, rows].clone() for t in (q, k, v)), cu_seqlens_of([97]), 97,
                              None if positions is None else positions[rows].clone(), window, causal=True)
    assert torch.isfinite(alone).all()
    assert torch.equal(batched[rows], alone)


# --- fused_qkv: grouped-query heads, QK-norm, Q scale -------------------------------------------------

# (tokens, hidden, heads, kv_heads, head_dim, qk_norm offset or None, scale, bias):
# Qwen3 (QK-norm, 2 to 4 heads a tile), Gemma3 (1 + weight, query_pre_attn_scalar, head dim 128 != hidden /
# heads), Qwen2 (a bias on Q, K and V, no QK-norm), Gemma3's head dim 256, a plain MHA projection with QK-norm.
QKV_CASES = [(70, 64, 4, 2, 32, 0.0, None, False), (33, 48, 2, 1, 128, 1.0, 0.3, False),
             (7, 96, 6, 2, 16, None, None, True), (9, 40, 2, 1, 256, 1.0, None, False),
             (20, 64, 2, 2, 32, 0.0, None, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, hidden, heads, kv_heads, head_dim, offset, scale, with_bias", QKV_CASES)
def test_fused_qkv_decoder(dtype, tokens, hidden, heads, kv_heads, head_dim, offset, scale, with_bias):
    slabs = heads + 2 * kv_heads
    x = rand(tokens, hidden, dtype=dtype, pad=4)
    weight = rand(slabs * head_dim, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = rand(slabs * head_dim, dtype=dtype) if with_bias else None
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)
    rope = family.rope_table(1_000_000.0, head_dim, 100, DEVICE)
    norms = {}
    if offset is not None:
        centre = 1.0 - offset  # Gemma's weights sit around 0, Qwen's around 1
        norms = dict(q_norm=centre + 0.3 * rand(head_dim, dtype=dtype), k_norm=centre + 0.3 * rand(head_dim, dtype=dtype),
                     norm_offset=offset)
    kwargs = dict(num_kv_heads=kv_heads, head_dim=head_dim, scale=scale, **norms)
    out = kernels.fused_qkv(x, weight, bias, heads, positions, rope, **kwargs)
    if kv_heads == heads:
        assert out.shape == (3, heads, tokens, head_dim) and out.is_contiguous()
    else:
        assert [t.shape for t in out] == [(heads, tokens, head_dim)] + [(kv_heads, tokens, head_dim)] * 2
        assert out[0].data_ptr() + heads * tokens * head_dim * x.element_size() == out[1].data_ptr()  # one buffer
    f64_norms = {key: value.double() if isinstance(value, torch.Tensor) else value for key, value in norms.items()}
    expected = reference.fused_qkv(*f64(x, weight, bias), heads, positions, rope, num_kv_heads=kv_heads,
                                   head_dim=head_dim, scale=scale, **f64_norms)
    torch_out = reference.fused_qkv(x, weight, bias, heads, positions, rope, **kwargs)

    def flat(qkv):
        return torch.cat([t.reshape(-1) for t in qkv])

    assert_matches(flat(out), flat(expected), flat(torch_out), "fused_qkv decoder")


def _pair_order(head_dim: int) -> torch.Tensor:
    """Within a head, rotate-half order -> rotary-pair order: new row 2i is row i, 2i + 1 is row i + D/2."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], -1).flatten()


@pytest.mark.parametrize("model", ["qwen3", "gemma3"])
def test_qk_norm_and_rope_give_transformers_scores(model):
    """transformers' Q and K (q_proj, per-head q_norm/k_norm, rotate-half RoPE) against the twin on the
    checkpoint's rows put in rotary-pair order per head, the norm weights likewise: the same scores
    (with Gemma3's query_pre_attn_scalar) and the same V, grouped-query, in float64."""
    from transformers import Gemma3TextConfig, Qwen3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    tokens, hidden, heads, kv_heads, head_dim = 11, 48, 4, 2, 32
    shape = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                 num_hidden_layers=1)
    if model == "qwen3":
        config = Qwen3Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
        attn, rotary, offset = Qwen3Attention(config, 0), Qwen3RotaryEmbedding(config), 0.0
        scaling = head_dim**-0.5
    else:
        config = Gemma3TextConfig(**shape, query_pre_attn_scalar=24)
        attn, offset = Gemma3Attention(config, 0), 1.0
        rotary = Gemma3RotaryEmbedding(config)
        scaling = 24**-0.5
    attn, rotary = attn.double(), rotary.double()
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_(0.0, 0.3)
    x = torch.randn(1, tokens, hidden, dtype=torch.float64)
    positions = torch.arange(5, 5 + tokens)
    cos, sin = rotary(x, positions[None], *(["sliding_attention"] if model == "gemma3" else []))
    with torch.no_grad():
        def split(t):  # (1, T, heads * D) -> (1, heads, T, D)
            return t.view(1, tokens, -1, head_dim).transpose(1, 2)

        q, k = attn.q_norm(split(attn.q_proj(x))), attn.k_norm(split(attn.k_proj(x)))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        theirs = q[0] @ k[0].repeat_interleave(heads // kv_heads, 0).transpose(-1, -2) * scaling
        their_v = split(attn.v_proj(x))[0]

        order = _pair_order(head_dim)

        def pair_rows(w, n):  # (n * D, hidden): each head's rows in rotary-pair order
            return w.view(n, head_dim, -1)[:, order].reshape(n * head_dim, -1)

        weight = torch.cat([pair_rows(attn.q_proj.weight, heads), pair_rows(attn.k_proj.weight, kv_heads),
                            attn.v_proj.weight])
        table = torch.cat([cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]], 1)  # rows at the positions
        q, k, v = reference.fused_qkv(x[0], weight, None, heads, torch.arange(tokens), table, num_kv_heads=kv_heads,
                                      head_dim=head_dim, q_norm=attn.q_norm.weight[order],
                                      k_norm=attn.k_norm.weight[order], norm_eps=config.rms_norm_eps,
                                      norm_offset=offset, scale=scaling)
    ours = q @ k.repeat_interleave(heads // kv_heads, 0).transpose(-1, -2)
    # transformers' RMSNorm computes in float32 whatever the module's dtype: float32's precision here
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, their_v)


def test_qwen2_qkv_bias_is_the_projections_bias():
    """Qwen2: biases on q_proj, k_proj and v_proj, none on o_proj; fused_qkv's bias is their concatenation."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    tokens, hidden, heads, kv_heads = 9, 48, 6, 2
    head_dim = hidden // heads
    attn = Qwen2Attention(Qwen2Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      num_hidden_layers=1), 0)
    assert attn.o_proj.bias is None and attn.q_proj.bias is not None
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_(0.0, 0.3)
        x = torch.randn(tokens, hidden)
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        q, k, v = kernels.fused_qkv(x, weight, bias, heads, num_kv_heads=kv_heads)
        for ours, proj, n, factor in ((q, attn.q_proj, heads, attn.scaling), (k, attn.k_proj, kv_heads, 1.0),
                                      (v, attn.v_proj, kv_heads, 1.0)):
            theirs = (proj(x) * factor).view(tokens, n, head_dim).transpose(0, 1)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fused_qkv_qk_norm_rows_are_batch_invariant():
    x = rand(150, 64, dtype=torch.bfloat16)
    weight = rand(8 * 32, 64, dtype=torch.bfloat16, scale=0.1)
    norm = 1 + 0.2 * rand(32, dtype=torch.bfloat16)
    positions = torch.arange(150, device=DEVICE) % 61
    rope = family.rope_table(10_000.0, 32, 64, DEVICE)
    kwargs = dict(num_kv_heads=2, head_dim=32, q_norm=norm, k_norm=norm)
    full = kernels.fused_qkv(x, weight, None, 4, positions, rope, **kwargs)
    for rows in (slice(0, 2), slice(64, 70), slice(149, 150)):
        alone = kernels.fused_qkv(x[rows].clone(), weight, None, 4, positions[rows].clone(), rope, **kwargs)
        for a, b in zip(alone, full):
            assert torch.equal(a, b[:, rows])


# --- RMSNorm, the sandwich step, the scaled embeddings -----------------------------------------------


def _exact(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/16 up to 4: their squares and every sum of them are exact in fp32, so the sum of
    squares does not depend on its order (torch's CPU cascade, the kernel's tree)."""
    return (torch.randint(-64, 65, shape, device=DEVICE) / 16).to(dtype)


def _norm_weight(hidden: int, dtype: torch.dtype, offset: float) -> torch.Tensor:
    return (1.0 - offset) + (torch.randint(-8, 9, (hidden,), device=DEVICE) / 16).to(dtype)  # k/16, near 1 - offset


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("hidden", [96, 1023])
def test_rms_norm(dtype, offset, hidden):
    x = rand(37, hidden, dtype=dtype, scale=2.0, pad=3)
    weight = (1.0 - offset) + 0.3 * rand(hidden, dtype=dtype)
    out = kernels.rms_norm(x, weight, 1e-6, offset)
    expected = reference.rms_norm(*f64(x, weight), 1e-6, offset)
    assert_matches(out, expected, reference.rms_norm(x, weight, 1e-6, offset), f"rms_norm offset={offset}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_rms_norm_is_transformers_bit_for_bit(dtype, module):
    """The twin is transformers' RMSNorm in every dtype, on any data; the kernel is the twin where the sum
    of squares is exact (and the rest of its arithmetic is the same, operation for operation)."""
    import importlib

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}[module]
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), f"{name}RMSNorm")
    offset = 1.0 if module == "gemma3" else 0.0
    norm = cls(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_norm_weight(96, dtype, offset))
        for x in (rand(21, 96, dtype=dtype, scale=3.0), _exact(21, 96, dtype=dtype)):
            assert torch.equal(reference.rms_norm(x, norm.weight, 1e-6, offset), norm(x))
        assert torch.equal(kernels.rms_norm(x, norm.weight, 1e-6, offset), norm(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_sandwich_rms_norm(dtype, offset):
    hidden = 120
    x, residual = rand(37, hidden, dtype=dtype, scale=2.0, pad=3), rand(37, hidden, dtype=dtype, scale=4.0, pad=5)
    weight, next_weight = ((1.0 - offset) + 0.3 * rand(hidden, dtype=dtype) for _ in range(2))
    r, h = kernels.sandwich_rms_norm(x, residual, weight, next_weight, 1e-6, offset)
    expected = reference.sandwich_rms_norm(*f64(x, residual, weight, next_weight), 1e-6, offset)
    torch_r, torch_h = reference.sandwich_rms_norm(x, residual, weight, next_weight, 1e-6, offset)
    assert_matches(r, expected[0], torch_r, "sandwich_rms_norm residual")
    assert_matches(h, expected[1], torch_h, "sandwich_rms_norm h")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sandwich_rms_norm_is_a_gemma3_block_step_bit_for_bit(dtype):
    """Gemma3DecoderLayer's ``residual + post_attention_layernorm(o)`` then ``pre_feedforward_layernorm``:
    the twin on any data, the kernel where the sums of squares are exact (the rows of x are +-2 and
    eps 0, so that x * rstd is exact too and the sum's squares stay multiples of 1/256)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    hidden = 96
    post, pre = Gemma3RMSNorm(hidden, eps=0.0).to(dtype), Gemma3RMSNorm(hidden, eps=0.0).to(dtype)
    with torch.no_grad():
        post.weight.copy_(_norm_weight(hidden, dtype, 1.0))
        pre.weight.copy_(_norm_weight(hidden, dtype, 1.0))
        for x, residual in ((rand(9, hidden, dtype=dtype), rand(9, hidden, dtype=dtype)),
                            (2 * torch.randint(0, 2, (9, hidden), device=DEVICE).to(dtype) * 2 - 2,
                             _exact(9, hidden, dtype=dtype))):
            expected = residual + post(x)
            twin = reference.sandwich_rms_norm(x, residual, post.weight, pre.weight, 0.0, 1.0)
            assert torch.equal(twin[0], expected) and torch.equal(twin[1], pre(expected))
        ours = kernels.sandwich_rms_norm(x, residual, post.weight, pre.weight, 0.0, 1.0)
        assert torch.equal(ours[0], expected) and torch.equal(ours[1], pre(expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_embeddings_are_gemma3s_bit_for_bit(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    vocab, hidden = 50, 120
    table = Gemma3TextScaledWordEmbedding(vocab, hidden, 0, embed_scale=hidden**0.5).to(dtype)
    with torch.no_grad():
        table.weight.normal_()
        ids = torch.randint(0, vocab, (41,), device=DEVICE)
        expected = table(ids)
    for ops in (kernels, reference):
        assert torch.equal(ops.embeddings(ids, None, None, table.weight, None, None, None, None, 0.0, hidden**0.5),
                           expected)
        assert torch.equal(ops.embeddings(ids, None, None, table.weight, None, None, None, None, 0.0),
                           table.weight[ids])  # Llama, Qwen, Mistral: a plain gather


# --- gated feed-forwards against transformers' MLPs --------------------------------------------------


@pytest.mark.parametrize("model, activation", [("llama", "silu"), ("qwen3", "silu"), ("gemma3", "gelu_tanh")])
def test_gated_linear_is_transformers_mlp(model, activation):
    """``down(act(gate(x)) * up(x))``: gate_proj is the activated half, interleaved with up_proj at load."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    config_cls, mlp_cls = {"llama": (LlamaConfig, LlamaMLP), "qwen3": (Qwen3Config, Qwen3MLP),
                           "gemma3": (Gemma3TextConfig, Gemma3MLP)}[model]
    mlp = mlp_cls(config_cls(hidden_size=40, intermediate_size=74, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=20))
    with torch.no_grad():
        for parameter in mlp.parameters():
            parameter.normal_(0.0, 0.2)
        x = torch.randn(33, 40)
        expected = mlp(x)
    weight = family.interleave_gate(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])).detach()
    for ops in (kernels, reference):
        out = ops.linear(ops.gated_linear(x, weight, None, activation), mlp.down_proj.weight.detach(), None)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- last-token pooling -----------------------------------------------------------------------------


def test_lasttoken_pooling_is_a_gather_at_the_ends():
    from sentence_transformers.models import Pooling

    lengths = [3, 0, 1, 5]
    hidden = torch.randn(sum(lengths), 8)
    ends = cu_seqlens_of(lengths)[1:].long().cpu() - 1
    out = pool(hidden, lengths, "lasttoken")
    assert torch.equal(out[[0, 2, 3]], hidden[ends[[0, 2, 3]]]) and not out[1].any()
    assert not pool(hidden, lengths, "lasttoken", skip=3)[0].any()  # only the skipped (prompt) tokens
    normalized = pool(hidden, lengths, "lasttoken", normalize=True)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(out, dim=-1))
    # sentence-transformers' lasttoken on the padded batch (right padding)
    padded = torch.zeros(len(lengths), max(lengths), 8)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, (tokens, n) in enumerate(zip(hidden.split(lengths), lengths)):
        padded[row, :n], mask[row, :n] = tokens, 1
    theirs = Pooling(8, pooling_mode="lasttoken")({"token_embeddings": padded, "attention_mask": mask})
    assert torch.equal(out, theirs["sentence_embedding"])


# --- launcher errors --------------------------------------------------------------------------------


def _bad_calls() -> dict:
    f32 = torch.float32
    x, q, cu = rand(4, 32, dtype=f32), rand(4, 5, 16, dtype=f32), cu_seqlens_of([5])
    qkv_w, norm = rand(8 * 16, 32, dtype=f32), rand(16, dtype=f32)
    w = rand(32, dtype=f32)
    return {
        "attention kv heads": (lambda: kernels.attention(q, q[:3], q[:3], cu, 5, causal=True), "k"),
        "attention v heads": (lambda: kernels.attention(q, q[:2], q[:1], cu, 5, causal=True), "v"),
        "attention causal": (lambda: kernels.attention(q, q, q, cu, 5, causal=1), "causal"),
        "attention head_dim": (lambda: kernels.attention(*[rand(2, 5, 264, dtype=f32)] * 3, cu, 5), "q"),
        "fused_qkv num_kv_heads": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=3, head_dim=16),
                                   "num_kv_heads"),
        "fused_qkv head_dim": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=2, head_dim=0), "head_dim"),
        "fused_qkv weight rows": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=1, head_dim=16),
                                  "weight"),
        "fused_qkv k_norm missing": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=2, head_dim=16,
                                                               q_norm=norm), "q_norm"),
        "fused_qkv q_norm shape": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=2, head_dim=16,
                                                             q_norm=norm[:8], k_norm=norm), "q_norm"),
        "fused_qkv q_norm head_dim": (lambda: kernels.fused_qkv(x, rand(8 * 24, 32, dtype=f32), None, 4,
                                                                num_kv_heads=2, head_dim=24, q_norm=rand(24, dtype=f32),
                                                                k_norm=rand(24, dtype=f32)), "q_norm"),
        "fused_qkv scale": (lambda: kernels.fused_qkv(x, qkv_w, None, 4, num_kv_heads=2, head_dim=16,
                                                      scale=float("nan")), "scale"),
        "rms_norm weight": (lambda: kernels.rms_norm(x, w[:8], 1e-6), "weight"),
        "rms_norm eps": (lambda: kernels.rms_norm(x, w, -1.0), "eps"),
        "rms_norm offset": (lambda: kernels.rms_norm(x, w, 1e-6, float("inf")), "offset"),
        "sandwich_rms_norm residual": (lambda: kernels.sandwich_rms_norm(x, x[:2], w, w, 1e-6), "residual"),
        "sandwich_rms_norm next_weight": (lambda: kernels.sandwich_rms_norm(x, x, w, w.half(), 1e-6), "next_weight"),
        "embeddings bias without norm": (lambda: kernels.embeddings(torch.zeros(4, dtype=torch.long, device=DEVICE),
                                                                    None, None, x, None, None, None, w, 0.0), "bias"),
        "embeddings scale": (lambda: kernels.embeddings(torch.zeros(4, dtype=torch.long, device=DEVICE), None, None,
                                                        x, None, None, None, None, 0.0, "8"), "scale"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_launcher_names_the_bad_argument(case):
    call, argument = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()
