"""DeBERTa-v2/v3 beyond what every family gets (test_families.py, test_parity.py, test_heads.py,
test_pipelines.py and test_integrations.py run its default, v3-like tiny checkpoint), and zero-shot
classification for any family with an NLI head.

The configurations DeBERTa checkpoints come in, each against transformers' own model: position keys of
their own (``share_att_key`` false) or the layer's, c2p alone, p2c alone, absolute positions with raw
(unbucketed) distances and token types (DeBERTa-v2 style), v2-xlarge's convolution beside the first
block (grouped too), an embedding projection (``embedding_size != hidden_size``), the non-legacy MLM
head; every parameter perturbed, 8 position buckets (texts reach far past them), an odd head dim (21).
Then the entry points: ``pipeline("zero-shot-classification")`` against transformers' (DeBERTa and
BERT NLI heads), in packed batches; ``fastenc run``; ``embed --file``; Ray's ``EmbedBatch``; a
SentencePiece-only checkpoint's one-line error.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from checkpoints import assert_matches_transformers, family_batch, hf_model, make_checkpoint, quiet_transformers
from task_helpers import compare_outputs

import fastenc
from fastenc.check import compare
from fastenc.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VARIANTS = {
    "own-keys-c2p": dict(share_att_key=False, pos_att_type=["c2p"]),
    "p2c": dict(pos_att_type=["p2c"], norm_rel_ebd="none"),
    "v2-absolute": dict(position_biased_input=True, type_vocab_size=2, position_buckets=-1, max_relative_positions=24,
                        share_att_key=False, norm_rel_ebd="none"),
    "conv": dict(conv_kernel_size=3, conv_act="gelu", hidden_act="gelu_new"),
    "conv-groups-tanh": dict(conv_kernel_size=5, conv_groups=3),
    "embedding-projection": dict(embedding_size=24, share_att_key=False),
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deberta-variants")
    return {name: make_checkpoint(root / name, "deberta-v2", seed=i + 2, **overrides)
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_transformers(variant_dirs, variant):
    path = variant_dirs[variant]
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask, types = family_batch(encoder, "deberta-v2", [37, 1, 0, 12], seed=3)
    assert_matches_transformers(encoder, path, ids, mask, types)
    mask[0, 5:8] = 0  # a hole: the convolution's neighbours and the distances are the caller's columns
    mask[3, :2] = 0  # left padding
    assert_matches_transformers(encoder, path, ids, mask, types)


@pytest.mark.parametrize("variant", ["conv", "embedding-projection", "own-keys-c2p"])
def test_variants_on_triton_match_transformers_and_are_batch_invariant(variant_dirs, variant):
    path = variant_dirs[variant]
    encoder = fastenc.Encoder.from_pretrained(path, backend="triton")
    ids, mask, types = family_batch(encoder, "deberta-v2", [30, 9, 1], seed=4)
    out = assert_matches_transformers(encoder, path, ids, mask, types)
    alone = encoder(ids[1:2, :9], mask[1:2, :9], None if types is None else types[1:2, :9])
    assert torch.equal(alone[0], out[1, :9])


def test_the_relative_terms_and_the_convolution_matter(variant_dirs):
    """Guards against a test that cannot fail: without c2p / p2c, or without the convolution, the hidden
    states are far from transformers'."""
    path = variant_dirs["conv"]
    encoder = fastenc.Encoder.from_pretrained(path)
    ids, mask, types = family_batch(encoder, "deberta-v2", [37, 12], seed=5)
    expected = assert_matches_transformers(encoder, path, ids, mask, types)
    state = hf_model(path).state_dict()
    for change in ({"pos_att_type": ["p2c"]}, {"pos_att_type": ["c2p"]}, {"conv_kernel_size": 0}):
        other = fastenc.Encoder.from_state_dict({**encoder.config.raw, **change}, state)
        assert (other(ids, mask, types) - expected).abs().max() > 1e-2, change


@pytest.mark.parametrize("head, overrides", [("mlm", dict(legacy=False)), ("mlm", dict(embedding_size=24)),
                                             ("sequence_classification", dict(pooler_hidden_act="tanh",
                                                                              share_att_key=False))])
def test_heads_of_other_layouts(tmp_path, head, overrides):
    """The MLM head's two layouts (``legacy``: to ``embedding_size``, tied; new: ``lm_predictions``) and the
    context pooler with another activation."""
    path = make_checkpoint(tmp_path, "deberta-v2", head=head, seed=6, **overrides)
    encoder = fastenc.Encoder.from_pretrained(path)
    assert encoder.heads == {head}
    ids, mask, _ = family_batch(encoder, "deberta-v2", [25, 6], seed=7)
    with torch.no_grad():
        expected = hf_model(path, head)(input_ids=ids, attention_mask=mask).logits
    packed = encoder.pack(ids, mask)
    hidden = encoder.forward_packed(packed)
    if head == "mlm":
        got, expected = encoder.model.heads.mlm_logits(hidden), expected[mask.bool()]
    else:
        got = encoder.model.heads.sequence_logits(hidden, packed.lengths)
    result = compare(f"{head} {overrides}", got, expected)
    assert result.ok, result.line()


