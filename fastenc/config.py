"""``EncoderConfig``: one dataclass for every encoder ``config.json``, one small reader per family.

A reader returns the sizes in one vocabulary, and for the families after BERT (MPNet, ModernBERT,
NomicBERT, GTE, DeBERTa-v2/v3, the decoder backbones Qwen3, Qwen2, Mistral, Llama and Gemma3) the
``Family`` description of their blocks (``fastenc/family.py``): norm placement and kind, position
scheme, attention window and RoPE base per layer, causal or bidirectional attention, feed-forward kind,
biases, DeBERTa's disentangled attention, Gemma3's sandwich norms and scales.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from .errors import LoadError
from .family import BERT, MPNET_BUCKETS, Conv, Disentangled, Family, LayerKind

# The decoder backbones (embedders and rerankers built on causal language models).
DECODER_MODEL_TYPES = ("qwen3", "qwen2", "mistral", "llama", "gemma3_text")
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert",
                         "mpnet", "modernbert", "nomic_bert", "gte", "deberta-v2") + DECODER_MODEL_TYPES
# Position ids count non-padding tokens from pad_token_id + 1 in these families.
_PADDING_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert", "mpnet")
# Families whose embeddings may have no token-type table (type_vocab_size 0).
_NO_TOKEN_TYPE_TYPES = ("distilbert", "mpnet", "modernbert", "gte", "deberta-v2") + DECODER_MODEL_TYPES
# Families whose transformers model, without a token-type table, ignores the token_type_ids its tokenizer
# sends (DeBERTa-v3's tokenizer marks a pair's second text with type 1; the decoders take none).
_IGNORED_TOKEN_TYPE_TYPES = ("deberta-v2",) + DECODER_MODEL_TYPES

# Size fields and their smallest valid value; a field may be spelled differently in config.json (_KEYS).
_MIN_SIZES = {
    "vocab_size": 1,
    "hidden_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "intermediate_size": 1,
    "max_position_embeddings": 1,
    "embedding_size": 1,
    "type_vocab_size": 0,  # 0: the family has no token types (DistilBERT); BERT-style families need 1
    "pad_token_id": 0,
    "num_hidden_groups": 1,
    "inner_group_num": 1,
    "num_key_value_heads": 1,
}
_KEYS = {"distilbert": {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                        "intermediate_size": "hidden_dim", "hidden_act": "activation"},
         "modernbert": {"hidden_act": "hidden_activation", "layer_norm_eps": "norm_eps"},
         **{decoder: {"layer_norm_eps": "rms_norm_eps"} for decoder in DECODER_MODEL_TYPES},
         "gemma3_text": {"hidden_act": "hidden_activation", "layer_norm_eps": "rms_norm_eps"}}
# Whether the LM head is the word embedding matrix when config.json does not say (transformers' defaults).
TIED_BY_DEFAULT = {"qwen3": False, "qwen2": False, "mistral": False, "llama": False, "gemma3_text": True}

# transformers' activation names -> the canonical names of the ops interface (reference.py).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def canonical_activation(name) -> str | None:
    """transformers' activation name -> the ops interface's (``"gelu"``, ``"silu"`` …); None if unsupported."""
    return _ACTIVATIONS.get(name) if isinstance(name, str) else None


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What the encoder needs to know of a checkpoint, in one vocabulary for every family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    intermediate_size: int
    max_length: int  # usable positions (RoBERTa-style models lose pad_token_id + 1)
    hidden_act: str  # as written in config.json
    layer_norm_eps: float
    type_vocab_size: int  # 0 when the family has no token types (DistilBERT)
    pad_token_id: int
    max_position_embeddings: int
    embedding_size: int  # != hidden_size for ELECTRA (small) and ALBERT
    position_offset: int  # RoBERTa-style: pad_token_id + 1; 0 elsewhere (positions start at 0)
    num_hidden_groups: int = 1  # ALBERT: distinct layer groups, shared across num_hidden_layers
    inner_group_num: int = 1  # ALBERT: layers per group
    family: Family = BERT  # what the blocks are made of (fastenc/family.py)
    relative_attention_num_buckets: int = 0  # MPNet: rows of the relative position bias table
    num_key_value_heads: int | None = None  # grouped-query attention's K/V heads; None: num_attention_heads
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # config.json as read

    @property
    def activation(self) -> str:
        """The canonical activation name of the ops interface (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``)."""
        return _ACTIVATIONS[self.hidden_act]

    @property
    def kv_heads(self) -> int:
        """The K and V heads: fewer than the query heads with grouped-query attention."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def is_decoder(self) -> bool:
        """A decoder backbone (Qwen3, Qwen2, Mistral, Llama, Gemma3): bf16 by default on the GPU."""
        return self.model_type in DECODER_MODEL_TYPES

    @property
    def tied_embeddings(self) -> bool:
        """Whether a language-model head without its own weight is the word embedding matrix."""
        return self.raw.get("tie_word_embeddings", TIED_BY_DEFAULT.get(self.model_type, True)) is not False

    @property
    def ignores_token_types(self) -> bool:
        """True when any ``token_type_ids`` are accepted and ignored (DeBERTa without a type table)."""
        return self.type_vocab_size == 0 and self.model_type in _IGNORED_TOKEN_TYPE_TYPES

    @property
    def padding_positions(self) -> bool:
        """True when position ids count non-padding tokens from ``pad_token_id + 1`` (RoBERTa)."""
        return self.position_offset > 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "EncoderConfig":
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in _READERS:
            raise LoadError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            fields = _READERS[model_type](raw)
        except KeyError as exc:
            raise LoadError(f"{source}: missing key {exc.args[0]!r} for model_type {model_type!r}") from None
        fields.setdefault("embedding_size", fields["hidden_size"])
        _validate(fields, model_type, source)
        family = fields.get("family", BERT)
        if isinstance(family, str):  # a reader's complaint about the config, for the message below
            raise LoadError(f"{source}: {family}")
        position_offset = fields["pad_token_id"] + 1 if model_type in _PADDING_POSITION_TYPES else 0
        hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
        head_dim = fields.pop("head_dim", None)  # the decoders' readers give theirs (Qwen3, Gemma3: not hidden / heads)
        if head_dim is None:
            if hidden % heads:
                raise LoadError(f"{source}: hidden size {hidden} is not a multiple of the {heads} attention heads")
            explicit_head_dim = raw.get("head_dim")
            if explicit_head_dim not in (None, hidden // heads):
                raise LoadError(f"{source}: head_dim {explicit_head_dim!r} is not hidden_size / num_attention_heads "
                                f"({hidden // heads}); fastenc supports only that")
            head_dim = hidden // heads
        elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise LoadError(f"{source}: head_dim must be a positive int, got {head_dim!r}")
        kv_heads = fields.get("num_key_value_heads")
        if kv_heads is not None and heads % kv_heads:
            raise LoadError(f"{source}: num_key_value_heads {kv_heads} does not divide the {heads} attention heads")
        if family.positions == "rope" and head_dim % 2:
            raise LoadError(f"{source}: RoPE needs an even head dim, got {head_dim}")
        max_length = fields["max_position_embeddings"] - position_offset
        if max_length <= 0:
            raise LoadError(f"{source}: no usable positions (max_position_embeddings "
                            f"{fields['max_position_embeddings']} is too small for pad_token_id {fields['pad_token_id']})")
        return cls(model_type=model_type, head_dim=head_dim, max_length=max_length,
                   position_offset=position_offset, raw=dict(raw), **fields)

    @classmethod
    def from_file(cls, path: str | Path) -> "EncoderConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoadError(f"{path}: not found (a checkpoint directory needs a config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoadError(f"{path}: cannot be read as JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise LoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))


def _bert(raw: dict) -> dict:
    embedding_type = raw.get("position_embedding_type", "absolute")
    if embedding_type != "absolute":
        raise LoadError(f"config.json: position_embedding_type {embedding_type!r} is not supported (only 'absolute')")
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        hidden_act=raw.get("hidden_act", "gelu"),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
        type_vocab_size=raw.get("type_vocab_size", 2),
        pad_token_id=raw.get("pad_token_id", 0) or 0,
        max_position_embeddings=raw.get("max_position_embeddings", 512),
    )


def _roberta(raw: dict) -> dict:
    fields = _bert(raw)
    fields["pad_token_id"] = raw.get("pad_token_id", 1)
    fields["type_vocab_size"] = raw.get("type_vocab_size", 1)
    fields["layer_norm_eps"] = raw.get("layer_norm_eps", 1e-5)
    return fields


def _distilbert(raw: dict) -> dict:
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["dim"],
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"],
        intermediate_size=raw["hidden_dim"],
        hidden_act=raw.get("activation", "gelu"),
        layer_norm_eps=1e-12,  # fixed in DistilBERT's modeling code
        type_vocab_size=0,
        pad_token_id=raw.get("pad_token_id", 0) or 0,
        max_position_embeddings=raw.get("max_position_embeddings", 512),
    )


def _electra(raw: dict) -> dict:
    fields = _bert(raw)
    fields["embedding_size"] = raw.get("embedding_size", fields["hidden_size"])
    return fields


def _albert(raw: dict) -> dict:
    fields = _bert(raw)
    fields["hidden_act"] = raw.get("hidden_act", "gelu_new")
    fields["embedding_size"] = raw.get("embedding_size", 128)
    fields["num_hidden_groups"] = raw.get("num_hidden_groups", 1)
    fields["inner_group_num"] = raw.get("inner_group_num", 1)
    return fields


def _mpnet(raw: dict) -> dict:
    fields = _bert(raw)
    fields["pad_token_id"] = raw.get("pad_token_id", 1)
    fields["type_vocab_size"] = 0
    buckets = raw.get("relative_attention_num_buckets", MPNET_BUCKETS)
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < MPNET_BUCKETS:
        # transformers' MPNet always computes 32 buckets, whatever the config says: fewer rows cannot work
        fields["family"] = (f"relative_attention_num_buckets {buckets!r} is below the {MPNET_BUCKETS} buckets "
                            "MPNet computes")
    elif fields["pad_token_id"] != 1:
        # MPNet's embeddings count positions from their padding index, fixed at 1 in transformers
        fields["family"] = f"pad_token_id {fields['pad_token_id']!r}: MPNet's positions assume padding id 1"
    else:
        fields["family"] = Family(relative_bias=True)
        fields["relative_attention_num_buckets"] = buckets
    return fields


def _rope_theta(raw: dict, section: dict | None, default: float) -> float | str:
    """A RoPE base from ``rope_parameters`` (or the older top-level keys); a string says what is wrong."""
    params = section if isinstance(section, dict) else {}
    legacy = raw.get("rope_scaling")
    kind = params.get("rope_type", params.get("type", "default"))
    if isinstance(legacy, dict) and legacy.get("rope_type", legacy.get("type", "default")) != "default":
        kind = legacy.get("rope_type", legacy.get("type"))
    if kind != "default":
        return f"rope_type {kind!r} is not supported (only 'default')"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor {params['partial_rotary_factor']!r} is not supported (only 1.0)"
    theta = params.get("rope_theta", raw.get("rope_theta", default))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        return f"rope_theta must be a positive number, got {theta!r}"
    return float(theta)


def _rope_family(raw: dict, default_theta: float, biases: frozenset) -> Family | str:
    """NomicBERT's and GTE's blocks: post-LN, RoPE on every layer, a gated feed-forward."""
    theta = _rope_theta(raw, raw.get("rope_parameters"), default_theta)
    if isinstance(theta, str):
        return theta
    depth = raw["num_hidden_layers"]
    if isinstance(depth, bool) or not isinstance(depth, int):
        return "num_hidden_layers must be a positive int"  # _validate says so first
    layers = tuple(LayerKind(rope_theta=theta) for _ in range(depth))
    return Family(positions="rope", ffn="gated", biases=biases, layers=layers)


# nomic-embed's own config.json (its remote code's GPT-2-style names) -> transformers' NomicBertConfig names
_NOMIC_HUB_KEYS = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
                   "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
                   "layer_norm_epsilon": "layer_norm_eps", "rotary_emb_base": "rope_theta"}
