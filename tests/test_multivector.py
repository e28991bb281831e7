"""``fastenc.maxsim``: late-interaction scores of a query against documents, against the plain torch formula
(``einsum`` over padded documents, the padding masked out of the max, the sum over the query), on the CPU's
torch backend and on the Triton backend under the interpreter; its input forms and its errors.
"""

from __future__ import annotations

import pytest
import torch

import fastenc
from fastenc import BackendError, InputError
from fastenc import kernels, multivector

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [5, 0, 70, 1, 33]  # ragged: shorter than the query, empty, past a 64-token block, one token
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def vectors(lengths, dim, dtype=torch.float32, n_query=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = (torch.randn(n_query, dim, generator=generator) * dim**-0.25).to(dtype)
    documents = [(torch.randn(n, dim, generator=generator) * dim**-0.25).to(dtype) for n in lengths]
    return query, documents


def padded_formula(query: torch.Tensor, documents: list[torch.Tensor]) -> torch.Tensor:
    """The plain torch formula: pad, einsum, mask the padding to -inf, max over tokens, sum over the query
    (in float32 or wider); an empty document scores 0."""
    padded = torch.nn.utils.rnn.pad_sequence(documents, batch_first=True)  # (docs, longest, dim)
    lengths = torch.tensor([d.shape[0] for d in documents])
    real = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # (docs, longest)
    scores = torch.einsum("qh,bth->bqt", query, padded)  # (docs, query_tokens, longest)
    scores = scores.masked_fill(~real[:, None, :], float("-inf")).amax(-1)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).sum(-1)
    return scores.masked_fill(lengths == 0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [48, 96, 128])
