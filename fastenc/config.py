"""``EncoderConfig``: one dataclass for every BERT-family ``config.json``, one small reader per family."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import LoadError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert")
# Position ids count non-padding tokens from pad_token_id + 1 in these families.
_PADDING_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert")

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
}
_KEYS = {"distilbert": {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                        "intermediate_size": "hidden_dim", "hidden_act": "activation"}}

# transformers' activation names -> the canonical names of the ops interface (reference.py).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
}


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
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # config.json as read

    @property
    def activation(self) -> str:
        """The canonical activation name of the ops interface (``"gelu"``, ``"gelu_tanh"``, ``"relu"``)."""
        return _ACTIVATIONS[self.hidden_act]

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
        position_offset = fields["pad_token_id"] + 1 if model_type in _PADDING_POSITION_TYPES else 0
        hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
        if hidden % heads:
            raise LoadError(f"{source}: hidden size {hidden} is not a multiple of the {heads} attention heads")
        max_length = fields["max_position_embeddings"] - position_offset
        if max_length <= 0:
            raise LoadError(f"{source}: no usable positions (max_position_embeddings "
                            f"{fields['max_position_embeddings']} is too small for pad_token_id {fields['pad_token_id']})")
        return cls(model_type=model_type, head_dim=hidden // heads, max_length=max_length,
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


def _validate(fields: dict, model_type: str, source: str) -> None:
    """Check every field's type and range in place (eps becomes a float); errors name the config.json key."""
    keys = _KEYS.get(model_type, {})
    for name, minimum in _MIN_SIZES.items():
        if name not in fields:
            continue
        value = fields[name]
        if model_type != "distilbert" and name == "type_vocab_size":
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
}
