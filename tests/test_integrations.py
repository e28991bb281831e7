"""Drop-in: ``fastenc.optimize`` on transformers and sentence-transformers models, ``attn_implementation="fastenc"``.

Every comparison applies the tolerance rule (``fastenc.check.compare``) against the unpatched model,
on the positions where the attention mask is 1 (per-sequence outputs: on the rows with a real token).
Each test also checks that fastenc really ran, so a silent fall-back to transformers cannot pass.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402
from task_helpers import task_checkpoint  # noqa: E402

import fastenc  # noqa: E402
from fastenc import reference  # noqa: E402
from fastenc.check import compare  # noqa: E402
from fastenc.integrations import transformers as integration  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LENGTHS = [9, 2, 13, 0, 5]  # odd lengths, padding, and an all-padding row


def _batch(model, family, seed=0, lengths=LENGTHS):
    special = C.special_ids(family)
    return C.random_batch(model.config.vocab_size, lengths, seed=seed, pad_id=special["pad"], cls_id=special["cls"],
                          sep_id=special["sep"])


def _count_encoder_calls(monkeypatch, model) -> list:
    """Count the fastenc encoder's forward passes inside an optimized model."""
    encoder = model.base_model._fastenc_patch.encoder
    calls, forward = [], encoder.model.forward
    monkeypatch.setattr(encoder.model, "forward", lambda packed: calls.append(packed.num_tokens) or forward(packed))
    return calls


def _assert_close_on_real_positions(name, ours, theirs, mask):
    keep = mask.bool()
    if ours.dim() >= 2 and tuple(ours.shape[:2]) == tuple(keep.shape):
        result = compare(name, ours, theirs, mask=keep)
    else:  # one row per sequence: rows without any real token are not compared
        rows = keep.any(1)
        result = compare(name, ours[rows], theirs[rows])
    assert torch.isfinite(ours[keep.any(1)]).all(), name
    assert result.ok, result.line()
    return result


@pytest.mark.parametrize("family, head", [(f, h) for f in C.ALL_FAMILIES for h in (None, *C.FAMILY_HEADS[f])])
def test_optimize_keeps_outputs(monkeypatch, family, head):
    path = task_checkpoint(family, head)
    reference_model, model = C.hf_model(path, head), C.hf_model(path, head)
    assert fastenc.optimize(model) is model
    calls = _count_encoder_calls(monkeypatch, model)
    ids, mask = _batch(model, family)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected, got = reference_model(**inputs), model(**inputs)
    assert calls == [int(mask.sum())]
    assert list(got.keys()) == list(expected.keys())
    for name in expected.keys():
        _assert_close_on_real_positions(f"{family}/{head}/{name}", got[name], expected[name], mask)
    if head is None:
        assert bool((got.last_hidden_state[~mask.bool()] == 0).all())


@pytest.mark.parametrize("family, name", [("bert", "BertForPreTraining"), ("electra", "ElectraForPreTraining"),
                                          ("albert", "AlbertForMultipleChoice"),
                                          ("roberta", "RobertaForMultipleChoice"),
                                          ("distilbert", "DistilBertForMultipleChoice")])
