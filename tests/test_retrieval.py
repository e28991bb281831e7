"""Retrieval against sentence-transformers on the same checkpoints: prompts (``embed(prompt_name=...)``),
token vectors (``embed_tokens``), SPLADE vectors (``embed_sparse`` vs ``SparseEncoder.encode``) and
reranking (``pipeline("rerank")`` vs ``CrossEncoder.rank``), and their errors.

Checkpoints: the bundled all-MiniLM-L6-v2 with prompts added to a copy of its configuration (the weights
are linked, not copied), and tiny perturbed ones saved as a ``SparseEncoder`` or ``CrossEncoder`` lays
them out. The Triton backend runs under the interpreter (tiny shapes only).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import warnings

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402

import fastenc  # noqa: E402
from fastenc import Encoder, FastencError, InputError, LoadError  # noqa: E402
from fastenc.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["What is the capital of France?", "", "a", "Paris is the capital and largest city of France. " * 8,
         "Ünïcödé, 中文 and emoji 😍"]
LONG = "Paris is the capital and largest city of France. " * 30  # over MiniLM's 256 tokens
PROMPTS = C.PROMPTS  # query, passage and an empty one


def _quiet_st(cls, path):
    with warnings.catch_warnings(), C.quiet_transformers():
        warnings.simplefilter("ignore")
        return cls(str(path), device="cpu")


# ------------------------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def prompted(minilm_path, tmp_path_factory):
    path = C.minilm_with_prompts(minilm_path, tmp_path_factory.mktemp("prompts") / "minilm")
    from sentence_transformers import SentenceTransformer

    return Encoder.from_pretrained(path), _quiet_st(SentenceTransformer, path), path


def _assert_same_vectors(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    cosine = torch.nn.functional.cosine_similarity(ours, theirs.cpu().float())
    assert cosine.min() >= 0.99999, cosine


@pytest.mark.parametrize("prompt_name", ["query", "passage"])
def test_prompts_match_sentence_transformers(prompted, prompt_name):
    encoder, st, _ = prompted
    ours = encoder.embed(TEXTS, prompt_name=prompt_name)
    _assert_same_vectors(ours, st.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True))
    torch.testing.assert_close(encoder.embed(TEXTS, prompt=PROMPTS[prompt_name]), ours, rtol=0, atol=0)


def test_empty_prompt_and_both_prompts(prompted):
    """An empty prompt is no prompt; a free prompt wins over prompt_name, as in sentence-transformers."""
    encoder, texts = prompted[0], TEXTS[:3]
    plain = encoder.embed(texts)
    torch.testing.assert_close(encoder.embed(texts, prompt_name="empty"), plain, rtol=0, atol=0)
    query = encoder.embed(texts, prompt_name="query")
    assert (query - plain).abs().max() > 1e-2  # the prompt changes the vectors
    with pytest.warns(UserWarning, match="prompt_name is ignored"):
        both = encoder.embed(texts, prompt_name="passage", prompt="query: ")
    torch.testing.assert_close(both, query, rtol=0, atol=0)


def test_default_prompt_and_excluded_prompt_tokens(prompted, minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    for name, options, prompt_name in (("default", dict(default="query"), None),
                                       ("excluded", dict(include_prompt=False), "passage")):
        path = C.minilm_with_prompts(minilm_path, tmp_path / name, **options)
        encoder, st = Encoder.from_pretrained(path), _quiet_st(SentenceTransformer, path)
        ours = encoder.embed(TEXTS, prompt_name=prompt_name)
        _assert_same_vectors(ours, st.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True))
    # include_prompt=False pools the text's own tokens only: not the vector with the prompt pooled in
    assert (prompted[0].embed(TEXTS[0], prompt_name="passage") - ours[0]).abs().max() > 1e-2


def test_unknown_prompt_name_lists_the_known_ones(prompted, tmp_path):
    encoder = prompted[0]
    with pytest.raises(InputError, match=r"'doc'.*'query', 'passage', 'empty'"):
        encoder.embed(["x"], prompt_name="doc")
    no_prompts = Encoder.from_pretrained(C.make_sentence_transformer(tmp_path / "st"))  # "prompts": {}
    with pytest.raises(InputError, match=r"prompt_name 'query'.*none"):
        no_prompts.embed(["x"], prompt_name="query")
    with pytest.raises(InputError, match=r"prompt_name 'query'"):
        no_prompts.embed_tokens(["x"], prompt_name="query")
    with pytest.raises(TypeError, match="prompt must be a str"):
        encoder.embed(["x"], prompt=3)


def test_bad_prompt_config_is_a_load_error(minilm_path, tmp_path):
    path = C.minilm_with_prompts(minilm_path, tmp_path / "bad")
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS,
                                                                        "default_prompt_name": "doc"}))
    with pytest.raises(LoadError, match="default_prompt_name 'doc'"):
        Encoder.from_pretrained(path)


def test_cli_prompt_name(prompted, capsys):
    encoder, _, path = prompted
    assert main(["embed", "--model", str(path), "--prompt-name", "query", "Welcome to NYC"]) == 0
    vector = torch.tensor(json.loads(capsys.readouterr().out))
    torch.testing.assert_close(vector, encoder.embed("Welcome to NYC", prompt_name="query"), rtol=0, atol=1e-6)
    assert main(["embed", "--model", str(path), "--prompt-name", "doc", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'doc'" in err and "'query'" in err


# ------------------------------------------------------------------------------------------ token vectors
def test_token_vectors_match_sentence_transformers(prompted):
    encoder, st, _ = prompted
    texts = TEXTS + [LONG]
    ours = encoder.embed_tokens(texts, prompt_name="query", batch_size=2)
    theirs = st.encode(texts, output_value="token_embeddings", prompt_name="query")
    assert len(ours) == len(texts) and len(ours[-1]) == 256
    for text, mine, expected in zip(texts, ours, theirs):
        assert mine.dtype == torch.float32 and mine.device.type == "cpu" and torch.isfinite(mine).all()
        assert mine.shape == expected.shape, text  # special and prompt tokens counted; LONG truncated at 256
        torch.testing.assert_close(mine, expected.float(), rtol=1e-4, atol=1e-4)
    single = encoder.embed_tokens("a")
    torch.testing.assert_close(single, encoder.embed_tokens(["a"])[0], rtol=0, atol=0)
    assert single.shape == (3, 384) and encoder.embed_tokens([]) == []


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_vectors_are_the_hidden_states(backend, tmp_path):
    path = C.make_sentence_transformer(tmp_path / "st", family="roberta", pooling="mean", seed=3)
    encoder = Encoder.from_pretrained(path, backend=backend)
    texts = ["a short one", "x", "a somewhat longer text with more tokens in it"]
    batch = encoder.tokenize(texts)
    hidden = C.hf_last_hidden_state(path, batch["input_ids"], batch["attention_mask"])
    for row, tokens in enumerate(encoder.embed_tokens(texts)):
        n = int(batch["attention_mask"][row].sum())
        torch.testing.assert_close(tokens, hidden[row, :n], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- SPLADE
SPLADE_CASES = [  # vocabularies of 203 and 300 words: neither a multiple of the kernel's tiles
    ("bert", "max", "log1p_relu", "current"),
    ("roberta", "sum", "relu", "legacy"),
    ("electra", "max", "relu", "current"),  # the generator's MLM head is narrower than the encoder
]


def _dense(sparse: torch.Tensor) -> torch.Tensor:
    assert sparse.layout == torch.sparse_coo
    return sparse.to_dense().float()


@pytest.mark.parametrize("family, pooling, activation, layout", SPLADE_CASES)
def test_sparse_vectors_match_sentence_transformers(tmp_path, family, pooling, activation, layout):
    from sentence_transformers import SparseEncoder

    path = C.make_sparse_encoder(tmp_path / family, family, pooling, activation, layout=layout)
    st = _quiet_st(SparseEncoder, path)
    texts = TEXTS[:3] + ["the cat sat on the mat " * 3, "Paris is the capital and largest city of France."]
    expected = _dense(st.encode(texts))
    backends = ("torch", "triton") if family == "bert" else ("torch",)  # the interpreter is slow: one family
    for backend in backends:
        encoder = Encoder.from_pretrained(path, backend=backend)
        ours = encoder.embed_sparse(texts, batch_size=2)
        assert ours.shape == (len(texts), encoder.config.vocab_size) and ours.dtype == torch.float32
        assert ours.is_coalesced() and ours.device.type == "cpu"
        dense = _dense(ours)
        assert torch.isfinite(dense).all() and (ours.values() > 0).all()  # zeros are not stored
        torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)
        assert 0.05 < (dense > 0).float().mean() < 1  # a real mix of active and inactive words
        single = encoder.embed_sparse(texts[4])
        assert single.shape == (encoder.config.vocab_size,) and single.layout == torch.sparse_coo
        if backend == "triton":  # the fused kernel: a text's vector is the same bits alone or in a batch
            assert torch.equal(_dense(single), dense[4])
        torch.testing.assert_close(_dense(single), dense[4], rtol=1e-5, atol=1e-6)  # torch: within rounding
    # top_k keeps each vector's largest values, as max_active_dims does
    top = _dense(Encoder.from_pretrained(path).embed_sparse(texts, top_k=5))
    torch.testing.assert_close(top, _dense(st.encode(texts, max_active_dims=5)), rtol=1e-4, atol=1e-5)
    assert ((top > 0).sum(1) <= 5).all()


def test_sparse_vectors_of_a_decoder_without_bias(tmp_path):
    """ModernBERT with ``decoder_bias: false``: its masked-LM head has no decoder bias. Expected:
    SpladePooling's max of ``log1p(relu(logits))`` over each text's tokens of transformers' own
    ModernBertForMaskedLM. (The Triton kernel's bias-free path: ``test_splade_pool_without_bias``.)"""
    from transformers import AutoModelForMaskedLM

    path = C.make_checkpoint(tmp_path / "modernbert", "modernbert", head="mlm", seed=4, decoder_bias=False)
    with C.quiet_transformers():
        model = AutoModelForMaskedLM.from_pretrained(str(path)).eval()
    assert model.decoder.bias is None
    texts = ["the cat sat on the mat", "a", "Paris is the capital of France. " * 3]
    encoder = Encoder.from_pretrained(path, backend="torch")
    batch = encoder.tokenize(texts)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    active = torch.log1p(torch.relu(logits)) * batch["attention_mask"][..., None]
    dense = _dense(encoder.embed_sparse(texts))
    torch.testing.assert_close(dense, active.amax(1), rtol=1e-4, atol=1e-5)
    assert 0.05 < (dense > 0).float().mean() < 1


def test_sparse_defaults_and_errors(tmp_path, minilm_path):
    path = C.make_sparse_encoder(tmp_path / "k", "bert", "max", "relu", layout="current", max_active_dims=7)
    encoder = Encoder.from_pretrained(path)
    vectors = encoder.embed_sparse(["the cat sat on the mat", "a"])
    assert ((_dense(vectors) > 0).sum(1) == 7).all()  # the checkpoint's max_active_dims is the default top_k
    assert encoder.embed_sparse([]).shape == (0, encoder.config.vocab_size)
    with pytest.raises(InputError, match="top_k"):
        encoder.embed_sparse(["x"], top_k=0)
    with pytest.raises(FastencError, match="embed_sparse"):
        encoder.embed(["x"])  # a SparseEncoder's dense vectors are not what sentence-transformers gives
    assert encoder.embed(["x"], pooling="mean").shape == (1, encoder.config.hidden_size)
    with pytest.raises(LoadError, match=r"no mlm head.*cls\.predictions"):
        Encoder.from_pretrained(minilm_path).embed_sparse(["x"])
    (path / "1_SpladePooling" / "config.json").write_text(json.dumps({"pooling_strategy": "mean"}))
    with pytest.raises(LoadError, match="SpladePooling"):
        Encoder.from_pretrained(path)


def test_plain_masked_lm_gets_sparse_encoder_defaults(tmp_path):
    """Without a SpladePooling config, SparseEncoder loads a masked LM with max pooling and relu."""
    from sentence_transformers import SparseEncoder

    path = C.make_checkpoint(tmp_path / "mlm", "distilbert", head="mlm", seed=5)
    texts = ["the cat sat on the mat", "a"]
    expected = _dense(_quiet_st(SparseEncoder, path).encode(texts))
    torch.testing.assert_close(_dense(Encoder.from_pretrained(path).embed_sparse(texts)), expected, rtol=1e-4,
                               atol=1e-5)


# -------------------------------------------------------------------------------------------- reranking
def _cross_encoder(path: pathlib.Path, family: str, activation_fn=None, seed: int = 0) -> pathlib.Path:
    from sentence_transformers import CrossEncoder

    source = C.make_checkpoint(path.parent / f"{path.name}-source", family, head="sequence_classification",
                               num_labels=1, seed=seed)
    model = _quiet_st(CrossEncoder, source)
    if activation_fn is not None:
        model.activation_fn = activation_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path))
    shutil.rmtree(source)
    return path