_NOMIC_GATES = {"swiglu": "silu", "geglu": "gelu"}  # its gated activations; "glu" (sigmoid) is not supported


def _nomic_hub_config(raw: dict) -> tuple[dict, str | None]:
    """nomic-embed's hub config.json in transformers' names, and what fastenc cannot run of it (or None)."""
    out = {**raw, **{ours: raw[theirs] for theirs, ours in _NOMIC_HUB_KEYS.items() if theirs in raw}}
    if raw.get("n_inner", 0) is None and isinstance(out.get("hidden_size"), int):
        out["intermediate_size"] = 4 * out["hidden_size"]  # GPT-2's default
    activation = raw.get("activation_function", "swiglu")
    out["hidden_act"] = _NOMIC_GATES.get(activation, "silu")
    if activation not in _NOMIC_GATES:
        return out, f"activation_function {activation!r} is not supported (only {', '.join(_NOMIC_GATES)})"
    for key, expected in (("rotary_emb_fraction", 1.0), ("prenorm", False), ("parallel_block", False),
                          ("rotary_emb_scale_base", None), ("rotary_scaling_factor", None)):
        if raw.get(key, expected) != expected:
            return out, f"{key} {raw[key]!r} is not supported (only {expected!r})"
    return out, None


def _nomic_bert(raw: dict) -> dict:
    hub, problem = "n_embd" in raw, None  # nomic-embed's own config.json, or transformers'
    if hub:
        raw, problem = _nomic_hub_config(raw)
    fields = _bert(raw)
    fields["hidden_act"] = raw.get("hidden_act", "silu")
    fields["max_position_embeddings"] = raw.get("max_position_embeddings", 2048)
    biases = {"norm"}  # transformers' NomicBERT: linears without bias; nomic-embed's own config says
    if hub:
        biases |= {part for part, key in (("qkv", "qkv_proj_bias"), ("attn_out", "qkv_proj_bias"),
                                          ("ffn_in", "mlp_fc1_bias"), ("ffn_out", "mlp_fc2_bias"))
                   if raw.get(key, True) is True}  # nomic's defaults: biases
    family = _rope_family(raw, 1000.0, frozenset(biases))
    if hub and not isinstance(family, str) and raw.get("rotary_emb_interleaved", False) is True:
        family = dataclasses.replace(family, rope_pairs="interleaved")
    fields["family"] = problem or family
    return fields


