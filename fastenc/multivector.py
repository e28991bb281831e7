"""Multi-vector (late-interaction) scoring: ``maxsim``, ColBERT's MaxSim of a query against many documents.

A multi-vector model (ColBERT, BGE-M3's ColBERT output) represents a text by one vector per token. A
document's score for a query is the sum over the query's vectors of their best dot product with any of
the document's vectors (Khattab and Zaharia, ColBERT, SIGIR 2020). ``maxsim`` takes the vectors as
tensors and runs ``fastenc.kernels.maxsim`` (Triton; CUDA, or the CPU under the Triton interpreter) on the
documents packed into one tensor, one launch, or its torch twin ``fastenc.reference.maxsim`` (the CPU),
to which a list of documents goes a group of about ``PACK_TOKENS`` tokens at a time, packed while the
group is in cache (packing a whole 1,000-document list first took longer than scoring it). Neither
holds the ``(query tokens, document tokens)`` products of all documents at once, nor a padded copy.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from . import reference
from .errors import InputError
from .model import resolve_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TOKENS = 2**31 - 1  # the packed documents' offsets are int32
PACK_TOKENS = 16384  # on the torch backend, a list of documents is packed and scored this many tokens at a time


def maxsim(
    query: torch.Tensor,
    documents: Sequence[torch.Tensor] | torch.Tensor,
    *,
    lengths: Sequence[int] | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Late-interaction (ColBERT MaxSim) scores of one query's token vectors against each document's:
    ``score[d] = sum over query vectors q of max over d's vectors v of <q, v>``.

    Args:
        query: ``(query_tokens, dim)``, float32, float16 or bfloat16, at least one token.
        documents: one ``(tokens_i, dim)`` tensor per document (a list or tuple; a 3-D tensor is read as
            documents of equal length, every row counting, so padding rows would count as tokens). With
            ``lengths``: one packed ``(total_tokens, dim)`` tensor holding the documents' vectors one after
            another, as a corpus stored flat keeps them; scored in place (copied only when its last dimension
            is strided).
        lengths: with a packed ``documents``, each document's token count (ints or a 1-D integer tensor),
            summing to ``total_tokens``.
        backend: ``None``: ``"triton"`` on CUDA, ``"torch"`` on the CPU. ``"triton"`` on the CPU needs the
            Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), else ``BackendError``.

    Returns:
        ``(documents,)`` float32 scores on the documents' device. A document without tokens scores 0
        (as in PyLate; sentence-transformers' ``util.maxsim`` gives such a document ``-1e9``). An empty
        ``documents`` gives an empty tensor.

    The vectors are used as given: ColBERT's and BGE-M3's come normalised. BGE-M3's own ColBERT score is
    this divided by the query's token count. The query is moved to the documents' device and cast to their
    dtype; products accumulate in float32 on the Triton backend, and the maxima and the sum are float32 on
    both. On the Triton backend a document's score is the same bits alone or among any other documents.
    No gradients are kept.

    Raises ``InputError`` naming the problem (a rank other than 2, an empty query, a dim mismatch,
    documents of mixed dtypes or devices, lengths that do not add up), ``TypeError`` for a query or
    document that is not a tensor.
    """
    _check_vectors("query", query)
    if query.shape[0] == 0:
        raise InputError("query has no tokens: MaxSim needs at least one query vector")
    dim = query.shape[1]
    packed, counts = _pack(documents, lengths, dim)
    device = packed.device if packed is not None else documents[0].device if counts else query.device
    _, ops = resolve_backend(backend, device)
    if not counts:
        return torch.zeros(0, dtype=torch.float32, device=device)
    query = query.to(device=device, dtype=packed.dtype if packed is not None else documents[0].dtype)
    if query.stride(-1) != 1:
        query = query.contiguous()
    with torch.no_grad():
        if packed is not None:
            return ops.maxsim(query, packed, _cu_seqlens(counts, device))
        if ops is not reference:  # the Triton kernel: one packed copy, one launch
            return ops.maxsim(query, torch.cat(list(documents)), _cu_seqlens(counts, device))
        # The twin: a group of documents of about PACK_TOKENS tokens at a time, packed while it is in cache.
        scores, first, tokens = [], 0, 0
        for last, count in enumerate(counts, 1):
            tokens += count
            if tokens >= PACK_TOKENS or last == len(counts):
                group = torch.cat(list(documents[first:last]))
                scores.append(ops.maxsim(query, group, _cu_seqlens(counts[first:last], device)))
                first, tokens = last, 0
        return torch.cat(scores)