def test_optimize_other_task_models(monkeypatch, family, name):
    """Any ``*For…`` model: its own head reads fastenc's states (here heads fresh from their initialisation)."""
    import transformers

    path = task_checkpoint(family, None)
    with C.quiet_transformers():
        torch.manual_seed(0)
        reference_model = getattr(transformers, name).from_pretrained(str(path)).eval()
        torch.manual_seed(0)
        model = getattr(transformers, name).from_pretrained(str(path)).eval()
    fastenc.optimize(model)
    calls = _count_encoder_calls(monkeypatch, model)
    ids, mask = _batch(model, family, lengths=[8, 5, 8, 3, 6, 8])
    if "MultipleChoice" in name:  # (batch, choices, seq)
        ids, mask = ids.view(2, 3, -1), mask.view(2, 3, -1)
    with torch.no_grad():
        expected, got = reference_model(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1
    flat_mask = mask.reshape(-1, mask.shape[-1])
    for key in expected.keys():
        if "MultipleChoice" in name:  # one logit per choice, every choice has tokens
            result = compare(key, got[key], expected[key])
            assert result.ok, result.line()
        else:
            _assert_close_on_real_positions(f"{name}/{key}", got[key], expected[key], flat_mask)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert"])
def test_optimize_call_forms(monkeypatch, family):
    """Positional ids, no mask, token types, return_dict=False; and the calls that go back to transformers."""
    path = task_checkpoint(family, "sequence_classification")
    reference_model, model = C.hf_model(path, "sequence_classification"), C.hf_model(path, "sequence_classification")
    fastenc.optimize(model)
    calls = _count_encoder_calls(monkeypatch, model)
    ids, mask = _batch(model, family, lengths=[6, 6])
    with torch.no_grad():
        expected = reference_model(ids).logits
        _assert_close_on_real_positions("positional", model(ids).logits, expected, mask)
        as_tuple = model(input_ids=ids, attention_mask=mask.float(), return_dict=False)
        assert isinstance(as_tuple, tuple)
        _assert_close_on_real_positions("tuple", as_tuple[0], expected, mask)
        if family in ("bert", "albert"):
            types = torch.zeros_like(ids)
            types[:, 3:] = 1
            _assert_close_on_real_positions("types", model(ids, token_type_ids=types).logits,
                                            reference_model(ids, token_type_ids=types).logits, mask)
        assert len(calls) == (3 if family in ("bert", "albert") else 2)
        # fastenc cannot give every layer's states: transformers runs them, unchanged
        full = model(ids, output_hidden_states=True)
        assert len(calls) == (3 if family in ("bert", "albert") else 2)
        assert full.hidden_states is not None
        torch.testing.assert_close(full.logits, expected, rtol=0, atol=0)
    logits = model(ids).logits  # eval mode with autograd on: fastenc's states feed the head, which still learns
    logits.sum().backward()
    assert len(calls) == (4 if family in ("bert", "albert") else 3)
    assert model.classifier.weight.grad is not None if family != "roberta" else \
        model.classifier.out_proj.weight.grad is not None
    model.train()  # training: transformers' own forward, with autograd (fastenc does not backpropagate)
    model(ids).logits.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert len(calls) == (4 if family in ("bert", "albert") else 3)


def test_optimized_model_copies_saves_and_reoptimizes(tmp_path):
    import copy

    path = task_checkpoint("camembert", "token_classification")
    reference_model = C.hf_model(path, "token_classification")
    model = fastenc.optimize(C.hf_model(path, "token_classification"))
    assert fastenc.optimize(model) is model  # again: the same patch, a fresh encoder
    torch.save(model, tmp_path / "model.pt")
    copies = [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]
    model.save_pretrained(tmp_path / "saved")  # the checkpoint is transformers' own, unchanged
    copies.append(C.hf_model(tmp_path / "saved", "token_classification"))
    ids, mask = _batch(model, "camembert", lengths=[6, 9])
    with torch.no_grad():
        expected = reference_model(input_ids=ids, attention_mask=mask).logits
        for index, other in enumerate([model, *copies]):
            _assert_close_on_real_positions(f"copy {index}", other(input_ids=ids, attention_mask=mask).logits,
                                            expected, mask)
    for other in copies[:2]:  # each copy runs its own encoder, over its own tensors
        patch = other.base_model._fastenc_patch
        assert patch.base is other.base_model and patch.encoder is not model.base_model._fastenc_patch.encoder
        word = other.base_model.get_input_embeddings().weight
        assert patch.encoder.model.tensors["embeddings.word"].data_ptr() == word.data_ptr()


def test_optimize_follows_the_model_to_another_dtype():
    path = task_checkpoint("bert", None)
    model = fastenc.optimize(C.hf_model(path))
    model.to(torch.bfloat16)
    ids, mask = _batch(model, "bert", lengths=[5, 3])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16 and model.base_model._fastenc_patch.encoder.dtype == torch.bfloat16
    with torch.no_grad():
        baseline = C.hf_model(path).to(torch.bfloat16)(input_ids=ids, attention_mask=mask).last_hidden_state
        reference_out = C.hf_model(path)(input_ids=ids, attention_mask=mask).last_hidden_state
    result = compare("bf16", out, reference_out, baseline, mask=mask.bool())
    assert result.ok, result.line()


def test_optimize_with_the_triton_backend():
    """The Triton kernels (under the interpreter on the CPU) inside a transformers model."""
    from fastenc.model import triton_interpreter_on

    if not (torch.cuda.is_available() or triton_interpreter_on()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    path = task_checkpoint("roberta", "token_classification")
    reference_model, model = C.hf_model(path, "token_classification"), C.hf_model(path, "token_classification")
    fastenc.optimize(model, backend="triton")
    assert model.base_model._fastenc_patch.encoder.backend == "triton"
    ids, mask = _batch(model, "roberta", lengths=[7, 3])
    with torch.no_grad():
        _assert_close_on_real_positions("triton", model(input_ids=ids, attention_mask=mask).logits,
                                        reference_model(input_ids=ids, attention_mask=mask).logits, mask)


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("max", True)])
def test_optimize_sentence_transformer(monkeypatch, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    path = C.make_sentence_transformer(tmp_path / "st", pooling=pooling, normalize=normalize,
                                       family="roberta" if pooling == "max" else "bert")
    texts = ["The cat sat on the mat.", "", "Hello world! " * 6, "Paris"]
    with C.quiet_transformers():
        reference_model = SentenceTransformer(str(path), device="cpu")
        model = SentenceTransformer(str(path), device="cpu")
    expected = reference_model.encode(texts, convert_to_tensor=True, batch_size=3)
    assert fastenc.optimize(model) is model
    transformer = next(m for m in model.modules() if type(m).__name__ == "Transformer")
    calls = _count_encoder_calls(monkeypatch, transformer.auto_model)
    got = model.encode(texts, convert_to_tensor=True, batch_size=3)
    assert len(calls) == 2
    result = compare("sentence_embedding", got, expected)
    assert result.ok, result.line()


@pytest.mark.parametrize("thing", [torch.nn.Linear(3, 3), "bert", None, object()])
def test_optimize_rejects_other_objects(thing):
    with pytest.raises(TypeError, match=f"cannot patch a .*{type(thing).__qualname__}"):
        fastenc.optimize(thing)


def test_optimize_rejects_unsupported_transformers_models():
    import transformers

    gpt = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2Model: model_type 'gpt2' is not one of"):
        fastenc.optimize(gpt)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, is_decoder=True)
    with C.quiet_transformers():
        decoder = transformers.BertLMHeadModel(config)
    with pytest.raises(TypeError, match="BertLMHeadModel: it is configured as a decoder"):
        fastenc.optimize(decoder)