def _gte(raw: dict) -> dict:
    fields = _bert(raw)
    fields["type_vocab_size"] = raw.get("type_vocab_size", 1)
    fields["pad_token_id"] = raw.get("pad_token_id", 1)
    fields["max_position_embeddings"] = raw.get("max_position_embeddings", 8192)
    fields["family"] = _rope_family(raw, 160_000.0, frozenset({"qkv", "attn_out", "ffn_out", "norm"}))
    return fields


def _modernbert(raw: dict) -> dict:
    layers = raw["num_hidden_layers"]
    fields = dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_hidden_layers=layers,
        num_attention_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        hidden_act=raw.get("hidden_activation", "gelu"),
        layer_norm_eps=raw.get("norm_eps", 1e-5),
        type_vocab_size=0,
        pad_token_id=raw.get("pad_token_id", 50283),
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
    )
    fields["family"] = _modernbert_family(raw, layers)
    return fields


def _modernbert_family(raw: dict, layers: int) -> Family | str:
    """Pre-LN blocks, global layers every ``global_attn_every_n_layers`` (3) and sliding windows between,
    each kind with its own RoPE base (``layer_types`` and ``rope_parameters`` when transformers wrote them)."""
    every = raw.get("global_attn_every_n_layers", 3)
    types = raw.get("layer_types")
    if types is None and isinstance(every, int) and not isinstance(every, bool) and every > 0 and isinstance(
            layers, int):
        types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention",
                                                                                  "sliding_attention"}:
        return f"layer_types {types!r} is not a list of {layers} 'full_attention' / 'sliding_attention'"
    local = raw.get("local_attention", 128)
    if isinstance(local, bool) or not isinstance(local, int) or local < 0:
        return f"local_attention must be a non-negative int, got {local!r}"
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    thetas = {}
    for kind, old_key, default in (("full_attention", "global_rope_theta", 160_000.0),
                                   ("sliding_attention", "local_rope_theta", 10_000.0)):
        section = dict(params.get(kind) or {})
        section.setdefault("rope_theta", raw.get(old_key, default))
        thetas[kind] = _rope_theta({}, section, default)
        if isinstance(thetas[kind], str):
            return thetas[kind]
    biases = {part for part, key in (("qkv", "attention_bias"), ("attn_out", "attention_bias"), ("ffn_in", "mlp_bias"),
                                     ("ffn_out", "mlp_bias"), ("norm", "norm_bias")) if raw.get(key, False) is True}
    kinds = tuple(LayerKind(window=local // 2 if kind == "sliding_attention" else None, rope_theta=thetas[kind],
                            attn_norm=depth > 0) for depth, kind in enumerate(types))
    return Family(norm="pre", positions="rope", ffn="gated", biases=frozenset(biases), layers=kinds)


