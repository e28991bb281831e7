"""The families after BERT — MPNet, ModernBERT, NomicBERT, GTE — against transformers, end to end.

Tiny perturbed checkpoints (tests/checkpoints.py: head dims 24, 40, 24, 28; ModernBERT with three layers,
global / local / local, and a window of ±8 tokens, so these sequences span several windows)
are compared with transformers under the tolerance rule (fastenc/check.py) on both backends (the Triton
one under the interpreter without a GPU), padded and packed (fp16 and bf16 on the Triton backend are
test_parity.py's, with every family); the Triton backend's results must be bitwise batch invariant.
The heads, pipelines and drop-in integrations of these families are tested with every other family's in
test_heads.py, test_pipelines.py and test_integrations.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import (NEW_FAMILIES, assert_matches_transformers, family_batch, hf_last_hidden_state, hf_model,
                         make_checkpoint)

import fastenc
from fastenc.check import compare
from fastenc.config import EncoderConfig

BACKENDS = ["torch", "triton"]
LENGTHS = [13, 1, 25, 0, 7]  # 25 tokens: wider than ModernBERT's 17-token windows
TEXTS = ["the cat sat on the mat", "a", "", "dogs and cats and birds " * 6, "hello world",
         "the quick brown fox jumps over the lazy dog and runs far away into the woods"]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_matches_transformers(family_dir, backend):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    ids, mask, types = family_batch(encoder, family, LENGTHS)
    out = assert_matches_transformers(encoder, path, ids, mask, types)
    assert (out[3] == 0).all()  # the all-padding row


def test_mask_with_holes_left_padding_and_full_length(family_dir):
    """Positions are the caller's columns, as transformers counts them: RoPE angles, MPNet's distances
    and ModernBERT's windows all see the holes."""
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask, types = family_batch(encoder, family, [30, 30, 30], seed=3)
    mask[0, 4] = 0  # a hole
    mask[1, :11] = 0  # left padding
    mask[2, 5:9] = 0  # a wide hole: keys across it are farther away than they are in the packed row
    assert_matches_transformers(encoder, path, ids, mask, types)
    ids, mask, types = family_batch(encoder, family, [encoder.config.max_length, 5], seed=6)
    assert_matches_transformers(encoder, path, ids, mask, types)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_agrees_with_padded(family_dir, backend):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend)
    texts = TEXTS if backend == "torch" else TEXTS[:3] + TEXTS[4:]  # the interpreter is slow: fewer tokens
    packed = encoder.pack_texts(texts, max_length=48)
    hidden = encoder.forward_packed(packed)
    batch = encoder.tokenize(texts, max_length=48)
    if not encoder.config.type_vocab_size:
        batch.pop("token_type_ids")
    reference = hf_last_hidden_state(path, **batch)
    assert torch.isfinite(hidden).all()
    result = compare("packed vs padded", hidden, reference[batch["attention_mask"].bool()])
    assert result.ok, result.line()


def test_triton_is_bitwise_batch_invariant_and_calls_no_torch_op(family_dir, monkeypatch):
    """A text's hidden states alone and in the middle of a batch are the same bits (the interpreter's
    exact dot: see fastenc/kernels/interpreter.py; embed() pools them per text, test_packed.py), and
    the Triton forward calls no torch attention, softmax, norm, activation, cosine or sine."""
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend="triton")

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton backend called a torch op it must replace")

    for name in ("scaled_dot_product_attention", "softmax", "layer_norm", "gelu", "silu", "relu"):
        monkeypatch.setattr(torch.nn.functional, name, forbidden)
    for name in ("softmax", "layer_norm", "relu", "cos", "sin"):
        monkeypatch.setattr(torch, name, forbidden)
    target = "the quick brown fox jumps over the lazy dog " * 2  # longer than ModernBERT's window
    texts = ["a", "", target, "hello world", "dogs and cats"]
    alone = encoder.forward_packed(encoder.pack_texts([target]))
    packed = encoder.pack_texts(texts)
    start = int(packed.cu_seqlens[2])
    assert torch.equal(encoder.forward_packed(packed)[start:start + alone.shape[0]], alone)


