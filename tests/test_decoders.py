"""The decoder backbones — Qwen3, Qwen2, Mistral, Llama, Gemma3 — against transformers and sentence-transformers.

Tiny checkpoints built with transformers' own classes (2 layers, hidden 48 or 64, grouped-query attention:
4 query heads over 2 K/V heads, Llama's over 1), every parameter perturbed, a byte-level BPE tokenizer
that appends an end-of-text token (as Qwen3-Embedding's does). The configurations reach what each family
adds: Qwen3's and Gemma3's head dim of 16 that is not hidden / heads (48 / 4) and their QK-norm, Qwen2's
Q/K/V biases, Llama's attention and MLP biases with a single K/V head, Mistral's sliding window (6 keys,
on every layer), Gemma3's local layer (a window of 8 keys, its own RoPE base), sandwich norms, scaled
embeddings and query_pre_attn_scalar, causal and bidirectional (EmbeddingGemma). Texts run past the
windows. Both backends (the Triton one under the interpreter without a GPU), padded (``encoder(ids,
mask)``) and packed (``embed``, the pipelines); then sentence-transformers models (last-token and mean
pooling, Dense, Normalize, prompts), CrossEncoders with a sequence-classification head and with a causal
LM scored by two tokens' logits, a sharded checkpoint, the dtype rules.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import sys
import warnings

import pytest
import torch
from checkpoints import BPE_SPECIALS, _added_tokens_decoder, _bpe_vocab_merges, _perturb, quiet_transformers, \
    save_sharded

import fastenc
from fastenc.check import compare
from fastenc.config import EncoderConfig
from fastenc.errors import FastencError, LoadError
from fastenc.model import resolve_dtype

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = ("qwen3", "qwen2", "mistral", "llama", "gemma3_text")
# Each family's tiny shape and the parts that set it apart (the module docstring).
CONFIGS = {
    "qwen3": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
    "llama": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "gemma3_text": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=24, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
}
AUTO_CLASSES = {None: "AutoModel", "sequence_classification": "AutoModelForSequenceClassification",
                "causal_lm": "AutoModelForCausalLM"}
LENGTHS = [13, 1, 22, 0, 7]  # 22 tokens: past Mistral's window of 6 and Gemma3's of 8 (and its bidirectional ±4)
TEXTS = ["the cat sat on the mat", "a", "", "dogs and cats and birds " * 3, "hello world",
         "the quick brown fox jumps over the lazy dog and runs far away"]
PAD, EOS = 1, 2  # the tokenizer's <pad> and </s>


def tokenizer():
    """A byte-level BPE that appends ``</s>`` to every text and pair (Qwen3-Embedding's tokenizer appends
    its end-of-text token), with "yes" and "no" as added tokens (the causal rerankers' answers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _bpe_vocab_merges()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BPE_SPECIALS])
    tok.add_tokens(["yes", "no"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B:0 </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return tok


def make_decoder(path, family: str, *, head: str | None = None, seed: int = 0, **overrides) -> pathlib.Path:
    """A tiny perturbed ``family`` checkpoint (``head``: None, "sequence_classification" with one label, or
    "causal_lm") with the tokenizer above, saved by transformers."""
    import transformers

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    kwargs = dict(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, intermediate_size=74,
                  max_position_embeddings=64, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS,
                  tie_word_embeddings=family == "gemma3_text", **CONFIGS[family])
    kwargs.update(overrides)
    if head == "sequence_classification":
        kwargs["num_labels"] = 1
    with quiet_transformers():
        config = transformers.AutoConfig.for_model(family, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, AUTO_CLASSES[head]).from_config(config)
        model.eval()
        _perturb(model, seed)
        model.save_pretrained(str(path))
    tok.save(str(path / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 64,
                "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
                "added_tokens_decoder": _added_tokens_decoder(tok)}
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return path


@pytest.mark.parametrize("flags", [{"add_bos_token": True, "add_eos_token": False}, {"add_eos_token": True},
                                   {"add_bos_token": False, "add_eos_token": False}, {"add_bos_token": True}],
                         ids=["bos", "eos", "neither", "bos-keeps-no-eos"])
def test_add_bos_and_eos_flags_follow_transformers(tmp_path, flags):
    """``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` (Llama, Gemma, Mistral set them):
    transformers' tokenizer ignores them where a tokenizer.json exists (its post-processor decides), and
    so does fastenc; their ids are equal, for texts and pairs."""
    from transformers import AutoTokenizer

    from fastenc.text import load_tokenizer

    tok = tokenizer()  # its own template appends </s>
    tok.save(str(tmp_path / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>", "added_tokens_decoder": _added_tokens_decoder(tok),
                **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    ours = load_tokenizer(tmp_path)
    with quiet_transformers():
        theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [text for text in TEXTS if text]
    assert [e.ids for e in ours.encode_batch(texts)] == theirs(texts)["input_ids"]
    pairs = list(zip(texts, reversed(texts)))
    expected = theirs([a for a, _ in pairs], [b for _, b in pairs])
    encodings = ours.encode_batch(pairs)
    assert [e.ids for e in encodings] == expected["input_ids"]
    assert all(e.ids[-1] == EOS and e.ids[0] != ours.token_to_id("<s>") for e in encodings)  # the file's template


def hf(path, head: str | None = None):
    import transformers

    with quiet_transformers():
        return getattr(transformers, AUTO_CLASSES[head]).from_pretrained(str(path), dtype=torch.float32,
                                                                         attn_implementation="eager").eval()


def batch(encoder, lengths, seed: int = 0):
    """Right-padded random ids (never the padding id) ending in ``</s>``, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, encoder.config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    for row, n in enumerate(lengths):
        if n:
            ids[row, n - 1] = EOS
    return ids.masked_fill(mask == 0, PAD), mask


def assert_hidden_matches(encoder, path, ids, mask):
    out = encoder(ids, mask)
    with torch.no_grad():
        reference = hf(path)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == reference.shape and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, mask=mask)
    assert result.ok, result.line()
    assert (out[mask == 0] == 0).all()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, make_decoder(tmp_path_factory.mktemp(request.param), request.param, seed=1)


# ------------------------------------------------------------------------------------------------- config
def test_config_reads_each_family():
    """head_dim, K/V heads, windows (fastenc's inclusive ones), RoPE bases, causality, biases and scales
    as transformers' configs say, written to config.json by transformers itself."""
    import transformers

    def read(family, **overrides):
        config = transformers.AutoConfig.for_model(family, **{**CONFIGS[family], "num_hidden_layers": 2,
                                                              "vocab_size": 100, **overrides})
        return EncoderConfig.from_dict(config.to_dict())

    qwen3 = read("qwen3")
    assert (qwen3.head_dim, qwen3.kv_heads, qwen3.family.qk_norm, qwen3.family.causal) == (16, 2, True, True)
    assert [k.rope_theta for k in qwen3.family.layers] == [5000.0, 5000.0] and qwen3.family.biases == frozenset()
    assert read("qwen2").family.biases == frozenset({"qkv"}) and read("qwen2").head_dim == 16
    assert [k.window for k in read("mistral").family.layers] == [5, 5]  # sliding_window 6: 5 keys before + itself
    assert [k.window for k in read("mistral", sliding_window=None).family.layers] == [None, None]
    llama = read("llama")
    assert llama.kv_heads == 1 and llama.family.biases == frozenset({"qkv", "attn_out", "ffn_in", "ffn_out"})
    gemma = read("gemma3_text")
    assert [(k.window, k.rope_theta) for k in gemma.family.layers] == [(7, 10_000.0), (None, 1_000_000.0)]
    assert gemma.family.sandwich and gemma.family.norm_offset == 1.0 and gemma.family.query_scale == 24 ** -0.5
    assert gemma.family.embedding_scale == float(torch.tensor(48 ** 0.5)) and gemma.activation == "gelu_tanh"
    bidirectional = read("gemma3_text", use_bidirectional_attention=True)
    # transformers keeps |q - k| < sliding_window // 2 + 1 = 5: 4 keys each side
    assert not bidirectional.family.causal and bidirectional.family.layers[0].window == 4
    six = read("gemma3_text", layer_types=None, num_hidden_layers=7)  # every sixth layer global
    assert [k.window is None for k in six.family.layers] == [False] * 5 + [True, False]


def test_config_refusals_name_the_problem():
    import transformers

    raw = transformers.AutoConfig.for_model("llama", **CONFIGS["llama"], num_hidden_layers=2, vocab_size=100,
                                            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64}).to_dict()
    with pytest.raises(LoadError, match="rope_type 'llama3' is not supported"):
        EncoderConfig.from_dict(raw)
    raw = transformers.AutoConfig.for_model("qwen3", **CONFIGS["qwen3"], num_hidden_layers=2, vocab_size=100).to_dict()
    with pytest.raises(LoadError, match="num_key_value_heads 3 does not divide the 4 attention heads"):
        EncoderConfig.from_dict({**raw, "num_key_value_heads": 3})


def test_dtype_defaults_to_bf16_on_cuda_for_decoders():
    import transformers

    decoder = EncoderConfig.from_dict(transformers.AutoConfig.for_model(
        "qwen3", **CONFIGS["qwen3"], num_hidden_layers=2, vocab_size=100).to_dict())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype(None, cuda, decoder) == torch.bfloat16 and resolve_dtype(None, cpu, decoder) == torch.float32
    assert resolve_dtype("fp16", cuda, decoder) == torch.float16
    assert resolve_dtype(None, cuda, EncoderConfig.from_dict({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                              "num_hidden_layers": 1, "num_attention_heads": 2,
                                                              "intermediate_size": 8})) == torch.float16


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_family_matches_transformers(family_dir, backend):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    assert encoder.heads == frozenset()
    ids, mask = batch(encoder, LENGTHS)
    out = assert_hidden_matches(encoder, path, ids, mask)
    assert (out[3] == 0).all()  # the all-padding row
    if backend == "triton":  # a text's states are bitwise the same alone and in the packed batch
        alone = encoder(ids[2:3, :22], mask[2:3, :22])
        assert torch.equal(alone[0], out[2])


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_left_padding_and_holes(tmp_path, family):
    """Positions are the caller's columns (as transformers' RoPE counts them) and causality follows the
    row's order: left padding and a hole in the mask give transformers' states."""
    path = make_decoder(tmp_path, family, seed=2)
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask = batch(encoder, [20, 20, 20], seed=3)
    mask[0, :6] = 0
    mask[1, 9] = 0
    assert_hidden_matches(encoder, path, ids, mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_prefix_states_are_the_full_texts(backend, family_dir):
    """A causal model: a prefix's states equal the first states of the whole text (bitwise on Triton)."""
    family, path = family_dir
    if family != "qwen3" and backend == "triton":
        pytest.skip("one family is enough under the interpreter")
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    ids, mask = batch(encoder, [22], seed=4)
    full = encoder(ids, mask)
    for n in (1, 7, 13):
        prefix = encoder(ids[:, :n], mask[:, :n])
        if backend == "triton":
            assert torch.equal(prefix[0], full[0, :n])
        else:
            torch.testing.assert_close(prefix[0], full[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bidirectional_gemma_past_its_window(tmp_path, backend):
    """EmbeddingGemma's kind: bidirectional attention, a local layer of ±4 keys; texts of 22 tokens. The
    first token's state depends on later tokens (it would not in a causal model)."""
    path = make_decoder(tmp_path, "gemma3_text", seed=5, use_bidirectional_attention=True)
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    assert not encoder.config.family.causal
    ids, mask = batch(encoder, [22, 9, 16], seed=6)
    out = assert_hidden_matches(encoder, path, ids, mask)
    assert not torch.allclose(encoder(ids[:1, :5], mask[:1, :5])[0, 0], out[0, 0])


def test_sharded_checkpoint_loads_the_same_bits(tmp_path):
    path = make_decoder(tmp_path / "one", "qwen2", seed=7)
    sharded = save_sharded(shutil.copytree(path, tmp_path / "sharded"), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*"))) > 2
    ids, mask = batch(fastenc.Encoder.from_pretrained(path), [9, 4], seed=8)
    assert torch.equal(fastenc.Encoder.from_pretrained(sharded)(ids, mask), fastenc.Encoder.from_pretrained(path)(ids, mask))


def test_checkpoint_dtype_is_read_without_a_float32_copy(tmp_path):
    """A bfloat16 checkpoint loaded in bfloat16: the tensors are the file's, and the states match
    transformers' in bfloat16 under the tolerance rule."""
    path = make_decoder(tmp_path, "qwen3", seed=9)
    model = hf(path)
    model.to(torch.bfloat16).save_pretrained(str(path))
    encoder = fastenc.Encoder.from_pretrained(path, dtype="bf16")
    word = encoder.model.tensors["embeddings.word"]
    assert word.dtype == torch.bfloat16 and torch.equal(word, model.embed_tokens.weight)
    ids, mask = batch(encoder, [12, 5], seed=10)
    with torch.no_grad():
        reference = hf(path)(input_ids=ids, attention_mask=mask).last_hidden_state  # float32
        baseline = model(input_ids=ids, attention_mask=mask).last_hidden_state
    result = compare("bf16", encoder(ids, mask), reference, baseline, mask=mask)
    assert result.ok, result.line()


def test_fp16_overflow_is_an_error(tmp_path):
    path = make_decoder(tmp_path, "llama", seed=11)
    encoder = fastenc.Encoder.from_pretrained(path, dtype="fp16")
    ids, mask = batch(encoder, [6], seed=12)
    assert torch.isfinite(encoder(ids, mask)).all()
    encoder.model.tensors["final_norm.weight"].fill_(60000.0)  # a final norm past float16's range
    with pytest.raises(FastencError, match="overflowed float16.*dtype='bf16'"):
        encoder(ids, mask)


def test_optimize_refuses_decoders(family_dir):
    family, path = family_dir
    with pytest.raises(TypeError, match="decoder backbones"):
        fastenc.optimize(hf(path))


# ------------------------------------------------------------------------------------ sentence-transformers
def make_sentence_transformer(path, family: str, *, pooling: str, dense: int = 0, seed: int = 0,
                              template: str | None = None, **overrides):
    """A SentenceTransformer saved by sentence-transformers: the backbone, ``pooling``, ``dense`` perturbed
    Dense modules (24 wide, then back to the hidden size; EmbeddingGemma has two), Normalize, and a query
    prompt (an instruction, as Qwen3-Embedding's)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.sentence_transformer.modules import Pooling

    path = pathlib.Path(path)
    backbone = make_decoder(path.with_name(path.name + "-backbone"), family, seed=seed, **overrides)
    if template is not None:  # sentence-transformers then renders every text as a chat message
        with_template(backbone, template)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(backbone))
        hidden = transformer.get_embedding_dimension()
        layers, generator = [], torch.Generator().manual_seed(seed)
        for n_in, n_out in ((hidden, 24), (24, hidden))[:dense]:
            layer = Dense(n_in, n_out, activation_function=torch.nn.Identity())
            with torch.no_grad():
                for parameter in layer.parameters():
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            layers.append(layer)
        modules = [transformer, Pooling(hidden, pooling_mode=pooling), *layers, Normalize()]
        SentenceTransformer(modules=modules, device="cpu",
                            prompts={"query": "Instruct: find the passage\nQuery: ", "document": ""}).save(str(path))
    shutil.rmtree(backbone)
    return path


@pytest.mark.parametrize("family, pooling, dense, backend", [
    ("qwen3", "lasttoken", 0, "torch"),  # Qwen3-Embedding
    ("qwen3", "lasttoken", 0, "triton"),
    ("gemma3_text", "mean", 2, "torch"),  # EmbeddingGemma: bidirectional, mean pooling, two Dense modules
    ("mistral", "lasttoken", 0, "torch"),  # e5-mistral
])
def test_embed_equals_sentence_transformers(tmp_path, family, pooling, dense, backend):
    from sentence_transformers import SentenceTransformer

    overrides = {"use_bidirectional_attention": True} if family == "gemma3_text" else {}
    path = make_sentence_transformer(tmp_path / "st", family, pooling=pooling, dense=dense, seed=13, **overrides)
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    with quiet_transformers():
        model = SentenceTransformer(str(path), device="cpu")
    for prompt_name in ("query", None) if backend == "torch" else ("query",):  # the interpreter is slow
        ours = encoder.embed(TEXTS, prompt_name=prompt_name)
        theirs = model.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True)
        assert ours.shape == theirs.shape and torch.isfinite(ours).all()
        result = compare("embedding", ours, theirs)
        assert result.ok, result.line()
    if backend == "triton":  # a text's vector does not depend on its neighbours, bit for bit
        assert torch.equal(encoder.embed(TEXTS[3], prompt_name="query"), ours[3])


# -------------------------------------------------------------------------------------------- rerankers
QUERY = "what do cats do"
DOCUMENTS = ["the cat sat on the mat", "dogs and cats and birds", "hello world", "a", "",
             "the quick brown fox jumps over the lazy dog"]


def assert_ranks_like(ours, cross_encoder):
    theirs = cross_encoder.rank(QUERY, DOCUMENTS)
    assert [r["index"] for r in ours] == [r["corpus_id"] for r in theirs]
    predicted = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS], convert_to_tensor=True)
    scores = torch.tensor([r["score"] for r in sorted(ours, key=lambda r: r["index"])])
    result = compare("scores", scores, predicted.float())
    assert result.ok, result.line()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rerank_sequence_classification_equals_cross_encoder(tmp_path, backend):
    """A decoder ``ForSequenceClassification`` (the converted Qwen3-Reranker): the score at the last token."""
    from sentence_transformers import CrossEncoder

    path = make_decoder(tmp_path, "qwen3", head="sequence_classification", seed=14)
    rerank = fastenc.pipeline("rerank", path, backend=backend)
    assert rerank.encoder.heads == frozenset({"sequence_classification"})
    with quiet_transformers():
        assert_ranks_like(rerank(QUERY, DOCUMENTS), CrossEncoder(str(path), device="cpu"))


def test_rerank_prompts_equal_cross_encoder(tmp_path):
    """A CrossEncoder's prompts: the one named, or the default, prepended to the query of every pair; in the
    pipeline and in ``/rerank`` (its ``prompt_name``)."""
    from sentence_transformers import CrossEncoder
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    backbone = make_decoder(tmp_path / "lm", "qwen3", head="sequence_classification", seed=20)
    path = tmp_path / "ce"
    prompts = {"web": "Instruct: find a web page that answers the query\nQuery: ", "short": "q: "}
    with quiet_transformers():
        CrossEncoder(str(backbone), device="cpu", prompts=prompts, default_prompt_name="short").save(str(path))
        cross_encoder = CrossEncoder(str(path), device="cpu")
    rerank = fastenc.pipeline("rerank", path)
    for prompt_name in ("web", None):  # None: the default prompt, as CrossEncoder applies it
        ours = rerank(QUERY, DOCUMENTS, prompt_name=prompt_name)
        theirs = cross_encoder.rank(QUERY, DOCUMENTS, prompt_name=prompt_name)
        assert [r["index"] for r in ours] == [r["corpus_id"] for r in theirs]
        result = compare("scores", torch.tensor([r["score"] for r in ours]),
                         torch.tensor([float(r["score"]) for r in theirs]))
        assert result.ok, result.line()
    assert rerank(QUERY, DOCUMENTS, prompt="") != rerank(QUERY, DOCUMENTS)  # an explicit empty prompt: none
    with pytest.raises(fastenc.InputError, match="'missing'.*'short', 'web'"):
        rerank(QUERY, DOCUMENTS, prompt_name="missing")

    documents = [text for text in DOCUMENTS if text]
    expected = rerank(QUERY, documents, prompt_name="web", raw_scores=True)
    with TestClient(create_app(rerank.encoder, warmup=False)) as client:
        response = client.post("/rerank", json={"query": QUERY, "texts": documents, "raw_scores": True,
                                                "prompt_name": "web", "truncate": True})
        unknown = client.post("/rerank", json={"query": QUERY, "texts": documents, "prompt_name": "missing"})
    assert response.status_code == 200, response.text
    assert [r["index"] for r in response.json()] == [r["index"] for r in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(response.json(), expected))
    assert unknown.status_code == 422 and "missing" in unknown.text


@pytest.mark.parametrize("saved", [True, False])
def test_rerank_causal_lm_equals_cross_encoder(tmp_path, saved):
    """A ``ForCausalLM`` CrossEncoder (Qwen3-Reranker as published): the "yes" logit less the "no" logit at
    the last token, from a LogitScore module saved with the model (``saved``) or CrossEncoder's default."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules.logit_score import LogitScore

    backbone = make_decoder(tmp_path / "lm", "qwen2", head="causal_lm", seed=15)
    yes, no = (tokenizer().token_to_id(word) for word in ("yes", "no"))
    path = backbone
    if saved:  # other token ids than the default ones: the module's are the ones read
        yes, no = 40, 57
        path = tmp_path / "ce"
        with quiet_transformers():
            CrossEncoder(modules=[Transformer(str(backbone), transformer_task="text-generation"),
                                  LogitScore(yes, no)], device="cpu").save(str(path))
    rerank = fastenc.pipeline("rerank", path)
    assert rerank.score_task.true_token_id == yes and rerank.score_task.false_token_id == no
    with quiet_transformers():
        assert_ranks_like(rerank(QUERY, DOCUMENTS), CrossEncoder(str(path), device="cpu"))


def test_logit_scores_read_two_rows_of_the_lm_head(tmp_path):
    path = make_decoder(tmp_path, "gemma3_text", head="causal_lm", seed=16, final_logit_softcapping=3.0)
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask = batch(encoder, [9, 4], seed=17)
    packed = encoder.pack(ids, mask)
    logits = encoder.model.heads.last_token_logits(encoder.model(packed), packed.lengths, (5, 40))  # (2, 2)
    with torch.no_grad():
        full = hf(path, "causal_lm")(input_ids=ids, attention_mask=mask).logits  # (2, seq, vocab), soft-capped
    expected = full[torch.arange(2), torch.tensor([8, 3])][:, [5, 40]]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_serve_rerank_scores_with_the_logit_score(tmp_path):
    """``/rerank`` on a causal-LM CrossEncoder: the pipeline's pairs, its two-token score, its order."""
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    path = make_decoder(tmp_path, "qwen3", head="causal_lm", seed=18)
    encoder = fastenc.Encoder.from_pretrained(path)
    documents = [text for text in DOCUMENTS if text]  # TEI's /rerank refuses an empty text
    expected = fastenc.pipeline("rerank", encoder)(QUERY, documents, raw_scores=True)
    with TestClient(create_app(encoder, warmup=False)) as client:
        response = client.post("/rerank", json={"query": QUERY, "texts": documents, "raw_scores": True})
        assert "reranker" in client.get("/info").json()["model_type"]
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [r["index"] for r in ranks] == [r["index"] for r in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(ranks, expected))


# Qwen3-Reranker's kind of template: an instruction as the system message (or a default one), the query and
# the document in their roles, an assistant prefill the score is read after
RERANK_TEMPLATE = (
    "{%- set system = messages | selectattr('role', 'eq', 'system') | map(attribute='content') | first -%}"
    "<s>{{ system or 'web' }}</s><s>q: {{ messages | selectattr('role', 'eq', 'query') | map(attribute='content')"
    " | first }} d: {{ messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first }}</s>"
    " yes or no:")
EMBED_TEMPLATE = ("{%- for message in messages -%}<s>{{ message.role }}: {{ message.content[0].text }}</s>"
                  "{%- endfor -%} the vector:")  # structured messages: a content list


def with_template(path: pathlib.Path, template: str) -> pathlib.Path:
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": template}))
    return path


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chat_template_reranker_equals_cross_encoder(tmp_path, backend):
    """Qwen3-Reranker as published for sentence-transformers: a causal LM CrossEncoder whose tokenizer has a
    chat template, so each pair is rendered as query and document messages (a prompt as the system
    message) and scored at its last token; a pair cut to the length limit gets the template's tail back."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules.logit_score import LogitScore

    backbone = with_template(make_decoder(tmp_path / "lm", "qwen3", head="causal_lm", seed=22), RERANK_TEMPLATE)
    path = tmp_path / "ce"
    yes, no = (tokenizer().token_to_id(word) for word in ("yes", "no"))
    with quiet_transformers():
        CrossEncoder(modules=[Transformer(str(backbone), transformer_task="text-generation"), LogitScore(yes, no)],
                     device="cpu", prompts={"web": "find pages"}
                     ).save(str(path))
        cross_encoder = CrossEncoder(str(path), device="cpu")
    assert "message" in json.loads((path / "sentence_bert_config.json").read_text())["modality_config"]
    rerank = fastenc.pipeline("rerank", path, backend=backend)
    documents = DOCUMENTS + ["birds " * 30]  # over the 64-token limit: cut, the answer prompt restored
    rendered = rerank.pairs(QUERY, documents)
    assert len(rendered[-1].ids) == 64 and rendered[-1].ids[-3:] == rendered[0].ids[-3:]
    for prompt_name in ("web", None) if backend == "torch" else ("web",):  # the interpreter is slow
        ours = rerank(QUERY, documents, prompt_name=prompt_name)
        theirs = cross_encoder.rank(QUERY, documents, prompt_name=prompt_name)
        assert len({round(r["score"], 3) for r in ours}) == len(documents)  # an order to get right, no ties
        assert [r["index"] for r in ours] == [r["corpus_id"] for r in theirs]
        result = compare("scores", torch.tensor([r["score"] for r in ours]),
                         torch.tensor([float(r["score"]) for r in theirs]))
        assert result.ok, result.line()
    if backend == "torch":  # /rerank renders the pairs the same way
        from starlette.testclient import TestClient

        from fastenc.serve import create_app

        texts = [text for text in documents if text]
        expected = rerank(QUERY, texts, prompt_name="web", raw_scores=True)
        with TestClient(create_app(rerank.encoder, warmup=False)) as client:
            response = client.post("/rerank", json={"query": QUERY, "texts": texts, "raw_scores": True,
                                                    "prompt_name": "web", "truncate": True})
        assert response.status_code == 200, response.text
        assert [r["index"] for r in response.json()] == [r["index"] for r in expected]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(response.json(), expected))


def test_chat_template_embedder_equals_sentence_transformers(tmp_path):
    """A SentenceTransformer over a backbone with a chat template (structured messages): each text a user
    message, a prompt a system message pooled with the rest; the same vectors as ``encode``."""
    from sentence_transformers import SentenceTransformer

    path = make_sentence_transformer(tmp_path / "st", "qwen3", pooling="lasttoken", seed=23,
                                     template=EMBED_TEMPLATE)
    settings = json.loads((path / "sentence_bert_config.json").read_text())
    assert settings["modality_config"]["message"]["format"] == "structured"
    encoder = fastenc.Encoder.from_pretrained(path)
    with quiet_transformers():
        model = SentenceTransformer(str(path), device="cpu")
    texts = [text for text in TEXTS if text] + ["cats " * 50]  # one cut to the limit
    for prompt_name in ("query", None):
        ours = encoder.embed(texts, prompt_name=prompt_name)
        theirs = model.encode(texts, prompt_name=prompt_name, convert_to_tensor=True)
        result = compare("embedding", ours, theirs)
        assert result.ok, result.line()
    assert encoder(*batch(encoder, [4])).shape == (1, 4, 48)  # the tensor API does not tokenize: unaffected
    prompted = encoder.text.prompt("query").apply(["a text"])  # texts that carry their system message
    assert pickle.loads(pickle.dumps(prompted)) == ["a text"] and pickle.loads(pickle.dumps(prompted))[0].system


def test_chat_template_problems_are_named(tmp_path, monkeypatch):
    """A template that drops a pair's document, and a machine without transformers to render with."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules.logit_score import LogitScore

    backbone = with_template(make_decoder(tmp_path / "lm", "qwen3", head="causal_lm", seed=24),
                             "{%- for m in messages -%}{%- if m.role == 'query' -%}{{ m.content }}{%- endif -%}"
                             "{%- endfor -%}")
    with quiet_transformers():
        CrossEncoder(modules=[Transformer(str(backbone), transformer_task="text-generation"), LogitScore(5, 6)],
                     device="cpu").save(str(tmp_path / "ce"))
    rerank = fastenc.pipeline("rerank", tmp_path / "ce")
    with pytest.raises(FastencError, match="'document'"):
        rerank(QUERY, DOCUMENTS)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FastencError, match=r"fastenc\[hf\]"):
        fastenc.pipeline("rerank", tmp_path / "ce")(QUERY, DOCUMENTS)


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoder_on_cuda(tmp_path, family, dtype):
    """Qwen3-0.6B's layer shape (1024 wide, 16 query and 8 K/V heads of 128) and EmbeddingGemma's (768, 3 and
    1 heads of 256, a local layer of 256 keys each side, bidirectional), 2 layers, on the Triton backend
    against transformers' eager model, ragged lengths to 512: the error against float32 at most 3x
    transformers' own in ``dtype``. Then a sequence alone is its batch's bits, and a CUDA graph replay the
    eager result. bf16 is the default dtype there."""
    shapes = {"qwen3": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            intermediate_size=3072),
              "gemma3_text": dict(hidden_size=768, num_attention_heads=3, num_key_value_heads=1, head_dim=256,
                                  intermediate_size=1152, sliding_window=512, use_bidirectional_attention=True,
                                  query_pre_attn_scalar=256)}[family]
    path = make_decoder(tmp_path, family, seed=20, max_position_embeddings=1024, **shapes)
    assert fastenc.Encoder.from_pretrained(path, device="cuda").dtype == torch.bfloat16
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", dtype=dtype, backend="triton")
    ids, mask = batch(encoder, [512, 300, 1, 77], seed=21)
    model = hf(path).cuda()
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state.float()
        baseline = model.to(dtype)(**inputs).last_hidden_state.float()
    out = encoder(ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
    alone = encoder(ids[3:4, :77], mask[3:4, :77])
    assert torch.equal(alone[0], out[3, :77])
    packed = encoder.pack(*batch(encoder, [200, 33], seed=22))
    assert torch.equal(encoder.model(packed), encoder.forward_packed(packed))
