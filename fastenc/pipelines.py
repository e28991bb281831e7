"""Task pipelines: ``fastenc.pipeline(task, model)``, with the outputs of ``transformers.pipeline``.

Each pipeline tokenizes with the checkpoint's ``tokenizers.Tokenizer`` (offsets, word ids and special
tokens come from it), runs the encoder on packed batches of ``batch_size`` texts (longest first, so a
batch's attention is padded as little as possible) and its head, and post-processes the way
``transformers`` v5 does (``pipelines/fill_mask.py``, ``text_classification.py``,
``token_classification.py``): same keys in the same order, same words, offsets and labels; scores are
Python floats.

Reranking (``"rerank"``) scores ``(query, text)`` pairs with a cross-encoder (a one-label sequence
classifier) and orders them as sentence-transformers' ``CrossEncoder.rank`` does (see
``RerankPipeline``).

Question answering follows the rule in ``API.md`` (transformers v5 ships no such pipeline): contexts
too long for ``max_seq_len`` tokens are split into windows overlapping by ``doc_stride`` tokens; in each
window ``p_start``/``p_end`` are the softmax of the start/end logits over the context tokens only, the
answer is the span ``s <= e < s + max_answer_len`` maximising ``p_start[s] * p_end[e]``, and the best
window wins.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import heads as task_heads
from .encoder import Encoder
from .errors import InputError, LoadError
from .tokenize import check_unicode

TASKS = ("fill-mask", "text-classification", "token-classification", "question-answering", "rerank")
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
CLASSIFICATION_FUNCTIONS = ("softmax", "sigmoid", "none")
_VERY_LARGE = int(1e30)  # transformers' model_max_length when tokenizer_config.json gives none
_TOKEN_TYPE_FAMILIES = ("bert", "electra", "albert", "nomic_bert")  # the others' tokenizers send no token_type_ids
_UNSET: Any = object()


def pipeline(task: str, model: str | Encoder | None = None, *, batch_size: int = 32, **load_kwargs) -> "Pipeline":
    """A callable for ``task`` on ``model`` (a checkpoint directory or an ``Encoder``).

    ``load_kwargs`` (``device``, ``dtype``, ``backend``) go to ``Encoder.from_pretrained``. A checkpoint
    without the task's head raises ``LoadError`` naming the missing tensors.
    """
    name = TASK_ALIASES.get(task, task)
    if name not in _PIPELINES:
        raise InputError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    if isinstance(model, Encoder):
        if load_kwargs:
            raise InputError(f"{', '.join(load_kwargs)}: loading options apply to a path, not to an Encoder")
        encoder = model
    else:
        encoder = Encoder.from_pretrained(model, **load_kwargs)
    return _PIPELINES[name](encoder, batch_size=batch_size)


class _Row(NamedTuple):
    """What ``Encoder._pack_encodings`` reads of an encoding."""

    ids: list[int]
    type_ids: list[int]


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What transformers' tokenizer object knows beyond ``tokenizers.Tokenizer``: ``tokenizer_config.json``."""

    mask_token: str | None
    mask_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    model_max_length: int
    clean_up_tokenization_spaces: bool

    @classmethod
    def from_encoder(cls, encoder: Encoder) -> "TokenizerInfo":
        tokenizer = encoder.tokenizer
        settings = {}
        if encoder.path is not None and (encoder.path / "tokenizer_config.json").is_file():
            try:
                settings = json.loads((encoder.path / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LoadError(f"{encoder.path / 'tokenizer_config.json'}: cannot be read as JSON ({exc})") from None
            settings = settings if isinstance(settings, dict) else {}

        def token(name: str, defaults: tuple[str, ...]) -> str | None:
            value = settings.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            candidates = (value,) if value else defaults
            return next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)

        def token_id(name, defaults):
            found = token(name, defaults)
            return None if found is None else tokenizer.token_to_id(found)

        mask = token("mask_token", ("[MASK]", "<mask>"))
        max_length = settings.get("model_max_length")
        usable = isinstance(max_length, (int, float)) and not isinstance(max_length, bool) and max_length > 0
        return cls(
            mask_token=mask,
            mask_token_id=None if mask is None else tokenizer.token_to_id(mask),
            pad_token_id=token_id("pad_token", ("[PAD]", "<pad>")),
            unk_token_id=token_id("unk_token", ("[UNK]", "<unk>")),
            model_max_length=int(min(max_length, _VERY_LARGE)) if usable else _VERY_LARGE,
            clean_up_tokenization_spaces=bool(settings.get("clean_up_tokenization_spaces", False)),
        )


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and English contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class Pipeline:
    """The shared machinery: tokenizer checks, batched packed forward passes, decoding."""

    task: str
    head: str

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        task_heads.require(encoder, self.head)
        if encoder.tokenizer is None:
            raise LoadError(f"{encoder.path or 'this encoder'}: the {self.task} pipeline needs the checkpoint's "
                            "tokenizer files (tokenizer.json, vocab.txt or vocab.json + merges.txt)")
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.batch_size = _check_batch_size(batch_size)
        self.info = TokenizerInfo.from_encoder(encoder)
        self.id2label = task_heads.id2label(encoder.config)
        self._token_types = encoder.config.model_type in _TOKEN_TYPE_FAMILIES

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, encoder={self.encoder!r})"

    # ------------------------------------------------------------------------------------- tokenizing
    @property
    def max_length(self) -> int:
        """The longest sequence the model takes: the tokenizer's limit, never over the model's."""
        return min(self.info.model_max_length, self.encoder.config.max_length)

    def _tokenize(self, inputs: list, *, truncation: bool, max_length: int | None = None, stride: int = 0,
                  strategy: str = "longest_first", is_pretokenized: bool = False) -> list:
        """Encodings with special tokens (and their overflowing windows when ``stride`` is used)."""
        tokenizer, limit = self.tokenizer, self.encoder.config.max_length
        max_length = self.max_length if max_length is None else max_length
        try:
            if truncation:
                tokenizer.enable_truncation(max_length, stride=stride, strategy=strategy)
            else:
                tokenizer.no_truncation()
            encodings = tokenizer.encode_batch(inputs, is_pretokenized=is_pretokenized, add_special_tokens=True)
        except Exception as exc:  # tokenizers raises bare Exceptions (e.g. a question too long to truncate)
            check_unicode(inputs, "input")  # a lone surrogate: name the input and the character
            raise InputError(f"cannot tokenize the input: {exc}") from None
        finally:
            tokenizer.no_truncation()
        vocab_size = self.encoder.config.vocab_size
        for index, encoding in enumerate(encodings):
            for window in [encoding, *encoding.overflowing]:
                if len(window.ids) > limit:
                    raise InputError(f"input {index} has {len(window.ids)} tokens, over the model's limit of "
                                     f"{limit} (truncation is off)")
                if window.ids and max(window.ids) >= vocab_size:
                    raise InputError(f"input {index}: the tokenizer produced id {max(window.ids)}, outside the "
                                     f"model's vocab_size {vocab_size}")
        return encodings

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
    def _run(self, encodings: list, compute, batch_size: int | None = None) -> list:
        """``compute(packed, hidden, rows)`` -> one result per sequence of the batch (``rows``: their input
        indices); returns the results for every encoding, in input order."""
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids), reverse=True)
        results: list = [None] * len(encodings)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            packed = self.encoder._pack_encodings([self._row(encodings[i]) for i in rows])
            with torch.inference_mode():
                hidden = self.encoder._run(packed)  # (tokens, hidden); a CUDA graph replay when one fits
                outputs = compute(packed, hidden, rows)
            for index, output in zip(rows, outputs):
                results[index] = output
        return results

    def _row(self, encoding) -> _Row:
        types = encoding.type_ids if self._token_types else [0] * len(encoding.ids)
        return _Row(encoding.ids, types)


