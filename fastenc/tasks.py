"""Output kinds: one object each, computing its output from packed hidden states.

A task object holds the options of one kind of output and turns a batch's last hidden states
``(tokens, hidden)`` (the sequences of ``lengths`` back to back, as ``Model`` returns them) into one
result per sequence, on the CPU. The kinds that look at token ids (BGE-M3's lexical weights leave out
special tokens, a ColBERT model's skiplist leaves out punctuation) take the batch's packed
``input_ids`` too (``needs_ids``). ``Encoder.embed`` and its relatives, the server's model worker and Ray
all compute through these objects, so their results agree by construction: a text's result depends only
on its own tokens, never on what else shares its batch (bitwise on the Triton backend, whose kernels
are batch invariant; every reduction here runs on one sequence's slice).

* ``SentenceEmbedding``: pooled vectors (``embed``, ``/embed``, ``/v1/embeddings``), cut to ``dim``
  coordinates (Matryoshka) and then normalised when asked.
* ``TokenEmbeddings``: each token's vector (``embed_tokens``, ``/embed_all``).
* ``SparseEmbedding``: SPLADE vectors over the vocabulary (``embed_sparse``, ``/embed_sparse``).
* ``SequenceScores``: a sequence classifier's logits (the classification and rerank pipelines,
  ``/predict``, ``/rerank``).
* ``TokenLogitScores``: a causal LM's log-odds of two tokens at the last token (a ``CrossEncoder`` with a
  ``LogitScore`` module, Qwen3-Reranker's "yes" against "no": the rerank pipeline, ``/rerank``).
* ``MultiVectorEmbedding``: per text its normalised token vectors for late interaction (BGE-M3's
  ColBERT vectors, a ColBERT model's; ``embed_multivector``).
* ``LexicalWeights``: BGE-M3's sparse vectors over the vocabulary (``embed_sparse`` on BGE-M3).
* ``MultiEmbedding``: any of dense, sparse and multi-vector outputs from the same hidden states, one
  forward for all three (``embed_multi``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from .errors import FastencError, InputError
from .packing import cu_seqlens_of
from .pooling import POOLING_MODES, Dense, SentenceConfig, SpladeConfig, pool
from .quantize import check_dim


class Task(Protocol):
    """What the model worker and the Python API ask of an output kind."""

    name: ClassVar[str]
    needs_ids: ClassVar[bool]  # compute() needs the batch's packed input_ids

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids: torch.Tensor | None = None):
        """One result per sequence of ``lengths`` from their packed ``(tokens, hidden)`` states (and their
        packed ``(tokens,)`` ``input_ids``, on any device, for the kinds that need them)."""


def _require_ids(task, input_ids: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    if input_ids is None:
        raise ValueError(f"{type(task).__name__}.compute needs the batch's packed input_ids")
    if input_ids.shape != hidden.shape[:1]:
        raise ValueError(f"input_ids hold {input_ids.shape[0]} tokens, the hidden states {hidden.shape[0]}")
    return input_ids.to(hidden.device)


@dataclasses.dataclass(frozen=True)
class SentenceEmbedding:
    """One float32 vector per text: its tokens pooled (``pooling``, leaving out the first ``skip`` tokens, a
    prompt's), through the checkpoint's ``Dense`` modules (``dense``), the first ``dim`` coordinates kept
    (all when None), then L2-normalised when ``normalize``."""

    pooling: str
    normalize: bool
    dim: int | None = None
    skip: int = 0
    dense: tuple[Dense, ...] = ()  # sentence-transformers Dense modules after the pooling

    name: ClassVar[str] = "embed"
    needs_ids: ClassVar[bool] = False

    @classmethod
    def for_checkpoint(cls, sentence: SentenceConfig | None, hidden_size: int, *, pooling: str | None = None,
                       normalize: bool | None = None, dim: int | None = None, skip: int = 0) -> "SentenceEmbedding":
        """The embedding a checkpoint defines (its sentence-transformers pooling, ``Dense`` modules and
        ``Normalize``), with the caller's overrides; ``FastencError`` when the checkpoint's modules make
        vectors fastenc cannot."""
        if sentence is not None and sentence.unsupported_modules:
            raise FastencError(f"embed() cannot reproduce the sentence-transformers modules "
                               f"{', '.join(sentence.unsupported_modules)} of this checkpoint")
        if pooling is None and sentence is not None and sentence.splade is not None:
            raise FastencError("this checkpoint is a sentence-transformers SparseEncoder (SpladePooling): use "
                               "embed_sparse() for its vectors, or pass pooling= to pool its hidden states")
        if pooling is None and sentence is not None and sentence.multivector is not None:
            raise FastencError("this checkpoint is a sentence-transformers MultiVectorEncoder (a ColBERT model): use "
                               "embed_multivector() for its vectors, or pass pooling= to pool its hidden states")
        if pooling is None:
            pooling = (sentence.pooling if sentence else None) or "mean"
        if pooling not in POOLING_MODES:
            raise InputError(f"pooling {pooling!r} is not supported; use one of {', '.join(POOLING_MODES)}")
        if normalize is None:
            normalize = bool(sentence and sentence.normalize)
        dense = sentence.dense if sentence is not None else ()
        width = dense[-1].out_features if dense else hidden_size
        dim = check_dim(dim, width)
        return cls(pooling, bool(normalize), None if dim == width else dim, skip, dense)

    @property
    def width(self) -> int | None:
        """The vectors' width when ``dense`` or ``dim`` set it (None: the hidden size)."""
        return self.dim if self.dim is not None else self.dense[-1].out_features if self.dense else None

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> torch.Tensor:
        """``(len(lengths), dim)`` float32 CPU vectors."""
        if self.dim is None and not self.dense:
            return pool(hidden, lengths, self.pooling, normalize=self.normalize, skip=self.skip).cpu()
        vectors = pool(hidden, lengths, self.pooling, skip=self.skip)
        for layer in self.dense:
            vectors = layer(model, vectors)
        vectors = vectors[:, :self.dim].contiguous()
        if self.normalize:
            for row in vectors:  # as pool() normalizes: one row at a time
                row /= row.norm().clamp_min(1e-12)
        return vectors.cpu()


@dataclasses.dataclass(frozen=True)
class TokenEmbeddings:
    """Per text a float32 CPU ``(n_i, hidden)`` tensor: the last hidden states of its ``n_i`` tokens, special
    tokens and any prompt included (sentence-transformers' ``output_value="token_embeddings"``). Each has
    its own storage, not a view that keeps the batch alive."""

    name: ClassVar[str] = "tokens"
    needs_ids: ClassVar[bool] = False

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> list[torch.Tensor]:
        return [tokens.clone() for tokens in hidden.float().cpu().split(list(lengths))]


@dataclasses.dataclass(frozen=True)
class SparseEmbedding:
    """SPLADE vectors: per text ``(indices, values)``, its active vocabulary entries in increasing order
    (int64) and their float32 values, zeros left out, at most ``top_k`` of them (the largest).

    The masked-LM head's logits, activated and pooled over the text's tokens as the checkpoint's
    ``SpladePooling`` says (``splade``), in one op that never holds the ``(tokens, vocab)`` logits whole.
    """

    top_k: int | None = None
    splade: SpladeConfig = SpladeConfig()

    name: ClassVar[str] = "sparse"
    needs_ids: ClassVar[bool] = False

    @classmethod
    def for_checkpoint(cls, sentence: SentenceConfig | None, top_k: int | None = None) -> "SparseEmbedding":
        """``top_k`` checked (as given, else the checkpoint's ``max_active_dims``, else all) and the
        checkpoint's ``SpladePooling`` (else SparseEncoder's defaults for a plain masked LM: max, relu)."""
        if top_k is None and sentence is not None:
            top_k = sentence.max_active_dims
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k must be a positive int or None, got {top_k!r}")
        return cls(top_k, (sentence.splade if sentence else None) or SpladeConfig())

    def vectors(self, model, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Dense ``(len(lengths), vocab)`` float32 vectors on the model's device, ``top_k`` largest kept."""
        cu_seqlens = cu_seqlens_of(lengths).to(hidden.device)
        vectors = model.heads.sparse_vectors(hidden, cu_seqlens, self.splade.pooling, self.splade.activation)
        if self.top_k is not None and self.top_k < vectors.shape[1]:  # sentence-transformers' select_max_active_dims
            values, cols = vectors.topk(self.top_k, dim=1)
            vectors = torch.zeros_like(vectors).scatter_(1, cols, values)
        return vectors

    def compute(self, model, hidden: torch.Tensor, lengths: list[int],
                input_ids=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        vectors = self.vectors(model, hidden, lengths)
        rows, cols = vectors.nonzero(as_tuple=True)  # row-major: each row's entries in increasing order
        values = vectors[rows, cols].cpu()
        counts = torch.bincount(rows, minlength=len(lengths)).tolist()
        return list(zip(cols.cpu().split(counts), values.split(counts)))


@dataclasses.dataclass(frozen=True)
class SequenceScores:
    """A sequence classifier's float32 CPU logits ``(n, num_labels)``, before any activation."""

    name: ClassVar[str] = "score"
    needs_ids: ClassVar[bool] = False

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> torch.Tensor:
        return model.heads.sequence_logits(hidden, lengths).float().cpu()


@dataclasses.dataclass(frozen=True)
class TokenLogitScores:
    """A causal LM scored as sentence-transformers' ``LogitScore`` scores it: float32 CPU ``(n, 1)``, the
    logit of ``true_token_id`` at each sequence's last token, less that of ``false_token_id`` when given,
    before any activation. Only those one or two rows of the LM head meet only the last tokens
    (``Heads.last_token_logits``)."""

    true_token_id: int
    false_token_id: int | None = None

    name: ClassVar[str] = "score"
    needs_ids: ClassVar[bool] = False

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> torch.Tensor:
        ids = (self.true_token_id,) if self.false_token_id is None else (self.true_token_id, self.false_token_id)
        logits = model.heads.last_token_logits(hidden, lengths, ids)  # (n, 1 or 2) float32
        scores = logits[:, :1] if self.false_token_id is None else logits[:, :1] - logits[:, 1:]
        return scores.cpu()


@dataclasses.dataclass(frozen=True)
class MultiVectorEmbedding:
    """Per text a float32 CPU ``(n_i, dim)`` tensor of L2-normalised token vectors, for late interaction.

    ``projection``: ``"bge_m3"`` (BGE-M3's ``colbert_linear`` on every token) or ``"dense"`` (a ColBERT
    model's token-level ``Dense`` modules, ``dense``; none: the hidden states themselves). Then each text's
    vectors are normalised (when ``normalize``), its first token left out (``skip_first``: BGE-M3 drops
    CLS) and the tokens whose ids are in ``skip_ids`` (a ColBERT model's skiplist) left out, and finally
    cut to ``dim`` coordinates and normalised again (``truncate_dim``). Every reduction runs on one text's
    own slice, so its vectors do not depend on the batch (bitwise on the Triton backend).
    """

    projection: str = "dense"
    dense: tuple[Dense, ...] = ()
    normalize: bool = True
    skip_first: bool = False
    skip_ids: tuple[int, ...] = ()
    dim: int | None = None

    name: ClassVar[str] = "multivector"
    needs_ids: ClassVar[bool] = True

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> list[torch.Tensor]:
        ids = _require_ids(self, input_ids, hidden) if self.skip_ids else None
        if self.projection == "bge_m3":
            vectors = model.heads.colbert_vectors(hidden)  # (T, D)
        else:
            vectors = hidden
            for layer in self.dense:
                vectors = layer(model, vectors)
        vectors = vectors.float()
        skip = torch.tensor(self.skip_ids, dtype=torch.long, device=hidden.device) if self.skip_ids else None
        out, start = [], 0
        for n in lengths:
            rows = vectors[start:start + n]
            if self.normalize:
                rows = F.normalize(rows, dim=-1)
            keep = torch.ones(n, dtype=torch.bool, device=rows.device)
            if self.skip_first:
                keep[:1] = False
            if skip is not None:
                keep &= ~torch.isin(ids[start:start + n], skip)
            rows = rows[keep]
            if self.dim is not None:
                rows = F.normalize(rows[:, :self.dim], dim=-1)
            out.append(rows.cpu().clone())
            start += n
        return out


@dataclasses.dataclass(frozen=True)
class LexicalWeights:
    """BGE-M3's lexical weights: per text ``(indices, values)``, the token ids it holds in increasing order
    (int64) and their float32 weights, as ``SparseEmbedding`` gives them.

    As FlagEmbedding's ``BGEM3FlagModel.encode`` computes them: each token's ``relu(sparse_linear(h))``,
    the largest per token id over the text, leaving out ``special_ids`` (the tokenizer's CLS, EOS, padding
    and unknown tokens) and zero weights; ``top_k`` keeps the largest.
    """

    special_ids: tuple[int, ...] = ()
    top_k: int | None = None

    name: ClassVar[str] = "sparse"
    needs_ids: ClassVar[bool] = True

    def compute(self, model, hidden: torch.Tensor, lengths: list[int],
                input_ids=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = _require_ids(self, input_ids, hidden)
        weights = model.heads.token_weights(hidden)  # (T,) float32
        special = torch.tensor(self.special_ids, dtype=torch.long, device=ids.device)
        counts = torch.tensor(list(lengths), device=ids.device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), counts)  # (T,) text of each
        keep = ~torch.isin(ids, special) & (weights > 0)
        # one key per (text, token id); the largest weight per key: exact in any order, so batch invariant
        keys, where = torch.unique(rows[keep] * model.config.vocab_size + ids[keep], return_inverse=True)  # sorted
        values = torch.zeros(keys.shape[0], dtype=torch.float32, device=ids.device)
        values.scatter_reduce_(0, where, weights[keep], "amax", include_self=False)
        per_text = torch.bincount(keys // model.config.vocab_size, minlength=len(lengths)).tolist()
        out = []
        for cols, vals in zip((keys % model.config.vocab_size).cpu().split(per_text), values.cpu().split(per_text)):
            if self.top_k is not None and self.top_k < cols.shape[0]:
                kept = vals.topk(self.top_k).indices.sort().values
                cols, vals = cols[kept], vals[kept]
            out.append((cols, vals))
        return out


@dataclasses.dataclass(frozen=True)
class MultiEmbedding:
    """Several output kinds from one forward pass: per text a dict with a ``"dense"`` vector
    (``SentenceEmbedding``), ``"sparse"`` ``(indices, values)`` (``LexicalWeights`` or ``SparseEmbedding``)
    and ``"multivector"`` vectors (``MultiVectorEmbedding``), for the kinds that are not None, each the
    very result its own task gives on the same hidden states."""

    dense: SentenceEmbedding | None = None
    sparse: LexicalWeights | SparseEmbedding | None = None
    multivector: MultiVectorEmbedding | None = None

    name: ClassVar[str] = "multi"

    @property
    def needs_ids(self) -> bool:
        return any(task is not None and task.needs_ids for task in self.parts().values())

    def parts(self) -> dict:
        return {"dense": self.dense, "sparse": self.sparse, "multivector": self.multivector}

    def compute(self, model, hidden: torch.Tensor, lengths: list[int], input_ids=None) -> list[dict]:
        results = {key: task.compute(model, hidden, lengths, input_ids)
                   for key, task in self.parts().items() if task is not None}
        return [{key: values[row] for key, values in results.items()} for row in range(len(lengths))]
