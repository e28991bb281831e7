"""``zero-shot-classification``: candidate labels scored by an NLI classifier, as transformers' pipeline.

Each text is the premise of one ``(text, hypothesis_template.format(label))`` pair per candidate label
(tokenized as a pair, the text cut first when too long: transformers' ``only_first``); the classifier's
*entailment* logit says how well the label fits. Without ``multi_label`` the entailment logits of a
text's labels go through one softmax (scores summing to 1); with it (or with a single label) each label
gets the softmax of its entailment against its contradiction logit. The entailment column is the first
``label2id`` entry whose name starts with "entail" (case-insensitive), as transformers finds it.

Every pair of a call, of every text, runs through the encoder in the pipelines' packed batches
(longest first, up to ``batch_size`` pairs and the token budget), not one pair at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from .. import heads as task_heads
from ..encoder import Encoder
from ..errors import InputError
from ..tasks import SequenceScores
from .base import Pipeline, _texts

DEFAULT_TEMPLATE = "This example is {}."


def entailment_id(config) -> int:
    """The entailment column: the first ``label2id`` name starting with "entail", else -1 (transformers'
    fallback, which reads the last column)."""
    label2id = config.raw.get("label2id")
    if not isinstance(label2id, dict) or not label2id:
        label2id = {name: index for index, name in task_heads.id2label(config).items()}
    for label, index in label2id.items():
        if str(label).lower().startswith("entail"):
            return int(index)
    return -1


def parse_labels(candidate_labels) -> list[str]:
    """Labels as transformers takes them: a list of str, or one str of comma-separated labels."""
    if isinstance(candidate_labels, str):
        return [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if not isinstance(candidate_labels, Sequence):
        raise TypeError(f"candidate_labels must be a str or a list of str, got {type(candidate_labels).__name__}")
    for index, label in enumerate(candidate_labels):
        if not isinstance(label, str):
            raise TypeError(f"candidate_labels[{index}] is {type(label).__name__}, not str")
    return list(candidate_labels)


class ZeroShotClassificationPipeline(Pipeline):
    """``p(text_or_list, candidate_labels, hypothesis_template="This example is {}.", multi_label=False)``:
    ``{"sequence", "labels", "scores"}`` per text, labels best first (see the module docstring)."""

    task, head = "zero-shot-classification", "sequence_classification"

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        super().__init__(encoder, batch_size=batch_size)
        self.entailment_id = entailment_id(encoder.config)
        if self.entailment_id == -1:
            warnings.warn("Failed to determine 'entailment' label id from the label2id mapping in the model config; "
                          "using -1 (the last label), as transformers does. Name the entailment label in label2id "
                          "for meaningful scores.", stacklevel=3)

    def __call__(self, sequences, candidate_labels=None, hypothesis_template: str = DEFAULT_TEMPLATE, *,
                 multi_label: bool = False, batch_size: int | None = None):
        single = isinstance(sequences, str)
        labels = parse_labels([] if candidate_labels is None else candidate_labels)
        texts = _texts(sequences)
        if not labels or not texts:
            raise InputError("You must include at least one label and at least one sequence.")
        if "" in texts:  # transformers refuses an empty premise the same way
            raise InputError(f"text {texts.index('')} is empty: zero-shot classification needs a sequence to classify")
        if not isinstance(hypothesis_template, str) or hypothesis_template.format(labels[0]) == hypothesis_template:
            raise InputError(f"The provided hypothesis_template {hypothesis_template!r} was not able to be formatted "
                             "with the target labels: it needs a {} where the label goes.")
        hypotheses = [hypothesis_template.format(label) for label in labels]
        pairs = [(text, hypothesis) for text in texts for hypothesis in hypotheses]
        logits = self.run(self._encode(pairs), lambda packed, hidden, rows: SequenceScores().compute(
            self.model, hidden, list(packed.lengths)), batch_size)
        results = []
        for index, text in enumerate(texts):
            rows = np.stack([row.numpy() for row in logits[index * len(labels):(index + 1) * len(labels)]])
            results.append(self._postprocess(text, labels, rows, multi_label))
        return results[0] if single else results

    def _encode(self, pairs: list[tuple[str, str]]) -> list:
        """The pairs' encodings, the text cut first to the model's length; a pair whose hypothesis alone is too
        long to cut that way is left whole, as transformers does (and then fails if over the model's limit)."""
        try:
            return self.tokenize(pairs, truncation=True, strategy="only_first")
        except InputError:
            pass
        encodings = []
        for pair in pairs:
            try:
                encodings += self.tokenize([pair], truncation=True, strategy="only_first")
            except InputError:
                encodings += self.tokenize([pair], truncation=False)
        return encodings

    def _postprocess(self, text: str, labels: list[str], logits: np.ndarray, multi_label: bool) -> dict:
        """transformers' ``postprocess`` on one text's ``(labels, classes)`` float32 logits, operation for operation."""
        if multi_label or len(labels) == 1:
            entail = self.entailment_id
            contradiction = -1 if entail == 0 else 0
            pairs = logits[..., [contradiction, entail]]
            scores = (np.exp(pairs) / np.exp(pairs).sum(-1, keepdims=True))[..., 1]
        else:
            entailment = logits[..., self.entailment_id]
            scores = np.exp(entailment) / np.exp(entailment).sum(-1, keepdims=True)
        order = list(reversed(scores.argsort()))
        return {"sequence": text, "labels": [labels[i] for i in order], "scores": scores[order].tolist()}