def _deberta_v2(raw: dict) -> dict:
    """DeBERTa-v2 and v3 (transformers' ``DebertaV2Config`` defaults; v3 checkpoints set ``position_buckets``
    256, ``norm_rel_ebd`` "layer_norm", ``share_att_key`` and ``position_biased_input`` false)."""
    fields = _bert(raw)
    fields["type_vocab_size"] = raw.get("type_vocab_size", 0)
    fields["layer_norm_eps"] = raw.get("layer_norm_eps", 1e-7)
    fields["embedding_size"] = raw.get("embedding_size", fields["hidden_size"])
    fields["family"] = _deberta_family(raw, fields["max_position_embeddings"])
    return fields


def _deberta_family(raw: dict, max_positions) -> Family | str:
    kinds = raw.get("pos_att_type") or []
    if isinstance(kinds, str):  # the old "p2c|c2p" spelling, as transformers reads it
        kinds = [kind.strip() for kind in kinds.lower().split("|")]
    if not isinstance(kinds, list) or not set(kinds) <= {"c2p", "p2c"}:
        return f"pos_att_type {raw.get('pos_att_type')!r} is not a list of 'c2p' / 'p2c'"
    flags = {key: raw.get(key, default) for key, default in (("relative_attention", False), ("share_att_key", False),
                                                             ("position_biased_input", True))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            return f"{key} must be true or false, got {value!r}"
    numbers = {key: raw.get(key, default) for key, default in (("position_buckets", -1), ("max_relative_positions", -1),
                                                               ("conv_kernel_size", 0), ("conv_groups", 1))}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} must be an int, got {value!r}"
    norms = [part.strip() for part in str(raw.get("norm_rel_ebd", "none")).lower().split("|")]
    disentangled = None
    if flags["relative_attention"]:
        max_distance = numbers["max_relative_positions"]
        if max_distance < 1:
            max_distance = max_positions
        buckets = max(numbers["position_buckets"], 0)
        if buckets == 1:
            return "position_buckets 1 is not supported (log buckets need at least 2)"
        disentangled = Disentangled(c2p="c2p" in kinds, p2c="p2c" in kinds, buckets=buckets, max_distance=max_distance,
                                    shared_keys=flags["share_att_key"], norm="layer_norm" in norms)
    conv = None
    if numbers["conv_kernel_size"] > 0:
        kernel, groups, hidden = numbers["conv_kernel_size"], numbers["conv_groups"], raw.get("hidden_size")
        activation = raw.get("conv_act", "tanh")
        if kernel % 2 == 0:
            return f"conv_kernel_size {kernel} is not supported (only odd sizes keep the sequence length)"
        if groups < 1 or not isinstance(hidden, int) or hidden % groups:
            return f"conv_groups {groups} does not divide hidden_size {hidden!r}"
        if activation != "tanh" and canonical_activation(activation) is None:
            return f"conv_act {activation!r} is not supported; supported: tanh, {', '.join(_ACTIVATIONS)}"
        conv = Conv(kernel, groups, "tanh" if activation == "tanh" else canonical_activation(activation))
    return Family(positions="absolute" if flags["position_biased_input"] else "relative", disentangled=disentangled,
                  scale_factor=1 + len(set(kinds)), project_before_norm=True, conv=conv)