# ------------------------------------------------------------------------------------------ ModernBERT
@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("modernbert-long"), "modernbert", seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_spans_many_windows(modernbert_dir, backend, monkeypatch):
    """A 90-token sequence spans five windows of ±8 tokens: the local layers' result is transformers', it
    differs from global attention's (the window matters here), and the local layers asked for a window."""
    encoder = fastenc.Encoder.from_pretrained(modernbert_dir, backend=backend)
    windows, attention = [], encoder.model.ops.attention

    def spy(q, k, v, cu_seqlens, max_seqlen, positions=None, window=None, bias=None, **relative):
        windows.append(window)
        return attention(q, k, v, cu_seqlens, max_seqlen, positions, window, bias, **relative)

    monkeypatch.setattr(encoder.model, "ops", _Replace(encoder.model.ops, attention=spy))
    ids, mask, types = family_batch(encoder, "modernbert", [90, 3], seed=2)
    out = assert_matches_transformers(encoder, modernbert_dir, ids, mask, types)
    assert windows == [None, 8, 8]  # global, local, local
    wide = fastenc.Encoder.from_state_dict({**encoder.config.raw, "local_attention": 1000},
                                           hf_model(modernbert_dir).state_dict())
    assert (wide(ids, mask) - out).abs().max() > 1e-3


class _Replace:
    """An ops module with some functions replaced."""

    def __init__(self, ops, **functions):
        self._ops, self._functions = ops, functions

    def __getattr__(self, name):
        return self._functions.get(name) or getattr(self._ops, name)


def test_modernbert_with_biases_and_old_config_keys(tmp_path):
    """Biases everywhere (attention_bias, mlp_bias, norm_bias, classifier_bias), and a config.json as the
    hub's ModernBERT checkpoints have it: no layer_types or rope_parameters, but global_attn_every_n_layers,
    global_rope_theta and local_rope_theta."""
    path = make_checkpoint(tmp_path / "biased", "modernbert", seed=4, attention_bias=True, mlp_bias=True,
                           norm_bias=True, num_hidden_layers=5, global_attn_every_n_layers=2)
    encoder = fastenc.Encoder.from_pretrained(path)
    assert encoder.config.family.biases == {"qkv", "attn_out", "ffn_in", "ffn_out", "norm"}
    ids, mask, types = family_batch(encoder, "modernbert", [30, 12], seed=1)
    expected = assert_matches_transformers(encoder, path, ids, mask, types)

    old = tmp_path / "old"
    shutil.copytree(path, old)
    config = json.loads((old / "config.json").read_text())
    thetas = {kind: config["rope_parameters"][kind]["rope_theta"] for kind in config["rope_parameters"]}
    for key in ("layer_types", "rope_parameters"):
        del config[key]
    config.update(global_rope_theta=thetas["full_attention"], local_rope_theta=thetas["sliding_attention"])
    (old / "config.json").write_text(json.dumps(config))
    legacy = fastenc.Encoder.from_pretrained(old)
    assert legacy.config.family == encoder.config.family
    assert torch.equal(legacy(ids, mask), expected)
    assert [kind.window for kind in legacy.config.family.layers] == [None, 8, None, 8, None]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_classifier_pooling(tmp_path, pooling):

    path = make_checkpoint(tmp_path, "modernbert", head="sequence_classification", classifier_pooling=pooling,
                           classifier_bias=True, seed=3)
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask, _ = family_batch(encoder, "modernbert", [30, 3, 17], seed=4)
    with torch.no_grad():
        expected = hf_model(path, "sequence_classification")(input_ids=ids, attention_mask=mask).logits
    packed = encoder.pack(ids, mask)
    got = encoder.model.heads.sequence_logits(encoder.forward_packed(packed), packed.lengths)
    result = compare(f"classifier_pooling={pooling}", got, expected)
    assert result.ok, result.line()


