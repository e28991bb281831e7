"""Fuzzing the edges where users hand fastenc data: safetensors files, config.json and texts.

The only outcomes allowed are the documented errors (``LoadError`` for files, ``InputError`` / ``TypeError``
for inputs) or finite vectors: never another exception, a hang, or a huge allocation. Examples are
derandomized (the same on every run, so CI cannot turn red by chance) and bounded so the module runs
in well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from checkpoints import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastenc
from fastenc.config import EncoderConfig

# FUZZ_EXAMPLES=N: N fresh random examples per test instead of the fixed 40, for a longer hunt by hand.
_HUNT = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 40), deadline=None, derandomize=not _HUNT, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling CI

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", "", 7, None]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), "bert", seed=11)


@pytest.fixture(scope="module")
def scratch(bert_dir, tmp_path_factory):
    """A copy of the checkpoint whose files the examples overwrite."""
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(bert_dir, path)
    return path


def _split(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _load_and_embed(path) -> None:
    """Load; if that works, the encoder must give finite vectors."""
    try:
        encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    except fastenc.LoadError:
        return
    vectors = encoder.embed(["hello world", ""])
    assert vectors.shape == (2, encoder.config.hidden_size) and torch.isfinite(vectors).all()


_entry_edit = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(DTYPES),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), st.integers(), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**63 - 1), max_size=3), st.none()),
})


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), _entry_edit), min_size=1, max_size=4),
       drop=st.booleans())
def test_fuzzed_safetensors_header_entries(scratch, bert_dir, edits, drop):
    header, body = _split((bert_dir / "model.safetensors").read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    for pick, edit in edits:
        name = names[pick % len(names)]
        if drop:
            header.pop(name, None)
        else:
            header[name] = {**header[name], **edit}
    (scratch / "model.safetensors").write_bytes(_join(header, body))
    _load_and_embed(scratch)


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_bytes(scratch, bert_dir, data):
    original = (bert_dir / "model.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "length_prefix", "garbage"]))
    if kind == "truncate":
        blob = original[: data.draw(st.integers(0, len(original) - 1))]
    elif kind == "flip_header":
        blob = bytearray(original)
        size = struct.unpack("<Q", original[:8])[0]
        for position in data.draw(st.lists(st.integers(8, 8 + size - 1), min_size=1, max_size=8)):
            blob[position] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "length_prefix":
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + original[8:]
    else:
        blob = data.draw(st.binary(max_size=64))
    (scratch / "model.safetensors").write_bytes(blob)
    _load_and_embed(scratch)


_CONFIG_VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.none(),
    st.booleans(), st.lists(st.integers(), max_size=2), st.sampled_from([0, 1, 2, 72, 3, 96, 111, 1e-12]),
)
_CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "pad_token_id", "layer_norm_eps", "hidden_act",
                "model_type", "embedding_size", "position_embedding_type"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _CONFIG_VALUES, min_size=1, max_size=3))
def test_fuzzed_config_fields(scratch, bert_dir, changes):
    raw = json.loads((bert_dir / "config.json").read_text())
    raw.update(changes)
    try:
        config = EncoderConfig.from_dict(raw)
    except fastenc.LoadError:
        pass
    else:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_length", "embedding_size", "type_vocab_size"):
            value = getattr(config, name)
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, value)
        assert config.layer_norm_eps > 0 and config.head_dim * config.num_attention_heads == config.hidden_size
    shutil.copyfile(bert_dir / "model.safetensors", scratch / "model.safetensors")
    (scratch / "config.json").write_text(json.dumps(raw))
    try:
        _load_and_embed(scratch)
    finally:
        shutil.copyfile(bert_dir / "config.json", scratch / "config.json")


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", -1), ("num_hidden_layers", 0), ("vocab_size", "100"), ("hidden_size", 72.0),
    ("num_attention_heads", True), ("intermediate_size", None), ("max_position_embeddings", -5),
    ("type_vocab_size", 0), ("pad_token_id", -1), ("pad_token_id", 10**9), ("layer_norm_eps", 0),
    ("layer_norm_eps", -1e-5), ("layer_norm_eps", float("nan")), ("layer_norm_eps", "1e-5"), ("hidden_act", "mish"),
    ("hidden_act", ["gelu"]), ("model_type", ["bert"]),
])
def test_bad_config_field_is_a_load_error_naming_it(bert_dir, field, value):
    raw = json.loads((bert_dir / "config.json").read_text())
    raw[field] = value
    with pytest.raises(fastenc.LoadError, match=field if field != "model_type" else "model_type"):
        EncoderConfig.from_dict(raw)


def test_distilbert_config_errors_name_its_own_keys():
    raw = {"model_type": "distilbert", "vocab_size": 100, "dim": 120, "n_heads": 3, "n_layers": -1, "hidden_dim": 200}
    with pytest.raises(fastenc.LoadError, match="n_layers must be a positive int, got -1"):
        EncoderConfig.from_dict(raw)


def test_weights_that_overflow_the_dtype_are_refused(scratch, bert_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(bert_dir / "model.safetensors")
    tensors["encoder.layer.1.output.dense.weight"][0, 0] = 1e6  # fine in fp32, inf in fp16
    save_file(tensors, scratch / "model.safetensors")
    try:
        fastenc.Encoder.from_pretrained(scratch, device="cpu")  # fp32: loads
        with pytest.raises(fastenc.LoadError, match=r"encoder\.layer\.1\.output\.dense\.weight.*non-finite"):
            fastenc.Encoder.from_pretrained(scratch, dtype="fp16", device="cpu")
    finally:
        shutil.copyfile(bert_dir / "model.safetensors", scratch / "model.safetensors")


# ------------------------------------------------------------------------------------------------ texts
_SPECIAL = ["\x00", "\u202e", "\u200f", "\ufeff", "\U0001f600", "\U0001f468\u200d\U0001f469", "\ud800", "\udc80",
            "\u0301", "[CLS]", "[SEP]", "[MASK]", "\t", "\n", "\r\n", "\u3000", "\u0645\u0631\u062d\u0628\u0627"]
_TEXT = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates included
    st.lists(st.sampled_from(_SPECIAL), max_size=12).map("".join),
    st.builds(lambda word, n: word * n, st.sampled_from(["a ", "word ", "\U0001f600"]), st.integers(0, 3000)),
)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return fastenc.Encoder.from_pretrained(minilm_path, device="cpu")


@FUZZ
@given(texts=st.lists(_TEXT, min_size=1, max_size=4), truncate=st.booleans())
def test_fuzzed_texts_give_finite_vectors_or_a_named_error(minilm, texts, truncate):
    try:
        vectors = minilm.embed(texts, truncate=truncate)
    except fastenc.InputError as exc:
        assert "text " in str(exc)  # names the text
        bad_unicode = any(not _encodes(t) for t in texts)
        too_long = not truncate
        assert bad_unicode or too_long, str(exc)
        return
    assert all(_encodes(t) for t in texts)
    assert vectors.shape == (len(texts), minilm.config.hidden_size) and torch.isfinite(vectors).all()


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.parametrize("texts, message", [
    (b"abc", "texts is bytes, not str: decode it first"),
    (bytearray(b"abc"), "texts is bytearray, not str"),
    (["ok", b"abc"], r"texts\[1\] is bytes, not str: decode it first"),
    (["ok", 3], r"texts\[1\] is int, not str$"),
])
def test_bytes_are_named_for_what_they_are(minilm, texts, message):
    with pytest.raises(TypeError, match=message):
        minilm.embed(texts)


def test_a_lone_surrogate_is_an_input_error_naming_the_text(minilm):
    with pytest.raises(fastenc.InputError, match=r"text 1 is not valid Unicode: surrogates not allowed \('\\udc80'\)"):
        minilm.embed(["fine", "bad \udc80 bytes"])