# ------------------------------------------------------------------------------------- decoder backbones
_DECODER_HEAD_DIMS = {"qwen3": 128, "gemma3_text": 256}  # transformers' defaults; else hidden / heads
_DECODER_MAX_POSITIONS = {"qwen3": 32768, "qwen2": 32768, "mistral": 131072, "llama": 2048, "gemma3_text": 131072}


def _decoder(model_type: str):
    """The reader of one decoder family (transformers' ``Qwen3Config``, ``Qwen2Config``, ``MistralConfig``,
    ``LlamaConfig``, ``Gemma3TextConfig`` defaults)."""

    def read(raw: dict) -> dict:
        gemma = model_type == "gemma3_text"
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        head_dim = raw.get("head_dim")
        if head_dim is None:
            default = _DECODER_HEAD_DIMS.get(model_type)
            head_dim = default if default is not None else (
                hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None)
        fields = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=raw["intermediate_size"],
            hidden_act=raw.get("hidden_activation", "gelu_pytorch_tanh") if gemma else raw.get("hidden_act", "silu"),
            layer_norm_eps=raw.get("rms_norm_eps", 1e-6),
            type_vocab_size=0,
            pad_token_id=raw.get("pad_token_id", 0 if gemma else None) or 0,
            max_position_embeddings=raw.get("max_position_embeddings", _DECODER_MAX_POSITIONS[model_type]),
        )
        fields["family"] = _decoder_family(raw, model_type)
        return fields

    return read