# -------------------------------------------------------------------------------------------- fill-mask
class FillMaskPipeline(Pipeline):
    """``p(text, top_k=5, targets=None)``: the likeliest tokens at each mask token."""

    task, head = "fill-mask", "mlm"

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        super().__init__(encoder, batch_size=batch_size)
        if self.info.mask_token_id is None:
            raise LoadError(f"{encoder.path or 'this encoder'}: the tokenizer has no mask token")

    def __call__(self, inputs: str | Sequence[str], *, top_k: int = 5, targets: str | Sequence[str] | None = None,
                 batch_size: int | None = None):
        texts = _texts(inputs)
        top_k = _positive_int(top_k, "top_k")
        target_ids = None if targets is None else self._target_ids(targets)
        encodings = self._tokenize(texts, truncation=False)
        mask_id = self.info.mask_token_id
        positions = [[j for j, token in enumerate(e.ids) if token == mask_id] for e in encodings]
        for index, found in enumerate(positions):
            if not found:
                raise InputError(f"text {index} has no mask token {self.info.mask_token!r}")

        def compute(packed, hidden, rows):
            starts = np.cumsum([0, *packed.lengths[:-1]])
            found = [positions[row] for row in rows]
            index = torch.tensor([int(start) + p for start, masks in zip(starts, found) for p in masks])
            probs = task_heads.mlm_logits(self.encoder, hidden, index).float().softmax(-1).cpu()  # (masks, vocab)
            return probs.split([len(masks) for masks in found])

        probs = self._run(encodings, compute, batch_size)
        results = [self._postprocess(e.ids, found, p, top_k, target_ids)
                   for e, found, p in zip(encodings, positions, probs)]
        if isinstance(inputs, str) or (isinstance(inputs, list) and len(inputs) == 1):
            return results[0]
        return results

    def _postprocess(self, ids, positions, probs, top_k, target_ids):
        if target_ids is not None:
            probs = probs[:, target_ids]
        values, predictions = probs.topk(min(top_k, probs.shape[-1]))
        single_mask = len(positions) == 1
        result = []
        for position, row_values, row_predictions in zip(positions, values.tolist(), predictions.tolist()):
            row = []
            for value, prediction in zip(row_values, row_predictions):
                if target_ids is not None:
                    prediction = target_ids[prediction]
                tokens = list(ids)
                tokens[position] = prediction
                tokens = [t for t in tokens if t != self.info.pad_token_id]
                # transformers keeps the special tokens when there are several masks, so the others show
                sequence = self.decode(tokens, skip_special_tokens=single_mask)
                row.append({"score": value, "token": prediction, "token_str": self.decode([prediction]),
                            "sequence": sequence})
            result.append(row)
        return result[0] if single_mask else result

    def _target_ids(self, targets) -> list[int]:
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        ids = []
        for target in targets:
            if not isinstance(target, str):
                raise TypeError(f"targets must be str or a list of str, got {type(target).__name__}")
            token = vocab.get(target)
            if token is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False).ids
                if not pieces:
                    warnings.warn(f"target {target!r} is not in the vocabulary and tokenizes to nothing; ignoring it",
                                  stacklevel=3)
                    continue
                token = pieces[0]
                warnings.warn(f"target {target!r} is not in the vocabulary; using its first token "
                              f"{self.tokenizer.id_to_token(token)!r}", stacklevel=3)
            ids.append(token)
        if not ids:
            raise InputError("targets: at least one target must be given")
        return sorted(set(ids))


