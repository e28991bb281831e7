"""Task heads on top of the encoder, loaded when the checkpoint has them.

Each head is a declarative table per family, like the encoder's (``checkpoint.py``): fastenc name ->
checkpoint name. Names starting with ``"@"`` are relative to the encoder's base prefix (``bert.`` …);
the others are absolute (task heads live beside the base model, not under it).
"""

from __future__ import annotations

import torch

from . import checkpoint
from .config import EncoderConfig

HEAD_NAMES = ("pooler", "mlm", "sequence_classification", "token_classification", "question_answering")

_BERT_POOLER = {"pooler.weight": "@pooler.dense.weight", "pooler.bias": "@pooler.dense.bias"}

HEAD_MAPS: dict[str, dict[str, dict[str, str]]] = {
    "bert": {"pooler": _BERT_POOLER},
    "roberta": {"pooler": _BERT_POOLER},
    "xlm-roberta": {"pooler": _BERT_POOLER},
    "camembert": {"pooler": _BERT_POOLER},
    "distilbert": {},
    "electra": {},
    "albert": {"pooler": {"pooler.weight": "@pooler.weight", "pooler.bias": "@pooler.bias"}},
}


def head_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    H = config.hidden_size
    return {"pooler.weight": (H, H), "pooler.bias": (H,)}


def load_heads(files: checkpoint.SafetensorsDir, config: EncoderConfig, dtype: torch.dtype,
               prefix: str) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """The heads whose tensors are all in the checkpoint, and the checkpoint keys they read."""
    shapes = head_shapes(config)
    loaded, used = {}, set()
    for head, table in HEAD_MAPS[config.model_type].items():
        resolved = {ours: prefix + theirs[1:] if theirs.startswith("@") else theirs for ours, theirs in table.items()}
        if not all(key in files.keys for key in resolved.values()):
            continue
        loaded[head] = checkpoint.load_tensors(files, resolved, shapes, dtype)
        used.update(resolved.values())
    return loaded, used
