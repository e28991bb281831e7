"""Text in, vectors out: the bundled all-MiniLM-L6-v2 against sentence-transformers, tokenizers against
transformers, and the batch invariance of ``embed``."""

import pytest
import torch
from checkpoints import make_checkpoint, make_sentence_transformer

import fastenc

TEXTS = [
    "Welcome to NYC",
    "",
    "   \t  ",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요.",
    "I love this 😍🎉🔥 so much!!!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "The quick brown fox jumps over the lazy dog. " * 60,  # far over the 256-token limit
    "Ünïcödé àccents, 中文字符 and العربية",
    "a",
    "<html><body class='x'>tags &amp; entities</body></html>",
]


@pytest.fixture(scope="module")
def minilm():
    return fastenc.Encoder.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def sentence_transformer(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


def test_minilm_matches_sentence_transformers(minilm, sentence_transformer):
    ours = minilm.embed(TEXTS)
    theirs = sentence_transformer.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=False).cpu()
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert torch.isfinite(ours).all()
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cosine.min() >= 0.99999, cosine
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)))  # modules.json lists Normalize


def test_minilm_defaults(minilm):
    assert minilm.text.max_length == 256  # sentence_bert_config.json's max_seq_length
    single = minilm.embed("Welcome to NYC")
    assert single.shape == (384,)
    torch.testing.assert_close(single, minilm.embed(["Welcome to NYC"])[0], rtol=0, atol=0)
    assert minilm.embed([]).shape == (0, 384)
    raw = minilm.embed(["Welcome to NYC"], normalize=False)
    assert abs(float(raw.norm()) - 1.0) > 1e-3


def test_pooling_modes_match_hidden_states(minilm):
    batch = minilm.tokenize(["pooling test sentence", "a"])
    hidden = minilm(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(minilm.embed(["pooling test sentence", "a"], normalize=False), mean)
    torch.testing.assert_close(minilm.embed(["pooling test sentence", "a"], pooling="cls", normalize=False),
                               hidden[:, 0])
    maxed = hidden.masked_fill(mask == 0, -1e9).amax(1)
    torch.testing.assert_close(minilm.embed(["pooling test sentence", "a"], pooling="max", normalize=False), maxed)
    last = hidden[torch.arange(2), batch["attention_mask"].sum(1) - 1]
    torch.testing.assert_close(minilm.embed(["pooling test sentence", "a"], pooling="lasttoken", normalize=False),
                               last)


def test_embed_is_batch_invariant(minilm):
    texts = TEXTS + [f"sentence number {i} with some padding words " * (i % 5 + 1) for i in range(12)]
    alone = torch.stack([minilm.embed(t) for t in texts])
    for batch_size in (1, 7, 64):
        together = minilm.embed(texts, batch_size=batch_size)
        torch.testing.assert_close(together, alone, rtol=0, atol=2e-6)
    shuffled = list(reversed(texts))
    torch.testing.assert_close(minilm.embed(shuffled, batch_size=5), alone.flip(0), rtol=0, atol=2e-6)


def test_tokenize_matches_transformers(minilm, minilm_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(minilm_path))(TEXTS, padding=True, truncation=True, max_length=256,
                                                             return_tensors="pt")
    ours = minilm.tokenize(TEXTS)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("files", ["json", "vocab"])
def test_tokenizer_files_match_transformers(tmp_path, family, files):
    """tokenizer.json, or vocab.txt (WordPiece) / vocab.json + merges.txt (byte-level BPE) alone."""
    from transformers import AutoTokenizer

    path = make_checkpoint(tmp_path, family, tokenizer=files)
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    texts = ["Hello world, the cat sat.", "", "UPPER case and ünïcode", "the " * 200]
    theirs = AutoTokenizer.from_pretrained(str(path))(texts, padding=True, truncation=True, max_length=32,
                                                       return_tensors="pt")
    ours = encoder.tokenize(texts, max_length=32)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


@pytest.mark.parametrize("pooling, subfolder", [("mean", False), ("cls", True), ("max", False)])
def test_sentence_transformers_configs(tmp_path, pooling, subfolder):
    from sentence_transformers import SentenceTransformer

    path = make_sentence_transformer(tmp_path, pooling=pooling, normalize=pooling != "max", subfolder=subfolder,
                                     max_seq_length=24)
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    texts = ["the cat sat on the mat", "", "a much longer text about dogs and cats " * 5]
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True).cpu()
    ours = encoder.embed(texts)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cosine.min() >= 0.99999, cosine
    torch.testing.assert_close(ours.norm(dim=1), theirs.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_roberta_embed_positions(tmp_path):
    """Packed RoBERTa positions (from pad_token_id + 1) equal the padded forward's."""
    path = make_checkpoint(tmp_path, "roberta")
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    texts = ["hello world", "the longest of the three texts here", "x"]
    batch = encoder.tokenize(texts)
    hidden = encoder(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(encoder.embed(texts, batch_size=2), mean)
