"""The whole encoder against transformers, every family, float32: the tolerance rule of fastenc/check.py.

Batches mix very different lengths, a length-1 row and an all-padding row; padded positions must be
exactly 0. The same tests run on the Triton backend (under the interpreter without a GPU).
"""

import pytest
import torch
from checkpoints import ALL_FAMILIES, FAMILIES, assert_matches_transformers, family_batch, make_checkpoint

import fastenc
from fastenc.check import compare

BACKENDS = ["torch", "triton"]
LENGTHS = [13, 1, 40, 0, 7]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)


# The GPU check's subset of the whole-model test (marked gpu): one family per kind of attention and FFN
# (absolute positions; MPNet's relative bias; ModernBERT's RoPE, windows and GeGLU; NomicBERT's SwiGLU). The
# others run the same kernels with the same constexprs; on the CPU every family runs.
GPU_FAMILIES = ("bert", "mpnet", "modernbert", "nomic_bert")


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.gpu) if f in GPU_FAMILIES else f
                                        for f in ALL_FAMILIES])
def any_family_dir(request, tmp_path_factory):
    """The families above and those after BERT (test_families.py tests what only they have)."""
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_matches_transformers(family_dir, backend):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend, device="cpu")
    ids, mask, types = family_batch(encoder, family, LENGTHS)
    out = assert_matches_transformers(encoder, path, ids, mask, types)
    assert (out[3] == 0).all()  # the all-padding row


def test_mask_with_holes_and_left_padding(family_dir):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    ids, mask, types = family_batch(encoder, family, [9, 9, 9], seed=3)
    mask[0, 4] = 0  # a hole
    mask[1, :3] = 0  # left padding
    assert_matches_transformers(encoder, path, ids, mask, types)


def test_no_mask_means_all_ones(family_dir):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    ids, mask, _ = family_batch(encoder, family, [11, 11], seed=5)
    torch.testing.assert_close(encoder(ids), encoder(ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("groups, layers, inner", [(1, 4, 1), (2, 4, 2), (3, 3, 1)])
def test_albert_layer_sharing(tmp_path, groups, layers, inner):
    path = make_checkpoint(tmp_path, "albert", seed=2, num_hidden_groups=groups, num_hidden_layers=layers,
                           inner_group_num=inner)
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    ids, mask, types = family_batch(encoder, "albert", [17, 3, 1], seed=4)
    assert_matches_transformers(encoder, path, ids, mask, types)


def test_batch_of_zero_rows(family_dir):
    _, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    out = encoder(torch.zeros(0, 6, dtype=torch.long))
    assert out.shape == (0, 6, encoder.config.hidden_size)


def test_full_length_rows(family_dir):
    """A row as long as the model allows (RoBERTa-style: max_position_embeddings - pad - 1)."""
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    ids, mask, types = family_batch(encoder, family, [encoder.config.max_length, 5], seed=6)
    assert_matches_transformers(encoder, path, ids, mask, types)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bert_base_on_cuda(tmp_path, dtype):
    """BERT-base shapes (12 x 768, sequence 512) on the Triton backend against transformers: fastenc's
    error against the fp32 model is at most 3x that of transformers run in the same dtype."""
    from checkpoints import hf_model

    path = make_checkpoint(tmp_path, "bert", seed=7, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                           intermediate_size=3072, max_position_embeddings=512)
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", dtype=dtype, backend="triton")
    ids, mask, types = family_batch(encoder, "bert", [512, 300, 1, 0, 77], seed=8)
    model = hf_model(path, None, "sdpa").cuda()
    with torch.no_grad():
        inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "token_type_ids": types.cuda()}
        reference = model(**inputs).last_hidden_state.float()
        baseline = model.to(dtype)(**inputs).last_hidden_state.float()
    out = encoder(ids, mask, types)
    assert out.dtype == dtype and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
    assert (out[mask == 0] == 0).all()


# The Triton backend runs where the machine has it: the compiled kernels on a GPU (the GPU check runs the
# families of GPU_FAMILIES), the interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("device", [TRITON_DEVICE])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_triton_matches_transformers(any_family_dir, dtype, device):
    """The whole model in fp16 and bf16 on the Triton backend: its error against transformers in fp32 is at
    most 3x transformers' own in ``dtype``."""
    from checkpoints import hf_model

    family, path = any_family_dir
    encoder = fastenc.Encoder.from_pretrained(path, device=device, dtype=dtype, backend="triton")
    ids, mask, types = family_batch(encoder, family, [21, 1, 9, 0], seed=10)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        inputs["token_type_ids"] = types
    model = hf_model(path, None, "eager")
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        baseline = model.to(dtype)(**inputs).last_hidden_state
    out = encoder(ids, mask, types)
    assert out.dtype == dtype and torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, baseline, mask=mask)
    assert result.ok, result.line()
    assert (out[mask == 0] == 0).all()


def test_triton_forward_calls_no_torch_attention_softmax_layer_norm_or_gelu(family_dir, monkeypatch):
    family, path = family_dir
    encoder = fastenc.Encoder.from_pretrained(path, backend="triton", device="cpu")
    ids, mask, types = family_batch(encoder, family, [9, 4], seed=9)
    expected = encoder(ids, mask, types)

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton backend called a torch op it must replace")

    for name in ("scaled_dot_product_attention", "softmax", "layer_norm", "gelu", "relu"):
        monkeypatch.setattr(torch.nn.functional, name, forbidden)
    for name in ("softmax", "layer_norm", "relu"):
        monkeypatch.setattr(torch, name, forbidden)
    assert torch.equal(encoder(ids, mask, types), expected)
