"""The kernels the families after BERT need, against ``fastenc.reference`` (the tolerance rule of
test_kernels.py): gated feed-forwards, bias-free linears and norms, the residual epilogue, RoPE in the
fused-QKV epilogue, and attention with a sliding window (which must skip, not mask, the key blocks
outside it) and MPNet's relative position bias. Also the load-time layouts of ``fastenc.family``
against transformers' own functions. Shapes stay tiny: this runs under the interpreter on the CPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastenc.reference as reference  # noqa: E402
from fastenc import family  # noqa: E402
from fastenc import kernels  # noqa: E402
from test_kernels import (  # noqa: E402,F401  (the autouse fixture seeds and poisons torch.empty)
    DEVICE, DTYPES, FP16_ON_GPU, GPU_DTYPES, _seed_and_poison, assert_matches, cu_seqlens_of, f64, norm_params, rand,
)

# --- gated_linear, linear without bias / with a residual ----------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation, with_bias", [("silu", False), ("gelu", True), ("gelu_tanh", False)])
def test_gated_linear(dtype, activation, with_bias):
    M, K, N = 70, 56, 37  # M past a block at 64 rows (fp32), K ragged, N odd: 74 interleaved rows
    x = rand(M, K, dtype=dtype, pad=8)
    weight = rand(2 * N, K, dtype=dtype, scale=K**-0.5, pad=8)
    bias = rand(2 * N, dtype=dtype) if with_bias else None
    out = kernels.gated_linear(x, weight, bias, activation)
    assert out.shape == (M, N)
    expected = reference.gated_linear(*f64(x, weight, bias), activation)
    assert_matches(out, expected, reference.gated_linear(x, weight, bias, activation), f"gated_linear[{activation}]")


def test_gated_linear_is_act_of_one_half_times_the_other():
    """The interleaved layout against the checkpoint's: act(gate(x)) * up(x) from two separate weights."""
    x = rand(9, 24, dtype=torch.float32)
    gate, up = rand(10, 24, dtype=torch.float32, scale=0.3), rand(10, 24, dtype=torch.float32, scale=0.3)
    weight = family.interleave_gate(torch.cat([gate, up]))
    expected = torch.nn.functional.silu(x.double() @ gate.double().t()) * (x.double() @ up.double().t())
    torch.testing.assert_close(kernels.gated_linear(x, weight, None, "silu").double(), expected, rtol=1e-5,
                               atol=1e-6)
    swapped = family.interleave_gate(torch.cat([up, gate]), linear_first=True)  # GTE's up_gate_proj
    assert torch.equal(swapped, weight)


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_with_residual(dtype, with_bias):
    M, K, N = 70, 40, 48
    x, weight = rand(M, K, dtype=dtype, pad=4), rand(N, K, dtype=dtype, scale=K**-0.5)
    bias = rand(N, dtype=dtype) if with_bias else None
    residual = rand(M, N, dtype=dtype, scale=2.0, pad=3)  # strided rows
    out = kernels.linear(x, weight, bias, None, residual)
    expected = reference.linear(*f64(x, weight, bias), None, residual.double())
    assert_matches(out, expected, reference.linear(x, weight, bias, None, residual), "linear + residual")


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
def test_linear_silu_without_bias(dtype):
    x, weight = rand(33, 40, dtype=dtype), rand(24, 40, dtype=dtype, scale=0.3)
    out = kernels.linear(x, weight, None, "silu")
    assert_matches(out, reference.linear(*f64(x, weight), None, "silu"), reference.linear(x, weight, None, "silu"),
                   "linear silu")


# --- norms and embeddings without bias / positions ------------------------------------------------------


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_layer_norm(dtype, with_bias):
    x = rand(37, 120, dtype=dtype, scale=2.0, pad=3)
    weight, bias = norm_params(120, dtype)
    bias = bias if with_bias else None
    out = kernels.layer_norm(x, weight, bias, 1e-5)
    expected = reference.layer_norm(*f64(x, weight, bias), 1e-5)
    assert_matches(out, expected, reference.layer_norm(x, weight, bias, 1e-5), "layer_norm")


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
def test_add_layer_norm_without_bias(dtype):
    x, residual = rand(21, 96, dtype=dtype), rand(21, 96, dtype=dtype)
    weight, _ = norm_params(96, dtype)
    out = kernels.add_layer_norm(x, residual, weight, None, 1e-12)
    expected = reference.add_layer_norm(*f64(x, residual, weight), None, 1e-12)
    assert_matches(out, expected, reference.add_layer_norm(x, residual, weight, None, 1e-12), "add_layer_norm")


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("with_types", [True, False], ids=["token_types", "no_token_types"])
def test_embeddings_without_positions(dtype, with_types):
    tokens, vocab, emb = 29, 50, 80
    input_ids = torch.randint(0, vocab, (tokens,), device=DEVICE)
    token_type_ids = torch.randint(0, 2, (tokens,), device=DEVICE) if with_types else None
    word_emb = rand(vocab, emb, dtype=dtype, pad=4)
    type_emb = rand(2, emb, dtype=dtype, scale=0.5) if with_types else None
    weight, bias = norm_params(emb, dtype)
    bias = bias if with_types else None  # ModernBERT: no token types, no norm bias
    args = (input_ids, None, token_type_ids)
    out = kernels.embeddings(*args, word_emb, None, type_emb, weight, bias, 1e-5)
    expected = reference.embeddings(*args, *f64(word_emb), None, *f64(type_emb, weight, bias), 1e-5)
    assert_matches(out, expected, reference.embeddings(*args, word_emb, None, type_emb, weight, bias, 1e-5),
                   "embeddings without positions")


