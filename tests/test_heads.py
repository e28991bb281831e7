"""Task heads: loading per family, logits against transformers, tying, legacy names and load errors."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402
from task_helpers import task_checkpoint  # noqa: E402

import fastenc  # noqa: E402
from fastenc import Encoder, LoadError  # noqa: E402
from fastenc.check import compare  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LENGTHS = [7, 1, 12, 3]  # odd lengths, a one-token row, padding in every row but one


def _batch(encoder, family, seed=0):
    special = C.special_ids(family)
    return C.random_batch(encoder.config.vocab_size, LENGTHS, seed=seed, pad_id=special["pad"],
                          cls_id=special["cls"], sep_id=special["sep"])


def _packed_hidden(encoder, ids, mask):
    packed = encoder.pack(ids, mask)
    with torch.inference_mode():
        return packed, encoder.forward_packed(packed)


def _head_outputs(encoder, head, packed, hidden):
    with torch.inference_mode():
        if head == "mlm":
            return {"logits": encoder.model.heads.mlm_logits(hidden)}
        if head == "sequence_classification":
            return {"logits": encoder.model.heads.sequence_logits(hidden, packed.lengths)}
        if head == "token_classification":
            return {"logits": encoder.model.heads.token_logits(hidden)}
        start, end = encoder.model.heads.qa_logits(hidden)
        return {"start_logits": start, "end_logits": end}


@pytest.mark.parametrize("family, head", [(f, h) for f in C.ALL_FAMILIES for h in C.FAMILY_HEADS[f]])
def test_head_logits_match_transformers(family, head):
    path = task_checkpoint(family, head)
    encoder = Encoder.from_pretrained(path, device="cpu")
    model = C.hf_model(path, head)
    assert head in encoder.heads
    ids, mask = _batch(encoder, family)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask)
    packed, hidden = _packed_hidden(encoder, ids, mask)
    keep = mask.bool()
    for name, ours in _head_outputs(encoder, head, packed, hidden).items():
        theirs = reference[name]
        if head != "sequence_classification":  # per token: transformers' values at the real tokens
            theirs = theirs[keep]
        assert ours.shape == theirs.shape, name
        assert torch.isfinite(ours).all()
        result = compare(f"{family}/{head}/{name}", ours, theirs)
        assert result.ok, result.line()


@pytest.mark.parametrize("family", C.ALL_FAMILIES)
def test_heads_listed_as_transformers_builds_them(family):
    """Only the heads the checkpoint holds; the pooler exactly where transformers' model has one."""
    for head in (None, *C.FAMILY_HEADS[family]):
        path = task_checkpoint(family, head)
        encoder = Encoder.from_pretrained(path, device="cpu")
        model = C.hf_model(path, head)
        has_pooler = getattr(model.base_model, "pooler", None) is not None
        expected = ({head} if head else set()) | ({"pooler"} if has_pooler else set())
        assert encoder.heads == frozenset(expected), (family, head)


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "albert", "distilbert"])
def test_mlm_decoder_is_the_word_embedding_matrix_when_tied(family):
    encoder = Encoder.from_pretrained(task_checkpoint(family, "mlm"), device="cpu")
    assert "mlm.decoder.weight" not in encoder.model.heads.tensors("mlm")  # nothing copied: the encoder's own tensor
    hidden = torch.randn(3, encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([2, 0])
    logits = encoder.model.heads.mlm_logits(hidden, index)
    t, ops, c = encoder.model.heads.tensors("mlm"), encoder.model.ops, encoder.config
    x = ops.linear(hidden[index], t["mlm.dense.weight"], t["mlm.dense.bias"])
    activation = encoder.model.heads._activation("mlm")
    x = ops.gelu_layer_norm(x, t["mlm.norm.weight"], t["mlm.norm.bias"], c.layer_norm_eps, activation)
    expected = x @ encoder.model.tensors["embeddings.word"].t() + t["mlm.decoder.bias"]
    assert logits.shape == (2, c.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "electra", "distilbert"])
