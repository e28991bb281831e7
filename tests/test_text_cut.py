"""A long text is cut before it is tokenized when it will be truncated (Tokenization.encode without
``overflow``): the encodings are bit for bit those of the whole text, tokenized whole and truncated by
the tokenizer itself, on a WordPiece checkpoint (the bundled MiniLM) and a byte-level BPE one, for texts
made to break a characters-per-token guess (long whitespace runs, control characters, one long word,
combining marks, CJK, emoji, punctuation runs), single and in pairs; and the tokenizer never sees more
than a bounded prefix of a 2 MB text."""

import random

import pytest
from checkpoints import make_checkpoint

import fastenc
from fastenc.errors import InputError


def _texts() -> list[str]:
    rng = random.Random(5)
    words = "the cat sat on a mat while dogs ran far away into woods near the river".split()
    prose = " ".join(rng.choice(words) for _ in range(3000))
    texts = [
        prose,
        "   \t\n " * 2000 + prose,  # thousands of characters that make no token, then words
        "\u0000\u200b" * 3000 + prose,  # control and zero-width characters, dropped by BERT's normaliser
        "x" * 50_000 + " " + prose,  # one word longer than any prefix tried first
        "supercalifragilistic" * 400 + " end",
        ("e\u0301" * 7 + " ") * 900,  # combining accents: a cut between a letter and its mark
        "東京都の天気は晴れです。" * 600,  # CJK: a token per character for BERT, several bytes for BPE
        "🙂🎉 " * 2000,
        "!?.,;:" * 2000 + " and words " * 300,
        "a  b   c    " * 1000,  # runs of spaces of growing length (GPT-2's \s+(?!\S))
        "ΟΔΟΣ ΟΔΟΣ ΣΣΣ " * 900,  # upper-case sigma: lower-casing depends on the next character
        "word " * 60,  # short: never cut
    ]
    cut_points = [rng.randrange(3000, 20_000) for _ in range(6)]
    return texts + [prose[:n] for n in cut_points]


def _expected(tokenizer, inputs, limit, strategy="longest_first"):
    tokenizer.enable_truncation(limit, strategy=strategy)
    try:
        return tokenizer.encode_batch(inputs)
    finally:
        tokenizer.no_truncation()


def _same(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.ids == b.ids
        assert a.type_ids == b.type_ids
        assert a.offsets == b.offsets
        assert a.special_tokens_mask == b.special_tokens_mask
        assert a.attention_mask == b.attention_mask
        assert a.word_ids == b.word_ids


@pytest.fixture(scope="module", params=["minilm", "bpe"])
def encoder(request, minilm_path, tmp_path_factory):
    if request.param == "minilm":
        return fastenc.Encoder.from_pretrained(minilm_path)
    path = make_checkpoint(tmp_path_factory.mktemp("bpe") / "roberta", "roberta", seed=3, max_position_embeddings=130)
    return fastenc.Encoder.from_pretrained(path)


class Spy:
    """The tokenizer, recording the longest text each call hands it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def _see(self, items):
        for item in items:
            for text in [item] if isinstance(item, str) else item:
                self.longest = max(self.longest, len(text))

    def encode(self, text, *args, **kwargs):
        self._see([text])
        return self.tokenizer.encode(text, *args, **kwargs)

    def encode_batch(self, items, *args, **kwargs):
        self._see(items)
        return self.tokenizer.encode_batch(items, *args, **kwargs)


def test_cut_texts_encode_as_the_whole_text(encoder):
    text, tokenizer = encoder.text, encoder.tokenizer
    texts = _texts()
    for limit in (text.max_length, 16):
        got = text.encode(texts, max_length=limit, lower_case=False)
        _same(got, _expected(tokenizer, texts, limit))
    # sentence-transformers' lower-casing (MiniLM's do_lower_case) before the cut
    lowered = [t.lower() for t in texts] if text.sentence and text.sentence.do_lower_case else texts
    _same(text.encode(texts), _expected(tokenizer, lowered, text.max_length))


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_cut_pairs_encode_as_the_whole_pair(encoder, strategy):
    """One long text or two (texts of a few thousand characters: tokenizers' own truncation of two long
    texts makes every pair of their overflowing windows), budgets odd and even."""
    text, tokenizer = encoder.text, encoder.tokenizer
    long = [t[:2500] for i, t in enumerate(_texts()[:11]) if i not in (3, 4)]  # not a word of 2,500 characters:
    # byte-level BPE merges within a word in quadratic time, which the reference pays for every window pair
    short = ["a question", "東京 " * 40]
    pairs = [(s, t) for s in short for t in long] + [(t, s) for s in short for t in long]
    both = [t[:800] for t in (long[0], long[1], long[2], long[3])]  # long enough to be cut, short enough for
    # the reference, whose window pairs grow as the product of the two lengths
    pairs += [(both[0], both[1]), (both[1], both[0]), (both[0], both[0]), (both[3], both[2])]
    got, expected = [], []
    for limit in (64, 65):
        for pair in pairs:  # one at a time: a strategy that cannot cut a pair raises for that pair alone
            try:
                expected.append(_expected(tokenizer, [pair], limit, strategy)[0])
            except Exception:
                continue
            got.append(text.encode([pair], max_length=limit, strategy=strategy, lower_case=False)[0])
    assert len(got) >= 10
    _same(got, expected)


def test_the_tokenizer_sees_a_bounded_prefix(encoder, monkeypatch):
    text = encoder.text
    spy = Spy(encoder.tokenizer)
    monkeypatch.setattr(text, "tokenizer", spy)
    huge = "the quick brown fox jumps over the lazy dog " * 50_000  # 2.2 MB
    encodings = text.encode([huge, "short"], lower_case=False)
    assert len(encodings[0].ids) == text.max_length
    assert spy.longest < 20 * text.max_length + 1024, spy.longest  # not the 2.2 MB
    with pytest.raises(InputError, match=rf"text 0 has more than \d+ tokens, over the limit of {text.max_length}"):
        text.encode([huge], truncate=False, lower_case=False)
    assert spy.longest < 20 * text.max_length + 1024, spy.longest
    pairs = text.encode([("a query", huge)], lower_case=False)
    assert len(pairs[0].ids) == text.max_length and spy.longest < 20 * text.max_length + 1024


def test_overflow_keeps_every_window(encoder):
    text = encoder.text
    long = "the cat sat on the mat " * 400
    whole = text.encode([long], max_length=32, overflow=True, lower_case=False)[0]
    assert len(whole.overflowing) > 50  # the windows of the whole text, as the pipelines use them