# ---------------------------------------------------------------------------------- text classification
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
        encodings = self._tokenize(texts, truncation=truncation, max_length=max_length)
        logits = self._run(encodings, lambda packed, hidden, rows: task_heads.sequence_logits(
            self.encoder, hidden, packed.lengths).float().cpu(), batch_size)
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


# --------------------------------------------------------------------------------- token classification
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
        encodings = self._tokenize(items, truncation=True, stride=stride or 0, is_pretokenized=is_split_into_words)
        windows, owners = [], []
        for index, encoding in enumerate(encodings):
            chunks = [encoding, *encoding.overflowing] if stride is not None else [encoding]
            windows += chunks
            owners += [index] * len(chunks)
        logits = self._run(windows, lambda packed, hidden, rows: task_heads.token_logits(
            self.encoder, hidden).float().cpu().split(list(packed.lengths)), batch_size)
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


# ---------------------------------------------------------------------------------- question answering
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
        encodings = self._tokenize(pairs, truncation=True, max_length=max_seq_len, stride=doc_stride,
                                   strategy="only_second")
        windows, owners = [], []
        for index, encoding in enumerate(encodings):
            chunks = [encoding, *encoding.overflowing]
            windows += chunks
            owners += [index] * len(chunks)

        def compute(packed, hidden, rows):
            start, end = task_heads.qa_logits(self.encoder, hidden)
            lengths = list(packed.lengths)
            return list(zip(start.float().cpu().split(lengths), end.float().cpu().split(lengths)))

        logits = self._run(windows, compute, batch_size)
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


# ------------------------------------------------------------------------------------------------ rerank
# A CrossEncoder's activation_fn (the dotted path sentence-transformers saves) -> the score function.
SCORE_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid, "torch.nn.Sigmoid": torch.sigmoid,
    "torch.nn.modules.linear.Identity": lambda x: x, "torch.nn.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": torch.tanh, "torch.nn.Tanh": torch.tanh,
}