QUERY = "where is the capital of france"
DOCUMENTS = ["Paris is the capital of France.", "The cat sat on the mat.", "", "capital " * 100,
             "France is a country in Europe; its capital is Paris.", "a"]


@pytest.mark.parametrize("family, activation", [("bert", None), ("roberta", torch.nn.Identity()), ("deberta-v2", None)])
def test_rerank_matches_cross_encoder(tmp_path, family, activation):
    from sentence_transformers import CrossEncoder

    path = _cross_encoder(tmp_path / family, family, activation)
    cross_encoder = _quiet_st(CrossEncoder, path)
    expected = cross_encoder.rank(QUERY, DOCUMENTS, return_documents=True)
    rerank = fastenc.pipeline("rerank", path)
    got = rerank(QUERY, DOCUMENTS, return_text=True, batch_size=4)
    assert [r["index"] for r in got] == [r["corpus_id"] for r in expected]
    for mine, theirs in zip(got, expected):
        assert list(mine) == ["index", "score", "text"] and isinstance(mine["score"], float)
        assert mine["text"] == theirs["text"] and abs(mine["score"] - theirs["score"]) <= 1e-4
    # the checkpoint's activation was read: sigmoid by default, else the saved one (sigmoid would not match)
    assert type(cross_encoder.activation_fn) is (torch.nn.Sigmoid if activation is None else type(activation))
    assert rerank(QUERY, DOCUMENTS, top_k=2) == [{"index": r["index"], "score": r["score"]} for r in got[:2]]
    assert rerank(QUERY, []) == []
    if activation is None:  # raw_scores: the logits, in the same order (sigmoid is monotone)
        raw = rerank(QUERY, DOCUMENTS, raw_scores=True)
        assert [r["index"] for r in raw] == [r["index"] for r in got]
        assert all(abs(torch.sigmoid(torch.tensor(r["score"])).item() - g["score"]) < 1e-6 for r, g in zip(raw, got))


def test_rerank_errors(tmp_path):
    path = _cross_encoder(tmp_path / "ce", "bert")
    rerank = fastenc.pipeline("rerank", path)
    with pytest.raises(TypeError, match="texts"):
        rerank(QUERY, "one document")
    with pytest.raises(TypeError, match="query"):
        rerank(["q"], DOCUMENTS)
    with pytest.raises(InputError, match="top_k"):
        rerank(QUERY, DOCUMENTS, top_k=0)
    with pytest.raises(InputError, match="input 3 has .* tokens"):
        rerank(QUERY, DOCUMENTS, truncation=False)  # "capital " * 100 is over the 96 positions
    three = C.make_checkpoint(tmp_path / "three", "bert", head="sequence_classification", num_labels=3)
    with pytest.raises(LoadError, match="one label.*3"):
        fastenc.pipeline("rerank", three)
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {**config, "activation_fn": "torch.nn.modules.activation.Softmax"}))
    with pytest.raises(LoadError, match="Softmax"):
        fastenc.pipeline("rerank", path)
    with pytest.raises(LoadError, match="sequence_classification"):
        fastenc.pipeline("rerank", C.make_checkpoint(tmp_path / "mlm", "bert", head="mlm"))
