"""safetensors → tensors, through declarative name maps per family.

Each family has a table from fastenc's names to checkpoint names (``"layers.{i}.qkv.weight"`` →
``"encoder.layer.{i}.attention.self.query.weight"`` …); a tuple of checkpoint names is concatenated
along dim 0 at load, which is how Q, K and V become one ``(3·hidden, hidden)`` weight. Key sets and
shapes are checked exactly before anything is read, and errors name the file and the tensor.

Tensors are read one at a time with ``safe_open(device=...)`` and converted to the target dtype there,
so a model never has two full copies in memory. Nothing is ever unpickled, with one exception: BGE-M3
ships its two small projections as ``torch.save`` files (``colbert_linear.pt``, ``sparse_linear.pt``);
``read_linear_pt`` reads them with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler,
which builds tensors, dicts and plain values and refuses any other object (no code runs), and then
accepts only a ``{"weight", "bias"}`` mapping of tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import family as families
from .config import EncoderConfig
from .errors import LoadError

logger = logging.getLogger("fastenc")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Task models keep the encoder under one of these prefixes; a base model has none.
BASE_PREFIXES = ("", "bert.", "roberta.", "xlm-roberta.", "camembert.", "distilbert.", "electra.", "albert.",
                 "mpnet.", "model.", "nomic_bert.", "gte.", "new.", "deberta.")
# Buffers some checkpoints carry that are not weights.
IGNORED_SUFFIXES = ("position_ids", "token_type_ids")

_BERT_EMBEDDINGS = {
    "embeddings.word": "embeddings.word_embeddings.weight",
    "embeddings.position": "embeddings.position_embeddings.weight",
    "embeddings.token_type": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
}


def _layer_map(prefix: str, q: str, k: str, v: str, attn_out: str, attn_norm: str, ffn_in: str, ffn_out: str,
               ffn_norm: str) -> dict:
    """One layer's table: fastenc name -> checkpoint name(s), both with a ``{i}`` placeholder."""
    table = {}
    for suffix in ("weight", "bias"):
        table[f"layers.{{i}}.qkv.{suffix}"] = tuple(f"{prefix}{name}.{suffix}" for name in (q, k, v))
        for ours, theirs in (("attn_out", attn_out), ("attn_norm", attn_norm), ("ffn_in", ffn_in),
                             ("ffn_out", ffn_out), ("ffn_norm", ffn_norm)):
            table[f"layers.{{i}}.{ours}.{suffix}"] = f"{prefix}{theirs}.{suffix}"
    return table


_BERT_LAYER = _layer_map(
    "encoder.layer.{i}.", "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
)
_DISTILBERT_LAYER = _layer_map(
    "transformer.layer.{i}.", "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
    "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm",
)
_MPNET_LAYER = _layer_map(
    "encoder.layer.{i}.", "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
    "attention.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
)
# Gated feed-forwards: "ffn_in" reads both halves, concatenated, then interleaved row by row at load
# (fastenc.family.prepare). The activated half comes first unless the layout says otherwise: NomicBERT
# and GTE compute act(gate_proj(x)) * up_proj(x); ModernBERT's Wi holds [input; gate] and computes
# act(input) * gate; GTE's hub layout fuses up_gate_proj = [up; gate], the linear half first.
def _fields(prefix: str, **parts: str | tuple[str, str]) -> dict:
    """``ours="theirs"`` per part -> the layer table (weight and bias of each), names under ``prefix``."""
    table = {}
    for ours, theirs in parts.items():
        for suffix in ("weight", "bias"):
            names = theirs if isinstance(theirs, tuple) else (theirs,)
            full = tuple(f"{prefix}{name}.{suffix}" for name in names)
            table[f"layers.{{i}}.{ours}.{suffix}"] = full if len(full) > 1 else full[0]
    return table


