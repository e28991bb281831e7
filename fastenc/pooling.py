"""Sentence embeddings: the sentence-transformers configuration files, and pooling of packed tokens.

Besides the pooling of a ``SentenceTransformer``, the configuration says what the retrieval calls need:
the prompts (``config_sentence_transformers.json``: ``prompts``, ``default_prompt_name``; the pooling
config's ``include_prompt``), a ``SparseEncoder``'s ``SpladePooling`` (``max``/``sum``,
``relu``/``log1p_relu``) and ``max_active_dims``, and a ``CrossEncoder``'s ``activation_fn``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .errors import LoadError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")

# 1_Pooling/config.json flags -> our mode names.
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
_UNSUPPORTED_FLAGS = ("pooling_mode_weightedmean_tokens",)

SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")
# modules.json types that hold the transformer (sentence-transformers >= 5.4 writes Transformer with
# transformer_task "fill-mask" for a SparseEncoder; earlier versions wrote MLMTransformer).
_TRANSFORMER_MODULES = ("Transformer", "MLMTransformer")


@dataclasses.dataclass(frozen=True)
class SpladeConfig:
    """A ``SpladePooling`` module: ``pool(act(MLM logits))`` over each text's tokens.

    ``relu`` is ``log1p(relu(x))``, ``log1p_relu`` is ``log1p(log1p(relu(x)))`` (sentence-transformers'
    names). Without a ``SpladePooling`` config, a masked-LM checkpoint gets SparseEncoder's defaults.
    """

    pooling: str = "max"
    activation: str = "relu"


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers directory says about turning token vectors into one vector."""

    transformer_dir: Path  # where config.json and the weights live
    pooling: str | None = None  # None: no 1_Pooling module
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    unsupported_modules: tuple[str, ...] = ()  # modules embed() cannot reproduce (Dense, ...)
    include_prompt: bool = True  # False: the prompt's tokens are left out of the pooling
    prompts: dict = dataclasses.field(default_factory=dict)  # name -> text prepended to each input
    default_prompt_name: str | None = None
    splade: SpladeConfig | None = None  # a SparseEncoder's SpladePooling module
    max_active_dims: int | None = None  # a SparseEncoder's default top_k
    activation_fn: str | None = None  # a CrossEncoder's score activation, as a dotted torch path

    @classmethod
    def from_dir(cls, directory: Path) -> "SentenceConfig":
        modules_file = directory / "modules.json"
        model = _read_model_config(directory)
        if not modules_file.is_file():
            return cls(transformer_dir=directory, **_read_sbert(directory), **model)
        modules = _read(modules_file)
        if not isinstance(modules, list):
            raise LoadError(f"{modules_file}: expected a list of modules")
        transformer_dir, pooling, normalize, unsupported = directory, None, False, []
        include_prompt, splade = True, None
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = directory / module.get("path", "")
            if kind in _TRANSFORMER_MODULES:
                transformer_dir = path
            elif kind == "Pooling":
                pooling = _pooling_mode(path / "config.json")
                include_prompt = _read(path / "config.json").get("include_prompt", True) is not False
            elif kind == "SpladePooling":
                splade = _splade(path / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                unsupported.append(kind)
        return cls(transformer_dir=transformer_dir, pooling=pooling, normalize=normalize,
                   unsupported_modules=tuple(unsupported), include_prompt=include_prompt, splade=splade,
                   **_read_sbert(transformer_dir), **model)


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


def _read_model_config(directory: Path) -> dict:
    """``config_sentence_transformers.json``: prompts, the default prompt, max_active_dims, activation_fn."""
    path = directory / "config_sentence_transformers.json"
    data = _read(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    prompts = data.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                for k, v in prompts.items()):
        raise LoadError(f"{path}: 'prompts' must map names to strings")
    prompts = {name: text or "" for name, text in prompts.items()}  # None: an empty prompt, as sentence-transformers
    default = data.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise LoadError(f"{path}: default_prompt_name {default!r} is not one of the prompts "
                        f"{', '.join(map(repr, prompts)) or '(none)'}")
    max_active_dims = data.get("max_active_dims")
    if max_active_dims is not None and (isinstance(max_active_dims, bool) or not isinstance(max_active_dims, int)
                                        or max_active_dims < 1):
        raise LoadError(f"{path}: max_active_dims must be a positive int, got {max_active_dims!r}")
    activation_fn = data.get("activation_fn")
    return {"prompts": prompts, "default_prompt_name": default, "max_active_dims": max_active_dims,
            "activation_fn": activation_fn if isinstance(activation_fn, str) else None}


def _splade(path: Path) -> SpladeConfig:
    data = _read(path) if path.is_file() else {}
    pooling = data.get("pooling_strategy", "max")
    activation = data.get("activation_function", "relu")
    if pooling not in SPLADE_POOLING or activation not in SPLADE_ACTIVATIONS:
        raise LoadError(f"{path}: SpladePooling with pooling_strategy {pooling!r} and activation_function "
                        f"{activation!r} is not supported; fastenc supports {SPLADE_POOLING} with "
                        f"{SPLADE_ACTIVATIONS}")
    return SpladeConfig(pooling, activation)


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


def pool(hidden: torch.Tensor, lengths: list[int], mode: str, *, normalize: bool = False,
         skip: int = 0) -> torch.Tensor:
    """Pool packed token vectors ``(tokens, hidden)`` into ``(len(lengths), hidden)`` float32 vectors.

    Each sequence is reduced (and L2-normalised) on its own slice, so its vector does not depend on the
    other sequences, bit for bit: no reduction across the batch, no atomics, no kernel whose shape
    depends on the batch. ``skip`` leading tokens of each sequence are left out (a prompt, when the
    pooling config says ``include_prompt: false``). An empty sequence pools to zeros.

    ``lasttoken`` (the decoder embedders') is one gather at ``cu_seqlens[1:] - 1``: only those rows are
    read and converted, whatever the batch holds.
    """
    out = hidden.new_zeros(len(lengths), hidden.shape[-1], dtype=torch.float32)
    if mode == "lasttoken":
        ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1  # cu_seqlens[1:] - 1
        kept = torch.tensor(lengths) > skip  # texts with a token after the skipped ones
        out[kept.to(out.device)] = hidden[ends[kept].to(hidden.device)].float()
        if normalize:
            for row in out:  # as below: one row at a time
                row /= row.norm().clamp_min(1e-12)
        return out
    for row, tokens in enumerate(hidden.float().split(lengths)):
        tokens = tokens[skip:]
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
