"""Bad input to the encoder: ``InputError`` (a ValueError) before any computation, naming the problem."""

import pytest
import torch
from checkpoints import make_checkpoint

import fastenc
from fastenc import reference


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return fastenc.Encoder.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("bert"), "bert"), device="cpu")


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    return fastenc.Encoder.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("distil"), "distilbert"), device="cpu")


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if any op runs: errors must come before computation."""
    def boom(*args, **kwargs):
        raise AssertionError("an op ran before the input was rejected")

    for name in ("embeddings", "fused_qkv", "attention", "linear", "add_layer_norm"):
        monkeypatch.setattr(reference, name, boom)


def _ids(encoder, rows=2, seq=5):
    return torch.randint(5, encoder.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))


def test_input_error_is_a_value_error():
    assert issubclass(fastenc.InputError, ValueError) and issubclass(fastenc.InputError, fastenc.FastencError)


@pytest.mark.parametrize("make, needle", [
    (lambda e: _ids(e).float(), "integer"),
    (lambda e: _ids(e)[0], "rank 2"),
    (lambda e: _ids(e)[None], "rank 2"),
    (lambda e: torch.tensor([[5, -1, 6]]), r"input_ids\[0, 1\] = -1"),
    (lambda e: torch.tensor([[5, 6], [7, e.config.vocab_size]]), rf"input_ids\[1, 1\] = {'{}'}"),
    (lambda e: _ids(e, 1, e.config.max_length + 1), "over the model's limit"),
])
def test_bad_input_ids(encoder, no_compute, make, needle):
    ids = make(encoder)
    needle = needle.replace("{}", str(encoder.config.vocab_size))
    with pytest.raises(fastenc.InputError, match=needle):
        encoder(ids)


def test_bad_masks(encoder, no_compute):
    ids = _ids(encoder)
    with pytest.raises(fastenc.InputError, match="attention_mask has shape"):
        encoder(ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(fastenc.InputError, match=r"attention_mask\[1, 2\] = 2"):
        mask = torch.ones_like(ids)
        mask[1, 2] = 2
        encoder(ids, mask)
    with pytest.raises(fastenc.InputError, match="bool or integer"):
        encoder(ids, torch.ones(2, 5))


def test_bad_token_types(encoder, distilbert, no_compute):
    ids = _ids(encoder)
    with pytest.raises(fastenc.InputError, match="token_type_ids has shape"):
        encoder(ids, None, torch.zeros(1, 5, dtype=torch.long))
    types = torch.zeros_like(ids)
    types[0, 3] = encoder.config.type_vocab_size
    with pytest.raises(fastenc.InputError, match=r"token_type_ids\[0, 3\] = 2 .*type_vocab_size"):
        encoder(ids, None, types)
    types = torch.zeros_like(ids)
    types[1, 0] = 1
    with pytest.raises(fastenc.InputError, match="token_type_ids"):
        distilbert(_ids(distilbert), None, types)  # DistilBERT has no token types


def test_valid_forms_are_accepted(encoder):
    ids = _ids(encoder)
    expected = encoder(ids)
    torch.testing.assert_close(encoder(ids.tolist()), expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder(ids.to(torch.int32), torch.ones_like(ids, dtype=torch.bool)), expected,
                               rtol=0, atol=0)
    assert encoder(ids, torch.zeros_like(ids)).abs().sum() == 0  # all-padding rows are zeros, never NaN


def test_embed_errors(encoder):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        encoder.embed(["fine", 3])
    with pytest.raises(TypeError, match="texts must be"):
        encoder.embed(42)
    long_text = "the cat sat on the mat " * 40
    with pytest.raises(fastenc.InputError, match=r"text 1 has (more than )?\d+ tokens, over the limit of 16"):
        encoder.embed(["short", long_text], max_length=16, truncate=False)
    with pytest.raises(fastenc.InputError, match="pooling 'median'"):
        encoder.embed("x", pooling="median")
    with pytest.raises(fastenc.InputError, match="batch_size"):
        encoder.embed("x", batch_size=0)
    with pytest.raises(fastenc.InputError, match="max_length"):
        encoder.embed("x", max_length=encoder.config.max_length + 1)


def test_no_tokenizer(tmp_path):
    encoder = fastenc.Encoder.from_pretrained(make_checkpoint(tmp_path, "bert", tokenizer=None), device="cpu")
    assert encoder.tokenizer is None
    with pytest.raises(fastenc.LoadError, match="no tokenizer"):
        encoder.embed("hello")
