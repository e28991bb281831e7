"""Tokenizers from a checkpoint's files, with the checkpoint's lower-casing and special tokens.

``tokenizer.json`` is used as is; without it a WordPiece tokenizer is built from ``vocab.txt``
(BERT-style normalisation, ``[CLS] … [SEP]``) or a byte-level BPE from ``vocab.json`` + ``merges.txt``
(RoBERTa-style, ``<s> … </s>``), reading ``tokenizer_config.json`` for the casing and special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .errors import InputError, LoadError


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


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int, truncate: bool, *,
           offset: int = 0) -> list[Encoding]:
    """Encode with special tokens, truncated to ``max_length`` tokens, or an ``InputError`` naming the text
    (its index plus ``offset``, for texts taken from a longer stream)."""
    if truncate:
        tokenizer.enable_truncation(max_length)
    else:
        tokenizer.no_truncation()
    try:
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
    except TypeError:  # tokenizers' message for a str it cannot take; find the text and say why
        check_unicode(texts, offset=offset)
        raise
    finally:
        tokenizer.no_truncation()
    if not truncate:
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) > max_length:
                raise InputError(f"text {index + offset} has {len(encoding.ids)} tokens, over the limit of "
                                 f"{max_length} (truncate=False)")
    return encodings
