"""safetensors → tensors, through declarative name maps per family.

Each family has a table from fastenc's names to checkpoint names (``"layers.{i}.qkv.weight"`` →
``"encoder.layer.{i}.attention.self.query.weight"`` …); a tuple of checkpoint names is concatenated
along dim 0 at load, which is how Q, K and V become one ``(3·hidden, hidden)`` weight. Key sets and
shapes are checked exactly before anything is read, and errors name the file and the tensor.

Tensors are read one at a time with ``safe_open(device=...)`` and converted to the target dtype there,
so a model never has two full copies in memory. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import EncoderConfig
from .errors import LoadError

logger = logging.getLogger("fastenc")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Task models keep the encoder under one of these prefixes; a base model has none.
BASE_PREFIXES = ("", "bert.", "roberta.", "xlm-roberta.", "camembert.", "distilbert.", "electra.", "albert.")
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
# ALBERT's unique layer i is layer j of group g, with i = g * inner_group_num + j.
_ALBERT_LAYER = _layer_map(
    "encoder.albert_layer_groups.{g}.albert_layers.{j}.", "attention.query", "attention.key", "attention.value",
    "attention.dense", "attention.LayerNorm", "ffn", "ffn_output", "full_layer_layer_norm",
)


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Where a family keeps its encoder tensors (names relative to the base prefix)."""

    embeddings: dict
    layer: dict
    project: dict = dataclasses.field(default_factory=dict)  # embedding_size -> hidden_size mapping


_ELECTRA_PROJECT = {"embeddings.project.weight": "embeddings_project.weight",
                    "embeddings.project.bias": "embeddings_project.bias"}
_ALBERT_PROJECT = {"embeddings.project.weight": "encoder.embedding_hidden_mapping_in.weight",
                   "embeddings.project.bias": "encoder.embedding_hidden_mapping_in.bias"}
_NO_TOKEN_TYPE = {k: v for k, v in _BERT_EMBEDDINGS.items() if k != "embeddings.token_type"}

NAME_MAPS = {
    "bert": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "roberta": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "xlm-roberta": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "camembert": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER),
    "distilbert": NameMap(_NO_TOKEN_TYPE, _DISTILBERT_LAYER),
    "electra": NameMap(_BERT_EMBEDDINGS, _BERT_LAYER, _ELECTRA_PROJECT),
    "albert": NameMap(_BERT_EMBEDDINGS, _ALBERT_LAYER, _ALBERT_PROJECT),
}


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


def encoder_names(config: EncoderConfig) -> dict[str, str | tuple[str, ...]]:
    """fastenc name -> checkpoint name(s) relative to the base prefix, every layer expanded."""
    names = NAME_MAPS[config.model_type]
    table = dict(names.embeddings)
    if config.model_type == "albert" or config.embedding_size != config.hidden_size:
        table.update(names.project)
    for i in range(num_unique_layers(config)):
        g, j = divmod(i, config.inner_group_num)
        for ours, theirs in names.layer.items():
            fill = (lambda s: s.format(i=i, g=g, j=j))
            table[ours.format(i=i)] = tuple(map(fill, theirs)) if isinstance(theirs, tuple) else fill(theirs)
    return table


def encoder_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """fastenc name -> the shape the config implies."""
    H, E, I = config.hidden_size, config.embedding_size, config.intermediate_size
    shapes = {
        "embeddings.word": (config.vocab_size, E),
        "embeddings.position": (config.max_position_embeddings, E),
        "embeddings.token_type": (config.type_vocab_size, E),
        "embeddings.norm.weight": (E,),
        "embeddings.norm.bias": (E,),
        "embeddings.project.weight": (H, E),
        "embeddings.project.bias": (H,),
    }
    layer = {
        "qkv.weight": (3 * H, H), "qkv.bias": (3 * H,),
        "attn_out.weight": (H, H), "attn_out.bias": (H,),
        "attn_norm.weight": (H,), "attn_norm.bias": (H,),
        "ffn_in.weight": (I, H), "ffn_in.bias": (I,),
        "ffn_out.weight": (H, I), "ffn_out.bias": (H,),
        "ffn_norm.weight": (H,), "ffn_norm.bias": (H,),
    }
    for i in range(num_unique_layers(config)):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
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
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """Read every tensor of ``table`` (fastenc name -> checkpoint name(s)), checking keys and shapes first."""
    plan = {}
    for ours, theirs in table.items():
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        keys = [prefix + part for part in parts]
        for key in keys:
            if key not in files.keys:
                raise LoadError(f"{files.where(key)}: missing tensor {key!r}")
        expected = shapes[ours]
        part_shape = (expected[0] // len(keys),) + tuple(expected[1:])
        for key in keys:
            actual = files.shape(key)
            if actual != part_shape:
                raise LoadError(
                    f"{files.where(key)}: tensor {key!r} has shape {list(actual)}, expected {list(part_shape)}"
                )
        plan[ours] = keys
    tensors = {}
    for ours, keys in plan.items():
        if len(keys) == 1:
            tensors[ours] = files.read(keys[0], dtype)
        else:
            out = torch.empty(shapes[ours], dtype=dtype, device=files.device)
            for chunk, key in zip(out.chunk(len(keys)), keys):
                files.read(key, dtype, out=chunk)
            tensors[ours] = out
        for key, part in zip(keys, tensors[ours].chunk(len(keys))):
            _check_finite(files, key, part, dtype)
    return tensors


def _check_finite(files, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A weight that is NaN or infinite in ``dtype`` (corrupt bytes, or an fp32 value past fp16's 65504)
    would make every output NaN: refuse it at load, naming the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
        raise LoadError(f"{files.where(key)}: tensor {key!r} holds non-finite values in {dtype} (e.g. {bad}); "
                        "a corrupt file, or values outside the range of the dtype asked for")


def load_encoder(files: SafetensorsDir, config: EncoderConfig, dtype: torch.dtype) -> tuple[dict, str]:
    """The encoder's tensors under fastenc names, and the base prefix they were found under."""
    prefix = find_base_prefix(files, config)
    table = encoder_names(config)
    tensors = load_tensors(files, table, encoder_shapes(config), dtype, prefix)
    return tensors, prefix


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