# ------------------------------------------------------------------------------- layouts and configs
def test_gte_without_token_types(tmp_path):
    """gte-base-en-v1.5's layout: type_vocab_size 0, no token-type table."""
    path = make_checkpoint(tmp_path, "gte", seed=6, type_vocab_size=0)
    encoder = fastenc.Encoder.from_pretrained(path)
    assert encoder.config.type_vocab_size == 0 and "embeddings.token_type" not in encoder.model.tensors
    ids, mask, _ = family_batch(encoder, "gte", [19, 4], seed=5)
    assert_matches_transformers(encoder, path, ids, mask, None)


@pytest.mark.parametrize("family", ["nomic_bert", "gte"])
def test_hub_and_transformers_layouts_load_alike(family, tmp_path):
    """transformers saves NomicBERT and GTE in the hub's layout (emb_ln, Wqkv, fc11/fc12, up_gate_proj …);
    a live model's state_dict has its own module names. Both load, to the same encoder."""
    path = make_checkpoint(tmp_path / family, family, seed=2)
    from_disk = fastenc.Encoder.from_pretrained(path)
    model = hf_model(path)
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    from_model = fastenc.Encoder.from_state_dict(model.config.to_dict(), model.state_dict())
    ids, mask, types = family_batch(from_disk, family, [17, 5], seed=8)
    assert torch.equal(from_disk(ids, mask, types), from_model(ids, mask, types))


