"""Sentence embeddings: the sentence-transformers configuration files, and pooling of packed tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .errors import LoadError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")

# 1_Pooling/config.json flags -> our mode names.
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_UNSUPPORTED_FLAGS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers directory says about turning token vectors into one vector."""

    transformer_dir: Path  # where config.json and the weights live
    pooling: str | None = None  # None: no 1_Pooling module
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    unsupported_modules: tuple[str, ...] = ()  # modules embed() cannot reproduce (Dense, ...)

    @classmethod
    def from_dir(cls, directory: Path) -> "SentenceConfig":
        modules_file = directory / "modules.json"
        if not modules_file.is_file():
            return cls(transformer_dir=directory, **_read_sbert(directory))
        modules = _read(modules_file)
        if not isinstance(modules, list):
            raise LoadError(f"{modules_file}: expected a list of modules")
        transformer_dir, pooling, normalize, unsupported = directory, None, False, []
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = directory / module.get("path", "")
            if kind == "Transformer":
                transformer_dir = path
            elif kind == "Pooling":
                pooling = _pooling_mode(path / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                unsupported.append(kind)
        return cls(transformer_dir=transformer_dir, pooling=pooling, normalize=normalize,
                   unsupported_modules=tuple(unsupported), **_read_sbert(transformer_dir))


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: cannot be read as JSON ({exc})") from None


def _read_sbert(directory: Path) -> dict:
    path = directory / "sentence_bert_config.json"
    if not path.is_file():
        return {}
    data = _read(path)
    return {"max_seq_length": data.get("max_seq_length"), "do_lower_case": bool(data.get("do_lower_case", False))}


def _pooling_mode(path: Path) -> str:
    data = _read(path)
    if "pooling_mode" in data:  # newer sentence-transformers write the mode as a string
        mode = {"mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "lasttoken"}.get(data["pooling_mode"],
                                                                                     data["pooling_mode"])
        modes = [mode]
    else:
        modes = [ours for flag, ours in _POOLING_FLAGS.items() if data.get(flag)]
        modes += [flag for flag in _UNSUPPORTED_FLAGS if data.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise LoadError(f"{path}: pooling {modes} is not supported; fastenc pools with one of {POOLING_MODES}")
    return modes[0]


def pool(hidden: torch.Tensor, lengths: list[int], mode: str, *, normalize: bool = False) -> torch.Tensor:
    """Pool packed token vectors ``(tokens, hidden)`` into ``(len(lengths), hidden)`` float32 vectors.

    Each sequence is reduced (and L2-normalised) on its own slice, so its vector does not depend on the
    other sequences, bit for bit: no reduction across the batch, no atomics, no kernel whose shape
    depends on the batch. An empty sequence pools to zeros.
    """
    out = hidden.new_zeros(len(lengths), hidden.shape[-1], dtype=torch.float32)
    for row, tokens in enumerate(hidden.float().split(lengths)):
        if tokens.shape[0] == 0:
            continue
        if mode == "mean":
            out[row] = tokens.mean(0)
        elif mode == "cls":
            out[row] = tokens[0]
        elif mode == "max":
            out[row] = tokens.amax(0)
        elif mode == "mean_sqrt_len":
            out[row] = tokens.sum(0) / tokens.shape[0] ** 0.5
        else:
            raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")
        if normalize:  # as torch.nn.functional.normalize, one row at a time
            out[row] /= out[row].norm().clamp_min(1e-12)
    return out