def test_maxsim_matches_the_padded_formula(dtype, dim):
    query, documents = vectors(LENGTHS, dim, dtype)
    out = fastenc.maxsim(query, documents)
    assert out.shape == (len(LENGTHS),) and out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = padded_formula(query.double(), [d.double() for d in documents])
    torch_err = (padded_formula(query, documents).double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * torch_err + ABS_FLOOR[dtype], f"max error {err:.3g} > 2 x the formula's {torch_err:.3g}"
    assert out[1] == 0


def test_maxsim_on_the_triton_backend():
    """The kernel on the packed documents (under the interpreter without CUDA), close to the torch backend."""
    query, documents = vectors(LENGTHS, 96, torch.float16)
    query, documents = query.to(DEVICE), [d.to(DEVICE) for d in documents]
    out = fastenc.maxsim(query, documents, backend="triton")
    assert out.device == query.device
    cu_seqlens = torch.tensor([0, 5, 5, 75, 76, 109], dtype=torch.int32, device=DEVICE)
    assert torch.equal(out, kernels.maxsim(query, torch.cat(documents), cu_seqlens))
    torch.testing.assert_close(out, fastenc.maxsim(query, documents, backend="torch"), rtol=1e-3, atol=1e-3)


def test_maxsim_input_forms_agree(monkeypatch):
    """A list, a tuple (packed and scored in groups of documents on the torch backend: here groups of 75
    and 34 tokens), a packed tensor with lengths (a list or a tensor), a 3-D tensor of equal-length
    documents."""
    monkeypatch.setattr(multivector, "PACK_TOKENS", 40)
    query, documents = vectors(LENGTHS, 48)
    out = fastenc.maxsim(query, documents)
    assert torch.equal(fastenc.maxsim(query, tuple(documents)), out)
    packed = fastenc.maxsim(query, torch.cat(documents), lengths=LENGTHS)
    assert torch.equal(fastenc.maxsim(query, torch.cat(documents), lengths=torch.tensor(LENGTHS)), packed)
    torch.testing.assert_close(out, packed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, padded_formula(query, documents), rtol=1e-6, atol=1e-6)
    same = [torch.randn(6, 48) for _ in range(3)]
    assert torch.equal(fastenc.maxsim(query, torch.stack(same)), fastenc.maxsim(query, same))
    column_major = torch.randn(48, 20).t()  # made unit-stride before scoring
    assert torch.equal(fastenc.maxsim(query, column_major, lengths=[20]),
                       fastenc.maxsim(query, column_major.contiguous(), lengths=[20]))


def test_maxsim_casts_the_query_and_scores_nothing():
    query, documents = vectors([3, 9], 48, torch.bfloat16)
    assert torch.equal(fastenc.maxsim(query.float(), documents), fastenc.maxsim(query, documents))
    for empty in (fastenc.maxsim(query, []), fastenc.maxsim(query, torch.zeros(0, 48), lengths=[])):
        assert empty.shape == (0,) and empty.dtype == torch.float32


def test_maxsim_keeps_no_gradient():
    query, documents = vectors([3, 9], 48)
    out = fastenc.maxsim(query.requires_grad_(), documents)
    assert not out.requires_grad


def _bad_calls() -> dict:
    """Each case: a call, the error it must raise and a piece of its message."""
    query, documents = vectors([3, 9], 48)
    packed = torch.cat(documents)
    return {
        "query 1-D": (lambda: fastenc.maxsim(query[0], documents), InputError, "query must be 2-D"),
        "query 3-D": (lambda: fastenc.maxsim(query[None], documents), InputError, "query must be 2-D"),
        "query empty": (lambda: fastenc.maxsim(query[:0], documents), InputError, "query has no tokens"),
        "query dim 0": (lambda: fastenc.maxsim(query[:, :0], [d[:, :0] for d in documents]), InputError, "dim 0"),
        "query integer": (lambda: fastenc.maxsim(query.long(), documents), InputError, "query has dtype torch.int64"),
        "query float64": (lambda: fastenc.maxsim(query.double(), documents), InputError, "query has dtype"),
        "query list": (lambda: fastenc.maxsim(query.tolist(), documents), TypeError, "query must be a torch.Tensor"),
        "dim mismatch": (lambda: fastenc.maxsim(query, [documents[0], documents[1][:, :40]]), InputError,
                         "documents[1] has dim 40, but the query has dim 48"),
        "document 1-D": (lambda: fastenc.maxsim(query, [documents[0], documents[1][0]]), InputError,
                         "documents[1] must be 2-D"),
        "document not a tensor": (lambda: fastenc.maxsim(query, [documents[0], "text"]), TypeError, "documents[1]"),
        "mixed dtypes": (lambda: fastenc.maxsim(query, [documents[0], documents[1].half()]), InputError,
                         "documents[1] is torch.float16"),
        "documents a string": (lambda: fastenc.maxsim(query, "text"), TypeError, "documents must be a sequence"),
        "documents 2-D": (lambda: fastenc.maxsim(query, packed), InputError, "pass lengths="),
        "documents 4-D": (lambda: fastenc.maxsim(query, packed[None, None]), InputError, "3-D tensor"),
        "packed dim mismatch": (lambda: fastenc.maxsim(query, packed[:, :40], lengths=[3, 9]), InputError,
                                "documents has dim 40"),
        "lengths with a list": (lambda: fastenc.maxsim(query, documents, lengths=[3, 9]), InputError,
                                "but documents is a list"),
        "lengths sum": (lambda: fastenc.maxsim(query, packed, lengths=[3, 8]), InputError, "add up to 11 tokens"),
        "lengths negative": (lambda: fastenc.maxsim(query, packed, lengths=[13, -1]), InputError, "lengths[1] is -1"),
        "lengths floats": (lambda: fastenc.maxsim(query, packed, lengths=torch.tensor([3.0, 9.0])), InputError,
                           "1-D integer tensor"),
        "lengths not ints": (lambda: fastenc.maxsim(query, packed, lengths=[3.0, 9.0]), InputError,
                             "sequence of ints"),
        "backend unknown": (lambda: fastenc.maxsim(query, documents, backend="cuda"), BackendError, "unknown"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_maxsim_names_the_problem(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_maxsim_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    query, documents = vectors([3, 9], 48)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        fastenc.maxsim(query, documents, backend="triton")