# transformers' own module names for NomicBERT and GTE (a live model's state_dict; optimize() reads them)
_ROPE_LAYER = _fields(
    "layers.{i}.", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
    attn_norm="post_attention_layernorm", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
    ffn_norm="post_mlp_layernorm",
)
# The hub layouts, which transformers also writes back on save (its conversion_mapping.py, reversed)
_NOMIC_LAYER = _fields(
    "encoder.layers.{i}.", qkv="attn.Wqkv", attn_out="attn.out_proj", attn_norm="norm1",
    ffn_in=("mlp.fc12", "mlp.fc11"), ffn_out="mlp.fc2", ffn_norm="norm2",  # fc12: the gate, fc11: up
)
_GTE_LAYER = _fields(
    "encoder.layer.{i}.", qkv="attention.qkv_proj", attn_out="attention.o_proj", attn_norm="attn_ln",
    ffn_in="mlp.up_gate_proj", ffn_out="mlp.down_proj", ffn_norm="mlp_ln",
)
# Pre-LN: "attn_norm" / "ffn_norm" are the norms before attention / before the feed-forward.
_MODERNBERT_LAYER = _fields(
    "layers.{i}.", qkv="attn.Wqkv", attn_out="attn.Wo", attn_norm="attn_norm", ffn_in="mlp.Wi", ffn_out="mlp.Wo",
    ffn_norm="mlp_norm",
)
# ALBERT's unique layer i is layer j of group g, with i = g * inner_group_num + j.
_ALBERT_LAYER = _layer_map(
    "encoder.albert_layer_groups.{g}.albert_layers.{j}.", "attention.query", "attention.key", "attention.value",
    "attention.dense", "attention.LayerNorm", "ffn", "ffn_output", "full_layer_layer_norm",
)