def _decoder_windows(raw: dict, model_type: str, layers: int) -> list[int | None] | str:
    """Each layer's attention window in fastenc's inclusive convention (None: every key), from
    ``layer_types`` and ``sliding_window`` as transformers reads them; a string says what is wrong."""
    if model_type == "llama":
        return [None] * layers
    if model_type == "mistral":  # one window on every layer, unless sliding_window is null
        sliding = raw.get("sliding_window", 4096)
        types = ["sliding_attention" if sliding is not None else "full_attention"] * layers
    elif model_type in ("qwen2", "qwen3"):
        sliding = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) is True else None
        types = raw.get("layer_types")
        if types is None:
            first = raw.get("max_window_layers", 28)
            types = ["sliding_attention" if sliding is not None and i >= first else "full_attention"
                     for i in range(layers)]
    else:  # gemma3_text: every sixth layer global (sliding_window_pattern), the others local
        sliding = raw.get("sliding_window", 4096)
        pattern = raw.get("sliding_window_pattern", 6)
        types = raw.get("layer_types")
        if types is None:
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                return f"sliding_window_pattern must be a positive int, got {pattern!r}"
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention",
                                                                                  "sliding_attention"}:
        return f"layer_types {types!r} is not a list of {layers} 'full_attention' / 'sliding_attention'"
    if "sliding_attention" not in types:
        return [None] * layers
    if isinstance(sliding, bool) or not isinstance(sliding, int) or sliding < 1:
        return f"sliding_window must be a positive int for the sliding layers, got {sliding!r}"
    # transformers keeps q - sliding_window < k <= q (causal); a bidirectional Gemma3 turns sliding_window S
    # into S // 2 + 1 at load and keeps |q - k| < S // 2 + 1 (config.json holds S)
    bidirectional = model_type == "gemma3_text" and raw.get("use_bidirectional_attention", False) is True
    window = sliding // 2 if bidirectional else sliding - 1
    return [window if kind == "sliding_attention" else None for kind in types]


def _decoder_thetas(raw: dict, model_type: str) -> dict[str, float] | str:
    """The RoPE base of the global ("full_attention") and local ("sliding_attention") layers."""
    if model_type != "gemma3_text":
        theta = _rope_theta(raw, raw.get("rope_parameters"), 10_000.0)
        return theta if isinstance(theta, str) else {"full_attention": theta, "sliding_attention": theta}
    params = raw.get("rope_parameters")
    sections = params if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params) \
        else {"full_attention": {**(raw.get("rope_scaling") or {}), **(params or {})}}
    thetas = {}
    for kind, old_key, default in (("full_attention", "rope_theta", 1_000_000.0),
                                   ("sliding_attention", "rope_local_base_freq", 10_000.0)):
        section = dict(sections.get(kind) or {})
        section.setdefault("rope_theta", raw.get(old_key, default))
        thetas[kind] = _rope_theta({}, section, default)
        if isinstance(thetas[kind], str):
            return f"{kind} layers: {thetas[kind]}"
    return thetas