class RerankPipeline(Pipeline):
    """``p(query, texts, top_k=None, return_text=False)``: ``[{"index", "score"(, "text")}]``, best first.

    As sentence-transformers' ``CrossEncoder.rank``: each ``(query, text)`` pair is tokenized as a pair
    (truncated longest first to the model's length), scored by the one-label classifier and its
    activation (``activation_fn`` from ``config_sentence_transformers.json`` or ``config.json``'s
    ``sentence_transformers``; sigmoid by default), then sorted by score, highest first, ties in input
    order; ``top_k`` keeps the first ones. The pairs run through the encoder packed, without padding.
    """

    task, head = "rerank", "sequence_classification"

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        super().__init__(encoder, batch_size=batch_size)
        labels = task_heads.num_labels(encoder.config)
        if labels != 1:
            raise LoadError(f"{encoder.path or 'this encoder'}: reranking needs a cross-encoder with one label "
                            f"(a relevance score); this classifier has {labels}")
        self.activation = self._activation()
        limit = encoder._sentence.max_seq_length if encoder._sentence else None
        self.pair_length = min(limit, self.max_length) if limit else self.max_length

    def _activation(self):
        """The score function, found where ``CrossEncoder`` looks for it, in the same order."""
        sentence, raw = self.encoder._sentence, self.encoder.config.raw
        settings = raw.get("sentence_transformers")
        for path in (sentence.activation_fn if sentence else None,
                     settings.get("activation_fn") if isinstance(settings, dict) else None,
                     raw.get("sbert_ce_default_activation_function")):
            if not isinstance(path, str):
                continue
            if not path.startswith("torch."):  # CrossEncoder loads only torch's without trust_remote_code
                warnings.warn(f"activation_fn {path!r} is not a torch module; scoring with the default sigmoid, "
                              "as sentence-transformers does without trust_remote_code", stacklevel=4)
                break
            if path not in SCORE_ACTIVATIONS:
                raise LoadError(f"{self.encoder.path or 'this encoder'}: the cross-encoder's activation_fn {path!r} "
                                f"is not supported; fastenc supports {', '.join(SCORE_ACTIVATIONS)}")
            return SCORE_ACTIVATIONS[path]
        return torch.sigmoid

    def __call__(self, query: str, texts: Sequence[str], *, top_k: int | None = None, return_text: bool = False,
                 raw_scores: bool = False, truncation: bool = True, batch_size: int | None = None) -> list[dict]:
        """``raw_scores``: the logits, without the activation (text-embeddings-inference's ``raw_scores``);
        ``truncation=False``: a pair over the model's length is an ``InputError`` instead of being cut."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str (the documents to rank), not one str")
        texts = _texts(texts)
        if top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        logits = self._run(self.pairs(query, texts, truncation=truncation), self.logits, batch_size)
        return self.rank(self.scores(logits, raw_scores), texts, top_k=top_k, return_text=return_text)

    # The steps of a call, each also run by ``fastenc serve``'s ``/rerank`` (which batches the pairs of
    # many requests in its model worker between the first step and the second).
    def pairs(self, query: str, texts: list[str], *, truncation: bool = True) -> list:
        """The encodings of the ``(query, text)`` pairs: tokenized as pairs, truncated longest first to the
        cross-encoder's length (``max_seq_length``, else the model's), or an ``InputError`` when
        ``truncation=False`` and a pair is over the model's limit."""
        return self._tokenize([(query, text) for text in texts], truncation=truncation, max_length=self.pair_length)

    def logits(self, packed, hidden: torch.Tensor, rows=None) -> torch.Tensor:
        """The classifier's float32 CPU logits ``(n, 1)`` of packed pairs' hidden states ``(tokens, hidden)``."""
        return task_heads.sequence_logits(self.encoder, hidden, packed.lengths).float().cpu()

    def scores(self, logits: Sequence[torch.Tensor], raw_scores: bool = False) -> list[float]:
        """One score per pair from its float32 logits (a ``(1,)`` tensor per pair, in input order): the
        checkpoint's activation, as CrossEncoder applies it, or the logits themselves with ``raw_scores``."""
        if not len(logits):
            return []
        logits = torch.cat([row.reshape(-1) for row in logits])  # (n,) float32, as CrossEncoder scores them
        return (logits if raw_scores else self.activation(logits)).tolist()

    @staticmethod
    def rank(scores: list[float], texts: list[str], *, top_k: int | None = None,
             return_text: bool = False) -> list[dict]:
        """``[{"index", "score"(, "text")}]`` sorted by score, highest first, ties in input order (a stable
        sort, as ``CrossEncoder.rank``); the first ``top_k``."""
        results = [{"index": index, "score": score} for index, score in enumerate(scores)]
        if return_text:
            for result, text in zip(results, texts):
                result["text"] = text
        results.sort(key=lambda result: result["score"], reverse=True)  # stable: ties keep the input order
        return results[:top_k]


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


_PIPELINES = {
    "fill-mask": FillMaskPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "rerank": RerankPipeline,
}