# --- fused_qkv with RoPE --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("tokens, hidden, heads, with_bias", [(7, 96, 4, True), (70, 80, 2, False), (33, 56, 2, True)])
def test_fused_qkv_rope(dtype, tokens, hidden, heads, with_bias):  # head dims 24, 40, 28
    x = rand(tokens, hidden, dtype=dtype, pad=4)
    weight = rand(3 * hidden, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = rand(3 * hidden, dtype=dtype) if with_bias else None
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)  # any order, repeats, gaps
    rope = family.rope_table(10_000.0, hidden // heads, 100, DEVICE)
    out = kernels.fused_qkv(x, weight, bias, heads, positions, rope)
    assert out.shape == (3, heads, tokens, hidden // heads) and out.is_contiguous()
    expected = reference.fused_qkv(*f64(x, weight, bias), heads, positions, rope)
    assert_matches(out, expected, reference.fused_qkv(x, weight, bias, heads, positions, rope), "fused_qkv rope")


def test_rope_in_pair_order_gives_transformers_scores():
    """Rotate-half RoPE (transformers' apply_rotary_pos_emb) on the checkpoint's rows and fastenc's
    pair-order RoPE on the permuted rows give the same attention scores, and the same V."""
    from transformers.models.nomic_bert.modeling_nomic_bert import apply_rotary_pos_emb  # no float32 upcast

    tokens, hidden, heads = 11, 80, 2
    head_dim = hidden // heads
    x = rand(tokens, hidden, dtype=torch.float32).double()
    weight = rand(3 * hidden, hidden, dtype=torch.float32, scale=hidden**-0.5).double()
    positions = torch.arange(3, 3 + tokens, device=DEVICE)
    table = family.rope_table(160_000.0, head_dim, 32, DEVICE).double()
    qkv = (x @ weight.t()).view(tokens, 3, heads, head_dim).permute(1, 2, 0, 3)  # (3, H, T, D)
    cos = torch.cat([table[positions, : head_dim // 2]] * 2, -1)[None]  # transformers' cat(freqs, freqs)
    sin = torch.cat([table[positions, head_dim // 2:]] * 2, -1)[None]
    q, k = apply_rotary_pos_emb(qkv[0][None], qkv[1][None], cos, sin)
    theirs = q[0] @ k[0].transpose(-1, -2) / math.sqrt(head_dim)
    ours_qkv = reference.fused_qkv(x, family.rotary_pair_order(weight, heads), None, heads, positions, table)
    ours = ours_qkv[0] @ ours_qkv[1].transpose(-1, -2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_qkv[2], qkv[2])


def test_rope_table_is_transformers_own():
    from transformers import ModernBertConfig, NomicBertConfig
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding
    from transformers.models.nomic_bert.modeling_nomic_bert import NomicBertRotaryEmbedding

    positions = torch.arange(200)[None]
    config = ModernBertConfig(hidden_size=80, num_attention_heads=2, num_hidden_layers=3)
    rotary = ModernBertRotaryEmbedding(config)
    for kind, theta in (("full_attention", 160_000.0), ("sliding_attention", 10_000.0)):
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions, kind)
        table = family.rope_table(theta, 40, 200)
        assert torch.equal(table[:, :20], cos[0, :, :20]) and torch.equal(table[:, 20:], sin[0, :, :20])
    config = NomicBertConfig(hidden_size=96, num_attention_heads=4)
    cos, sin = NomicBertRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    table = family.rope_table(1000.0, 24, 200)
    assert torch.equal(table[:, :12], cos[0, :, :12]) and torch.equal(table[:, 12:], sin[0, :, :12])


@pytest.mark.gpu
def test_fused_qkv_rope_rows_are_batch_invariant():
    x = rand(150, 80, dtype=torch.float16)
    weight, bias = rand(240, 80, dtype=torch.float16, scale=0.1), rand(240, dtype=torch.float16)
    positions = torch.arange(150, device=DEVICE) % 61
    rope = family.rope_table(10_000.0, 40, 64, DEVICE)
    full = kernels.fused_qkv(x, weight, bias, 2, positions, rope)
    for rows in (slice(0, 2), slice(64, 70), slice(149, 150)):
        alone = kernels.fused_qkv(x[rows].clone(), weight, bias, 2, positions[rows].clone(), rope)
        assert torch.equal(alone, full[:, :, rows])


# --- attention: sliding window, relative bias --------------------------------------------------------

LENGTHS = [1, 7, 0, 97, 129]  # tiny, empty, and lengths across block edges


def _qkv(heads: int, tokens: int, head_dim: int, dtype: torch.dtype):
    q, k, v = rand(3, heads, tokens, head_dim, dtype=dtype).unbind(0)
    q.mul_(head_dim**-0.5)
    return q, k, v


def _positions(lengths: list[int], gaps: bool) -> torch.Tensor:
    """Each sequence's positions: 0, 1, 2, … or, with gaps, a start offset and holes (a padded row
    with left padding and masked tokens), always increasing."""
    generator = torch.Generator().manual_seed(len(lengths))
    out = []
    for n in lengths:
        steps = torch.ones(n, dtype=torch.long)
        if gaps and n:
            steps = 1 + (torch.rand(n, generator=generator) < 0.2).long() * torch.randint(1, 4, (n,), generator=generator)
            steps[0] = 5
        out.append(torch.cumsum(steps, 0) - 1)
    return torch.cat(out).to(DEVICE)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, window", [(24, 5), (40, 0), (64, 40)])
def test_attention_sliding_window(dtype, head_dim, window):
    heads, tokens = 2, sum(LENGTHS)
    q, k, v = _qkv(heads, tokens, head_dim, dtype)
    cu_seqlens, positions = cu_seqlens_of(LENGTHS), _positions(LENGTHS, gaps=head_dim == 40)
    out = kernels.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, window)
    expected = reference.attention(*f64(q, k, v), cu_seqlens, max(LENGTHS), positions, window)
    torch_out = reference.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, window)
    assert_matches(out, expected, torch_out, f"attention window={window}")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, window", [(24, None), (64, 9)])
def test_attention_relative_bias(dtype, head_dim, window):
    heads, tokens, max_positions = 3, sum(LENGTHS), 400  # positions with gaps reach about 260
    q, k, v = _qkv(heads, tokens, head_dim, dtype)
    table = torch.randn(family.MPNET_BUCKETS, heads) * 2  # MPNet's (buckets, heads) embedding
    bias = family.relative_bias_by_distance(table, max_positions).to(DEVICE)
    cu_seqlens = cu_seqlens_of(LENGTHS)
    positions = _positions(LENGTHS, gaps=True) + 2  # MPNet counts from padding_idx + 1
    out = kernels.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, window, bias)
    expected = reference.attention(*f64(q, k, v), cu_seqlens, max(LENGTHS), positions, window, bias.double())
    torch_out = reference.attention(q, k, v, cu_seqlens, max(LENGTHS), positions, window, bias)
    assert_matches(out, expected, torch_out, "attention + relative bias")


def test_relative_bias_is_mpnet_bucketed_bias():
    """The bias table by distance is transformers' MPNetEncoder.compute_position_bias, exactly."""
    from transformers import MPNetConfig
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    encoder = MPNetEncoder(MPNetConfig(hidden_size=24, num_attention_heads=3, num_hidden_layers=1))
    with torch.no_grad():
        encoder.relative_attention_bias.weight.normal_()
        seq = 300  # past max_distance 128: the log buckets and the clamp
        theirs = encoder.compute_position_bias(torch.zeros(1, seq, 24))[0]  # (heads, seq, seq)
        ours = family.relative_bias_by_distance(encoder.relative_attention_bias.weight, seq)  # (heads, 2 seq - 1)
    distance = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]  # key - query
    assert torch.equal(ours[:, distance + seq - 1], theirs)
    relative = torch.arange(-400, 400)
    assert torch.equal(family.mpnet_bucket(relative), MPNetEncoder.relative_position_bucket(relative))


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the blocks near the NaN keys
def test_sliding_window_skips_the_key_blocks_outside_it():
    """Keys and values far outside every window of a query block are NaN: had the kernel read them
    (and masked them after computing), 0 * NaN would reach those queries' outputs. The sequence spans
    many windows; only the queries whose block can reach the poisoned keys may see NaN."""
    heads, head_dim, seqlen, window = 1, 32, 1100, 8
    for dtype in (torch.float32, torch.float16):
        q, k, v = _qkv(heads, seqlen, head_dim, dtype)
        cu_seqlens = cu_seqlens_of([seqlen])
        clean = kernels.attention(q, k, v, cu_seqlens, seqlen, None, window)
        poisoned = (500, 540)
        k[:, poisoned[0]:poisoned[1]] = float("nan")
        v[:, poisoned[0]:poisoned[1]] = float("nan")
        out = kernels.attention(q, k, v, cu_seqlens, seqlen, None, window)
        # queries farther than window + two blocks from the poisoned keys share no key block with them
        reach = window + 2 * 128
        far = torch.ones(seqlen, dtype=torch.bool)
        far[max(0, poisoned[0] - reach):poisoned[1] + reach] = False
        assert far.sum() > 500
        assert torch.isfinite(out[far]).all(), dtype
        assert torch.equal(out[far], clean[far]), dtype


@pytest.mark.parametrize("dtype, position", [(torch.float32, 0), pytest.param(torch.bfloat16, 2,
                                                                              marks=pytest.mark.gpu),
                                             (torch.float32, 4)])
def test_windowed_biased_attention_is_batch_invariant(dtype, position):
    lengths = [129, 7, 1, 0]
    lengths.insert(position, 97)
    heads, head_dim = 2, 40
    q, k, v = _qkv(heads, sum(lengths), head_dim, dtype)
    positions = _positions(lengths, gaps=True)
    bias = family.relative_bias_by_distance(torch.randn(32, heads), 300).to(DEVICE)
    batched = kernels.attention(q, k, v, cu_seqlens_of(lengths), max(lengths), positions, 6, bias)
    start = sum(lengths[:position])
    rows = slice(start, start + 97)
    alone = kernels.attention(*(t[:, rows].clone() for t in (q, k, v)), cu_seqlens_of([97]), 97,
                              positions[rows].clone(), 6, bias)
    assert torch.isfinite(alone).all()
    assert torch.equal(batched[rows], alone)


def test_window_without_positions_uses_the_index_in_the_sequence():
    q, k, v = _qkv(2, 40, 24, torch.float32)
    cu_seqlens = cu_seqlens_of([15, 25])
    positions = torch.cat([torch.arange(15), torch.arange(25)]).to(DEVICE)
    assert torch.equal(kernels.attention(q, k, v, cu_seqlens, 25, None, 4),
                       kernels.attention(q, k, v, cu_seqlens, 25, positions, 4))
    # a window as wide as the sequence is full attention
    torch.testing.assert_close(kernels.attention(q, k, v, cu_seqlens, 25, None, 25),
                               kernels.attention(q, k, v, cu_seqlens, 25), rtol=1e-6, atol=1e-7)


# --- launcher errors ----------------------------------------------------------------------------------


def _bad_calls() -> dict:
    f32 = torch.float32
    x, w = rand(4, 32, dtype=f32), rand(9, 32, dtype=f32)
    q, cu = rand(2, 5, 16, dtype=f32), cu_seqlens_of([5])
    qkv_w, rope = rand(96, 32, dtype=f32), family.rope_table(10.0, 16, 8, DEVICE)
    positions = torch.zeros(4, dtype=torch.long, device=DEVICE)
    return {
        "gated_linear odd rows": (lambda: kernels.gated_linear(x, w, None, "silu"), "weight"),
        "gated_linear activation": (lambda: kernels.gated_linear(x, w[:8], None, "swiglu"), "activation"),
        "linear residual shape": (lambda: kernels.linear(x, w, None, None, x), "residual"),
        "fused_qkv rope dtype": (lambda: kernels.fused_qkv(x, qkv_w, None, 2, positions, rope.double()), "rope"),
        "fused_qkv rope without positions": (lambda: kernels.fused_qkv(x, qkv_w, None, 2, None, rope), "positions"),
        "fused_qkv positions shape": (lambda: kernels.fused_qkv(x, qkv_w, None, 2, positions[:2], rope), "positions"),
        "attention window": (lambda: kernels.attention(q, q, q, cu, 5, None, -1), "window"),
        "attention bias columns": (lambda: kernels.attention(q, q, q, cu, 5, None, None, torch.zeros(2, 8)), "bias"),
        "attention bias heads": (lambda: kernels.attention(q, q, q, cu, 5, None, None, torch.zeros(3, 9)), "bias"),
        "attention positions": (lambda: kernels.attention(q, q, q, cu, 5, positions, 2), "positions"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_launcher_names_the_bad_argument(case):
    call, argument = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()