def test_pair_token_types_are_ignored_without_a_type_table(base_dir):
    """DeBERTa-v3's tokenizer sends type 1 for a pair's second text and its model, without a type table,
    ignores it: so does fastenc, and an optimized transformers model fed the tokenizer's output keeps its
    logits."""
    encoder = fastenc.Encoder.from_pretrained(base_dir)
    pairs = dict(zip(("input_ids", "attention_mask", "token_type_ids"), _pair_batch(base_dir)))
    assert pairs["token_type_ids"].max() == 1
    assert torch.equal(encoder(**pairs), encoder(pairs["input_ids"], pairs["attention_mask"]))
    path = make_checkpoint(base_dir.parent / "nli-types", "deberta-v2", head="sequence_classification", seed=11)
    model = hf_model(path, "sequence_classification")
    pairs = dict(zip(("input_ids", "attention_mask", "token_type_ids"), _pair_batch(path)))
    with torch.no_grad():
        expected = model(**pairs).logits
        got = fastenc.optimize(model)(**pairs).logits
    result = compare("optimized logits", got, expected)
    assert result.ok, result.line()


def _pair_batch(path):
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(["the cat sat", "Paris"], ["on the mat", "is in France and Paris is nice"], padding=True,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def test_config_errors_name_the_problem():
    base = {"model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 37, "relative_attention": True}
    for change, needle in (({"pos_att_type": ["c2p", "p2p"]}, "pos_att_type"),
                           ({"conv_kernel_size": 4}, "conv_kernel_size 4"),
                           ({"conv_kernel_size": 3, "conv_groups": 5}, "conv_groups 5"),
                           ({"conv_kernel_size": 3, "conv_act": "mish"}, "conv_act 'mish'"),
                           ({"share_att_key": "yes"}, "share_att_key")):
        with pytest.raises(fastenc.LoadError, match=needle):
            fastenc.EncoderConfig.from_dict({**base, **change})
    old = fastenc.EncoderConfig.from_dict({**base, "pos_att_type": "p2c|c2p"}).family.disentangled
    assert old.c2p and old.p2c  # the old "p2c|c2p" spelling


# ------------------------------------------------------------------------------------------- zero-shot
NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


@pytest.fixture(scope="module", params=["deberta-v2", "bert"])
def nli(request, tmp_path_factory):
    import transformers

    path = make_checkpoint(tmp_path_factory.mktemp(f"nli-{request.param}"), request.param,
                           head="sequence_classification", id2label=NLI_LABELS, seed=8)
    with quiet_transformers():
        theirs = transformers.pipeline("zero-shot-classification", model=str(path), device="cpu")
    return fastenc.pipeline("zero-shot-classification", path, device="cpu"), theirs


LONG = "The quick brown fox jumps over the lazy dog, and the cat sat on the mat with the dog. " * 6


def test_zero_shot_matches_transformers(nli):
    ours, theirs = nli
    labels = ["sports", "politics", "science and technology", "cooking"]
    cases = [("Paris is the capital of France.", dict(candidate_labels=labels)),
             ("Paris is the capital of France.", dict(candidate_labels=labels, multi_label=True)),
             ("a", dict(candidate_labels=["one label only"])),
             ("The cat sat.", dict(candidate_labels="sports, cooking,  travel")),  # a comma-separated string
             ("The cat sat.", dict(candidate_labels=labels, hypothesis_template="This text is about {}.")),
             (["Hello world!", LONG], dict(candidate_labels=labels[:3])),  # LONG: its premise is cut first
             (["Hello world!"], dict(candidate_labels=labels[:2]))]
    for inputs, kwargs in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs(inputs, **kwargs)
        got = ours(inputs, **kwargs)
        assert compare_outputs(got, expected) <= 1e-5, (inputs, kwargs)
    assert ours("Paris.", labels) == ours("Paris.", candidate_labels=labels)  # labels as the second argument


def test_zero_shot_pairs_run_in_packed_batches(nli, monkeypatch):
    ours, _ = nli
    texts, labels = ["a cat", "the dog sat on the mat", "hello world"], ["a", "b", "c", "d"]
    one_by_one = [ours(text, candidate_labels=labels) for text in texts]
    calls = []
    forward = ours.model.forward
    monkeypatch.setattr(ours.model, "forward", lambda packed: calls.append(len(packed.lengths)) or forward(packed))
    assert compare_outputs(ours(texts, candidate_labels=labels), one_by_one) <= 1e-6
    assert calls == [12]  # the 3 x 4 pairs in one packed batch
    calls.clear()
    ours(texts, candidate_labels=labels, batch_size=5)
    assert calls == [5, 5, 2]


def test_zero_shot_entailment_label_and_errors(tmp_path):
    path = make_checkpoint(tmp_path / "nli", "deberta-v2", head="sequence_classification",
                           id2label={0: "CONTRADICTION", 1: "Neutral", 2: "ENTAILMENT"}, seed=9)
    assert fastenc.pipeline("zero-shot-classification", path).entailment_id == 2  # found as transformers does
    plain = make_checkpoint(tmp_path / "plain", "deberta-v2", head="sequence_classification", seed=9)
    with pytest.warns(UserWarning, match="entailment"):
        pipe = fastenc.pipeline("zero-shot-classification", plain)
    assert pipe.entailment_id == -1
    for kwargs, needle in ((dict(candidate_labels=[]), "at least one label"),
                           (dict(candidate_labels=["a"], hypothesis_template="no slot"), "hypothesis_template")):
        with pytest.raises(fastenc.InputError, match=needle):
            pipe("text", **kwargs)
    with pytest.raises(fastenc.InputError, match="at least one label and at least one sequence"):
        pipe([], candidate_labels=["a"])
    with pytest.raises(fastenc.InputError, match="text 1 is empty"):  # transformers refuses it too
        pipe(["a", ""], candidate_labels=["a"])


def test_cli_run_zero_shot(nli, capsys):
    ours, _ = nli
    code = main(["run", "zero-shot-classification", "--model", str(ours.encoder.path), "--device", "cpu",
                 "--candidate-labels", "sports,cooking", "--multi-label", "a b", "c"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and lines == ours(["a b", "c"], candidate_labels=["sports", "cooking"], multi_label=True)


# ----------------------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("deberta-base"), "deberta-v2", seed=10)


def test_embed_file_ray_batch_and_sentencepiece_only(base_dir, tmp_path, capsys):
    import pyarrow as pa

    from fastenc.integrations.ray import EmbedBatch

    texts = ["the cat sat on the mat", "", "Paris is the capital of France. " * 5, "a"]
    encoder = fastenc.Encoder.from_pretrained(base_dir)
    expected = encoder.embed(texts)
    corpus, output = tmp_path / "corpus.txt", tmp_path / "vectors.npy"
    corpus.write_text("\n".join(texts) + "\n")
    assert main(["embed", "--model", str(base_dir), "--device", "cpu", "--file", str(corpus), "--output",
                 str(output)]) == 0
    assert torch.equal(torch.from_numpy(np.load(output)), expected)
    table = EmbedBatch(base_dir)(pa.table({"text": texts}))  # what each Ray actor runs
    assert torch.equal(torch.tensor(table.column("embedding").to_pylist()), expected)

    spm = tmp_path / "spm-only"
    spm.mkdir()
    for name in ("config.json", "model.safetensors"):
        (spm / name).symlink_to(base_dir / name)
    (spm / "spm.model").write_bytes(b"\x00")
    only = fastenc.Encoder.from_pretrained(spm)  # the tensor API works without a tokenizer
    assert torch.equal(only(torch.tensor([[1, 50, 51, 2]])), encoder(torch.tensor([[1, 50, 51, 2]])))
    message = r"SentencePiece \(spm.model\) without a tokenizer.json.*AutoTokenizer.from_pretrained"
    with pytest.raises(fastenc.LoadError, match=message):
        only.embed("text")
    assert main(["embed", "--model", str(spm), "--device", "cpu", "text"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "spm.model" in error and "save_pretrained" in error


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deberta_v3_base_on_cuda(tmp_path, dtype):
    """DeBERTa-v3-base shapes (12 x 768, 256 buckets, c2p and p2c, shared keys; 4 layers) on the Triton
    backend against transformers' eager model, ragged lengths up to 512 (distances past the buckets): the
    error against float32 at most 3x transformers' own in ``dtype``. Then a sequence alone is its batch's
    bits, and a CUDA graph replay the eager result."""
    path = make_checkpoint(tmp_path, "deberta-v2", seed=7, hidden_size=768, num_attention_heads=12, num_hidden_layers=4,
                           intermediate_size=3072, max_position_embeddings=512, position_buckets=256, tokenizer=None,
                           vocab_size=1000)
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", dtype=dtype, backend="triton")
    ids, mask, _ = family_batch(encoder, "deberta-v2", [512, 300, 1, 0, 77], seed=8)
    model = hf_model(path, None, "eager").cuda()
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state.float()
        baseline = model.to(dtype)(**inputs).last_hidden_state.float()
    out = encoder(ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
    alone = encoder(ids[4:5, :77], mask[4:5, :77])
    assert torch.equal(alone[0], out[4, :77])
    packed = encoder.pack(*family_batch(encoder, "deberta-v2", [200, 33], seed=9)[:2])
    assert torch.equal(encoder.model(packed), encoder.forward_packed(packed))
