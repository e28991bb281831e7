"""``question-answering``: the likeliest answer span of the context.

transformers v5 ships no such pipeline; the rule is the one it had: contexts too long for ``max_seq_len``
tokens are split into windows overlapping by ``doc_stride`` tokens; in each window ``p_start``/``p_end``
are the softmax of the start/end logits over the context tokens only, the answer is the span
``s <= e < s + max_answer_len`` maximising ``p_start[s] * p_end[e]``, and the best window wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from .base import Pipeline, _non_negative_int, _positive_int, _texts

class QuestionAnsweringPipeline(Pipeline):
    """``p(question=..., context=..., max_answer_len=15)``: the likeliest answer span of the context."""

    task, head = "question-answering", "question_answering"

    def __call__(self, inputs=None, *, question: str | Sequence[str] | None = None,
                 context: str | Sequence[str] | None = None, top_k: int = 1, max_answer_len: int = 15,
                 max_seq_len: int | None = None, doc_stride: int | None = None, batch_size: int | None = None):
        pairs, single = self._pairs(inputs, question, context)
        top_k = _positive_int(top_k, "top_k")
        max_answer_len = _positive_int(max_answer_len, "max_answer_len")
        max_seq_len = min(384, self.max_length) if max_seq_len is None else _positive_int(max_seq_len, "max_seq_len")
        if max_seq_len > self.encoder.config.max_length:
            raise InputError(f"max_seq_len {max_seq_len} is over the model's limit of "
                             f"{self.encoder.config.max_length} tokens")
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else _non_negative_int(doc_stride, "doc_stride")
        if doc_stride >= max_seq_len:
            raise InputError(f"doc_stride {doc_stride} must be less than max_seq_len {max_seq_len}")
        encodings = self.tokenize(pairs, truncation=True, max_length=max_seq_len, stride=doc_stride,
                                   strategy="only_second", overflow=True)
        windows, owners = [], []
        for index, encoding in enumerate(encodings):
            chunks = [encoding, *encoding.overflowing]
            windows += chunks
            owners += [index] * len(chunks)

        def compute(packed, hidden, rows):
            start, end = self.model.heads.qa_logits(hidden)
            lengths = list(packed.lengths)
            return list(zip(start.float().cpu().split(lengths), end.float().cpu().split(lengths)))

        logits = self.run(windows, compute, batch_size)
        candidates: list[dict] = [{} for _ in pairs]
        for window, owner, (start_logits, end_logits) in zip(windows, owners, logits):
            for score, start, end in best_spans(window, start_logits, end_logits, max_answer_len, top_k):
                span = (start, end)
                if score > candidates[owner].get(span, -1.0):
                    candidates[owner][span] = score
        results = []
        for (_, text), found in zip(pairs, candidates):
            if not found:
                raise InputError(f"context {text[:40]!r} has no tokens to answer from")
            ranked = sorted(found.items(), key=lambda item: item[1], reverse=True)[:top_k]
            answers = [{"score": score, "start": start, "end": end, "answer": text[start:end]}
                       for (start, end), score in ranked]
            results.append(answers[0] if top_k == 1 else answers)
        return results[0] if single else results

    @staticmethod
    def _pairs(inputs, question, context) -> tuple[list[tuple[str, str]], bool]:
        if inputs is not None:
            if question is not None or context is not None:
                raise InputError("give either inputs (a {'question', 'context'} dict or a list of them) or "
                                 "question= and context=, not both")
            items = [inputs] if isinstance(inputs, dict) else inputs
            if not isinstance(items, Sequence) or isinstance(items, str):
                raise TypeError(f"inputs must be a {{'question', 'context'}} dict or a list of them, "
                                f"got {type(inputs).__name__}")
            for index, item in enumerate(items):
                if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                        and isinstance(item.get("context"), str)):
                    raise TypeError(f"inputs[{index}] must be a dict with str 'question' and 'context'")
            return [(item["question"], item["context"]) for item in items], isinstance(inputs, dict)
        if question is None or context is None:
            raise InputError("question answering needs question= and context=")
        if isinstance(question, str) and isinstance(context, str):
            return [(question, context)], True
        questions = [question] * len(context) if isinstance(question, str) else _texts(question, allow_empty=False)
        contexts = [context] * len(questions) if isinstance(context, str) else _texts(context, allow_empty=False)
        if len(questions) != len(contexts):
            raise InputError(f"{len(questions)} questions but {len(contexts)} contexts")
        return list(zip(questions, contexts)), False


def best_spans(encoding, start_logits: torch.Tensor, end_logits: torch.Tensor, max_answer_len: int,
               top_k: int = 1) -> list[tuple[float, int, int]]:
    """The ``top_k`` best ``(score, start char, end char)`` spans of one window (the rule in API.md)."""
    context = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence == 1]
    if not context:
        return []
    index = torch.tensor(context)
    p_start = start_logits.double()[index].softmax(0)  # over the context tokens only
    p_end = end_logits.double()[index].softmax(0)
    n = len(context)
    scores = p_start[:, None] * p_end[None, :]  # (s, e)
    gap = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # e - s
    scores = scores.masked_fill((gap < 0) | (gap >= max_answer_len), -1.0)
    values, flat = scores.reshape(-1).topk(min(top_k, scores.numel()))
    spans = []
    for value, position in zip(values.tolist(), flat.tolist()):
        if value < 0:
            break
        s, e = divmod(position, n)
        spans.append((value, encoding.offsets[context[s]][0], encoding.offsets[context[e]][1]))
    return spans


