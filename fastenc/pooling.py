"""Sentence embeddings: the sentence-transformers configuration files, and pooling of packed tokens.

Besides the pooling of a ``SentenceTransformer``, the configuration says what the retrieval calls need:
the prompts (``config_sentence_transformers.json``: ``prompts``, ``default_prompt_name``; the pooling
config's ``include_prompt``), a ``SparseEncoder``'s ``SpladePooling`` (``max``/``sum``,
``relu``/``log1p_relu``) and ``max_active_dims``, a ``CrossEncoder``'s ``activation_fn`` and, for one
backed by a causal language model, its ``LogitScore`` module (the token ids it scores), the ``Dense``
modules after the pooling (``Dense``: their weights are read here, from the module folder's
safetensors), and a ``MultiVectorEncoder``'s (ColBERT) settings (``MultiVectorConfig``: query and
document lengths, query expansion, the skiplist, the token-level ``Dense`` projection and ``Normalize``),
in the format sentence-transformers 6 saves and in PyLate's older one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import string
from pathlib import Path

import torch

from .chat import ChatSettings
from .errors import LoadError

logger = logging.getLogger("fastenc")

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

# A Dense module's activation_function (the class path sentence-transformers saves) -> (the activation the
# GEMM applies, one of fastenc's ops activations, or None; an elementwise function after it, or None).
DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": (None, torch.tanh), "torch.nn.Tanh": (None, torch.tanh),
    "torch.nn.modules.linear.Identity": (None, None), "torch.nn.Identity": (None, None),
    "torch.nn.modules.activation.ReLU": ("relu", None), "torch.nn.ReLU": ("relu", None),
    "torch.nn.modules.activation.GELU": ("gelu", None), "torch.nn.GELU": ("gelu", None),
    "torch.nn.modules.activation.SiLU": ("silu", None), "torch.nn.SiLU": ("silu", None),
    "torch.nn.modules.activation.Sigmoid": (None, torch.sigmoid), "torch.nn.Sigmoid": (None, torch.sigmoid),
}
_DEFAULT_DENSE_ACTIVATION = "torch.nn.modules.activation.Tanh"  # Dense's default, and its fallback
QUERY_EXPANSION_STRATEGIES = ("fixed", "min")


@dataclasses.dataclass(frozen=True)
class SpladeConfig:
    """A ``SpladePooling`` module: ``pool(act(MLM logits))`` over each text's tokens.

    ``relu`` is ``log1p(relu(x))``, ``log1p_relu`` is ``log1p(log1p(relu(x)))`` (sentence-transformers'
    names). Without a ``SpladePooling`` config, a masked-LM checkpoint gets SparseEncoder's defaults.
    """

    pooling: str = "max"
    activation: str = "relu"


@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """A sentence-transformers ``Dense`` module: ``act(x @ weight.T + bias)``, plus the input (or its
    ``residual`` projection) with ``use_residual``; ``activation`` is the saved class path.

    The weights are kept as read (float32, CPU); ``__call__`` runs them through the model's ops backend
    (``ops.linear``: a GEMM whose rows do not depend on each other, bitwise on the Triton backend) in
    the model's dtype and device, converted once per device and dtype. Compared by identity.
    """

    path: Path  # the module folder
    weight: torch.Tensor  # (out_features, in_features) float32
    bias: torch.Tensor | None  # (out_features,)
    activation: str
    input_name: str = "sentence_embedding"  # "token_embeddings": before any pooling, on every token
    use_residual: bool = False
    residual: torch.Tensor | None = None  # (out_features, in_features) when use_residual and the widths differ
    _placed: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def load(cls, directory: Path, *, input_name: str = "sentence_embedding") -> "Dense":
        """The module in ``directory``: ``config.json`` and ``model.safetensors`` (``linear.weight``,
        ``linear.bias``, ``residual.weight``). ``input_name``: the input when the config names none (older
        saves; a ColBERT model's Dense works on token embeddings)."""
        config = _read(directory / "config.json") if (directory / "config.json").is_file() else None
        if not isinstance(config, dict) or "in_features" not in config or "out_features" not in config:
            raise LoadError(f"{directory / 'config.json'}: a Dense module's config needs in_features and out_features")
        activation = config.get("activation_function") or _DEFAULT_DENSE_ACTIVATION
        if not activation.startswith("torch."):  # sentence-transformers' fallback without trust_remote_code
            logger.warning("%s: Dense activation %r is not a torch module; using Tanh, as sentence-transformers "
                           "does without trust_remote_code", directory, activation)
            activation = _DEFAULT_DENSE_ACTIVATION
        if activation not in DENSE_ACTIVATIONS:
            raise LoadError(f"{directory / 'config.json'}: Dense activation {activation!r} is not supported; fastenc "
                            f"supports {', '.join(sorted({k.rsplit('.', 1)[-1] for k in DENSE_ACTIVATIONS}))}")
        n_in, n_out = int(config["in_features"]), int(config["out_features"])
        bias, use_residual = bool(config.get("bias", True)), bool(config.get("use_residual", False))
        shapes = {"linear.weight": (n_out, n_in)}
        if bias:
            shapes["linear.bias"] = (n_out,)
        if use_residual and n_in != n_out:
            shapes["residual.weight"] = (n_out, n_in)
        tensors = _read_module_tensors(directory, shapes)
        return cls(directory, tensors["linear.weight"], tensors.get("linear.bias"), activation,
                   config.get("module_input_name") or input_name, use_residual, tensors.get("residual.weight"))

    def __call__(self, model, x: torch.Tensor) -> torch.Tensor:
        """``(rows, in_features)`` -> ``(rows, out_features)`` float32, on the model's ops and device."""
        key = (model.device, model.dtype)
        if key not in self._placed:
            self._placed[key] = tuple(None if t is None else t.to(device=model.device, dtype=model.dtype)
                                      for t in (self.weight, self.bias, self.residual))
        weight, bias, residual = self._placed[key]
        op, after = DENSE_ACTIVATIONS[self.activation]
        x = x.to(device=model.device, dtype=model.dtype)
        y = model.ops.linear(x, weight, bias, op).float()
        if after is not None:
            y = after(y)
        if self.use_residual:
            y = y + (x if residual is None else model.ops.linear(x, residual, None)).float()
        return y


def _read_module_tensors(directory: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the tensors of ``shapes`` from a module folder's ``model.safetensors``, float32 on the CPU."""
    from safetensors import SafetensorError, safe_open

    file = directory / "model.safetensors"
    if not file.is_file():
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise LoadError(f"{directory}: only pickle weights ({', '.join(pickles)}); fastenc never unpickles. "
                            "Load the model with sentence-transformers and save it again (safetensors).")
        raise LoadError(f"{directory}: no model.safetensors")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            for key, shape in shapes.items():
                if key not in keys:
                    raise LoadError(f"{file}: missing tensor {key!r}")
                actual = tuple(handle.get_slice(key).get_shape())
                if actual != shape:
                    raise LoadError(f"{file}: tensor {key!r} has shape {list(actual)}, expected {list(shape)}")
            tensors = {key: handle.get_tensor(key).float() for key in shapes}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{file}: malformed or truncated safetensors file ({exc})") from None
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{file}: tensor {key!r} holds non-finite values")
    return tensors


@dataclasses.dataclass(frozen=True)
class QueryExpansion:
    """ColBERT's query expansion: queries padded to ``length`` tokens with ``token`` (the tokenizer's mask
    token when None), each counted as a query vector. ``fixed``: every query has exactly ``length`` tokens
    (longer ones are cut); ``min``: at least ``length``. ``attend``: the encoder attends to them too."""

    strategy: str
    length: int
    attend: bool = False
    token: str | None = None


@dataclasses.dataclass(frozen=True)
class MultiVectorConfig:
    """A ``MultiVectorEncoder``'s (ColBERT model's) settings: per text one vector per token, projected by
    ``dense`` (token-level ``Dense`` modules), L2-normalised when ``normalize``, the skiplist's tokens left
    out for the tasks of ``skiplist_tasks``, then cut to ``truncate_dim`` and normalised again."""

    dense: tuple[Dense, ...] = ()
    normalize: bool = True
    query_length: int | None = None
    document_length: int | None = None
    expansion: QueryExpansion | None = None
    skiplist_words: tuple[str, ...] = ()
    skiplist_tasks: tuple[str, ...] = ("document",)
    truncate_dim: int | None = None
    prefixes: tuple[str, ...] = ()  # PyLate's query/document prefixes: single tokens, registered as such


@dataclasses.dataclass(frozen=True)
class LogitScore:
    """A ``CrossEncoder``'s ``LogitScore`` module over a causal language model: the score of a pair is the
    LM logit of ``true_token_id`` at its last token, less that of ``false_token_id`` when there is one
    (the log-odds; Qwen3-Reranker's "yes" and "no")."""

    true_token_id: int
    false_token_id: int | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return (self.true_token_id,) if self.false_token_id is None else (self.true_token_id, self.false_token_id)

    @classmethod
    def load(cls, path: Path) -> "LogitScore":
        data = _read(path) if path.is_file() else {}
        true_id, false_id = data.get("true_token_id"), data.get("false_token_id")
        for name, value, optional in (("true_token_id", true_id, False), ("false_token_id", false_id, True)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LoadError(f"{path}: LogitScore's {name} must be a token id (a non-negative int), got {value!r}")
        source = data.get("module_input_name", "causal_logits")
        if source != "causal_logits":
            raise LoadError(f"{path}: LogitScore reading {source!r} is not supported (only the causal LM's logits)")
        return cls(true_id, false_id)


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
    dense: tuple[Dense, ...] = ()  # Dense modules after the pooling: part of the sentence embedding
    multivector: MultiVectorConfig | None = None  # a MultiVectorEncoder (ColBERT model)
    logit_score: LogitScore | None = None  # a CrossEncoder over a causal LM: the token ids its score reads
    # the Transformer module's modality_config has "message": texts and pairs go through the tokenizer's chat
    # template (fastenc.chat)
    chat: ChatSettings | None = None

    @property
    def embedding_dim(self) -> int | None:
        """The sentence embedding's width when ``Dense`` modules set it, else None (the hidden size)."""
        return self.dense[-1].out_features if self.dense else None

    @classmethod
    def from_dir(cls, directory: Path) -> "SentenceConfig":
        modules_file = directory / "modules.json"
        model = _read_model_config(directory)
        legacy, truncate_dim = model.pop("_legacy"), model.pop("_truncate_dim")
        multivector_model = model.pop("_model_type") in ("MultiVectorEncoder", "ColBERT")
        if not modules_file.is_file():
            sbert = _read_sbert(directory)
            sbert.pop("_multivector")
            sbert.pop("chat", None)  # a plain checkpoint: no sentence-transformers formatting to follow
            return cls(transformer_dir=directory, **sbert, **model)
        modules = _read(modules_file)
        if not isinstance(modules, list):
            raise LoadError(f"{modules_file}: expected a list of modules")
        transformer_dir, pooling, normalize, unsupported = directory, None, False, []
        include_prompt, splade, logit_score = True, None, None
        dense, token_dense, token_normalize, mask = [], [], False, None
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
            elif kind == "LogitScore":
                logit_score = LogitScore.load(path / "config.json")
            elif kind == "Normalize":
                settings = _read(path / "config.json") if (path / "config.json").is_file() else {}
                default = "token_embeddings" if multivector_model else "sentence_embedding"
                if (settings.get("module_input_name") or default) == "token_embeddings":
                    token_normalize = True
                else:
                    normalize = True
            elif kind == "Dense":
                layer = Dense.load(path, input_name="token_embeddings" if multivector_model else "sentence_embedding")
                if layer.input_name == "token_embeddings" and pooling is None and multivector_model:
                    token_dense.append(layer)
                elif layer.input_name == "sentence_embedding" and pooling is not None and not normalize:
                    dense.append(layer)
                else:
                    unsupported.append(f"Dense (on {layer.input_name}{', after Normalize' if normalize else ''})")
            elif kind == "MultiVectorMask" and multivector_model:
                mask = _read(path / "config.json") if (path / "config.json").is_file() else {}
                if mask.get("keep_only_token_ids"):
                    unsupported.append("MultiVectorMask (keep_only_token_ids)")
            else:
                unsupported.append(kind)
        sbert = _read_sbert(transformer_dir)
        multivector = None
        if multivector_model:
            if legacy.get("pylate"):  # PyLate listed only Transformer and Dense: it masked and normalised inline
                if mask is None:
                    mask = {"skiplist_words": legacy.get("skiplist_words", list(string.punctuation))}
                token_normalize = True
            multivector = _multivector(directory, sbert.pop("_multivector"), legacy, mask or {}, tuple(token_dense),
                                       token_normalize, truncate_dim)
        else:
            sbert.pop("_multivector")
        return cls(transformer_dir=transformer_dir, pooling=pooling, normalize=normalize,
                   unsupported_modules=tuple(unsupported), include_prompt=include_prompt, splade=splade,
                   dense=tuple(dense), multivector=multivector, logit_score=logit_score, **sbert, **model)


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: cannot be read as JSON ({exc})") from None


def _read_sbert(directory: Path) -> dict:
    """``sentence_bert_config.json``: the limits and casing, and (under ``_multivector``) a ColBERT model's
    Transformer settings: ``query_length``, ``document_length``, ``query_expansion``."""
    path = directory / "sentence_bert_config.json"
    if not path.is_file():
        return {"_multivector": {}}
    data = _read(path)
    modalities = data.get("modality_config")
    return {"max_seq_length": data.get("max_seq_length"), "do_lower_case": bool(data.get("do_lower_case", False)),
            "chat": (ChatSettings.read(modalities["message"], data.get("processing_kwargs"), path)
                     if isinstance(modalities, dict) and "message" in modalities else None),
            "_multivector": {k: data[k] for k in ("query_length", "document_length", "query_expansion") if k in data}}


def _positive(value, what: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoadError(f"{path}: {what} must be a positive int, got {value!r}")
    return value


def _multivector(directory: Path, transformer: dict, legacy: dict, mask: dict, dense: tuple[Dense, ...],
                 normalize: bool, truncate_dim) -> MultiVectorConfig:
    """A ColBERT model's settings from the Transformer's config (sentence-transformers 6) or PyLate's
    top-level keys (``legacy``), as ``MultiVectorEncoder`` reads them."""
    where = directory / "sentence_bert_config.json"
    settings = {**{k: v for k, v in legacy.items() if k in ("query_length", "document_length", "query_expansion")},
                **transformer}
    expansion = settings.get("query_expansion")
    if expansion is not None:
        if not isinstance(expansion, dict) or expansion.get("strategy") not in QUERY_EXPANSION_STRATEGIES:
            raise LoadError(f"{where}: query_expansion must be an object with strategy in "
                            f"{QUERY_EXPANSION_STRATEGIES}, got {expansion!r}")
        token = expansion.get("token")
        if token is not None and not isinstance(token, str):
            raise LoadError(f"{where}: query_expansion token must be a string, got {token!r}")
        expansion = QueryExpansion(expansion["strategy"], _positive(expansion.get("length"), "query_expansion length",
                                                                    where),
                                   bool(expansion.get("attend", False)), token)
        if expansion.length is None:
            raise LoadError(f"{where}: query_expansion needs a length (the tokens a query is padded to)")
    words = mask.get("skiplist_words") or []
    tasks = mask.get("skiplist_tasks") or ["document"]
    if isinstance(tasks, str):
        tasks = [tasks]
    if not all(isinstance(w, str) for w in words) or not all(isinstance(t, str) for t in tasks):
        raise LoadError(f"{directory}: the MultiVectorMask skiplist must list strings")
    return MultiVectorConfig(dense=dense, normalize=normalize,
                             query_length=_positive(settings.get("query_length"), "query_length", where),
                             document_length=_positive(settings.get("document_length"), "document_length", where),
                             expansion=expansion, skiplist_words=tuple(words), skiplist_tasks=tuple(tasks),
                             truncate_dim=_positive(truncate_dim, "truncate_dim", directory),
                             prefixes=tuple(legacy.get("prefixes", ())))


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
    legacy = _pylate(data, prompts)  # PyLate's prefixes go in front of the prompts
    return {"prompts": prompts, "default_prompt_name": default, "max_active_dims": max_active_dims,
            "activation_fn": activation_fn if isinstance(activation_fn, str) else None,
            "_model_type": data.get("model_type"), "_truncate_dim": data.get("truncate_dim"), "_legacy": legacy}


def _pylate(data: dict, prompts: dict) -> dict:
    """PyLate's top-level ColBERT keys, as ``MultiVectorEncoder`` translates them: the query and document
    prefixes (prepended to the prompts, in ``prompts`` in place), the lengths, the expansion (on, fixed at
    ``query_length`` or 32 tokens, unless ``do_query_expansion`` is false) and the skiplist."""
    legacy: dict = {}
    for key, name in (("query_prefix", "query"), ("document_prefix", "document")):
        if key in data:
            prefix = data[key] or ""
            prompts[name] = prefix + (prompts.get(name) or "").removeprefix(prefix)
            legacy.setdefault("prefixes", []).append(prefix)
    markers = ("query_length", "document_length", "query_expansion", "do_query_expansion", "attend_to_expansion_tokens",
               "attend_to_mask_tokens", "query_prefix", "document_prefix", "skiplist_words")
    if not any(key in data for key in markers):
        return legacy
    legacy["pylate"] = data.get("model_type") == "ColBERT"
    for key in ("query_length", "document_length", "query_expansion"):
        if data.get(key) is not None or key == "query_expansion" and key in data:
            legacy[key] = data[key]
    if "query_expansion" not in legacy:
        if data.get("do_query_expansion") is False:
            legacy["query_expansion"] = None
        else:
            attend = data.get("attend_to_expansion_tokens", data.get("attend_to_mask_tokens"))
            length = legacy.pop("query_length", None) or 32
            legacy["query_expansion"] = {"strategy": "fixed", "attend": bool(attend), "length": length}
    if data.get("skiplist_words") is not None:
        legacy["skiplist_words"] = data["skiplist_words"]
    return legacy


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