# The decoder backbones (Llama's names, which Mistral, Qwen2, Qwen3 and Gemma3 share): pre-norm blocks,
# "attn_norm" the input_layernorm, "ffn_norm" the norm before the feed-forward (Llama's
# post_attention_layernorm, Gemma3's pre_feedforward_layernorm); Gemma3's sandwich adds the norms after
# attention and after the feed-forward. gate_proj is the activated half: act(gate_proj(x)) * up_proj(x).
_DECODER_PARTS = dict(qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
                      attn_norm="input_layernorm", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
                      q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_DECODER_LAYER = _fields("layers.{i}.", **_DECODER_PARTS, ffn_norm="post_attention_layernorm")
_GEMMA3_LAYER = _fields("layers.{i}.", **_DECODER_PARTS, ffn_norm="pre_feedforward_layernorm",
                        post_attn_norm="post_attention_layernorm", post_ffn_norm="post_feedforward_layernorm")
_DECODER_EMBEDDINGS = {"embeddings.word": "embed_tokens.weight"}
_DECODER_MODEL = {"final_norm.weight": "norm.weight"}


# DeBERTa-v2/v3: BERT's blocks under other names, and the position projections of the disentangled
# attention (the families' tables keep only what a config's family has: see encoder_shapes).
_DEBERTA_LAYER = {
    **_layer_map("encoder.layer.{i}.", "attention.self.query_proj", "attention.self.key_proj",
                 "attention.self.value_proj", "attention.output.dense", "attention.output.LayerNorm",
                 "intermediate.dense", "output.dense", "output.LayerNorm"),
    **_fields("encoder.layer.{i}.", pos_key="attention.self.pos_key_proj", pos_query="attention.self.pos_query_proj"),
}
_DEBERTA_PROJECT = {"embeddings.project.weight": "embeddings.embed_proj.weight"}  # no bias
_DEBERTA_MODEL = {"relative.embeddings": "encoder.rel_embeddings.weight",
                  "relative.norm.weight": "encoder.LayerNorm.weight", "relative.norm.bias": "encoder.LayerNorm.bias",
                  "conv.weight": "encoder.conv.conv.weight", "conv.bias": "encoder.conv.conv.bias",
                  "conv.norm.weight": "encoder.conv.LayerNorm.weight", "conv.norm.bias": "encoder.conv.LayerNorm.bias"}


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Where a family keeps its encoder tensors (names relative to the base prefix)."""

    embeddings: dict
    layer: dict
    project: dict = dataclasses.field(default_factory=dict)  # embedding_size -> hidden_size mapping
    model: dict = dataclasses.field(default_factory=dict)  # tensors outside the layers (MPNet's bias, final norm)
    gate_linear_first: bool = False  # a gated "ffn_in" stored [linear half; activated half]


_ELECTRA_PROJECT = {"embeddings.project.weight": "embeddings_project.weight",
                    "embeddings.project.bias": "embeddings_project.bias"}
_ALBERT_PROJECT = {"embeddings.project.weight": "encoder.embedding_hidden_mapping_in.weight",
                   "embeddings.project.bias": "encoder.embedding_hidden_mapping_in.bias"}
_NO_TOKEN_TYPE = {k: v for k, v in _BERT_EMBEDDINGS.items() if k != "embeddings.token_type"}

_NO_POSITION = {k: v for k, v in _BERT_EMBEDDINGS.items() if k != "embeddings.position"}
_NOMIC_EMBEDDINGS = {**_NO_POSITION, "embeddings.norm.weight": "emb_ln.weight", "embeddings.norm.bias": "emb_ln.bias"}
_MODERNBERT_EMBEDDINGS = {"embeddings.word": "embeddings.tok_embeddings.weight",
                          "embeddings.norm.weight": "embeddings.norm.weight",
                          "embeddings.norm.bias": "embeddings.norm.bias"}

NAME_MAPS = {
    "bert": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "roberta": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "xlm-roberta": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "camembert": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "distilbert": NameMap(_NO_TOKEN_TYPE, _DISTILBERT_LAYER),
    "electra": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER, _ELECTRA_PROJECT),
    "albert": NameMap(_BERT_EMBEDDINGS, _ALBERT_LAYER, _ALBERT_PROJECT),
    "mpnet": NameMap(_NO_TOKEN_TYPE, _MPNET_LAYER,
                     model={"relative_bias": "encoder.relative_attention_bias.weight"}),
    "modernbert": NameMap(_MODERNBERT_EMBEDDINGS, _MODERNBERT_LAYER,
                          model={"final_norm.weight": "final_norm.weight", "final_norm.bias": "final_norm.bias"}),
    "nomic_bert": NameMap(_NOMIC_EMBEDDINGS, _NOMIC_LAYER),
    "gte": NameMap(_NO_POSITION, _GTE_LAYER, gate_linear_first=True),
    "deberta-v2": NameMap(_BERT_EMBEDDINGS, _DEBERTA_LAYER, _DEBERTA_PROJECT, model=_DEBERTA_MODEL),
    **{decoder: NameMap(_DECODER_EMBEDDINGS, _DECODER_LAYER, model=_DECODER_MODEL)
       for decoder in ("qwen3", "qwen2", "mistral", "llama")},
    "gemma3_text": NameMap(_DECODER_EMBEDDINGS, _GEMMA3_LAYER, model=_DECODER_MODEL),
}
# Other layouts a family's tensors come in, tried after NAME_MAPS' when its first layer is absent.
OTHER_LAYOUTS = {
    "nomic_bert": (NameMap(_NO_POSITION, _ROPE_LAYER),),
    "gte": (NameMap(_NO_POSITION, _ROPE_LAYER),),
}


def layouts(config: EncoderConfig) -> tuple[NameMap, ...]:
    """The name maps a family's checkpoints may use, the usual one first."""
    return (NAME_MAPS[config.model_type], *OTHER_LAYOUTS.get(config.model_type, ()))


def num_unique_layers(config: EncoderConfig) -> int:
    """Layers with their own weights (ALBERT shares its groups across the depth)."""
    if config.model_type == "albert":
        return config.num_hidden_groups * config.inner_group_num
    return config.num_hidden_layers


def layer_schedule(config: EncoderConfig) -> list[int]:
    """The unique layer run at each depth, in order (ALBERT's grouping rule from transformers)."""
    if config.model_type != "albert":
        return list(range(config.num_hidden_layers))
    per_group = config.num_hidden_layers / config.num_hidden_groups
    return [int(depth / per_group) * config.inner_group_num + j
            for depth in range(config.num_hidden_layers) for j in range(config.inner_group_num)]


def encoder_names(config: EncoderConfig, names: NameMap | None = None) -> dict[str, str | tuple[str, ...]]:
    """fastenc name -> checkpoint name(s) relative to the base prefix, every layer expanded; only the
    tensors this config's family has (``encoder_shapes``). ``names``: the layout (the family's usual one)."""
    names = NAME_MAPS[config.model_type] if names is None else names
    table = dict(names.embeddings)
    table.update(names.model)
    if config.model_type == "albert" or config.embedding_size != config.hidden_size:
        table.update(names.project)
    for i in range(num_unique_layers(config)):
        g, j = divmod(i, config.inner_group_num)
        for ours, theirs in names.layer.items():
            fill = (lambda s: s.format(i=i, g=g, j=j))
            table[ours.format(i=i)] = tuple(map(fill, theirs)) if isinstance(theirs, tuple) else fill(theirs)
    shapes = encoder_shapes(config)
    return {ours: theirs for ours, theirs in table.items() if ours in shapes}


def encoder_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """fastenc name -> the shape the config implies, for every tensor the family has."""
    H, E, I = config.hidden_size, config.embedding_size, config.intermediate_size
    family = config.family
    shapes = {
        "embeddings.word": (config.vocab_size, E),
        "embeddings.project.weight": (H, E),
        "embeddings.project.bias": (H,),
    }
    if family.embedding_norm:
        shapes["embeddings.norm.weight"] = (E,)
    if family.positions == "absolute":
        shapes["embeddings.position"] = (config.max_position_embeddings, E)
    if config.type_vocab_size:
        shapes["embeddings.token_type"] = (config.type_vocab_size, E)
    if family.relative_bias:
        shapes["relative_bias"] = (config.relative_attention_num_buckets, config.num_attention_heads)
    if family.final_norm:
        shapes["final_norm.weight"] = (H,)
    if family.project_before_norm:  # DeBERTa: the projection (no bias) comes first, the norm is hidden-wide
        shapes.update({"embeddings.project.weight": (H, E), "embeddings.norm.weight": (H,)})
        del shapes["embeddings.project.bias"]
    shapes.update(_deberta_shapes(config))
    norms = ["attn_norm", "ffn_norm"] + (["post_attn_norm", "post_ffn_norm"] if family.sandwich else [])
    if family.has_bias("norm"):
        if "embeddings.norm.weight" in shapes:
            shapes["embeddings.norm.bias"] = shapes["embeddings.norm.weight"]
        if family.final_norm:
            shapes["final_norm.bias"] = (H,)
    ffn_rows = 2 * I if family.ffn == "gated" else I  # gated: both halves, concatenated
    attention = config.num_attention_heads * config.head_dim  # hidden, but for Qwen3's and Gemma3's head dims
    qkv_rows = attention + 2 * config.kv_heads * config.head_dim  # Q, then K and V (fewer heads with GQA)
    layer = {"qkv": (qkv_rows, H), "attn_out": (H, attention), "ffn_in": (ffn_rows, H), "ffn_out": (H, I)}
    for i in range(num_unique_layers(config)):
        for part, shape in layer.items():
            shapes[f"layers.{i}.{part}.weight"] = shape
            if family.has_bias(part):
                shapes[f"layers.{i}.{part}.bias"] = shape[:1]
        for part in norms:
            if part == "attn_norm" and not family.layer(i).attn_norm:
                continue  # ModernBERT's first block: no norm before attention
            shapes[f"layers.{i}.{part}.weight"] = (H,)
            if family.has_bias("norm"):
                shapes[f"layers.{i}.{part}.bias"] = (H,)
        if family.qk_norm:
            shapes[f"layers.{i}.q_norm.weight"] = shapes[f"layers.{i}.k_norm.weight"] = (config.head_dim,)
    return shapes


def encoder_splits(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """The rows of each checkpoint tensor in a concatenated fastenc tensor, where they are not equal parts:
    Q, K and V with grouped-query attention (``heads``, ``kv_heads``, ``kv_heads`` heads of ``head_dim`` rows)."""
    if config.kv_heads == config.num_attention_heads:
        return {}
    q, kv = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    return {f"layers.{i}.qkv.{part}": (q, kv, kv) for i in range(num_unique_layers(config))
            for part in ("weight", "bias")}


def _deberta_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """DeBERTa's tensors outside BERT's: the relative embeddings (and their norm), each layer's position
    projections where they are not the layer's own K and Q, the first block's convolution."""
    H, family, shapes = config.hidden_size, config.family, {}
    spec, conv = family.disentangled, family.conv
    if spec is not None:
        shapes["relative.embeddings"] = (2 * spec.span, H)
        if spec.norm:
            shapes.update({"relative.norm.weight": (H,), "relative.norm.bias": (H,)})
        for i in range(num_unique_layers(config)):
            for part, term in (("pos_key", spec.c2p), ("pos_query", spec.p2c)):
                if term and not spec.shared_keys:
                    shapes.update({f"layers.{i}.{part}.weight": (H, H), f"layers.{i}.{part}.bias": (H,)})
    if conv is not None:
        shapes.update({"conv.weight": (H, H // conv.groups, conv.kernel_size), "conv.bias": (H,),
                       "conv.norm.weight": (H,), "conv.norm.bias": (H,)})
    return shapes


def _canonical(key: str) -> str:
    """Legacy LayerNorm names (``gamma``/``beta``) read as ``weight``/``bias``."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


class SafetensorsDir:
    """The safetensors files of a checkpoint directory, opened lazily, with a key index.

    ``keys`` maps every canonical key (legacy names renamed) to ``(file, key in that file)``.
    """

    def __init__(self, directory: Path, device: torch.device):
        self.directory = Path(directory)
        self.device = device
        self._handles: dict[Path, object] = {}
        files = self._weight_files()
        # where a missing tensor should have been: the single file, or the shards' index
        self.source = files[0] if len(files) == 1 and files[0].name == SINGLE_FILE else self.directory / INDEX_FILE
        self.keys: dict[str, tuple[Path, str]] = {}
        for file in files:
            for key in self._open(file).keys():
                self.keys[_canonical(key)] = (file, key)

    def _weight_files(self) -> list[Path]:
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise LoadError(f"{index}: not a valid safetensors index ({exc!r})") from None
            missing = [s for s in shards if not (self.directory / s).is_file()]
            if missing:
                raise LoadError(f"{index}: shard file {missing[0]} is missing from {self.directory}")
            return [self.directory / s for s in shards]
        pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise LoadError(
                f"{self.directory}: only pickle weights ({', '.join(pickles)}); fastenc never unpickles. "
                "Convert them to safetensors (e.g. load with transformers and save_pretrained(safe_serialization=True))."
            )
        raise LoadError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device=str(self.device))
            except (SafetensorError, OSError, ValueError) as exc:
                raise LoadError(f"{file}: malformed or truncated safetensors file ({exc})") from None
        return self._handles[file]

    def shape(self, key: str) -> tuple[int, ...]:
        file, real = self.keys[key]
        return tuple(self._open(file).get_slice(real).get_shape())

    def read(self, key: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor to the device in ``dtype`` (into ``out`` when given)."""
        file, real = self.keys[key]
        try:
            tensor = self._open(file).get_tensor(real)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LoadError(f"{file}: cannot read tensor {real!r} ({exc})") from None
        if out is not None:
            return out.copy_(tensor)
        return tensor.to(dtype)

    def where(self, key: str) -> str:
        return str(self.keys[key][0] if key in self.keys else self.source)


class StateDictSource:
    """In-memory tensors (a ``transformers`` model's ``state_dict()``) behind ``SafetensorsDir``'s interface.

    ``read`` moves a tensor to the device and dtype only when it is not there already, so the encoder
    shares the model's storage (Q, K and V, concatenated at load, are the one copy).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], device: torch.device, name: str = "state dict"):
        self.directory = f"<{name}>"  # stands where a directory is named in messages
        self.source = self.directory
        self.device = device
        self._tensors = state_dict
        self.keys: dict[str, str] = {_canonical(key): key for key in state_dict}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[self.keys[key]].shape)

    def read(self, key: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._tensors[self.keys[key]].detach()
        if out is not None:
            return out.copy_(tensor)
        return tensor.to(device=self.device, dtype=dtype)

    def where(self, key: str) -> str:
        return self.directory


def find_base_prefix(files: SafetensorsDir, config: EncoderConfig) -> str:
    """The prefix under which this checkpoint keeps its encoder (``""`` for a base model)."""
    word = NAME_MAPS[config.model_type].embeddings["embeddings.word"]
    for prefix in BASE_PREFIXES:
        if prefix + word in files.keys:
            return prefix
    raise LoadError(
        f"{files.directory}: missing tensor {word!r} (looked for it with the prefixes "
        f"{', '.join(repr(p) for p in BASE_PREFIXES if p)} and none)"
    )


def load_tensors(files: SafetensorsDir, table: dict, shapes: dict, dtype: torch.dtype,
                 prefix: str = "", splits: dict | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of ``table`` (fastenc name -> checkpoint name(s)), checking keys and shapes first.

    A tuple of checkpoint names is concatenated along dim 0, in equal parts unless ``splits`` gives the
    rows of each (fastenc name -> one row count per checkpoint name)."""
    plan = {}
    for ours, theirs in table.items():
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        keys = [prefix + part for part in parts]
        for key in keys:
            if key not in files.keys:
                raise LoadError(f"{files.where(key)}: missing tensor {key!r}")
        expected = shapes[ours]
        rows = (splits or {}).get(ours) or (expected[0] // len(keys),) * len(keys)
        for key, n in zip(keys, rows):
            part_shape = (n,) + tuple(expected[1:])
            actual = files.shape(key)
            if actual != part_shape:
                raise LoadError(
                    f"{files.where(key)}: tensor {key!r} has shape {list(actual)}, expected {list(part_shape)}"
                )
        plan[ours] = (keys, rows)
    tensors = {}
    for ours, (keys, rows) in plan.items():
        if len(keys) == 1:
            tensors[ours] = files.read(keys[0], dtype)
        else:
            out = torch.empty(shapes[ours], dtype=dtype, device=files.device)
            for chunk, key in zip(out.split(list(rows)), keys):
                files.read(key, dtype, out=chunk)
            tensors[ours] = out
        for key, part in zip(keys, tensors[ours].split(list(rows))):
            _check_finite(files, key, part, dtype)
    return tensors


def _check_finite(files, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A weight that is NaN or infinite in ``dtype`` (corrupt bytes, or an fp32 value past fp16's 65504)
    would make every output NaN: refuse it at load, naming the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
        raise LoadError(f"{files.where(key)}: tensor {key!r} holds non-finite values in {dtype} (e.g. {bad}); "
                        "a corrupt file, or values outside the range of the dtype asked for")


def find_layout(files: SafetensorsDir, config: EncoderConfig, prefix: str) -> NameMap:
    """The layout whose first layer's Q (K, V) projection the checkpoint has; the usual one otherwise
    (whose missing tensors the error then names)."""
    for names in layouts(config):
        first = encoder_names(config, names)["layers.0.qkv.weight"]
        if all(prefix + key in files.keys for key in (first if isinstance(first, tuple) else (first,))):
            return names
    return NAME_MAPS[config.model_type]


def load_encoder(files: SafetensorsDir, config: EncoderConfig, dtype: torch.dtype) -> tuple[dict, str, set[str]]:
    """The encoder's tensors under fastenc names, in the kernels' layouts (``fastenc.family.prepare``), the
    base prefix they were found under, and the checkpoint keys read."""
    prefix = find_base_prefix(files, config)
    names = find_layout(files, config, prefix)
    table = encoder_names(config, names)
    tensors = load_tensors(files, table, encoder_shapes(config), dtype, prefix, encoder_splits(config))
    tensors = families.prepare(tensors, config.family, config.num_attention_heads, num_unique_layers(config),
                               gate_linear_first=names.gate_linear_first, eps=config.layer_norm_eps,
                               num_kv_heads=config.kv_heads, head_dim=config.head_dim)
    return tensors, prefix, used_keys(table, prefix)


def used_keys(table: dict, prefix: str = "") -> set[str]:
    """The checkpoint keys a table reads."""
    keys = set()
    for theirs in table.values():
        keys.update(prefix + part for part in (theirs if isinstance(theirs, tuple) else (theirs,)))
    return keys


def warn_unused(files: SafetensorsDir, used: set[str]) -> None:
    """Unexpected extra tensors are ignored, with one warning naming a few of them."""
    extra = sorted(k for k in files.keys if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        logger.warning("%s: ignoring %d unexpected tensor(s): %s", files.directory, len(extra), shown)


def read_linear_pt(path: Path, dtype: torch.dtype, device: torch.device, *, in_features: int,
                   out_features: int | None = None) -> dict[str, torch.Tensor]:
    """The ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` of a ``torch.nn.Linear`` state dict saved with
    ``torch.save`` (as BGE-M3 ships ``colbert_linear.pt`` and ``sparse_linear.pt``), in ``dtype`` on ``device``.

    Read with ``torch.load(weights_only=True)``: the restricted unpickler, which accepts tensors, dicts and
    plain values only and runs no code from the file. The result must then be a mapping of exactly
    ``weight`` and ``bias`` to finite floating-point tensors of those shapes (``out_features=None``: any
    output width); anything else is a ``LoadError`` naming the file and the problem.
    """
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(str(exc))
        raise LoadError(f"{path}: refused by the restricted loader torch.load(weights_only=True), which builds "
                        f"tensors and plain values only: {reason}") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise LoadError(f"{path}: cannot be read as a torch.save file of tensors ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise LoadError(f"{path}: expected a Linear layer's state dict ({{'weight', 'bias'}}), got "
                        f"{type(state).__name__}")
    if set(state) != {"weight", "bias"}:
        raise LoadError(f"{path}: expected exactly the tensors 'weight' and 'bias' of a Linear layer, got "
                        f"{', '.join(map(repr, sorted(state))) or 'none'}")
    weight, bias = state["weight"], state["bias"]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise LoadError(f"{path}: {name!r} is not a floating-point tensor ({type(tensor).__name__})")
    out = weight.shape[0] if out_features is None and weight.dim() == 2 else out_features
    for name, tensor, shape in (("weight", weight, (out, in_features)), ("bias", bias, (out,))):
        if tuple(tensor.shape) != shape or (out is not None and out < 1):
            raise LoadError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{path}: tensor {name!r} holds non-finite values")
    tensors = {name: tensor.to(device=device, dtype=dtype).contiguous() for name, tensor in state.items()}
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{path}: tensor {name!r} holds values outside the range of {dtype}")
    return tensors


def _unpickler_reason(message: str) -> str:
    """The reason in torch's long "Weights only load failed" message (what the unpickler refused)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(". ", 1)[0] or "not a torch.save file of tensors"
    return lines[0] if lines else "not a torch.save file of tensors"