def test_untied_mlm_decoder(family):
    """An untied decoder is read from the checkpoint, with the bias its forward adds."""
    path = task_checkpoint(family, "mlm", tie_word_embeddings=False)
    encoder = Encoder.from_pretrained(path, device="cpu")
    assert "mlm.decoder.weight" in encoder.model.heads.tensors("mlm")
    model = C.hf_model(path, "mlm")
    ids, mask = _batch(encoder, family, seed=3)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    packed, hidden = _packed_hidden(encoder, ids, mask)
    result = compare(f"{family}/untied", encoder.model.heads.mlm_logits(hidden), reference)
    assert result.ok, result.line()


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Copy a checkpoint directory, passing its tensors through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(edit(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _edit_config(path: pathlib.Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_legacy_names_load(tmp_path):
    """``cls.predictions.decoder.bias`` only, and ``gamma``/``beta`` LayerNorm names, as older checkpoints have."""
    src = task_checkpoint("bert", "mlm")

    def legacy(tensors):
        out = {}
        for key, value in tensors.items():
            key = key.replace("cls.predictions.bias", "cls.predictions.decoder.bias")
            if "LayerNorm" in key:
                key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
            out[key] = value
        return out

    path = _rewrite(src, tmp_path / "legacy", legacy)
    old, new = Encoder.from_pretrained(path, device="cpu"), Encoder.from_pretrained(src, device="cpu")
    for name, tensor in new.model.heads.tensors("mlm").items():
        torch.testing.assert_close(old.model.heads.tensors("mlm")[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("family, head, dropped", [
    ("bert", "mlm", "cls.predictions.transform.dense.weight"),
    ("roberta", "sequence_classification", "classifier.out_proj.bias"),
    ("distilbert", "sequence_classification", "classifier.weight"),
    ("electra", "mlm", "generator_predictions.LayerNorm.bias"),
    ("albert", "question_answering", "qa_outputs.bias"),
])
def test_incomplete_head_names_the_missing_tensor(tmp_path, family, head, dropped):
    src = task_checkpoint(family, head)
    path = _rewrite(src, tmp_path / "partial", lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(LoadError, match=f"{head} head is incomplete.*missing '{dropped}'"):
        Encoder.from_pretrained(path, device="cpu")


def test_classifier_with_wrong_label_count_names_the_tensor(tmp_path):
    path = tmp_path / "labels"
    shutil.copytree(task_checkpoint("bert", "sequence_classification"), path)
    _edit_config(path, id2label={str(i): f"L{i}" for i in range(5)}, label2id=None)
    with pytest.raises(LoadError, match=r"'classifier.weight' has shape \[3, 72\], expected \[5, 72\]"):
        Encoder.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("family, head", [("bert", "sequence_classification"), ("bert", "token_classification"),
                                          ("albert", "sequence_classification"),
                                          ("distilbert", "sequence_classification"),
                                          ("distilbert", "token_classification")])
def test_classifier_kind_without_architectures(tmp_path, family, head):
    """Same tensor names, two heads: without ``architectures`` the pooler (or the larger head) decides."""
    path = tmp_path / "noarch"
    shutil.copytree(task_checkpoint(family, head), path)
    _edit_config(path, architectures=None)
    encoder = Encoder.from_pretrained(path, device="cpu")
    assert head in encoder.heads
    assert not ({"sequence_classification", "token_classification"} - {head}) & encoder.heads


def test_architectures_without_our_head_loads_the_encoder(tmp_path):
    """A ``*ForMultipleChoice`` checkpoint keeps ``classifier.*`` of another shape: not one of our heads."""
    path = tmp_path / "choice"
    shutil.copytree(task_checkpoint("bert", "sequence_classification"), path)
    _edit_config(path, architectures=["BertForMultipleChoice"], id2label=None, label2id=None)
    encoder = Encoder.from_pretrained(path, device="cpu")
    assert encoder.heads == frozenset({"pooler"})
    with pytest.raises(LoadError, match="BertForMultipleChoice, which has no sequence_classification head"):
        fastenc.pipeline("text-classification", encoder)


@pytest.mark.parametrize("task, family, head, missing", [
    ("fill-mask", "bert", None, "'cls.predictions.transform.dense.weight'"),
    ("fill-mask", "roberta", "sequence_classification", "'lm_head.dense.weight'"),
    ("text-classification", "roberta", None, "'classifier.dense.weight'"),
    ("text-classification", "bert", "mlm", "'bert.pooler.dense.weight'"),
    ("token-classification", "electra", None, "'classifier.weight'"),
    ("question-answering", "distilbert", "token_classification", "'qa_outputs.weight', 'qa_outputs.bias'"),
])
def test_pipeline_without_its_head_names_the_missing_tensors(task, family, head, missing):
    with pytest.raises(LoadError, match=f"missing tensor\\(s\\) .*{missing}"):
        fastenc.pipeline(task, task_checkpoint(family, head), device="cpu")


@pytest.mark.parametrize("family", C.FAMILIES)
def test_from_state_dict_matches_from_pretrained_and_shares_storage(family):
    path = task_checkpoint(family, "mlm")
    model = C.hf_model(path, "mlm")
    state = model.state_dict()
    encoder = Encoder.from_state_dict(model.config.to_dict(), state)
    reference = Encoder.from_pretrained(path, device="cpu")
    assert encoder.heads == reference.heads
    word = model.get_input_embeddings().weight
    assert encoder.model.tensors["embeddings.word"].data_ptr() == word.data_ptr()
    ids, mask = _batch(encoder, family, seed=5)
    torch.testing.assert_close(encoder(ids, mask), reference(ids, mask), rtol=0, atol=0)


def test_from_state_dict_missing_tensor_is_a_load_error():
    model = C.hf_model(task_checkpoint("bert", None))
    state = {k: v for k, v in model.state_dict().items() if "layer.1.output.dense.weight" not in k}
    with pytest.raises(LoadError, match=r"<state dict>: missing tensor 'encoder.layer.1.output.dense.weight'"):
        Encoder.from_state_dict(model.config.to_dict(), state)
