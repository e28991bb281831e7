"""``token-classification``: entities with their words and character offsets, as transformers'
pipeline (its ``gather_pre_entities``, aggregation strategies and stride windows)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .base import Pipeline, _non_negative_int, _texts

AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")


class TokenClassificationPipeline(Pipeline):
    """``p(text, aggregation_strategy="none")``: entities with their words and character offsets."""

    task, head = "token-classification", "token_classification"

    def __call__(self, inputs, *, aggregation_strategy: str = "none", ignore_labels: Sequence[str] | None = None,
                 stride: int | None = None, is_split_into_words: bool = False, delimiter: str | None = None,
                 batch_size: int | None = None):
        strategy = str(aggregation_strategy).lower()
        if strategy not in AGGREGATION_STRATEGIES:
            raise InputError(f"aggregation_strategy {aggregation_strategy!r} is not supported; use one of "
                             f"{', '.join(AGGREGATION_STRATEGIES)}")
        ignore = ["O"] if ignore_labels is None else list(ignore_labels)
        if stride is not None:
            stride = _non_negative_int(stride, "stride")
            if stride >= self.max_length:
                raise InputError(f"stride {stride} must be less than the model's maximum length {self.max_length}")
            if strategy == "none":
                raise InputError('stride splits long texts into windows and merges their entities, which needs an '
                                 'aggregation_strategy other than "none"')
        if is_split_into_words:
            delimiter = " " if delimiter is None else delimiter
            if isinstance(inputs, list) and inputs and all(isinstance(w, str) for w in inputs):
                inputs, single = [inputs], False  # transformers answers one pre-split text with a list of one
            else:
                single = False
            items = list(inputs)
            for index, words in enumerate(items):
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise TypeError(f"inputs[{index}] must be a list of words (is_split_into_words=True)")
            sentences = [delimiter.join(words) for words in items]
        else:
            single = isinstance(inputs, str)
            items = _texts(inputs, allow_empty=False)
            sentences = items
        encodings = self.tokenize(items, truncation=True, stride=stride or 0, is_pretokenized=is_split_into_words,
                                  overflow=stride is not None)
        windows, owners = [], []
        for index, encoding in enumerate(encodings):
            chunks = [encoding, *encoding.overflowing] if stride is not None else [encoding]
            windows += chunks
            owners += [index] * len(chunks)
        logits = self.run(windows, lambda packed, hidden, rows: self.model.heads.token_logits(
            hidden).float().cpu().split(list(packed.lengths)), batch_size)
        entities: list[list] = [[] for _ in items]
        counts = [owners.count(i) for i in range(len(items))]
        for window, owner, window_logits in zip(windows, owners, logits):
            word_starts = None
            if is_split_into_words:
                word_starts, offset = [], 0
                for word in items[owner]:
                    word_starts.append(offset)
                    offset += len(word) + len(delimiter)
            pre = self._gather(sentences[owner], window, window_logits.numpy(), strategy, word_starts)
            grouped = self._aggregate(pre, strategy)
            entities[owner] += [entity for entity in grouped
                                if entity.get("entity") not in ignore and entity.get("entity_group") not in ignore]
        results = [_merge_overlapping(found) if count > 1 else found for found, count in zip(entities, counts)]
        return results[0] if single else results

    def _gather(self, sentence: str, encoding, logits: np.ndarray, strategy: str, word_starts) -> list[dict]:
        """transformers' ``gather_pre_entities``: one entry per non-special token, with scores and offsets."""
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
        prefix = getattr(self.tokenizer.model, "continuing_subword_prefix", None)
        pre = []
        for index, token_scores in enumerate(scores):
            if encoding.special_tokens_mask[index]:
                continue
            token_id = encoding.ids[index]
            word = self.tokenizer.id_to_token(token_id)
            start, end = encoding.offsets[index]
            if word_starts is not None and encoding.word_ids[index] is not None:
                start += word_starts[encoding.word_ids[index]]
                end += word_starts[encoding.word_ids[index]]
            word_ref = sentence[start:end]
            if prefix:
                is_subword = len(word) != len(word_ref)
            else:
                if strategy in ("first", "average", "max"):
                    warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning,
                                  stacklevel=4)
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if token_id == self.info.unk_token_id:
                word, is_subword = word_ref, False
            pre.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": index,
                        "is_subword": is_subword})
        return pre

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for entry in pre:
                best = int(entry["scores"].argmax())
                entities.append({"entity": self.id2label[best], "score": float(entry["scores"][best]),
                                 "index": entry["index"], "word": entry["word"], "start": entry["start"],
                                 "end": entry["end"]})
            if strategy == "none":
                return entities
        else:
            entities = self._aggregate_words(pre, strategy)
        return self._group_entities(entities)

    def _aggregate_words(self, pre: list[dict], strategy: str) -> list[dict]:
        """Tokens of one word get one label (``first``, ``average`` or ``max``)."""
        words, group = [], None
        for entry in pre:
            if group is None:
                group = [entry]
            elif entry["is_subword"]:
                group.append(entry)
            else:
                words.append(self._aggregate_word(group, strategy))
                group = [entry]
        if group is not None:
            words.append(self._aggregate_word(group, strategy))
        return words

    def _aggregate_word(self, group: list[dict], strategy: str) -> dict:
        word = self.convert_tokens_to_string([entry["word"] for entry in group])
        if strategy == "first":
            scores = group[0]["scores"]
        elif strategy == "max":
            scores = max(group, key=lambda entry: entry["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([entry["scores"] for entry in group]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.id2label[best], "score": float(scores[best]), "word": word,
                "start": group[0]["start"], "end": group[-1]["end"]}

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        """Adjacent tokens (words) with the same tag, not opened by a ``B-``, form one entity group."""
        groups, current = [], []
        for entity in entities:
            if current:
                bi, tag = _tag(entity["entity"])
                _, last_tag = _tag(current[-1]["entity"])
                if not (tag == last_tag and bi != "B"):
                    groups.append(self._group(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._group(current))
        return groups

    def _group(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": float(np.nanmean([entity["score"] for entity in entities])),
                "word": self.convert_tokens_to_string([entity["word"] for entity in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}


def _tag(name: str) -> tuple[str, str]:
    if name.startswith("B-"):
        return "B", name[2:]
    if name.startswith("I-"):
        return "I", name[2:]
    return "I", name


def _merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows: of two that overlap, the longer one (then the surer one) stays."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda entity: entity["start"])
    merged, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