# -------------------------------------------------------------------------- attn_implementation
def _masks(ids, mask):
    """Every form transformers may hand an attention function: 2D, boolean 4D, additive 4D, query-dependent."""
    keep = mask.bool()
    batch, seq = ids.shape
    boolean = keep[:, None, None, :].expand(batch, 1, seq, seq)
    additive = torch.zeros(batch, 1, seq, seq).masked_fill(~boolean, torch.finfo(torch.float32).min)
    banded = boolean & (torch.arange(seq)[None, :] - torch.arange(seq)[:, None]).abs().le(3)  # not a padding mask
    return {"2d": mask, "bool-4d": boolean, "additive-4d": additive, "banded-4d": banded}


# MPNet and DeBERTa compute their attention themselves (with their relative terms): no attention
# interface to plug into (transformers has no SDPA for them either).
@pytest.mark.parametrize("family", [f for f in C.ALL_FAMILIES if f not in ("mpnet", "deberta-v2")])
def test_attn_implementation_matches_sdpa(monkeypatch, family):
    path = task_checkpoint(family, "token_classification")
    sdpa = C.hf_model(path, "token_classification", attn_implementation="sdpa")
    ours = C.hf_model(path, "token_classification", attn_implementation="fastenc")
    assert ours.config._attn_implementation == "fastenc"
    calls = []
    monkeypatch.setattr(integration, "_OPS", {"cpu": _counting(reference, calls)})
    ids, mask = _batch(sdpa, family)
    full_ids, _ = _batch(sdpa, family, lengths=[7, 7])
    cases = [("none", full_ids, None)] + [(name, ids, m) for name, m in _masks(ids, mask).items()]
    layers = sdpa.config.num_hidden_layers
    for name, batch_ids, batch_mask in cases:
        calls.clear()
        with torch.no_grad():
            expected = sdpa(input_ids=batch_ids, attention_mask=batch_mask).logits
            got = ours(input_ids=batch_ids, attention_mask=batch_mask).logits
        # every position, padding included, as sdpa computes it
        result = compare(f"{family}/{name}", got[torch.isfinite(expected)], expected[torch.isfinite(expected)])
        assert result.ok, result.line()
        assert len(calls) == (0 if name == "banded-4d" else layers), name  # the banded mask goes to sdpa