def _decoder_family(raw: dict, model_type: str) -> Family | str:
    """Pre-norm RMSNorm blocks, RoPE, a gated feed-forward; causal unless Gemma3's config says otherwise."""
    layers = raw["num_hidden_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        return "num_hidden_layers must be a positive int"  # _validate says so first
    windows = _decoder_windows(raw, model_type, layers)
    thetas = _decoder_thetas(raw, model_type)
    for problem in (windows, thetas):
        if isinstance(problem, str):
            return problem
    kinds = tuple(LayerKind(window=window, rope_theta=thetas["full_attention" if window is None else
                                                               "sliding_attention"]) for window in windows)
    biased = raw.get("attention_bias", False) is True
    biases = {"qkv", "attn_out"} if biased else set()
    if model_type == "qwen2":
        biases = {"qkv"}  # Qwen2: q_proj, k_proj and v_proj have a bias, o_proj none
    if model_type == "llama" and raw.get("mlp_bias", False) is True:
        biases |= {"ffn_in", "ffn_out"}
    gemma = model_type == "gemma3_text"
    causal = not (gemma and raw.get("use_bidirectional_attention", False) is True)
    extra = {}
    if gemma:
        hidden, scalar = raw["hidden_size"], raw.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not (math.isfinite(scalar) and scalar > 0):
            return f"query_pre_attn_scalar must be a positive number, got {scalar!r}"
        if raw.get("attn_logit_softcapping") is not None:
            return f"attn_logit_softcapping {raw['attn_logit_softcapping']!r} is not supported (only null)"
        # transformers' embed_scale: a float32 buffer, cast to the table's dtype at each forward
        extra = dict(norm_offset=1.0, sandwich=True, query_scale=float(scalar) ** -0.5,
                     embedding_scale=float(torch.tensor(float(hidden) ** 0.5, dtype=torch.float32))
                     if isinstance(hidden, int) else None)
    return Family(norm="pre", positions="rope", ffn="gated", biases=frozenset(biases), layers=kinds, norm_type="rms",
                  embedding_norm=False, causal=causal, qk_norm=model_type in ("qwen3", "gemma3_text"), **extra)


def _validate(fields: dict, model_type: str, source: str) -> None:
    """Check every field's type and range in place (eps becomes a float); errors name the config.json key."""
    keys = _KEYS.get(model_type, {})
    for name, minimum in _MIN_SIZES.items():
        if name not in fields:
            continue
        value = fields[name]
        if model_type not in _NO_TOKEN_TYPE_TYPES and name == "type_vocab_size":
            minimum = 1  # BERT-style embeddings always add a token-type row
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive int" if minimum == 1 else "a non-negative int"
            raise LoadError(f"{source}: {keys.get(name, name)} must be {kind}, got {value!r}")
    if fields["pad_token_id"] >= fields["vocab_size"]:
        raise LoadError(f"{source}: pad_token_id {fields['pad_token_id']} is outside vocab_size {fields['vocab_size']}")
    eps = fields["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise LoadError(f"{source}: layer_norm_eps must be a positive finite number, got {eps!r}")
    fields["layer_norm_eps"] = float(eps)
    act = fields["hidden_act"]
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise LoadError(f"{source}: {keys.get('hidden_act', 'hidden_act')} {act!r} is not supported; "
                        f"supported: {', '.join(_ACTIVATIONS)}")


_READERS = {
    "bert": _bert,
    "roberta": _roberta,
    "xlm-roberta": _roberta,
    "camembert": _roberta,
    "distilbert": _distilbert,
    "electra": _electra,
    "albert": _albert,
    "mpnet": _mpnet,
    "modernbert": _modernbert,
    "nomic_bert": _nomic_bert,
    "gte": _gte,
    "deberta-v2": _deberta_v2,
    **{model_type: _decoder(model_type) for model_type in DECODER_MODEL_TYPES},
}
