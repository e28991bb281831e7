"""FP8 encoders (``dtype="fp8"``): loading, the quality gates on the torch backend's emulation, the Triton
kernels (under the interpreter without a GPU) against that emulation, batch invariance, the entry points.

Quality, on small sets (``benchmarks/fp8_quality.py`` measures it on thousands of texts): the bundled
all-MiniLM-L6-v2's sentence vectors against float32's. Measured here (2-core x86-64): minimum cosine
0.9971 over 220 texts, top-10 overlap 0.960 on 200 documents of the retrieval corpus of
``test_quantize.py`` (fp16: 0.999999 and 1.00). That is e4m3's precision (3 mantissa bits: the weights alone,
quantized per channel, give 0.998), below the 0.999 / 0.99 the FP8 issue asked for; the bounds below
leave room for other roundings, not for a broken path (codes without their scales, or shuffled, fall
far below them).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from checkpoints import family_batch, make_checkpoint
from task_helpers import task_checkpoint
from test_quantize import overlap, sentences, top10

import fastenc
from fastenc import fp8
from fastenc.errors import BackendError

pytestmark = pytest.mark.filterwarnings("ignore:dtype='fp8' on the torch backend:UserWarning")


def load(path, **kwargs) -> fastenc.Encoder:
    return fastenc.Encoder.from_pretrained(path, device="cpu", **kwargs)


# --- loading ------------------------------------------------------------------------------------


def test_fp8_load_quantizes_the_layer_gemms_only():
    path = task_checkpoint("bert", None)
    with pytest.warns(UserWarning, match="emulation of the FP8 path.*slow"):
        encoder = load(path, dtype="fp8")
    assert encoder.fp8 and encoder.dtype == torch.float16 and encoder.backend == "torch"
    exact = load(path)
    assert not exact.fp8
    for layer, reference in zip(encoder.model.layers, exact.model.layers):
        for name in ("qkv_weight", "attn_out_weight", "ffn_in_weight", "ffn_out_weight"):
            weight, original = getattr(layer, name), getattr(reference, name)
            assert isinstance(weight, fp8.Fp8Weight) and weight.codes.dtype == torch.float8_e4m3fn
            assert weight.scales.shape == (original.shape[0],) and weight.shape == original.shape
            # Each channel within half an e4m3 step (2^-4 relative at the top of its range) of the checkpoint's.
            bound = original.abs().amax(1, keepdim=True) * 2.0**-4
            assert ((weight.dequantize() - original).abs() <= bound).all(), name
        assert layer.qkv_bias.dtype == torch.float16 and layer.ffn_norm_weight.dtype == torch.float16
    assert encoder.model.tensors["embeddings.word"].dtype == torch.float16  # embeddings stay 16-bit


def test_fp8_spellings_and_the_gpu_error(monkeypatch):
    assert fp8.requested("fp8") and fp8.requested("FP8") and fp8.requested(torch.float8_e4m3fn)
    assert not fp8.requested("fp16") and not fp8.requested(None) and not fp8.requested(torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(BackendError, match="needs a GPU with FP8 tensor cores.*T4 is sm_75"):
        fp8.check_device(torch.device("cuda"), "triton")
    with pytest.raises(fastenc.InputError, match="or fp8"):
        load(task_checkpoint("bert", None), dtype="fp4")


# --- quality gates on the emulation -------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_pair(minilm_path, one_thread):
    exact = fastenc.Encoder.from_pretrained(minilm_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = fastenc.Encoder.from_pretrained(minilm_path, dtype="fp8")
    return exact, quantized


def test_minilm_fp8_cosine_and_neighbours(minilm_pair):
    exact, quantized = minilm_pair
    docs, queries = sentences(200, seed=0), sentences(20, seed=1)
    d32, q32 = exact.embed(docs), exact.embed(queries)
    d8, q8 = quantized.embed(docs), quantized.embed(queries)
    assert d8.dtype == torch.float32 and torch.isfinite(d8).all()
    cosine = torch.nn.functional.cosine_similarity(torch.cat([d8, q8]), torch.cat([d32, q32]))
    assert cosine.min() >= 0.995, f"min cosine {cosine.min():.5f}"
    assert overlap(top10(q32 @ d32.T), top10(q8 @ d8.T)) >= 0.93
    assert cosine.min() < 1  # quantization happened: the vectors are not the float32 ones


# --- fastenc check: transformers quantized alike -------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v2", "albert"])
def test_fp8_check_compares_with_transformers_quantized_alike(family, tmp_path):
    """``fastenc check --dtype fp8``'s baseline is transformers with the same e4m3 roundings: fastenc's FP8
    error is about the baseline's (the same quantization, computed twice), far above fp16's."""
    from fastenc.check import run_check

    path = make_checkpoint(tmp_path / family, family, seed=2)
    hidden, padding, pooled = run_check(path, device="cpu", dtype="fp8", backend="torch")
    assert hidden.ok and padding.ok and pooled.ok, (hidden.line(), pooled.line())
    quantization = hidden.limit / 3  # the baseline's own error
    assert 0.5 * quantization <= hidden.error <= 2 * quantization, hidden.line()
    fp16, _, _ = run_check(path, device="cpu", dtype="fp16", backend="torch")
    assert hidden.error > 5 * fp16.limit, (hidden.line(), fp16.line())  # fp16's rule could not judge FP8


def test_fp8_baseline_needs_the_transformer_layers():
    from transformers import BertConfig, BertModel

    from fastenc.check import fp8_baseline

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    model.config.num_hidden_layers = 5  # no list of 5 layers
    with pytest.raises(fastenc.InputError, match="BertModel: no list of 5 transformer layers"):
        fp8_baseline(model)


# --- the Triton kernels against the emulation ---------------------------------------------------


@pytest.mark.parametrize("family", ["bert", pytest.param("modernbert", id="modernbert (pre-LN, GeGLU, RoPE)")])
def test_triton_fp8_matches_the_emulation(family, tmp_path):
    path = make_checkpoint(tmp_path / family, family, seed=2)
    exact = load(path)
    twin = load(path, dtype="fp8")
    triton = load(path, dtype="fp8", backend="triton")
    ids, mask, types = family_batch(exact, family, [9, 1, 23], seed=4)
    reference = exact(ids, mask, types).double()
    twin_error = (twin(ids, mask, types).double() - reference).abs().max()
    out = triton(ids, mask, types)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out[mask == 0] == 0).all()
    error = (out.double() - reference).abs().max()
    assert 0 < twin_error and error <= 3 * twin_error, f"triton fp8 {error:.3g}, twin {twin_error:.3g}"


def test_triton_fp8_is_batch_invariant(tmp_path):
    path = make_checkpoint(tmp_path / "bert", "bert", seed=3)
    encoder = load(path, dtype="fp8", backend="triton")
    ids, mask, types = family_batch(encoder, "bert", [12, 30, 5], seed=6)
    batch = encoder(ids, mask, types)
    for row in (0, 2):
        alone = encoder(ids[row:row + 1, : int(mask[row].sum())], mask[row:row + 1, : int(mask[row].sum())],
                        None if types is None else types[row:row + 1, : int(mask[row].sum())])
        assert torch.equal(alone[0], batch[row, : int(mask[row].sum())])


# --- entry points -------------------------------------------------------------------------------


def test_fp8_through_pipelines_and_serve_specs():
    path = task_checkpoint("bert", "sequence_classification")
    exact = fastenc.pipeline("text-classification", model=str(path), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = fastenc.pipeline("text-classification", model=str(path), device="cpu", dtype="fp8")
    texts = ["the old fisherman repaired the wooden boat", "a tired nurse found a red bicycle"]
    assert [r["label"] for r in exact(texts)] == [r["label"] for r in quantized(texts)]
    from fastenc.serve.app import worker_specs

    assert {spec.dtype for spec in worker_specs(str(path), device="cpu", workers=2, dtype="fp8")} == {"fp8"}


def test_optimize_with_fp8_hands_back_the_models_dtype():
    path = task_checkpoint("bert", "sequence_classification")
    from checkpoints import hf_model

    model = hf_model(path, "sequence_classification")
    ids, mask, types = family_batch(load(path), "bert", [9, 4], seed=8)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fastenc.optimize(model, dtype="fp8") is model
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert model.base_model._fastenc_patch.encoder.fp8
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert 0 < (logits - expected).abs().max() < 0.1 * expected.abs().max()