def test_attention_mask_is_read_once_per_forward(monkeypatch):
    """The padding plan is made once per forward pass, not once per layer, and never reused stale."""
    path = task_checkpoint("xlm-roberta", None)  # three layers
    sdpa = C.hf_model(path, attn_implementation="sdpa")
    ours = C.hf_model(path, attn_implementation="fastenc")
    reads, key_padding = [], integration._key_padding
    monkeypatch.setattr(integration, "_key_padding", lambda *args: reads.append(1) or key_padding(*args))
    ids, mask = _batch(sdpa, "xlm-roberta", lengths=[6, 3, 8])
    boolean = _masks(ids, mask)["bool-4d"].clone()
    for attention_mask in (mask, boolean):
        reads.clear()
        with torch.inference_mode():  # inference tensors have no version counter: still read once
            got = ours(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        assert len(reads) == 1
        _assert_close_on_real_positions("plan", got, sdpa(input_ids=ids, attention_mask=attention_mask)
                                        .last_hidden_state.detach(), mask)
    boolean[1, :, :, 3:6] = True  # the same tensor, changed in place: a new plan
    mask[1, 3:6] = 1
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=boolean).last_hidden_state
        expected = sdpa(input_ids=ids, attention_mask=boolean).last_hidden_state
    _assert_close_on_real_positions("changed", got, expected, mask)


def _counting(module, calls):
    class Counting:
        def __getattr__(self, name):
            function = getattr(module, name)
            if name != "attention":
                return function
            return lambda *args: calls.append(args[0].shape[1]) or function(*args)
    return Counting()


def test_attention_mask_interface_gives_the_2d_padding_mask():
    from transformers import masking_utils

    config = C.hf_model(task_checkpoint("bert", None), attn_implementation="fastenc").config
    embeds = torch.zeros(2, 5, 8)
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = masking_utils.create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=padded)
    assert mask.dtype == torch.bool and mask.tolist() == padded.bool().tolist()
    assert masking_utils.create_bidirectional_mask(config=config, inputs_embeds=embeds,
                                                   attention_mask=torch.ones(2, 5, dtype=torch.long)) is None
    causal = masking_utils.create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padded,
                                              past_key_values=None, position_ids=torch.arange(5)[None].expand(2, 5))
    assert causal.shape == (2, 1, 5, 5) and not bool(causal[1, 0, 0, 1])  # sdpa's causal mask, not a 2D one


def test_attention_with_gradients_goes_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(integration, "_OPS", {"cpu": _counting(reference, calls)})
    model = C.hf_model(task_checkpoint("electra", None), attn_implementation="fastenc")
    ids, mask = _batch(model, "electra", lengths=[4, 6])
    model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert calls == [] and model.get_input_embeddings().weight.grad is not None


def test_registration_waits_for_transformers():
    """``import fastenc`` imports no transformers; importing it later registers "fastenc" with both interfaces."""
    script = textwrap.dedent("""
        import sys
        import fastenc
        assert "transformers" not in sys.modules, "import fastenc imported transformers"
        import transformers.masking_utils as masks
        import transformers.modeling_utils as models
        assert models.AttentionInterface._global_mapping["fastenc"].__name__ == "fastenc_attention"
        assert masks.AttentionMaskInterface._global_mapping["fastenc"].__name__ == "fastenc_mask"
        assert not any(type(f).__name__ == "_RegisterOnImport" for f in sys.meta_path)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
