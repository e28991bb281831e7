"""Text, once: a checkpoint's tokenizer, and everything between texts and the token ids the model takes.

``load_tokenizer`` reads the tokenizer files: ``tokenizer.json`` as is; without it a WordPiece tokenizer
from ``vocab.txt`` (BERT-style normalisation, ``[CLS] … [SEP]``) or a byte-level BPE from ``vocab.json``
+ ``merges.txt`` (RoBERTa-style, ``<s> … </s>``), with ``tokenizer_config.json``'s casing and special tokens.
A SentencePiece model alone (DeBERTa-v3's ``spm.model``, XLM-R's ``sentencepiece.bpe.model``) is not read:
``missing_tokenizer`` says, in one line, how to write its ``tokenizer.json``.

``Tokenization`` is the one component every caller goes through (``embed`` and its relatives, the
pipelines, the server, Ray): it owns the tokenizer and the lock that guards its truncation setting
(``tokenizers.Tokenizer`` keeps truncation as state on the object, so two threads that flip it race),
the length limits, the sentence-transformers lower-casing and prompts, text pairs and overflowing
windows, the vocabulary check, ColBERT's query expansion (``expand``: a query padded with mask tokens)
and token lookups (a skiplist's ids, the special tokens), and packing encodings into a host ``PackedBatch``.

A text is never tokenized further than its result needs: when it will be truncated (or refused for its
length) and its overflowing windows are not asked for, a long text is cut to a prefix before it is
tokenized, so a 2 MB text costs what its first few thousand characters cost. The cut is safe by
construction, not by a characters-per-token guess: the prefix is tokenized, and it is kept only if the
tokens the result needs all come from words before its last two (pre-tokenizer words: a cut can change
only the word it falls in, and the normaliser's and pre-tokenizer's look-around at the cut is a
character or two); else a prefix four times longer is tried, up to the whole text. So the encoding is
the one of the whole text (ids, offsets, type ids, masks), bit for bit.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .chat import ChatTemplate, Prompted
from .config import EncoderConfig
from .errors import InputError, LoadError
from .packing import PackedBatch, pack_sequences, token_budget_batches
from .pooling import QueryExpansion, SentenceConfig

_VERY_LARGE = int(1e30)  # transformers' model_max_length when tokenizer_config.json gives none
# The families whose transformers tokenizers send token_type_ids; the others' models see type 0 everywhere
# (RoBERTa's pair encodings carry type 1, which its one-row type table does not have).
TOKEN_TYPE_FAMILIES = ("bert", "electra", "albert", "nomic_bert", "deberta-v2")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: cannot be read as JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token(settings: dict, name: str, default: str) -> str:
    """A special token from tokenizer_config.json (a string or an AddedToken-style dict)."""
    value = settings.get(name) or default
    return value.get("content", default) if isinstance(value, dict) else str(value)


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer files."""
    settings = _read_json(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise LoadError(f"{directory / 'tokenizer.json'}: cannot be loaded ({exc})") from None
    elif (directory / "vocab.txt").is_file():
        tokenizer = _wordpiece(directory / "vocab.txt", settings)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = _byte_level_bpe(directory / "vocab.json", directory / "merges.txt", settings)
    else:
        return None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


SENTENCEPIECE_FILES = ("spm.model", "sentencepiece.bpe.model", "tokenizer.model")


def missing_tokenizer(directory: Path | None) -> str:
    """Why a checkpoint has no tokenizer fastenc can use, in one line that says what to do."""
    where = directory if directory is not None else "this encoder"
    found = [name for name in SENTENCEPIECE_FILES if directory is not None and (Path(directory) / name).is_file()]
    if found:
        return (f"{where}: the tokenizer is SentencePiece ({found[0]}) without a tokenizer.json, which fastenc needs; "
                f"write one with: python -c \"from transformers import AutoTokenizer; "
                f"AutoTokenizer.from_pretrained('{where}').save_pretrained('{where}')\" "
                "(transformers converts it with the sentencepiece and protobuf packages)")
    return (f"{where}: no tokenizer files (tokenizer.json, vocab.txt or vocab.json + merges.txt); "
            "pass token ids to the encoder instead")


def _wordpiece(vocab: Path, settings: dict) -> Tokenizer:
    unk, cls, sep = _token(settings, "unk_token", "[UNK]"), _token(settings, "cls_token", "[CLS]"), \
        _token(settings, "sep_token", "[SEP]")
    specials = [unk, cls, sep, _token(settings, "pad_token", "[PAD]"), _token(settings, "mask_token", "[MASK]")]
    try:
        tokenizer = Tokenizer(WordPiece.from_file(str(vocab), unk_token=unk))
    except Exception as exc:
        raise LoadError(f"{vocab}: cannot be loaded as a WordPiece vocabulary ({exc})") from None
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"),
        lowercase=settings.get("do_lower_case", True),
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens([t for t in specials if tokenizer.token_to_id(t) is not None])
    for token in (cls, sep):
        if tokenizer.token_to_id(token) is None:
            raise LoadError(f"{vocab}: special token {token!r} is not in the vocabulary")
    tokenizer.post_processor = processors.BertProcessing(
        (sep, tokenizer.token_to_id(sep)), (cls, tokenizer.token_to_id(cls))
    )
    return tokenizer


def _added_token(settings: dict, content: str, **defaults) -> AddedToken:
    """A special token with the flags ``tokenizer_config.json``'s ``added_tokens_decoder`` gives it."""
    flags = dict(defaults)
    entries = settings.get("added_tokens_decoder")
    for entry in entries.values() if isinstance(entries, dict) else ():
        if isinstance(entry, dict) and entry.get("content") == content:
            flags.update({k: bool(entry[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in entry})
    flags.setdefault("normalized", False)
    return AddedToken(content, special=True, **flags)


def _byte_level_bpe(vocab: Path, merges: Path, settings: dict) -> Tokenizer:
    try:
        tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:
        raise LoadError(f"{vocab}: cannot be loaded with {merges.name} as a byte-level BPE ({exc})") from None
    prefix_space = bool(settings.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    cls, sep = _token(settings, "cls_token", "<s>"), _token(settings, "sep_token", "</s>")
    specials = [cls, sep] + [_token(settings, name, default) for name, default in
                             (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                              ("pad_token", "<pad>"), ("mask_token", "<mask>"))]
    mask = _token(settings, "mask_token", "<mask>")
    # RoBERTa's mask token takes the space before it (lstrip), as transformers' RobertaTokenizer defines it
    tokenizer.add_special_tokens([_added_token(settings, t, lstrip=t == mask) for t in dict.fromkeys(specials)
                                  if tokenizer.token_to_id(t) is not None])
    for token in (cls, sep):
        if tokenizer.token_to_id(token) is None:
            raise LoadError(f"{vocab}: special token {token!r} is not in the vocabulary")
    tokenizer.post_processor = processors.RobertaProcessing(
        (sep, tokenizer.token_to_id(sep)), (cls, tokenizer.token_to_id(cls)),
        trim_offsets=True, add_prefix_space=prefix_space,
    )
    return tokenizer


def check_unicode(texts: list, what: str = "text", offset: int = 0) -> None:
    """Raise ``InputError`` naming the first text that is not valid Unicode (a lone surrogate, as a file read
    with ``errors="surrogateescape"`` leaves them), which no tokenizer can take. An item may also be a
    tuple or list of strings (a text pair, pre-tokenized words)."""
    for index, item in enumerate(texts):
        for text in [item] if isinstance(item, str) else [t for t in item if isinstance(t, str)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(f"{what} {index + offset} is not valid Unicode: {exc.reason} ({text[exc.start]!r}); "
                                 "decode its bytes with errors='replace' first") from None


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """What transformers' tokenizer object knows beyond ``tokenizers.Tokenizer``: ``tokenizer_config.json``."""

    mask_token: str | None = None
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    cls_token_id: int | None = None
    eos_token_id: int | None = None
    model_max_length: int = _VERY_LARGE
    clean_up_tokenization_spaces: bool = False

    @classmethod
    def read(cls, tokenizer: Tokenizer, directory: Path | None) -> "TokenizerSettings":
        settings = _read_json(directory / "tokenizer_config.json") if directory is not None else {}

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
            cls_token_id=token_id("cls_token", ("[CLS]", "<s>")),
            eos_token_id=token_id("eos_token", ("</s>",)),
            model_max_length=int(min(max_length, _VERY_LARGE)) if usable else _VERY_LARGE,
            clean_up_tokenization_spaces=bool(settings.get("clean_up_tokenization_spaces", False)),
        )


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt prepended to every text, as sentence-transformers does, and the number of its tokens left
    out of the pooling (0 unless the pooling config says ``include_prompt: false``). For a chat model
    (``chat``) the prompt is a ``system`` message instead: the texts carry it (``fastenc.chat.Prompted``)."""

    text: str = ""
    skip: int = 0
    chat: bool = False

    def apply(self, texts: Sequence[str]) -> list[str]:
        if not self.text:
            return list(texts)
        if self.chat:
            return [Prompted(text, self.text) for text in texts]
        return [self.text + text for text in texts]


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A token sequence made here rather than by the tokenizer (an expanded query): ``ids`` and ``type_ids``."""

    ids: list[int]
    type_ids: list[int]


class Tokenization:
    """Texts -> encodings -> packed token ids, for one checkpoint (see the module docstring).

    ``sentence`` is the checkpoint's sentence-transformers configuration (limits, lower-casing, prompts);
    ``directory`` holds ``tokenizer_config.json`` (special tokens, ``model_max_length``).
    """

    def __init__(self, tokenizer: Tokenizer, config: EncoderConfig, sentence: SentenceConfig | None = None,
                 directory: Path | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.sentence = sentence
        self.token_types = config.model_type in TOKEN_TYPE_FAMILIES
        self._lock = threading.Lock()  # guards the tokenizer's truncation state: set, encode, reset
        if sentence is not None and sentence.multivector is not None:
            self._register_prefixes(sentence.multivector.prefixes)
        self.settings = TokenizerSettings.read(tokenizer, directory)
        # a sentence-transformers model with the "message" modality: inputs rendered by the chat template
        self.chat = (ChatTemplate(directory, sentence.chat, config.model_type)
                     if sentence is not None and sentence.chat is not None and directory is not None else None)
        self._pairs_checked = False

    def _register_prefixes(self, prefixes: Sequence[str]) -> None:
        """PyLate's query and document prefixes (``[unused0]``, ``[Q] ``) were inserted as single tokens in
        training; where the tokenizer would split one that it knows (``[unused0]`` into ``[``, ``unused``,
        ``##0``, ``]``), register it as a special token, as ``MultiVectorEncoder`` does, so that prepending
        it as text gives the token trained with."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        for value in prefixes:
            if not value or not value.split():
                continue
            for prefix in (value, value.split(None, 1)[0]):
                if prefix not in vocab:
                    continue
                if self.tokenizer.encode(prefix, add_special_tokens=False).tokens != [prefix]:
                    self.tokenizer.add_special_tokens([AddedToken(prefix, normalized=False, special=True)])
                break

    # ------------------------------------------------------------------------------------------ limits
    @property
    def max_length(self) -> int:
        """The sentence-transformers limit: ``max_seq_length`` if the checkpoint sets one, never over the
        model's positions (``embed``'s default)."""
        limit = self.sentence.max_seq_length if self.sentence else None
        return min(limit, self.config.max_length) if limit else self.config.max_length

    @property
    def model_max_length(self) -> int:
        """The transformers limit: the tokenizer's ``model_max_length``, never over the model's positions
        (the pipelines' default)."""
        return min(self.settings.model_max_length, self.config.max_length)

    def limit(self, max_length: int | None = None) -> int:
        """``max_length`` checked (an int from 2 to the model's positions), or ``max_length`` when None."""
        if max_length is None:
            return self.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an int of at least 2, got {max_length!r}")
        if max_length > self.config.max_length:
            raise InputError(f"max_length {max_length} is over the model's limit of {self.config.max_length} tokens")
        return max_length

    # ---------------------------------------------------------------------------------------- encoding
    def encode(self, inputs: Sequence, *, max_length: int | None = None, truncate: bool = True, stride: int = 0,
               strategy: str = "longest_first", pretokenized: bool = False, special_tokens: bool = True,
               lower_case: bool | None = None, check_length: bool = True, offset: int = 0,
               what: str = "text", overflow: bool = False) -> list[Encoding]:
        """Encodings of ``inputs`` (texts, ``(text, text_pair)`` tuples, or word lists with
        ``pretokenized``), with special tokens unless ``special_tokens=False``.

        ``truncate``: cut to ``max_length`` tokens (``self.max_length`` when None); pairs are cut as
        ``strategy`` says (tokenizers' ``longest_first``, ``only_first``, ``only_second``). With
        ``overflow`` the cut-off tokens are kept as the encodings' overflowing windows, overlapping by
        ``stride`` tokens; without it long texts are cut before they are tokenized (see the module
        docstring: the encodings are the same, their ``overflowing`` is not meaningful). Without
        ``truncate`` an input (or a window) over ``max_length`` tokens is an ``InputError``, unless
        ``check_length`` is off. ``lower_case`` (None: the sentence-transformers setting of the
        checkpoint) lower-cases the texts first. Errors name the input as ``"{what} {index + offset}"``:
        a text of a stream is named by its place in the stream.
        """
        limit = self.limit(max_length)
        if self.chat is not None and special_tokens and not pretokenized:
            return self._encode_chat(inputs, limit, truncate=truncate, check_length=check_length, offset=offset,
                                     what=what, overflow=overflow, lower_case=lower_case)
        if lower_case is None:
            lower_case = bool(self.sentence and self.sentence.do_lower_case)
        if lower_case:
            inputs = [_lower(item) for item in inputs]
        tokenizer = self.tokenizer
        with self._lock:
            try:
                if not overflow and not pretokenized and (truncate or check_length):
                    tokenizer.no_truncation()
                    inputs = self._cut(inputs, limit, strategy, special_tokens, truncate, what, offset)
                if truncate:
                    tokenizer.enable_truncation(limit, stride=stride, strategy=strategy)
                else:
                    tokenizer.no_truncation()
                encodings = tokenizer.encode_batch(inputs, is_pretokenized=pretokenized,
                                                   add_special_tokens=special_tokens)
            except Exception as exc:  # tokenizers raises bare Exceptions (a lone surrogate, a pair too long to cut)
                check_unicode(inputs, what, offset)
                raise InputError(f"cannot tokenize the {what}s: {exc}") from None
            finally:
                tokenizer.no_truncation()
        vocab_size = self.config.vocab_size
        for index, encoding in enumerate(encodings):
            for window in [encoding, *encoding.overflowing]:
                if check_length and not truncate and len(window.ids) > limit:
                    raise InputError(f"{what} {index + offset} has {len(window.ids)} tokens, over the limit of "
                                     f"{limit} (truncation is off)")
                if window.ids and max(window.ids) >= vocab_size:
                    raise InputError(f"{what} {index + offset}: the tokenizer produced id {max(window.ids)}, outside "
                                     f"the model's vocab_size {vocab_size}")
        return encodings

    def _encode_chat(self, inputs: Sequence, limit: int, *, truncate: bool, check_length: bool, offset: int,
                     what: str, overflow: bool, lower_case: bool | None) -> list:
        """A chat model's encodings (``fastenc.chat``): each input's conversation rendered by the template,
        tokenized without special tokens (the template wrote them), cut to ``limit`` tokens with the
        template's tail restored over the last ones of a row that reached the limit."""
        if overflow:
            raise InputError("overflowing windows are not supported for a chat-template model: its inputs are "
                             "conversations rendered whole")
        conversations = [self.chat.conversation(item) for item in inputs]
        if not self._pairs_checked and any(isinstance(item, (tuple, list)) for item in inputs):
            self.chat.check_pairs()
            self._pairs_checked = True
        rendered = self.chat.render(conversations)
        encodings = self.encode(rendered, max_length=limit, truncate=truncate, special_tokens=False,
                                lower_case=lower_case, check_length=check_length, offset=offset, what=what)
        if not truncate or not self.chat.settings.restore_suffix:
            return encodings
        out = list(encodings)
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) < limit:
                continue
            suffix = self.chat.suffix(conversations[index], self._plain_ids)
            keep = min(len(suffix), len(encoding.ids))
            if keep:
                out[index] = Tokens(encoding.ids[:len(encoding.ids) - keep] + list(suffix[len(suffix) - keep:]),
                                    list(encoding.type_ids))
        return out

    def _plain_ids(self, text: str) -> list[int]:
        """``text``'s token ids without special tokens or truncation."""
        with self._lock:
            self.tokenizer.no_truncation()
            return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------------------------ bounded cost
    def _specials(self, pair: bool) -> int:
        processor = self.tokenizer.post_processor
        return processor.num_special_tokens_to_add(pair) if processor is not None else 0

    def _safe_prefix(self, text: str, keep: int) -> tuple[str, int]:
        """``(prefix, n)``: the shortest tried prefix of ``text`` whose first ``n >= keep`` tokens are the
        whole text's (or ``(text, 0)`` when no shorter prefix shows it). Called with the lock held and
        truncation off."""
        chars = _cut_chars(keep)
        while chars < len(text):
            head = text[:chars]
            words = self.tokenizer.encode(head, add_special_tokens=False).word_ids
            if words and words[-1] is not None:
                # the tokens of the words before the last two cannot change when the text goes on
                safe = bisect.bisect_left(words, words[-1] - 1)
                if safe >= keep:
                    return head, safe
            chars *= 4
        return text, 0

    def _cut(self, inputs: Sequence, limit: int, strategy: str, special_tokens: bool, truncate: bool, what: str,
             offset: int) -> list:
        """``inputs`` with long texts cut to prefixes whose encodings (truncated to ``limit`` tokens) are the
        whole texts'; without ``truncate``, a text shown to be over ``limit`` is an ``InputError`` at once."""
        out = list(inputs)
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                keep = max(1, limit - (self._specials(False) if special_tokens else 0))
                if len(item) < _cut_chars(keep):
                    continue
                head, safe = self._safe_prefix(item, keep + (0 if truncate else 1))
                if not truncate and safe > keep:
                    raise InputError(f"{what} {index + offset} has more than {safe} tokens, over the limit of "
                                     f"{limit} (truncation is off)")
                if truncate:
                    out[index] = head
            elif truncate and isinstance(item, tuple) and len(item) == 2:
                out[index] = self._cut_pair(item, limit, strategy, special_tokens, f"{what} {index + offset}")
        return out

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _cut_pair(self, pair: tuple, limit: int, strategy: str, special_tokens: bool, what: str) -> tuple:
        """A pair with its long texts cut where truncation with ``strategy`` gives the same encoding.

        Only a text the strategy truncates is cut, to a prefix whose first ``budget + 1`` tokens are its
        own (``budget``: the limit less the pair's special tokens), more than truncation keeps of it.
        ``longest_first`` also compares the texts' lengths when both are over the budget (the longer gets
        the odd token of an odd budget): there the prefixes must compare as the whole texts do, which
        the texts' full counts (tokenized apart: linear, where tokenizers' own truncation of a long pair
        makes every pair of overflowing windows) decide, the longer prefix grown until they do.
        """
        budget = max(1, limit - (self._specials(True) if special_tokens else 0))
        truncated = {"longest_first": (0, 1), "only_first": (0,), "only_second": (1,)}.get(strategy, ())
        texts = list(pair)
        cut = [side for side in truncated if isinstance(texts[side], str) and len(texts[side]) >= _cut_chars(budget + 1)]
        if not cut:
            return pair
        heads = list(texts)
        for side in cut:
            heads[side] = self._safe_prefix(texts[side], budget + 1)[0]
        cut = [side for side in cut if heads[side] is not texts[side]]
        if strategy != "longest_first" or not cut or budget % 2 == 0:
            return tuple(heads)
        counts = [self._count(head) for head in heads]
        if min(counts) <= budget:  # the shorter fits: only its exact (whole) length decides the split
            return tuple(heads)
        true = [self._count(text) if side in cut else counts[side] for side, text in enumerate(texts)]
        longer = 0 if true[0] > true[1] else 1  # tokenizers swaps only when the first is strictly longer
        chars = len(heads[longer])
        while (counts[0] > counts[1]) != (true[0] > true[1]):
            if heads[longer] is texts[longer]:
                raise InputError(f"{what}: the two texts of a pair are each over the limit of {limit} tokens and "
                                 "too long to truncate together; shorten one of them")
            chars *= 4
            heads[longer] = texts[longer] if chars >= len(texts[longer]) else texts[longer][:chars]
            counts[longer] = true[longer] if heads[longer] is texts[longer] else self._count(heads[longer])
        return tuple(heads)

    def pack(self, encodings: Sequence) -> PackedBatch:
        """A host ``PackedBatch`` of encodings (anything with ``ids`` and ``type_ids``), positions as
        transformers counts them; the token types of families whose tokenizers send none are zero."""
        c = self.config
        ids = [e.ids for e in encodings]
        types = None
        if c.type_vocab_size:
            types = [e.type_ids if self.token_types else [0] * len(e.ids) for e in encodings]
            worst = max((max(row) for row in types if row), default=0)
            if worst >= c.type_vocab_size:
                raise InputError(f"the tokenizer produced token type {worst}, outside the model's type_vocab_size "
                                 f"{c.type_vocab_size}")
        return pack_sequences(ids, types, pad_token_id=c.pad_token_id if c.padding_positions else None)

    def tokenize(self, texts: Sequence[str], *, max_length: int | None = None,
                 truncate: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``token_type_ids`` (CPU int64)."""
        encodings = self.encode(texts, max_length=max_length, truncate=truncate)
        seq = max((len(e.ids) for e in encodings), default=0)
        ids = torch.full((len(texts), seq), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), seq), dtype=torch.long)
        types = torch.zeros((len(texts), seq), dtype=torch.long)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, :n] = 1
            types[row, :n] = torch.tensor(e.type_ids, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    # ------------------------------------------------------------------------------------------ tokens
    def token_ids(self, tokens: Sequence[str]) -> tuple[int, ...]:
        """The ids of the tokens the vocabulary (or the added tokens) holds as such; the others are left
        out (as sentence-transformers' skiplist drops words that are no single token)."""
        found = (self.tokenizer.token_to_id(token) for token in tokens)
        return tuple(sorted({i for i in found if i is not None}))

    def expand(self, encodings: Sequence, expansion: QueryExpansion) -> list[Tokens]:
        """ColBERT's query expansion: each encoding shorter than ``expansion.length`` tokens padded to it
        with the expansion token (``expansion.token``, else the mask token, else EOS), token type 0, as
        sentence-transformers' ``Transformer`` expands query batches (a ``fixed`` expansion's queries are
        cut to ``length`` by ``encode`` first)."""
        if expansion.token is not None:
            token_id = self.tokenizer.token_to_id(expansion.token)
            if token_id is None:
                raise InputError(f"the query expansion token {expansion.token!r} is not in the vocabulary")
        else:
            token_id = self.settings.mask_token_id if self.settings.mask_token_id is not None else \
                self.settings.eos_token_id
            if token_id is None:
                raise InputError("query expansion needs a mask or EOS token, and this tokenizer has neither")
        out = []
        for encoding in encodings:
            missing = max(expansion.length - len(encoding.ids), 0)
            out.append(Tokens(list(encoding.ids) + [token_id] * missing, list(encoding.type_ids) + [0] * missing))
        return out

    # ----------------------------------------------------------------------------------------- prompts
    @property
    def prompts(self) -> dict[str, str]:
        """The checkpoint's prompts by name (``config_sentence_transformers.json``)."""
        return dict(self.sentence.prompts) if self.sentence else {}

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None, *,
               max_length: int | None = None) -> Prompt:
        """The prompt to prepend, as sentence-transformers resolves it: ``prompt`` if given (``prompt_name`` is
        then ignored, with a warning), else the checkpoint's prompt called ``prompt_name``, else its
        ``default_prompt_name``'s, else none; with the count of its tokens the pooling leaves out."""
        prompts = self.prompts
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            if prompt_name is not None:
                warnings.warn("both prompt and prompt_name given: prompt_name is ignored (as in sentence-transformers)",
                              stacklevel=3)
            text = prompt
        elif prompt_name is not None:
            if prompt_name not in prompts:
                known = ", ".join(map(repr, prompts)) or "none"
                raise InputError(f"prompt_name {prompt_name!r} is not one of this checkpoint's prompts "
                                 f"(config_sentence_transformers.json): {known}")
            text = prompts[prompt_name]
        else:
            default = self.sentence.default_prompt_name if self.sentence else None
            text = prompts[default] if default is not None else ""
        if self.chat is not None:  # a system message, whose tokens are pooled (as sentence-transformers does)
            return Prompt(text, 0, chat=True)
        return Prompt(text, self._prompt_skip(text, max_length))

    def _prompt_skip(self, prompt: str, max_length: int | None) -> int:
        """Prompt tokens to leave out of the pooling: 0 unless the pooling config says ``include_prompt:
        false``; then the prompt's token count with special tokens but without a trailing one ([CLS] + the
        prompt for BERT), as sentence-transformers' ``Transformer`` measures it."""
        if not prompt or self.sentence is None or self.sentence.include_prompt:
            return 0
        encoding = self.encode([prompt], max_length=max_length)[0]
        return len(encoding.ids) - (1 if encoding.special_tokens_mask and encoding.special_tokens_mask[-1] else 0)

    # ----------------------------------------------------------------------------------------- batching
    def batches(self, texts: Sequence[str], *, batch_size: int, max_tokens: int, max_length: int | None = None,
                truncate: bool = True, offset: int = 0) -> tuple[list[Encoding], list[list[int]]]:
        """The encodings of ``texts`` and their token-budget batches (indices, longest first: at most
        ``batch_size`` texts and, unless one text is longer, ``max_tokens`` real tokens each)."""
        encodings = self.encode(texts, max_length=max_length, truncate=truncate, offset=offset)
        return encodings, token_budget_batches([len(e.ids) for e in encodings], batch_size, max_tokens)

    def windows(self, texts: Iterator[str], *, window: int, batch_size: int, max_tokens: int,
                max_length: int | None = None, truncate: bool = True,
                prompt: Prompt = Prompt()) -> Iterator[tuple[list[Encoding], list[list[int]]]]:
        """``(encodings, batches)`` per window of ``window`` texts of a stream, the prompt prepended; a
        non-``str`` item is a ``TypeError`` naming its place in the stream."""
        start = 0
        while chunk := list(itertools.islice(texts, window)):
            for index, text in enumerate(chunk):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{start + index}] is {type(text).__name__}, not str")
            yield self.batches(prompt.apply(chunk), batch_size=batch_size, max_tokens=max_tokens,
                               max_length=max_length, truncate=truncate, offset=start)
            start += len(chunk)


def _cut_chars(tokens: int) -> int:
    """The first prefix tried for ``tokens`` tokens: 8 characters a token (English takes about 4.5) and a
    margin; a text shorter than this is tokenized whole."""
    return 8 * tokens + 256


def _lower(item):
    if isinstance(item, str):
        return item.lower()
    return type(item)(_lower(part) for part in item)  # a text pair, or pre-tokenized words
