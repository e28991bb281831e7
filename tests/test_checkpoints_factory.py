"""Self-test of tests/checkpoints.py: the tiny checkpoints are what they claim to be."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402

# (hidden, heads, head_dim, layers, intermediate, max_positions, act, embedding_size)
EXPECTED = {
    "bert": (72, 3, 24, 2, 111, 96, "gelu", None),
    "roberta": (64, 2, 32, 2, 148, 100, "gelu", None),
    "xlm-roberta": (64, 2, 32, 3, 185, 66, "gelu", None),
    "camembert": (64, 2, 32, 2, 111, 82, "gelu_new", None),
    "distilbert": (120, 3, 40, 2, 259, 128, "gelu", None),
    "electra": (80, 2, 40, 2, 222, 72, "gelu_new", 48),
    "albert": (96, 4, 24, 3, 185, 112, "gelu_new", 40),
}


pytestmark = pytest.mark.usefixtures("one_thread")


PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
          "distilbert": "distilbert", "electra": "electra", "albert": "albert"}


def _safetensors_keys(path: pathlib.Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _cfg(model):
    c = model.config
    hidden = getattr(c, "dim", None) or c.hidden_size
    heads = getattr(c, "n_heads", None) or c.num_attention_heads
    layers = getattr(c, "n_layers", None) or c.num_hidden_layers
    inter = getattr(c, "hidden_dim", None) or c.intermediate_size
    act = getattr(c, "activation", None) if c.model_type == "distilbert" else c.hidden_act
    return hidden, heads, hidden // heads, layers, inter, c.max_position_embeddings, act


def _assert_perturbed(model, fresh):
    fresh_sd = dict(fresh.named_parameters())
    n = n_ln = 0
    for name, p in model.named_parameters():
        q = fresh_sd[name]
        assert p.shape == q.shape, name
        assert not torch.allclose(p, q), f"{name} equals its fresh initialisation"
        if p.ndim == 1 and name.endswith("bias"):
            assert p.abs().max() > 1e-3, f"{name} is all zeros"
        if C._is_layernorm_weight(model, name):
            assert not torch.allclose(p, torch.ones_like(p)), f"{name} is all ones"
            assert 0.8 < p.mean() < 1.2 and p.std() > 0.03, name
            n_ln += 1
        n += 1
    assert n > 10
    assert n_ln >= 3  # embeddings + at least one layer's two LayerNorms


@pytest.mark.parametrize("family", C.FAMILIES)
def test_base_checkpoint(family, tmp_path):
    import transformers

    path = C.make_checkpoint(tmp_path / family, family)
    assert path == tmp_path / family
    files = sorted(os.listdir(path))
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == family
    assert cfg["vocab_size"] >= C.tokenizer_size(family)
    assert 100 <= cfg["vocab_size"] <= 320

    model = C.hf_model(path)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    hidden, heads, hdim, layers, inter, maxpos, act, emb = EXPECTED[family]
    assert _cfg(model) == (hidden, heads, hdim, layers, inter, maxpos, act)
    assert inter & (inter - 1) != 0  # not a power of two
    # the file holds exactly the model's (base, un-prefixed) parameters
    keys = _safetensors_keys(path)
    assert keys == set(dict(model.named_parameters()))
    assert not any(k.startswith(PREFIX[family] + ".") for k in keys)

    word = model.get_input_embeddings().weight
    assert word.shape[0] == cfg["vocab_size"]
    if emb is not None:
        assert model.config.embedding_size == emb != hidden
        assert word.shape[1] == emb
    else:
        assert word.shape[1] == hidden
    if family in C.BPE_FAMILIES:
        assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (1, 0, 2)
        assert model.config.layer_norm_eps == 1e-5 and model.config.type_vocab_size == 1
    elif family != "distilbert":
        assert model.config.pad_token_id == 0
        assert model.config.type_vocab_size == 2 and model.config.layer_norm_eps == 1e-12
    if family == "albert":
        assert model.config.num_hidden_groups == 1 and model.config.inner_group_num == 1
        assert len(model.encoder.albert_layer_groups) == 1
        assert len(model.encoder.albert_layer_groups[0].albert_layers) == 1
        assert not any(".albert_layer_groups.1" in k for k in keys)

    # every parameter differs from a fresh initialisation (same seed, so exactly the perturbation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with C.quiet_transformers():
            fresh = transformers.AutoModel.from_config(model.config)
    _assert_perturbed(model, fresh)

    ids, mask = C.random_batch(cfg["vocab_size"], [13, 1, 40, 0], seed=3, pad_id=cfg["pad_token_id"])
    h = C.hf_last_hidden_state(path, ids, mask)
    assert h.shape == (4, 40, hidden) and h.dtype == torch.float32
    assert torch.isfinite(h).all()
    # deterministic; the seed matters
    again = C.make_checkpoint(tmp_path / "again", family)
    other = C.make_checkpoint(tmp_path / "other", family, seed=1)
    assert torch.equal(C.hf_last_hidden_state(again, ids, mask), h)
    assert not torch.allclose(C.hf_last_hidden_state(other, ids, mask), h)


@pytest.mark.parametrize("family", C.FAMILIES)
@pytest.mark.parametrize("head", [h for h in C.HEADS])
def test_head_checkpoint(family, head, tmp_path):
    path = C.make_checkpoint(tmp_path / "ck", family, head=head, tokenizer=None)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    model, info = C.hf_model(path, head, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    keys = _safetensors_keys(path)
    prefix = PREFIX[family] + "."
    assert any(k.startswith(prefix + "embeddings.") for k in keys), sorted(keys)[:5]
    # tied decoder weights are not written; they are the word embeddings after loading
    for target in C.SAVED_TIED_KEYS[family]:
        assert target not in keys
    out = model.get_output_embeddings()
    if head in ("mlm", "pretraining") and out is not None:
        assert out.weight is model.get_input_embeddings().weight
        assert out.weight.shape[0] == model.config.vocab_size
    if head == "sequence_classification":
        assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    if head == "token_classification":
        assert model.config.id2label[0] == "O" and model.config.num_labels == 5
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() > 1e-3, name
    # the base model loads from the head checkpoint with nothing missing but (maybe) the pooler
    ids, mask = C.random_batch(model.config.vocab_size, [7, 5], seed=0, pad_id=model.config.pad_token_id)
    h = C.hf_last_hidden_state(path, ids, mask)
    with torch.no_grad():
        ref = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(h, ref)


def test_num_labels_override(tmp_path):
    path = C.make_checkpoint(tmp_path / "a", "roberta", head="sequence_classification", num_labels=2)
    model = C.hf_model(path, "sequence_classification")
    assert model.config.num_labels == 2 and model.config.id2label == {0: "negative", 1: "neutral"}
    path = C.make_checkpoint(tmp_path / "b", "bert", head="token_classification", num_labels=3)
    assert C.hf_model(path, "token_classification").config.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}


def test_albert_groups_override(tmp_path):
    path = C.make_checkpoint(tmp_path / "a", "albert", num_hidden_groups=2, num_hidden_layers=4)
    model = C.hf_model(path)
    assert len(model.encoder.albert_layer_groups) == 2
    assert any(".albert_layer_groups.1." in k for k in _safetensors_keys(path))
    ids, mask = C.random_batch(model.config.vocab_size, [9, 3], seed=0)
    assert torch.isfinite(C.hf_last_hidden_state(path, ids, mask)).all()


def test_distilbert_override_aliases(tmp_path):
    path = C.make_checkpoint(tmp_path / "a", "distilbert", hidden_size=96, num_attention_heads=4,
                             num_hidden_layers=3, hidden_act="gelu_new")
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["dim"], cfg["n_heads"], cfg["n_layers"], cfg["activation"]) == (96, 4, 3, "gelu_new")


@pytest.mark.parametrize("family", C.FAMILIES)
@pytest.mark.parametrize("mode", ["json", "vocab"])
def test_tokenizer_files(family, mode, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = C.make_checkpoint(tmp_path / "ck", family, tokenizer=mode)
    files = set(os.listdir(path)) - {"config.json", "model.safetensors"}
    if mode == "json":
        assert files == {"tokenizer.json", "tokenizer_config.json"}
        ref = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        expected = {"vocab.txt"} if family in C.WORDPIECE_FAMILIES else {"vocab.json", "merges.txt"}
        assert files == expected | {"tokenizer_config.json"}
        ref = C._wordpiece_tokenizer() if family in C.WORDPIECE_FAMILIES else C.bpe_tokenizer()
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    assert ref.get_vocab_size() <= vocab_size
    with C.quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(path))
    sp = C.special_ids(family)
    mask = tok.mask_token
    texts = ["Hello world", f"The capital of France is {mask}.", "héllo  Wörld!! unseen-words xyzzy 42", ""]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text).ids, text
        assert ids[0] == sp["cls"] and ids[-1] == sp["sep"] and max(ids) < vocab_size
    assert tok("Hello world", "The cat")["input_ids"] == ref.encode("Hello world", "The cat").ids
    assert (tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (sp["pad"], sp["mask"], sp["unk"])
    assert sp["mask"] in tok(f"is {mask}.")["input_ids"]
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    maxpos = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    assert tok.model_max_length == (maxpos - 2 if family in C.BPE_FAMILIES else maxpos)


def test_bpe_training_is_cached_and_deterministic():
    vocab, merges = C._bpe_vocab_merges()
    cache = C._BPE_CACHE
    C._BPE_CACHE = None
    try:
        assert C._bpe_vocab_merges() == (vocab, merges)
    finally:
        C._BPE_CACHE = cache
    assert [vocab[t] for t in C.BPE_SPECIALS] == [0, 1, 2, 3, 4]
    assert len(merges) > 10 and len(vocab) <= C.BPE_VOCAB_SIZE


@pytest.mark.parametrize("subfolder", [False, True])
def test_sentence_transformer(subfolder, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = C.make_sentence_transformer(tmp_path / "st", pooling="mean", normalize=True, subfolder=subfolder,
                                       max_seq_length=48 if subfolder else None)
    modules = json.loads((path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["0_Transformer" if subfolder else "", "1_Pooling", "2_Normalize"]
    tdir = path / "0_Transformer" if subfolder else path
    assert (tdir / "model.safetensors").is_file() and (tdir / "sentence_bert_config.json").is_file()
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    with C.quiet_transformers():
        st = SentenceTransformer(str(path), device="cpu")
    assert st.max_seq_length == (48 if subfolder else 96)
    emb = st.encode(["hi", "Hello world"], convert_to_tensor=True)
    assert emb.shape == (2, 72) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))

    # mean pooling of the reference hidden state reproduces sentence-transformers
    enc = st.tokenize(["Hello world"])
    h = C.hf_last_hidden_state(tdir, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    pooled = torch.nn.functional.normalize(h.mean(1), dim=-1)
    torch.testing.assert_close(pooled[0], emb[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_sentence_transformer_pooling(pooling, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = C.make_sentence_transformer(tmp_path / "st", pooling=pooling, normalize=False)
    assert not (path / "2_Normalize").exists()
    cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert cfg[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'max_tokens'}"] is True
    with C.quiet_transformers():
        st = SentenceTransformer(str(path), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"]
    assert st.encode(["hi"]).shape == (1, 72)


@pytest.mark.parametrize("family,head", [("bert", None), ("xlm-roberta", "mlm"), ("albert", "sequence_classification")])
def test_save_sharded(family, head, tmp_path):
    path = C.make_checkpoint(tmp_path / "ck", family, head=head)
    ids, mask = C.random_batch(C.tokenizer_size(family), [11, 4], seed=0, pad_id=C.special_ids(family)["pad"])
    before = C.hf_last_hidden_state(path, ids, mask)
    keys = _safetensors_keys(path)
    assert C.save_sharded(path) == path
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == keys
    assert torch.equal(C.hf_last_hidden_state(path, ids, mask), before)
    assert (path / "tokenizer.json").is_file()


def test_rewrite_weights(tmp_path):
    path = C.make_checkpoint(tmp_path / "ck", "bert", tokenizer=None)
    ids, mask = C.random_batch(100, [6, 2], seed=0)
    before = C.hf_last_hidden_state(path, ids, mask)

    def legacy(name, t):
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        return "bert." + name, t

    C.rewrite_weights(path, legacy)
    keys = _safetensors_keys(path)
    assert "bert.embeddings.LayerNorm.gamma" in keys and "bert.embeddings.LayerNorm.beta" in keys
    assert all(k.startswith("bert.") for k in keys)
    # transformers still reads the prefixed legacy names: the reference is unchanged
    assert torch.equal(C.hf_last_hidden_state(path, ids, mask), before)

    C.rewrite_weights(path, lambda n, t: None if n == "bert.encoder.layer.1.output.dense.bias" else (n, t))
    assert "bert.encoder.layer.1.output.dense.bias" not in _safetensors_keys(path)
    with pytest.raises(RuntimeError, match="encoder.layer.1.output.dense.bias"):
        C.hf_last_hidden_state(path, ids, mask)


def test_random_batch():
    ids, mask = C.random_batch(50, [13, 1, 40, 0], seed=0, pad_id=1)
    assert ids.shape == mask.shape == (4, 40) and ids.dtype == mask.dtype == torch.long
    assert mask.sum(1).tolist() == [13, 1, 40, 0]
    assert ((ids == 1) == (mask == 0)).all()  # pad id exactly where padded
    assert ids.min() >= 0 and ids.max() < 50
    again, _ = C.random_batch(50, [13, 1, 40, 0], seed=0, pad_id=1)
    assert torch.equal(ids, again)
    assert not torch.equal(ids, C.random_batch(50, [13, 1, 40, 0], seed=1, pad_id=1)[0])
    ids, mask = C.random_batch(50, [5, 1, 0], seed=0, cls_id=2, sep_id=3)
    assert ids[0, 0] == 2 and ids[0, 4] == 3 and ids[1, 0] == 2 and (ids[2] == 0).all()
    ids, mask = C.random_batch(50, [0, 0], seed=0)
    assert ids.shape == (2, 1) and mask.sum() == 0