def _cu_seqlens(counts: list[int], device: torch.device) -> torch.Tensor:
    cu_seqlens = torch.zeros(len(counts) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0, out=cu_seqlens[1:])
    return cu_seqlens.to(device)


def _check_vectors(name: str, tensor) -> None:
    """A ``(tokens, dim)`` floating-point tensor with ``dim >= 1``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (tokens, dim), got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise InputError(f"{name} must be 2-D (tokens, dim), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in DTYPES:
        raise InputError(f"{name} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    if tensor.shape[1] == 0:
        raise InputError(f"{name} has dim 0: the vectors need at least one dimension")


def _pack(documents, lengths, dim: int) -> tuple[torch.Tensor | None, list[int]]:
    """The documents' token counts, checked, and, unless they are a sequence of tensors (packed later, as the
    backend needs), the documents as one ``(total_tokens, dim)`` tensor with a unit last stride."""
    if lengths is not None:
        if not isinstance(documents, torch.Tensor):
            raise InputError("lengths= describes one packed (total_tokens, dim) tensor of documents, but documents "
                             f"is a {type(documents).__name__}")
        _check_vectors("documents", documents)
        _check_dim("documents", documents, dim)
        counts = _counts(lengths)
        if sum(counts) != documents.shape[0]:
            raise InputError(f"lengths add up to {sum(counts)} tokens, but the packed documents have "
                             f"{documents.shape[0]} rows")
        packed = documents
    elif isinstance(documents, torch.Tensor):
        if documents.dim() == 2:
            raise InputError("documents is one 2-D tensor: pass lengths= to score it as packed documents, or "
                             "[documents] to score it as one document")
        if documents.dim() != 3:
            raise InputError(f"documents must be a sequence of (tokens, dim) tensors or a 3-D tensor, got shape "
                             f"{tuple(documents.shape)}")
        packed = documents.reshape(-1, documents.shape[2])
        _check_vectors("documents", packed)
        _check_dim("documents", packed, dim)
        counts = [documents.shape[1]] * documents.shape[0]
    elif isinstance(documents, Sequence) and not isinstance(documents, (str, bytes)):
        for i, document in enumerate(documents):
            _check_vectors(f"documents[{i}]", document)
            _check_dim(f"documents[{i}]", document, dim)
            if i and (document.dtype, document.device) != (documents[0].dtype, documents[0].device):
                raise InputError(f"documents[{i}] is {document.dtype} on {document.device}, but documents[0] is "
                                 f"{documents[0].dtype} on {documents[0].device}: pass documents of one dtype "
                                 "and device")
        counts = [document.shape[0] for document in documents]
        packed = None
    else:
        raise TypeError(f"documents must be a sequence of (tokens, dim) tensors, got {type(documents).__name__}")
    if sum(counts) > MAX_TOKENS:
        raise InputError(f"documents hold {sum(counts)} tokens: at most {MAX_TOKENS} per call")
    if packed is not None and packed.stride(-1) != 1:
        packed = packed.contiguous()
    return packed, counts


def _check_dim(name: str, tensor: torch.Tensor, dim: int) -> None:
    if tensor.shape[1] != dim:
        raise InputError(f"{name} has dim {tensor.shape[1]}, but the query has dim {dim}")


def _counts(lengths) -> list[int]:
    """``lengths`` as a list of non-negative ints."""
    if isinstance(lengths, torch.Tensor):
        integer = not (lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool)
        if lengths.dim() != 1 or not integer:
            raise InputError(f"lengths must be a 1-D integer tensor, got {lengths.dtype} of shape "
                             f"{tuple(lengths.shape)}")
        counts = lengths.tolist()
    else:
        try:
            counts = [operator.index(c) for c in lengths]
        except TypeError:
            raise InputError(f"lengths must be a sequence of ints or a 1-D integer tensor, got {lengths!r}") from None
    negative = next((i for i, c in enumerate(counts) if c < 0), None)
    if negative is not None:
        raise InputError(f"lengths[{negative}] is {counts[negative]}: a document has at least 0 tokens")
    return counts
