"""The Triton kernels against ``fastenc.reference``, under the interpreter on the CPU or compiled on CUDA.

Tolerance rule (FlashAttention's tests): the reference runs in float64 on upcast inputs; the kernel's
max abs error against it must be at most twice the error of the same reference op run in the input
dtype (torch's own error), plus a tiny absolute floor. Every output is also checked to be finite, and
every launcher's ``torch.empty`` is poisoned with NaN, so an element the kernel forgets to write fails.
Inputs that are views into NaN-padded buffers catch reads past the last column.

The interpreter is slow: shapes stay tiny here; the BERT-base shapes are marked ``cuda`` and run only there.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastenc.reference as reference  # noqa: E402
from fastenc import kernels  # noqa: E402
from fastenc.errors import BackendError  # noqa: E402
from fastenc.kernels import _target  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bf16 runs under the interpreter too: tests/conftest.py installs fastenc.kernels.interpreter, whose
# tl.dot reads bf16 operands exactly and whose fp32 -> bf16 casts round to nearest (Triton's own
# interpreter does neither).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The GPU check's subset (``-m gpu``, with the ``cuda`` tests): these tests pick CUDA when it is there, and
# their 16-bit cases run compiled on the GPU; every kernel variant has its fp16 case there, and bf16 too
# where its rounding takes a path of its own (attention's P cast, the GEMM epilogues, SPLADE).
GPU = pytest.mark.gpu
FP16_ON_GPU = [torch.float32, pytest.param(torch.float16, marks=GPU), torch.bfloat16]
GPU_DTYPES = [torch.float32, pytest.param(torch.float16, marks=GPU), pytest.param(torch.bfloat16, marks=GPU)]
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu"]
# Added to twice torch's error: only matters where torch's op happens to be exact.
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Seed every test and make every floating-point ``torch.empty`` NaN, so unwritten outputs show."""
    torch.manual_seed(0)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0, pad: int = 0) -> torch.Tensor:
    """Normal random data; with ``pad``, a view into a NaN-filled buffer ``pad`` columns wider."""
    base = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype, device=DEVICE)
    view = base[..., : shape[-1]]
    view.copy_(torch.randn(shape, device=DEVICE) * scale)
    return view


