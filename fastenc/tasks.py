"""Output kinds: one object each, computing its output from packed hidden states.

A task object holds the options of one kind of output and turns a batch's last hidden states
``(tokens, hidden)`` (the sequences of ``lengths`` back to back, as ``Model`` returns them) into one
result per sequence, on the CPU. ``Encoder.embed`` and its relatives, the server's model worker and Ray
all compute through these objects, so their results agree by construction: a text's result depends only
on its own tokens, never on what else shares its batch (bitwise on the Triton backend, whose kernels
are batch invariant; every reduction here runs on one sequence's slice).

* ``SentenceEmbedding``: pooled vectors (``embed``, ``/embed``, ``/v1/embeddings``), cut to ``dim``
  coordinates (Matryoshka) and then normalised when asked.
* ``TokenEmbeddings``: each token's vector (``embed_tokens``, ``/embed_all``).
* ``SparseEmbedding``: SPLADE vectors over the vocabulary (``embed_sparse``, ``/embed_sparse``).
* ``SequenceScores``: a sequence classifier's logits (the classification and rerank pipelines,
  ``/predict``, ``/rerank``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import torch

from .errors import FastencError, InputError
from .packing import cu_seqlens_of
from .pooling import POOLING_MODES, SentenceConfig, SpladeConfig, pool
from .quantize import check_dim


class Task(Protocol):
    """What the model worker and the Python API ask of an output kind."""

    name: ClassVar[str]

    def compute(self, model, hidden: torch.Tensor, lengths: list[int]):
        """One result per sequence of ``lengths`` from their packed ``(tokens, hidden)`` states."""


@dataclasses.dataclass(frozen=True)
class SentenceEmbedding:
    """One float32 vector per text: its tokens pooled (``pooling``, leaving out the first ``skip`` tokens, a
    prompt's), the first ``dim`` coordinates kept (all when None), then L2-normalised when ``normalize``."""

    pooling: str
    normalize: bool
    dim: int | None = None
    skip: int = 0

    name: ClassVar[str] = "embed"

    @classmethod
    def for_checkpoint(cls, sentence: SentenceConfig | None, hidden_size: int, *, pooling: str | None = None,
                       normalize: bool | None = None, dim: int | None = None, skip: int = 0) -> "SentenceEmbedding":
        """The embedding a checkpoint defines (its sentence-transformers pooling and ``Normalize``), with the
        caller's overrides; ``FastencError`` when the checkpoint's modules make vectors fastenc cannot."""
        if sentence is not None and sentence.unsupported_modules:
            raise FastencError(f"embed() cannot reproduce the sentence-transformers modules "
                               f"{', '.join(sentence.unsupported_modules)} of this checkpoint")
        if pooling is None and sentence is not None and sentence.splade is not None:
            raise FastencError("this checkpoint is a sentence-transformers SparseEncoder (SpladePooling): use "
                               "embed_sparse() for its vectors, or pass pooling= to pool its hidden states")
        if pooling is None:
            pooling = (sentence.pooling if sentence else None) or "mean"
        if pooling not in POOLING_MODES:
            raise InputError(f"pooling {pooling!r} is not supported; use one of {', '.join(POOLING_MODES)}")
        if normalize is None:
            normalize = bool(sentence and sentence.normalize)
        dim = check_dim(dim, hidden_size)
        return cls(pooling, bool(normalize), None if dim == hidden_size else dim, skip)

    def compute(self, model, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``(len(lengths), dim)`` float32 CPU vectors."""
        if self.dim is None:
            return pool(hidden, lengths, self.pooling, normalize=self.normalize, skip=self.skip).cpu()
        vectors = pool(hidden, lengths, self.pooling, skip=self.skip)[:, :self.dim].contiguous()
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

    def compute(self, model, hidden: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
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

    def compute(self, model, hidden: torch.Tensor, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        vectors = self.vectors(model, hidden, lengths)
        rows, cols = vectors.nonzero(as_tuple=True)  # row-major: each row's entries in increasing order
        values = vectors[rows, cols].cpu()
        counts = torch.bincount(rows, minlength=len(lengths)).tolist()
        return list(zip(cols.cpu().split(counts), values.split(counts)))


@dataclasses.dataclass(frozen=True)
class SequenceScores:
    """A sequence classifier's float32 CPU logits ``(n, num_labels)``, before any activation."""

    name: ClassVar[str] = "score"

    def compute(self, model, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return model.heads.sequence_logits(hidden, lengths).float().cpu()