def test_nomic_embed_hub_config(tmp_path):
    """nomic-embed's own config.json (GPT-2-style names: n_embd, rotary_emb_base, activation_function
    "swiglu", …) reads as transformers' NomicBertConfig; its rotary_emb_interleaved checkpoints, whose Q and
    K rows are in pair order already, load too."""
    from fastenc import family as families
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "native", "nomic_bert", seed=3)
    expected_encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask, types = family_batch(expected_encoder, "nomic_bert", [17, 5], seed=2)
    expected = expected_encoder(ids, mask, types)
    native = json.loads((path / "config.json").read_text())
    hub = {key: value for key, value in native.items()
           if key not in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                          "max_position_embeddings", "layer_norm_eps", "rope_parameters", "hidden_act", "head_dim")}
    hub.update(n_embd=native["hidden_size"], n_head=native["num_attention_heads"], n_layer=native["num_hidden_layers"],
               n_inner=native["intermediate_size"], n_positions=native["max_position_embeddings"],
               layer_norm_epsilon=native["layer_norm_eps"], rotary_emb_base=native["rope_parameters"]["rope_theta"],
               rotary_emb_fraction=1.0, rotary_emb_interleaved=False, activation_function="swiglu", prenorm=False,
               qkv_proj_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False)
    (path / "config.json").write_text(json.dumps(hub))
    assert torch.equal(fastenc.Encoder.from_pretrained(path)(ids, mask, types), expected)

    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if k.endswith("attn.Wqkv.weight")]:
        tensors[key] = families.rotary_pair_order(tensors[key], native["num_attention_heads"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**hub, "rotary_emb_interleaved": True}))
    torch.testing.assert_close(fastenc.Encoder.from_pretrained(path)(ids, mask, types), expected, rtol=0, atol=0)
    for change, needle in (({"activation_function": "gelu"}, "activation_function 'gelu'"),
                           ({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction 0.5"),
                           ({"prenorm": True}, "prenorm True")):
        (path / "config.json").write_text(json.dumps({**hub, **change}))
        with pytest.raises(fastenc.LoadError, match=needle):
            fastenc.Encoder.from_pretrained(path)


def test_mpnet_sentence_transformer_embeddings(tmp_path):
    """all-mpnet-base-v2's layout (mean pooling, normalised): embed(), and the optimized
    SentenceTransformer, against sentence-transformers."""
    from checkpoints import make_sentence_transformer, quiet_transformers
    from sentence_transformers import SentenceTransformer

    path = make_sentence_transformer(tmp_path / "st", family="mpnet", pooling="mean", normalize=True)
    encoder = fastenc.Encoder.from_pretrained(path)
    with quiet_transformers():
        expected = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
        optimized = fastenc.optimize(SentenceTransformer(str(path), device="cpu"))
    for name, got in (("embed", encoder.embed(TEXTS)), ("optimize", optimized.encode(TEXTS, convert_to_tensor=True))):
        result = compare(name, got, expected)
        assert result.ok, result.line()


def test_check_passes_on_each_family(family_dir):
    from fastenc.check import run_check

    _, path = family_dir
    for comparison in run_check(path):
        assert comparison.ok, comparison.line()


@pytest.mark.parametrize("model_type, changes, needle", [
    ("mpnet", {"relative_attention_num_buckets": 16}, "below the 32 buckets"),
    ("mpnet", {"pad_token_id": 0}, "padding id 1"),
    ("nomic_bert", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10.0}}, "rope_type 'yarn'"),
    ("gte", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("gte", {"hidden_size": 54, "num_attention_heads": 2}, "even head dim"),
    ("nomic_bert", {"head_dim": 48}, "head_dim 48"),
    ("modernbert", {"layer_types": ["full_attention", "chunked"]}, "layer_types"),
    ("modernbert", {"global_rope_theta": -1}, "rope_theta must be"),
])
def test_config_errors_name_the_problem(model_type, changes, needle):
    raw = {"model_type": model_type, "vocab_size": 50, "hidden_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 37, "pad_token_id": 1, **changes}
    with pytest.raises(fastenc.LoadError, match=needle):
        EncoderConfig.from_dict(raw)


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_modernbert_base_on_cuda(tmp_path, dtype):
    """ModernBERT-base shapes (12 x 768, 22 layers: global every third, windows of ±64) on the Triton
    backend against transformers' ModernBERT with SDPA, sequences up to 1024 tokens: fastenc's error
    against the fp32 model is at most 3x that of transformers run in the same dtype. Then the CUDA graph
    replay of a small batch gives the eager result bit for bit."""
    path = make_checkpoint(tmp_path, "modernbert", seed=7, hidden_size=768, num_attention_heads=12,
                           num_hidden_layers=22, intermediate_size=1152, local_attention=128,
                           max_position_embeddings=1024, tokenizer=None, vocab_size=1000)
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", dtype=dtype, backend="triton")
    ids, mask, _ = family_batch(encoder, "modernbert", [1024, 300, 1, 0, 77], seed=8)
    model = hf_model(path, None, "sdpa").cuda()
    with torch.no_grad():
        inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
        reference = model(**inputs).last_hidden_state.float()
        baseline = model.to(dtype)(**inputs).last_hidden_state.float()
    out = encoder(ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
    assert (out[mask == 0] == 0).all()
    packed = encoder.pack(*family_batch(encoder, "modernbert", [200, 33], seed=9)[:2])
    assert torch.equal(encoder.model(packed), encoder.forward_packed(packed))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mpnet", "nomic_bert", "gte"])
def test_base_shapes_on_cuda(tmp_path, family):
    """MPNet, NomicBERT and GTE at base shapes (12 x 768), fp16, on the Triton backend against transformers."""
    path = make_checkpoint(tmp_path, family, seed=7, hidden_size=768, num_attention_heads=12, num_hidden_layers=4,
                           intermediate_size=3072, max_position_embeddings=514, tokenizer=None, vocab_size=1000)
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", dtype=torch.float16, backend="triton")
    ids, mask, types = family_batch(encoder, family, [512, 200, 1, 0, 77], seed=8)
    model = hf_model(path, None, "eager").cuda()
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    if types is not None:
        inputs["token_type_ids"] = types.cuda()
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state.float()
        baseline = model.half()(**inputs).last_hidden_state.float()
    out = encoder(ids, mask, types)
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