def norm_params(hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm weight and bias away from 1 and 0 (which would hide bugs)."""
    return 1 + 0.2 * rand(hidden, dtype=dtype), 0.2 * rand(hidden, dtype=dtype)


def f64(*tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(out: torch.Tensor, expected: torch.Tensor, torch_out: torch.Tensor, name: str) -> None:
    """The tolerance rule of the module docstring; ``expected`` is the float64 reference."""
    assert out.shape == torch_out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(torch_out.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != {torch_out.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output (NaN left unwritten, or overflow)"
    assert torch.isfinite(expected).all(), f"{name}: the reference itself is not finite"
    err, torch_err = max_error(out, expected), max_error(torch_out, expected)
    bound = 2 * torch_err + ABS_FLOOR[out.dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + {ABS_FLOOR[out.dtype]:g}"


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


# --- linear -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M, K, N", [(130, 120, 96), (7, 384, 40)])  # M past a block; K ragged, K even
def test_linear(dtype, activation, M, K, N):
    x = rand(M, K, dtype=dtype, pad=8)  # strided rows, NaN past column K
    weight = rand(N, K, dtype=dtype, scale=K**-0.5, pad=8)
    bias = rand(N, dtype=dtype)
    out = kernels.linear(x, weight, bias, activation)
    expected = reference.linear(*f64(x, weight, bias), activation)
    assert_matches(out, expected, reference.linear(x, weight, bias, activation), "linear")


@GPU
def test_linear_rows_are_batch_invariant():
    x = rand(200, 96, dtype=torch.float16)
    weight, bias = rand(120, 96, dtype=torch.float16, scale=0.1), rand(120, dtype=torch.float16)
    full = kernels.linear(x, weight, bias, "gelu")
    for rows in (slice(0, 3), slice(37, 41), slice(199, 200)):
        assert torch.equal(kernels.linear(x[rows].clone(), weight, bias, "gelu"), full[rows])


def test_linear_empty_and_single_column():
    weight, bias = rand(1, 24, dtype=torch.float32), rand(1, dtype=torch.float32)
    assert kernels.linear(rand(0, 24, dtype=torch.float32), weight, bias).shape == (0, 1)
    x = rand(5, 24, dtype=torch.float32)
    out = kernels.linear(x, weight, bias)
    assert_matches(out, reference.linear(*f64(x, weight, bias)), reference.linear(x, weight, bias), "linear N=1")


# --- fused_qkv ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("tokens, hidden, heads", [(7, 96, 4), (130, 120, 3), (33, 160, 2)])  # D = 24, 40, 80
def test_fused_qkv(dtype, tokens, hidden, heads):
    x = rand(tokens, hidden, dtype=dtype, pad=4)
    weight = rand(3 * hidden, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = rand(3 * hidden, dtype=dtype)
    out = kernels.fused_qkv(x, weight, bias, heads)
    assert out.shape == (3, heads, tokens, hidden // heads) and out.is_contiguous()
    expected = reference.fused_qkv(*f64(x, weight, bias), heads)
    assert_matches(out, expected, reference.fused_qkv(x, weight, bias, heads), "fused_qkv")


@GPU
def test_fused_qkv_rows_are_batch_invariant():
    x = rand(150, 96, dtype=torch.float16)
    weight, bias = rand(288, 96, dtype=torch.float16, scale=0.1), rand(288, dtype=torch.float16)
    full = kernels.fused_qkv(x, weight, bias, 4)
    for rows in (slice(0, 2), slice(64, 70), slice(149, 150)):
        assert torch.equal(kernels.fused_qkv(x[rows].clone(), weight, bias, 4), full[:, :, rows])


# --- attention ----------------------------------------------------------------------------------

LENGTHS = [1, 7, 0, 97, 129]  # one packed batch: tiny, empty, and lengths across block edges


def qkv_inputs(heads: int, tokens: int, head_dim: int, dtype: torch.dtype, layout: str):
    """q, k, v as the Triton fused_qkv gives them (contiguous slabs) or as the reference does (a
    permuted view of (tokens, 3, heads, head_dim)), the latter padded with NaN past head_dim."""
    if layout == "slabs":
        qkv = rand(3, heads, tokens, head_dim, dtype=dtype)
    else:
        qkv = rand(tokens, 3, heads, head_dim, dtype=dtype, pad=8).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    q.mul_(head_dim**-0.5)  # fused_qkv's pre-scaling
    return q, k, v


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [24, 40, 64, 80])
@pytest.mark.parametrize("layout", ["slabs", "permuted"])
def test_attention(dtype, head_dim, layout):
    heads, tokens = 2, sum(LENGTHS)
    q, k, v = qkv_inputs(heads, tokens, head_dim, dtype, layout)
    cu_seqlens = cu_seqlens_of(LENGTHS)
    out = kernels.attention(q, k, v, cu_seqlens, max(LENGTHS))
    expected = reference.attention(*f64(q, k, v), cu_seqlens, max(LENGTHS))
    assert_matches(out, expected, reference.attention(q, k, v, cu_seqlens, max(LENGTHS)), "attention")


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
def test_attention_after_fused_qkv(dtype):
    lengths, hidden, heads = [5, 0, 70], 96, 3
    x = rand(sum(lengths), hidden, dtype=dtype)
    weight, bias = rand(3 * hidden, hidden, dtype=dtype, scale=hidden**-0.5), rand(3 * hidden, dtype=dtype)
    cu_seqlens = cu_seqlens_of(lengths)
    out = kernels.attention(*kernels.fused_qkv(x, weight, bias, heads), cu_seqlens, max(lengths))
    expected = reference.attention(*reference.fused_qkv(*f64(x, weight, bias), heads), cu_seqlens, max(lengths))
    torch_out = reference.attention(*reference.fused_qkv(x, weight, bias, heads), cu_seqlens, max(lengths))
    assert_matches(out, expected, torch_out, "fused_qkv + attention")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("position", [0, 2, 4])  # first, middle, last
def test_attention_sequence_is_batch_invariant(dtype, position):
    lengths = [129, 7, 1, 0]
    lengths.insert(position, 97)
    heads, head_dim = 2, 40
    q, k, v = qkv_inputs(heads, sum(lengths), head_dim, dtype, "slabs")
    batched = kernels.attention(q, k, v, cu_seqlens_of(lengths), max(lengths))
    start = sum(lengths[:position])
    rows = slice(start, start + 97)
    alone = kernels.attention(*(t[:, rows].clone() for t in (q, k, v)), cu_seqlens_of([97]), 97)
    assert torch.isfinite(alone).all()
    assert torch.equal(batched[rows], alone)


def test_attention_without_tokens():
    q, k, v = qkv_inputs(2, 0, 32, torch.float32, "slabs")
    assert kernels.attention(q, k, v, cu_seqlens_of([0, 0]), 0).shape == (0, 64)
    assert kernels.attention(q, k, v, cu_seqlens_of([]), 0).shape == (0, 64)


# --- layer norms --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("hidden", [96, 120, 384, 1023])
def test_add_layer_norm(dtype, hidden):
    x, residual = rand(37, hidden, dtype=dtype, pad=3), rand(37, hidden, dtype=dtype, scale=2.0, pad=5)
    weight, bias = norm_params(hidden, dtype)
    out = kernels.add_layer_norm(x, residual, weight, bias, 1e-12)
    expected = reference.add_layer_norm(*f64(x, residual, weight, bias), 1e-12)
    assert_matches(out, expected, reference.add_layer_norm(x, residual, weight, bias, 1e-12), "add_layer_norm")


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", [96, 120, 384])
def test_gelu_layer_norm(dtype, activation, hidden):
    x = rand(37, hidden, dtype=dtype, scale=2.0, pad=3)
    weight, bias = norm_params(hidden, dtype)
    out = kernels.gelu_layer_norm(x, weight, bias, 1e-5, activation)
    expected = reference.gelu_layer_norm(*f64(x, weight, bias), 1e-5, activation)
    torch_out = reference.gelu_layer_norm(x, weight, bias, 1e-5, activation)
    assert_matches(out, expected, torch_out, f"gelu_layer_norm[{activation}]")


# --- embeddings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP16_ON_GPU, ids=str)
@pytest.mark.parametrize("with_types", [True, False], ids=["token_types", "no_token_types"])
@pytest.mark.parametrize("emb", [96, 120, 384])
def test_embeddings(dtype, with_types, emb):
    tokens, vocab, positions = 41, 50, 64
    input_ids = torch.randint(0, vocab, (tokens,), device=DEVICE)
    position_ids = torch.randint(0, positions, (tokens,), device=DEVICE, dtype=torch.int32)
    token_type_ids = torch.randint(0, 2, (tokens,), device=DEVICE) if with_types else None
    word_emb, pos_emb = rand(vocab, emb, dtype=dtype, pad=4), rand(positions, emb, dtype=dtype, scale=0.5)
    type_emb = rand(2, emb, dtype=dtype, scale=0.5, pad=2) if with_types else None
    weight, bias = norm_params(emb, dtype)
    ids = (input_ids, position_ids, token_type_ids)
    out = kernels.embeddings(*ids, word_emb, pos_emb, type_emb, weight, bias, 1e-12)
    expected = reference.embeddings(*ids, *f64(word_emb, pos_emb, type_emb, weight, bias), 1e-12)
    torch_out = reference.embeddings(*ids, word_emb, pos_emb, type_emb, weight, bias, 1e-12)
    assert_matches(out, expected, torch_out, "embeddings")


# --- splade_pool --------------------------------------------------------------------------------

SPLADE_LENGTHS = [1, 7, 0, 70]  # a one-token text, an empty one, one past a 64-token block


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("pooling, activation", [("max", "relu"), ("sum", "log1p_relu")])
@pytest.mark.parametrize("hidden, vocab", [(72, 203), (64, 130)])  # K ragged / even; the last vocab tile partial
def test_splade_pool(dtype, pooling, activation, hidden, vocab):
    x = rand(sum(SPLADE_LENGTHS), hidden, dtype=dtype, pad=4)  # NaN past column K: reading it would show
    weight = rand(vocab, hidden, dtype=dtype, scale=hidden**-0.5, pad=4)
    bias = rand(vocab, dtype=dtype) - 1.5  # most logits negative, as in a trained SPLADE head
    cu_seqlens = cu_seqlens_of(SPLADE_LENGTHS)
    out = kernels.splade_pool(x, weight, bias, cu_seqlens, pooling, activation)
    assert out.shape == (len(SPLADE_LENGTHS), vocab) and out.dtype == torch.float32
    expected = reference.splade_pool(*f64(x, weight, bias), cu_seqlens, pooling, activation)
    torch_out = reference.splade_pool(x, weight, bias, cu_seqlens, pooling, activation)
    assert_matches(out, expected, torch_out, f"splade_pool[{pooling}, {activation}]")
    assert (out >= 0).all() and (out[2] == 0).all()  # non-negative; the empty text pools to zero
    assert 0.02 < (out[0] > 0).float().mean() < 0.5  # the one-token text: a mix of active and inactive words


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("pooling, activation", [("max", "relu"), ("sum", "log1p_relu")])
def test_splade_pool_without_bias(dtype, pooling, activation):
    """A decoder without a bias (ModernBERT's ``decoder_bias: false``): ``bias=None``, not a zero vector."""
    x = rand(sum(SPLADE_LENGTHS), 72, dtype=dtype, pad=4)
    weight = rand(203, 72, dtype=dtype, scale=72**-0.5, pad=4)
    cu_seqlens = cu_seqlens_of(SPLADE_LENGTHS)
    out = kernels.splade_pool(x, weight, None, cu_seqlens, pooling, activation)
    expected = reference.splade_pool(*f64(x, weight), None, cu_seqlens, pooling, activation)
    torch_out = reference.splade_pool(x, weight, None, cu_seqlens, pooling, activation)
    assert_matches(out, expected, torch_out, f"splade_pool without bias[{pooling}, {activation}]")
    zero_bias = torch.zeros(203, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(expected, reference.splade_pool(*f64(x, weight), zero_bias, cu_seqlens, pooling,
                                                               activation), rtol=0, atol=0)
    assert (out[2] == 0).all() and 0.02 < (out[0] > 0).float().mean() < 0.98


def test_splade_pool_matches_the_twin_chunk_by_chunk():
    """The twin's vocabulary chunks meet: a vocabulary over one chunk gives the unchunked result."""
    vocab = reference.SPLADE_VOCAB_CHUNK + 37
    x, weight = rand(9, 24, dtype=torch.float64), rand(vocab, 24, dtype=torch.float64)
    bias = rand(vocab, dtype=torch.float64)
    cu_seqlens = cu_seqlens_of([4, 5])
    logits = reference.splade_activation(reference.linear(x, weight, bias), "log1p_relu")
    for pooling, pooled in (("max", torch.stack([logits[:4].amax(0), logits[4:].amax(0)])),
                            ("sum", torch.stack([logits[:4].sum(0), logits[4:].sum(0)]))):
        torch.testing.assert_close(reference.splade_pool(x, weight, bias, cu_seqlens, pooling, "log1p_relu"), pooled)


@GPU
def test_splade_pool_rows_are_batch_invariant():
    lengths = [70, 7, 1, 33]
    x = rand(sum(lengths), 96, dtype=torch.float16)
    weight, bias = rand(150, 96, dtype=torch.float16, scale=0.1), rand(150, dtype=torch.float16)
    for pooling, activation in (("max", "relu"), ("sum", "log1p_relu")):
        full = kernels.splade_pool(x, weight, bias, cu_seqlens_of(lengths), pooling, activation)
        start = 0
        for row, n in enumerate(lengths):
            alone = kernels.splade_pool(x[start:start + n].clone(), weight, bias, cu_seqlens_of([n]), pooling,
                                        activation)
            assert torch.equal(alone[0], full[row]), (pooling, row)
            start += n


# --- maxsim -------------------------------------------------------------------------------------

# Ragged: a document shorter than the query, an empty one, one past a 64-token block, a one-token one.
MAXSIM_LENGTHS = [5, 0, 70, 1, 33]


def maxsim_inputs(n_query: int, dim: int, dtype: torch.dtype, lengths: list[int] = MAXSIM_LENGTHS):
    """A query and packed documents of unit-scale dot products; NaN past the dim (reading it would show)."""
    query = rand(n_query, dim, dtype=dtype, scale=dim**-0.25, pad=4)
    documents = rand(sum(lengths), dim, dtype=dtype, scale=dim**-0.25, pad=4)
    return query, documents, cu_seqlens_of(lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_query, dim", [
    (1, 24),  # one query token; fp32 takes the dim in one step
    (37, 48),  # two query blocks, the second partial; a masked dim
    (7, 96),  # a query shorter than its block; masked one-step dim on 16-bit
    (32, 128),  # exactly one query block (ColBERT's query length and dim)
    (37, 200),  # the dim walked in steps, the last one masked
])
def test_maxsim(dtype, n_query, dim):
    query, documents, cu_seqlens = maxsim_inputs(n_query, dim, dtype)
    out = kernels.maxsim(query, documents, cu_seqlens)
    assert out.shape == (len(MAXSIM_LENGTHS),) and out.dtype == torch.float32
    expected = reference.maxsim(*f64(query, documents), cu_seqlens)
    assert_matches(out, expected, reference.maxsim(query, documents, cu_seqlens), "maxsim")
    assert out[1] == 0  # the empty document


def test_maxsim_without_tokens():
    """No documents; documents without tokens; a query without tokens: empty sums, zero scores."""
    query, documents, cu_seqlens = maxsim_inputs(5, 32, torch.float16)
    assert kernels.maxsim(query, documents, cu_seqlens[:1]).shape == (0,)
    assert kernels.maxsim(query, documents[:0], cu_seqlens_of([0, 0])).tolist() == [0.0, 0.0]
    assert kernels.maxsim(query[:0], documents, cu_seqlens).tolist() == [0.0] * len(MAXSIM_LENGTHS)
    assert reference.maxsim(query[:0], documents, cu_seqlens).tolist() == [0.0] * len(MAXSIM_LENGTHS)


def test_maxsim_documents_are_batch_invariant():
    lengths = [70, 7, 1, 0, 33, 64]
    for dtype in (torch.float16, torch.float32):
        query, documents, _ = maxsim_inputs(37, 96, dtype, lengths)
        full = kernels.maxsim(query, documents, cu_seqlens_of(lengths))
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        docs = [documents[start:start + n] for start, n in zip(starts, lengths)]
        reverse = kernels.maxsim(query, torch.cat(docs[::-1]), cu_seqlens_of(lengths[::-1]))
        assert torch.equal(reverse.flip(0), full), dtype
        for row, doc in enumerate(docs):
            alone = kernels.maxsim(query, doc.clone(), cu_seqlens_of([doc.shape[0]]))
            assert torch.equal(alone[0], full[row]), (dtype, row)


def test_maxsim_twin_chunks_cut_through_documents(monkeypatch):
    """The twin's token chunks meet: chunks of 3 rows (cutting through documents) give the padded formula's
    scores exactly (small integers: every product and sum is exact)."""
    lengths = [4, 0, 9, 1]
    query = torch.randint(-4, 5, (6, 10), dtype=torch.float64)
    documents = torch.randint(-4, 5, (sum(lengths), 10), dtype=torch.float64)
    monkeypatch.setattr(reference, "MAXSIM_CHUNK", 3 * query.shape[0])
    scores = reference.maxsim(query, documents, cu_seqlens_of(lengths).cpu())
    docs = documents.split(lengths)
    assert scores.tolist() == [(query @ d.t()).amax(1).sum().item() if len(d) else 0.0 for d in docs]


# --- launcher errors ----------------------------------------------------------------------------


def _bad_calls() -> dict:
    """Each case: a launcher call with one bad argument, the error it must raise, the name it must give."""
    f32 = torch.float32
    x, w, b = rand(4, 32, dtype=f32), rand(8, 32, dtype=f32), rand(8, dtype=f32)
    qkv_w, qkv_b = rand(96, 32, dtype=f32), rand(96, dtype=f32)
    q, cu = rand(2, 5, 16, dtype=f32), cu_seqlens_of([5])
    ln_w, ln_b = rand(32, dtype=f32), rand(32, dtype=f32)
    ids, table = torch.zeros(4, dtype=torch.int64, device=DEVICE), rand(10, 32, dtype=f32)
    meta = torch.empty(4, 32, device="meta")
    return {
        "linear x on meta": (lambda: kernels.linear(meta, w, b), BackendError, "x"),
        "linear x rank": (lambda: kernels.linear(x[0], w, b), ValueError, "x"),
        "linear x integer": (lambda: kernels.linear(x.long(), w, b), ValueError, "x"),
        "linear weight dtype": (lambda: kernels.linear(x, w.half(), b), ValueError, "weight"),
        "linear weight shape": (lambda: kernels.linear(x, w[:, :16], b), ValueError, "weight"),
        "linear weight column-major": (lambda: kernels.linear(x, w.t().contiguous().t(), b), ValueError, "weight"),
        "linear bias shape": (lambda: kernels.linear(x, w, b[:4]), ValueError, "bias"),
        "linear bias device": (lambda: kernels.linear(x, w, b.to("meta")), ValueError, "bias"),
        "linear activation": (lambda: kernels.linear(x, w, b, "swish"), ValueError, "activation"),
        "fused_qkv num_heads": (lambda: kernels.fused_qkv(x, qkv_w, qkv_b, 5), ValueError, "num_heads"),
        "fused_qkv weight shape": (lambda: kernels.fused_qkv(x, w, b, 2), ValueError, "weight"),
        "attention head_dim": (lambda: kernels.attention(*[q[..., :8]] * 3, cu, 5), ValueError, "q"),
        "attention k dtype": (lambda: kernels.attention(q, q.half(), q, cu, 5), ValueError, "k"),
        "attention v shape": (lambda: kernels.attention(q, q, q[:1], cu, 5), ValueError, "v"),
        "attention cu_seqlens dtype": (lambda: kernels.attention(q, q, q, cu.long(), 5), ValueError, "cu_seqlens"),
        "attention max_seqlen": (lambda: kernels.attention(q, q, q, cu, 5.0), ValueError, "max_seqlen"),
        "add_layer_norm residual": (lambda: kernels.add_layer_norm(x, x[:2], ln_w, ln_b, 1e-5), ValueError, "residual"),
        "add_layer_norm weight": (lambda: kernels.add_layer_norm(x, x, ln_w[:8], ln_b, 1e-5), ValueError, "weight"),
        "gelu_layer_norm bias": (lambda: kernels.gelu_layer_norm(x, ln_w, ln_b.half(), 1e-5), ValueError, "bias"),
        "gelu_layer_norm activation": (
            lambda: kernels.gelu_layer_norm(x, ln_w, ln_b, 1e-5, "tanh"), ValueError, "activation"
        ),
        "embeddings input_ids": (
            lambda: kernels.embeddings(ids.float(), ids, ids, table, table, table, ln_w, ln_b, 1e-12),
            ValueError,
            "input_ids",
        ),
        "embeddings token_type_ids": (
            lambda: kernels.embeddings(ids, ids, None, table, table, table, ln_w, ln_b, 1e-12),
            ValueError,
            "token_type_ids",
        ),
        "splade_pool weight shape": (lambda: kernels.splade_pool(x, w[:, :16], b, cu), ValueError, "weight"),
        "splade_pool bias shape": (lambda: kernels.splade_pool(x, w, b[:4], cu), ValueError, "bias"),
        "splade_pool cu_seqlens dtype": (lambda: kernels.splade_pool(x, w, b, cu.long()), ValueError, "cu_seqlens"),
        "splade_pool pooling": (lambda: kernels.splade_pool(x, w, b, cu, "mean"), ValueError, "pooling"),
        "splade_pool activation": (lambda: kernels.splade_pool(x, w, b, cu, "max", "gelu"), ValueError, "activation"),
        "maxsim query rank": (lambda: kernels.maxsim(x[None], x, cu_seqlens_of([4])), ValueError, "query"),
        "maxsim query dim 0": (lambda: kernels.maxsim(x[:, :0], x[:, :0], cu_seqlens_of([4])), ValueError, "query"),
        "maxsim documents dtype": (lambda: kernels.maxsim(x, x.half(), cu_seqlens_of([4])), ValueError, "documents"),
        "maxsim documents dim": (lambda: kernels.maxsim(x, x[:, :16], cu_seqlens_of([4])), ValueError, "documents"),
        "maxsim documents device": (lambda: kernels.maxsim(x, x.to("meta"), cu_seqlens_of([4])), ValueError,
                                    "documents"),
        "maxsim cu_seqlens dtype": (lambda: kernels.maxsim(x, x, cu_seqlens_of([4]).long()), ValueError, "cu_seqlens"),
        "maxsim cu_seqlens empty": (lambda: kernels.maxsim(x, x, cu[:0]), ValueError, "cu_seqlens"),
        "embeddings pos_emb": (
            lambda: kernels.embeddings(ids, ids, None, table, table[:, :16], None, ln_w, ln_b, 1e-12),
            ValueError,
            "pos_emb",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_launcher_names_the_bad_argument(case):
    call, error, argument = _bad_calls()[case]
    with pytest.raises(error, match=rf"^{argument}\b"):
        call()


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(_target, "INTERPRETED", False)
    x, w, b = rand(4, 32, dtype=torch.float32), rand(8, 32, dtype=torch.float32), rand(8, dtype=torch.float32)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        kernels.linear(x, w, b)


def test_launchers_mirror_the_reference():
    """Same names, parameters and defaults as fastenc.reference; KERNELS lists each once."""
    names = [name for name, _ in kernels.KERNELS]
    assert sorted(names) == ["add_layer_norm", "add_layer_norm_fp8", "attention", "embeddings", "fused_qkv",
                             "fused_qkv_fp8", "gated_linear", "gated_linear_fp8", "gelu_layer_norm", "layer_norm",
                             "layer_norm_fp8", "linear", "linear_fp8", "maxsim", "rms_norm", "sandwich_rms_norm",
                             "splade_pool"]
    for name in names:
        ours, theirs = inspect.signature(getattr(kernels, name)), inspect.signature(getattr(reference, name))
        assert [(p.name, p.default) for p in ours.parameters.values()] == [
            (p.name, p.default) for p in theirs.parameters.values()
        ], name


# --- BERT-base shapes on CUDA -------------------------------------------------------------------
# 12 heads x 64, hidden 768, intermediate 3072, two sequences of 512 tokens (1024 tokens packed).

BERT_DTYPES = [torch.float16, torch.bfloat16]
BERT_TOKENS, BERT_HIDDEN, BERT_HEADS = 1024, 768, 12


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", BERT_DTYPES, ids=str)
@pytest.mark.parametrize("in_features, out_features, activation", [(768, 3072, "gelu"), (3072, 768, None)])
def test_bert_base_linear(dtype, in_features, out_features, activation):
    x = rand(BERT_TOKENS, in_features, dtype=dtype)
    weight = rand(out_features, in_features, dtype=dtype, scale=in_features**-0.5)
    bias = rand(out_features, dtype=dtype)
    out = kernels.linear(x, weight, bias, activation)
    expected = reference.linear(*f64(x, weight, bias), activation)
    assert_matches(out, expected, reference.linear(x, weight, bias, activation), "linear")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", BERT_DTYPES, ids=str)
def test_bert_base_fused_qkv_and_attention(dtype):
    lengths = [512, 512]
    x = rand(BERT_TOKENS, BERT_HIDDEN, dtype=dtype)
    weight = rand(3 * BERT_HIDDEN, BERT_HIDDEN, dtype=dtype, scale=BERT_HIDDEN**-0.5)
    bias = rand(3 * BERT_HIDDEN, dtype=dtype)
    qkv = kernels.fused_qkv(x, weight, bias, BERT_HEADS)
    expected_qkv = reference.fused_qkv(*f64(x, weight, bias), BERT_HEADS)
    assert_matches(qkv, expected_qkv, reference.fused_qkv(x, weight, bias, BERT_HEADS), "fused_qkv")

    cu_seqlens = cu_seqlens_of(lengths)
    out = kernels.attention(*qkv, cu_seqlens, 512)
    expected = reference.attention(*qkv.double(), cu_seqlens, 512)
    assert_matches(out, expected, reference.attention(*qkv, cu_seqlens, 512), "attention")
    alone = kernels.attention(*qkv[:, :, 512:].clone(), cu_seqlens_of([512]), 512)
    assert torch.equal(out[512:], alone)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", BERT_DTYPES, ids=str)
def test_bert_base_norms_and_embeddings(dtype):
    x, residual = rand(BERT_TOKENS, BERT_HIDDEN, dtype=dtype), rand(BERT_TOKENS, BERT_HIDDEN, dtype=dtype)
    weight, bias = norm_params(BERT_HIDDEN, dtype)
    out = kernels.add_layer_norm(x, residual, weight, bias, 1e-12)
    expected = reference.add_layer_norm(*f64(x, residual, weight, bias), 1e-12)
    assert_matches(out, expected, reference.add_layer_norm(x, residual, weight, bias, 1e-12), "add_layer_norm")

    out = kernels.gelu_layer_norm(x, weight, bias, 1e-12)
    expected = reference.gelu_layer_norm(*f64(x, weight, bias), 1e-12)
    assert_matches(out, expected, reference.gelu_layer_norm(x, weight, bias, 1e-12), "gelu_layer_norm")

    vocab = 30522
    input_ids = torch.randint(0, vocab, (BERT_TOKENS,), device=DEVICE)
    position_ids = torch.arange(512, device=DEVICE).repeat(2)
    token_type_ids = torch.randint(0, 2, (BERT_TOKENS,), device=DEVICE)
    tables = [rand(rows, BERT_HIDDEN, dtype=dtype) for rows in (vocab, 512, 2)]  # word, position, type
    ids = (input_ids, position_ids, token_type_ids)
    out = kernels.embeddings(*ids, *tables, weight, bias, 1e-12)
    expected = reference.embeddings(*ids, *f64(*tables, weight, bias), 1e-12)
    assert_matches(out, expected, reference.embeddings(*ids, *tables, weight, bias, 1e-12), "embeddings")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", BERT_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [128, 1024])  # ColBERT's dim (one step), BGE-M3's (walked in steps)
def test_colbert_scale_maxsim(dtype, dim):
    """A 32-token query against 1,000 documents of 50-300 tokens, and one document alone: the same bits."""
    lengths = torch.randint(50, 301, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    query, documents, cu_seqlens = maxsim_inputs(32, dim, dtype, lengths)
    out = kernels.maxsim(query, documents, cu_seqlens)
    expected = reference.maxsim(*f64(query, documents), cu_seqlens)
    assert_matches(out, expected, reference.maxsim(query, documents, cu_seqlens), "maxsim")
    start = sum(lengths[:500])
    alone = kernels.maxsim(query, documents[start:start + lengths[500]].clone(), cu_seqlens_of([lengths[500]]))
    assert torch.equal(alone[0], out[500])
