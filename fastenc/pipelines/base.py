"""What every task pipeline shares: the encoder's tokenization, one batching policy, decoding.

A pipeline tokenizes through the encoder's ``Tokenization`` (offsets, word ids, special tokens and
overflowing windows come from the checkpoint's ``tokenizers.Tokenizer``; transformers' pipelines do not
lower-case as sentence-transformers does, so neither do these), runs the model on token-budget batches
(``embed()``'s policy: longest first, at most ``batch_size`` sequences and ``max_tokens`` real tokens,
never any padding) and its head, and post-processes the way ``transformers`` v5 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import heads as task_heads
from ..encoder import DEFAULT_MAX_TOKENS, Encoder
from ..errors import InputError, LoadError
from ..packing import token_budget_batches
from ..text import missing_tokenizer

_UNSET: Any = object()


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and English contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class Pipeline:
    """The shared machinery: tokenization through the encoder's ``Tokenization``, batched packed forward
    passes, decoding. ``encoder`` must have the task's ``head`` and a tokenizer."""

    task: str
    head: str | None  # None: the task needs no classifier head (late-interaction reranking)

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        if self.head is not None:
            encoder.model.heads.require(self.head)
        if encoder.text is None:
            raise LoadError(f"the {self.task} pipeline needs the checkpoint's tokenizer: "
                            f"{missing_tokenizer(encoder.path)}")
        self.encoder = encoder
        self.model = encoder.model
        self.text = encoder.text
        self.tokenizer = encoder.tokenizer
        self.batch_size = _check_batch_size(batch_size)
        self.info = encoder.text.settings
        self.id2label = task_heads.id2label(encoder.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, encoder={self.encoder!r})"

    # ------------------------------------------------------------------------------------- tokenizing
    @property
    def max_length(self) -> int:
        """The longest sequence the model takes: the tokenizer's limit, never over the model's."""
        return self.text.model_max_length

    def tokenize(self, inputs: list, *, truncation: bool, max_length: int | None = None, stride: int = 0,
                 strategy: str = "longest_first", is_pretokenized: bool = False, overflow: bool = False) -> list:
        """Encodings with special tokens (and, with ``overflow``, their overflowing windows overlapping by
        ``stride`` tokens): cut to ``max_length`` (the tokenizer's limit when None) with ``truncation``, else
        each within the model's."""
        if truncation:
            limit = self.max_length if max_length is None else max_length
        else:
            limit = self.encoder.config.max_length
        return self.text.encode(inputs, max_length=limit, truncate=truncation, stride=stride, strategy=strategy,
                                pretokenized=is_pretokenized, lower_case=False, what="input",
                                overflow=overflow)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """transformers' ``tokenizer.decode``: the tokenizers decode, then its optional clean-up."""
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips the clean-up for BPE models: it would strip real spaces before punctuation
        if self.info.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # ---------------------------------------------------------------------------------------- running
    def run(self, encodings: list, compute, batch_size: int | None = None) -> list:
        """``compute(packed, hidden, rows)`` -> one result per sequence of the batch (``rows``: their input
        indices); returns the results for every encoding, in input order. Batches are ``embed()``'s:
        longest first, at most ``batch_size`` sequences and ``DEFAULT_MAX_TOKENS`` real tokens."""
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        results: list = [None] * len(encodings)
        for rows in token_budget_batches([len(e.ids) for e in encodings], batch_size, DEFAULT_MAX_TOKENS):
            packed = self.text.pack([encodings[i] for i in rows])
            with torch.inference_mode():
                hidden = self.model(packed)  # (tokens, hidden); a CUDA graph replay when one fits
                outputs = compute(packed, hidden, rows)
            for index, output in zip(rows, outputs):
                results[index] = output
        return results


# -------------------------------------------------------------------------------------------- helpers
def _texts(inputs, allow_empty: bool = True) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a str or a list of str, got {type(inputs).__name__}")
    if not inputs and not allow_empty:
        raise InputError("at least one input is required")
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise TypeError(f"inputs[{index}] is {type(text).__name__}, not str")
    return list(inputs)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_batch_size(value) -> int:
    return _positive_int(value, "batch_size")


