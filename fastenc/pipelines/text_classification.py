"""``text-classification``: labels and scores per text or text pair, as transformers' pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import heads as task_heads
from ..errors import InputError
from ..tasks import SequenceScores
from .base import _UNSET, Pipeline, _positive_int

CLASSIFICATION_FUNCTIONS = ("softmax", "sigmoid", "none")


class TextClassificationPipeline(Pipeline):
    """``p(text_or_list, top_k=1, function_to_apply=None)``: labels and scores for each text (or text pair)."""

    task, head = "text-classification", "sequence_classification"

    def __call__(self, inputs, *, top_k=_UNSET, function_to_apply: str | None = None, truncation: bool = False,
                 max_length: int | None = None, batch_size: int | None = None):
        legacy = top_k is _UNSET  # transformers' legacy output: one dict per text when top_k is not given
        if not legacy and top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        function = self._function(function_to_apply)
        items = [inputs] if isinstance(inputs, (str, dict)) else inputs
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise TypeError(f"inputs must be a str, a {{'text', 'text_pair'}} dict or a list of them, "
                            f"got {type(inputs).__name__}")
        texts = [self._text(item, index) for index, item in enumerate(items)]
        encodings = self.tokenize(texts, truncation=truncation, max_length=max_length)
        logits = self.run(encodings, lambda packed, hidden, rows: SequenceScores().compute(
            self.model, hidden, list(packed.lengths)), batch_size)
        results = [self._postprocess(row, function, top_k, legacy) for row in logits]
        if isinstance(inputs, str):
            return [results[0]] if legacy else results[0]
        if isinstance(inputs, dict):
            return results[0]
        return results

    @staticmethod
    def _text(item, index: int):
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            pair = item.get("text_pair")
            if pair is None:
                return item["text"]
            if isinstance(pair, str):
                return (item["text"], pair)
        raise TypeError(f"inputs[{index}] must be a str or a {{'text': str, 'text_pair': str}} dict, "
                        f"got {type(item).__name__}")

    def _function(self, name: str | None) -> str:
        """The score function: as asked, else as transformers decides from the config."""
        if name is not None and str(name).lower() != "default":
            if str(name).lower() not in CLASSIFICATION_FUNCTIONS:
                raise InputError(f"function_to_apply {name!r} is not supported; use one of "
                                 f"{', '.join(CLASSIFICATION_FUNCTIONS)}")
            return str(name).lower()
        raw, labels = self.encoder.config.raw, task_heads.num_labels(self.encoder.config)
        problem = raw.get("problem_type")
        if problem == "regression":
            return "none"
        if problem == "multi_label_classification" or labels == 1:
            return "sigmoid"
        if problem == "single_label_classification" or labels > 1:
            return "softmax"
        return str(raw.get("function_to_apply", "none")).lower()

    def _postprocess(self, logits: torch.Tensor, function: str, top_k, legacy: bool):
        outputs = logits.numpy()  # float32, as transformers scores them
        if function == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-outputs))
        elif function == "softmax":
            shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
        else:
            scores = outputs
        if legacy:
            return {"label": self.id2label[int(scores.argmax())], "score": float(scores.max())}
        ranked = sorted(({"label": self.id2label[i], "score": float(s)} for i, s in enumerate(scores)),
                        key=lambda entry: entry["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]


