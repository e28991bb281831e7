"""Task heads on top of the encoder, loaded when the checkpoint has them.

Each head is a declarative table per family, like the encoder's (``checkpoint.py``): fastenc name ->
checkpoint name. Names starting with ``"@"`` are relative to the encoder's base prefix (``bert.`` …);
the others are absolute (task heads live beside the base model, not under it). ``"a|b"`` lists
alternative names: the first one present is read, and the others count as used. (The MLM decoder's
bias is the one its forward adds; transformers saves it as ``cls.predictions.bias`` when it is tied to
it, and writes both when the decoder is untied.)

What each family computes (transformers' modeling files, v5):

* pooler: ``tanh(dense(first token))`` (BERT, RoBERTa-likes, ALBERT).
* masked LM: ``decoder(LayerNorm(act(dense(h))))`` through the fused ``ops.gelu_layer_norm``; the decoder
  weight is the word embedding matrix when the checkpoint ties them (it is then absent from the file,
  and the encoder's own tensor is reused, not copied). Logits are computed only at the asked positions.
  The activation is the encoder's for BERT, DistilBERT and ALBERT, exact GELU for RoBERTa and ELECTRA.
  SPLADE vectors (``sparse_vectors``) run the same transform, then ``ops.splade_pool``: the decoder,
  the SPLADE activation and the pooling over each text's tokens in one op, vocabulary tile by tile.
* sequence classification: BERT and ALBERT ``classifier(pooler)``; RoBERTa-likes
  ``out_proj(tanh(dense(first)))``; DistilBERT ``classifier(relu(pre_classifier(first)))``; ELECTRA
  ``out_proj(gelu(dense(first)))``.
* token classification: ``classifier(h)`` on every token; question answering: ``qa_outputs(h)`` ->
  start and end logits.
* MPNet: RoBERTa's heads (``lm_head``, ``classifier.dense`` / ``out_proj``) under ``mpnet.``.
  NomicBERT and GTE: BERT's pooler and classifiers; NomicBERT's MLM head is BERT's (``cls.predictions``,
  the encoder's activation), GTE's RoBERTa's (``lm_head``, exact GELU); neither has a QA model.
* DeBERTa-v2/v3: sequence classification is ``classifier(act(pooler.dense(first token)))`` (its
  ``ContextPooler``, ``pooler_hidden_act``, GELU by default); the masked LM is BERT's head
  (``cls.predictions``, to ``embedding_size``) with ``legacy`` (transformers' default), else
  ``lm_predictions.lm_head`` (hidden-wide, its decoder always the word embeddings); token
  classification and QA as BERT's.
* ModernBERT: every task runs ``head`` (``norm(act(dense(x)))``, ``classifier_activation``, biases as
  ``classifier_bias`` / ``norm_bias`` say) before its ``classifier`` (or ``decoder``); the sequence
  classifier first pools the tokens as ``classifier_pooling`` says (``"cls"``: the first token,
  ``"mean"``: the mean of the sequence's tokens).

* The decoder backbones (Qwen3, Qwen2, Mistral, Llama, Gemma3): sequence classification is
  ``score(last token)`` (``*ForSequenceClassification``, no bias; transformers takes the last token that
  is not the padding id, which is the last token unless a text ends with that id); the causal LM head
  (``causal_lm``, ``lm_head``, the word embeddings when tied) is read only at the last token and only
  at the rows of the scored token ids (``last_token_logits``: a sentence-transformers ``CrossEncoder`` with a
  ``LogitScore`` module, Qwen3-Reranker's "yes" and "no"), with Gemma's ``final_logit_softcapping``.

* BGE-M3 (``bge_m3``, from ``colbert_linear.pt`` and ``sparse_linear.pt`` beside the weights, read by
  ``checkpoint.read_linear_pt``): ``colbert_linear(h)`` on every token (its ColBERT vectors, before the
  first token is dropped and they are normalised) and ``relu(sparse_linear(h))``, one weight per token
  (its lexical weights), as FlagEmbedding's ``BGEM3FlagModel`` computes them.

BERT's and ALBERT's sequence and token classifiers have the same tensor names (``classifier.*``), so
which one a checkpoint holds is read from ``config.json``'s ``architectures``; without it, a pooler
means sequence classification (``*ForTokenClassification`` is built without one). A head with some but
not all of its tensors is a ``LoadError`` naming the missing ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import checkpoint
from .config import DECODER_MODEL_TYPES, EncoderConfig, canonical_activation
from .errors import LoadError

HEAD_NAMES = ("pooler", "mlm", "sequence_classification", "token_classification", "question_answering", "bge_m3",
              "causal_lm")
BGE_M3_FILES = ("colbert_linear.pt", "sparse_linear.pt")
_CLASSIFIERS = ("sequence_classification", "token_classification")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One head of one family: its tensors and how it computes."""

    tensors: dict[str, str]  # fastenc name -> checkpoint name ("@" relative to the base prefix, "a|b" alternatives)
    activation: str | None = None  # canonical ops activation; "config" = the encoder's own
    tied: str | None = None  # fastenc name that may be absent and then is the word embedding matrix
    requires: tuple[str, ...] = ()  # heads this one runs on (BERT's classifier runs on the pooler)


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}


def _mlm(dense: str, norm: str, decoder_weight: str, decoder_bias: str, activation: str) -> HeadSpec:
    return HeadSpec({**_linear("mlm.dense", dense), **_linear("mlm.norm", norm),
                     "mlm.decoder.weight": decoder_weight, "mlm.decoder.bias": decoder_bias},
                    activation=activation, tied="mlm.decoder.weight")


_TOKEN = HeadSpec(_linear("token", "classifier"))
_QA = HeadSpec(_linear("qa", "qa_outputs"))
_BERT_POOLER = HeadSpec(_linear("pooler", "@pooler.dense"), activation="tanh")
_ROBERTA_HEADS = {
    "pooler": _BERT_POOLER,
    "mlm": _mlm("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder.weight", "lm_head.decoder.bias|lm_head.bias",
                "gelu"),
    "sequence_classification": HeadSpec({**_linear("seq.dense", "classifier.dense"),
                                         **_linear("seq.out", "classifier.out_proj")}, activation="tanh"),
    "token_classification": _TOKEN,
    "question_answering": _QA,
}

HEAD_SPECS: dict[str, dict[str, HeadSpec]] = {
    "bert": {
        "pooler": _BERT_POOLER,
        "mlm": _mlm("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias|cls.predictions.bias", "config"),
        "sequence_classification": HeadSpec(_linear("seq.out", "classifier"), requires=("pooler",)),
        "token_classification": _TOKEN,
        "question_answering": _QA,
    },
    "roberta": _ROBERTA_HEADS,
    "xlm-roberta": _ROBERTA_HEADS,
    "camembert": _ROBERTA_HEADS,
    "distilbert": {
        "mlm": _mlm("vocab_transform", "vocab_layer_norm", "vocab_projector.weight", "vocab_projector.bias", "config"),
        "sequence_classification": HeadSpec({**_linear("seq.dense", "pre_classifier"),
                                             **_linear("seq.out", "classifier")}, activation="relu"),
        "token_classification": _TOKEN,
        "question_answering": _QA,
    },
    "electra": {
        "mlm": _mlm("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.weight",
                    "generator_lm_head.bias", "gelu"),
        "sequence_classification": HeadSpec({**_linear("seq.dense", "classifier.dense"),
                                             **_linear("seq.out", "classifier.out_proj")}, activation="gelu"),
        "token_classification": _TOKEN,
        "question_answering": _QA,
    },
    "albert": {
        "pooler": HeadSpec(_linear("pooler", "@pooler"), activation="tanh"),
        "mlm": _mlm("predictions.dense", "predictions.LayerNorm", "predictions.decoder.weight",
                    "predictions.decoder.bias|predictions.bias", "config"),
        "sequence_classification": HeadSpec(_linear("seq.out", "classifier"), requires=("pooler",)),
        "token_classification": _TOKEN,
        "question_answering": _QA,
    },
    "mpnet": _ROBERTA_HEADS,
    "nomic_bert": {
        "pooler": _BERT_POOLER,
        "mlm": _mlm("cls.predictions.transform.dense", "cls.predictions.transform.layer_norm",
                    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias|cls.predictions.bias", "config"),
        "sequence_classification": HeadSpec(_linear("seq.out", "classifier"), requires=("pooler",)),
        "token_classification": _TOKEN,
    },
    "gte": {
        "pooler": _BERT_POOLER,
        # the hub's (and transformers' saved) name first, transformers' module name second
        "mlm": HeadSpec({**_linear("mlm.dense", "lm_head.dense"),
                         "mlm.norm.weight": "lm_head.norm.weight|lm_head.layer_norm.weight",
                         "mlm.norm.bias": "lm_head.norm.bias|lm_head.layer_norm.bias",
                         "mlm.decoder.weight": "lm_head.decoder.weight", "mlm.decoder.bias": "lm_head.decoder.bias"},
                        activation="gelu", tied="mlm.decoder.weight"),
        "sequence_classification": HeadSpec(_linear("seq.out", "classifier"), requires=("pooler",)),
        "token_classification": _TOKEN,
    },
}


_DECODER_HEADS = {
    "sequence_classification": HeadSpec({"seq.out.weight": "score.weight"}),
    "causal_lm": HeadSpec({"lm.weight": "lm_head.weight"}, tied="lm.weight"),
}
HEAD_SPECS.update({decoder: _DECODER_HEADS for decoder in DECODER_MODEL_TYPES})


def _modernbert_heads(config: EncoderConfig) -> dict[str, HeadSpec]:
    """ModernBERT's heads: ``head`` (dense, activation, norm) then the task's projection; which of their
    tensors have a bias is in the config (``classifier_bias``, ``norm_bias``, ``decoder_bias``)."""
    raw = config.raw
    activation = canonical_activation(raw.get("classifier_activation", "gelu"))

    def transform(ours: str) -> dict[str, str]:
        tensors = {f"{ours}.dense.weight": "head.dense.weight", f"{ours}.norm.weight": "head.norm.weight"}
        if raw.get("classifier_bias", False) is True:
            tensors[f"{ours}.dense.bias"] = "head.dense.bias"
        if raw.get("norm_bias", False) is True:
            tensors[f"{ours}.norm.bias"] = "head.norm.bias"
        return tensors

    mlm = {**transform("mlm"), "mlm.decoder.weight": "decoder.weight"}
    if raw.get("decoder_bias", True) is True:
        mlm["mlm.decoder.bias"] = "decoder.bias"
    return {
        "mlm": HeadSpec(mlm, activation=activation, tied="mlm.decoder.weight"),
        "sequence_classification": HeadSpec({**transform("seq"), **_linear("seq.out", "classifier")},
                                            activation=activation),
        "token_classification": HeadSpec({**transform("token"), **_linear("token", "classifier")},
                                         activation=activation),
        "question_answering": HeadSpec({**transform("qa"), **_linear("qa", "classifier")}, activation=activation),
    }


def _deberta_heads(config: EncoderConfig) -> dict[str, HeadSpec]:
    """DeBERTa's heads: the context pooler's activation and the masked LM's layout come from the config."""
    raw = config.raw
    pooler_act = raw.get("pooler_hidden_act", "gelu")
    activation = "tanh" if pooler_act == "tanh" else canonical_activation(pooler_act)
    if activation is None:
        raise LoadError(f"config.json: pooler_hidden_act {pooler_act!r} is not supported")
    if raw.get("legacy", True) is not False:
        mlm = HEAD_SPECS["bert"]["mlm"]
    else:  # the decoder is the word embedding matrix itself, whatever tie_word_embeddings says
        mlm = HeadSpec({**_linear("mlm.dense", "lm_predictions.lm_head.dense"),
                        **_linear("mlm.norm", "lm_predictions.lm_head.LayerNorm"),
                        "mlm.decoder.bias": "lm_predictions.lm_head.bias"}, activation="config")
    return {
        "mlm": mlm,
        "sequence_classification": HeadSpec({**_linear("seq.dense", "pooler.dense"),
                                             **_linear("seq.out", "classifier")}, activation=activation),
        "token_classification": _TOKEN,
        "question_answering": _QA,
    }


def head_specs(config: EncoderConfig) -> dict[str, HeadSpec]:
    """The heads a family can have, and their tensors (ModernBERT's and DeBERTa's depend on its config)."""
    if config.model_type == "deberta-v2":
        return _deberta_heads(config)
    if config.model_type == "modernbert":
        if config.raw.get("classifier_pooling", "cls") not in ("cls", "mean"):
            raise LoadError(f"config.json: classifier_pooling {config.raw['classifier_pooling']!r} is not "
                            "'cls' or 'mean'")
        return _modernbert_heads(config)
    return HEAD_SPECS[config.model_type]

# ``architectures`` suffix -> the heads such a model has (None: any; the pooler is always allowed).
_ARCHITECTURE_HEADS = {
    "ForSequenceClassification": {"sequence_classification"},
    "ForTokenClassification": {"token_classification"},
    "ForQuestionAnswering": {"question_answering"},
    "ForMaskedLM": {"mlm"},
    "ForPreTraining": {"mlm"},
    "ForCausalLM": {"causal_lm"},
    "Model": set(),
}
_BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "camembert": "roberta.",
                "distilbert": "distilbert.", "electra": "electra.", "albert": "albert.", "mpnet": "mpnet.",
                "modernbert": "model.", "nomic_bert": "nomic_bert.", "gte": "gte.", "deberta-v2": "deberta.",
                **{decoder: "model." for decoder in DECODER_MODEL_TYPES}}


# ----------------------------------------------------------------------------------------------- config
def num_labels(config: EncoderConfig) -> int:
    """The classifier's output size as transformers reads it: ``len(id2label)``, else ``num_labels``, else 2."""
    id2label = config.raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.raw.get("num_labels", 2))


def id2label(config: EncoderConfig) -> dict[int, str]:
    """Label names by index; ``LABEL_{i}`` where config.json names none (transformers' default)."""
    raw = config.raw.get("id2label")
    names = {int(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return {i: names.get(i, f"LABEL_{i}") for i in range(num_labels(config))}


def head_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    H, V, L = config.hidden_size, config.vocab_size, num_labels(config)
    # the MLM transform's width: ELECTRA's, ALBERT's and DeBERTa's legacy head end at embedding_size
    legacy_deberta = config.model_type == "deberta-v2" and config.raw.get("legacy", True) is not False
    E = config.embedding_size if config.model_type in ("electra", "albert") or legacy_deberta else H
    return {
        "pooler.weight": (H, H), "pooler.bias": (H,),
        "mlm.dense.weight": (E, H), "mlm.dense.bias": (E,),
        "mlm.norm.weight": (E,), "mlm.norm.bias": (E,),
        "mlm.decoder.weight": (V, E), "mlm.decoder.bias": (V,),
        "seq.dense.weight": (H, H), "seq.dense.bias": (H,),
        "seq.out.weight": (L, H), "seq.out.bias": (L,),
        "token.weight": (L, H), "token.bias": (L,),
        "qa.weight": (2, H), "qa.bias": (2,),
        "lm.weight": (V, H),
        # ModernBERT's head before each task's projection
        **{f"{task}.{part}.{kind}": (H,) if part == "norm" or kind == "bias" else (H, H)
           for task in ("seq", "token", "qa") for part in ("dense", "norm") for kind in ("weight", "bias")},
    }


def _architecture_heads(config: EncoderConfig) -> set[str] | None:
    """The heads ``config.json``'s ``architectures`` names, or None when it names nothing we know."""
    architectures = config.raw.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return None
    for suffix, heads in _ARCHITECTURE_HEADS.items():
        if str(architectures[0]).endswith(suffix):
            return set(heads)
    return set()  # e.g. *ForMultipleChoice: none of our heads


# ------------------------------------------------------------------------------------------------ loading
def _resolve(spec: HeadSpec, prefix: str, present, tie_allowed: bool) -> tuple[dict[str, str], list[str], set[str]]:
    """(fastenc name -> key found, checkpoint names missing, other alternatives present) for one head."""
    found, missing, others = {}, [], set()
    for ours, theirs in spec.tensors.items():
        names = [prefix + name[1:] if name.startswith("@") else name for name in theirs.split("|")]
        keys = [name for name in names if name in present]
        if keys:
            found[ours] = keys[0]
            others.update(keys[1:])
        elif not (ours == spec.tied and tie_allowed):
            missing.append(names[0])
    return found, missing, others


def _survey(config: EncoderConfig, prefix: str, present) -> tuple[dict, dict, set[str]]:
    """The family's heads: complete ``{head: found}``, incomplete ``{head: (found, missing)}``, and the
    alternative names present beside those the complete heads read."""
    specs = head_specs(config)
    allowed = _architecture_heads(config)
    tie_allowed = config.tied_embeddings
    complete, partial, others = {}, {}, {}
    for head, spec in specs.items():
        if allowed is not None and head != "pooler" and head not in allowed:
            continue  # the checkpoint says it is another model; its tensors are someone else's
        found, missing, others[head] = _resolve(spec, prefix, present, tie_allowed)
        for required in spec.requires:
            missing += _resolve(specs[required], prefix, present, tie_allowed)[1]
        if not missing:
            complete[head] = found
        elif found:
            partial[head] = (found, missing)
    if all(head in complete for head in _CLASSIFIERS):
        # Same tensors, two readings (BERT/ALBERT ``classifier.*``; DistilBERT's token classifier is a
        # subset of its sequence classifier): the larger head wins, and with equal ones the pooler decides.
        seq, token = (set(complete[h].values()) for h in _CLASSIFIERS)
        keep_seq = seq > token or (seq == token and "pooler" in complete)
        del complete["token_classification" if keep_seq else "sequence_classification"]
    return complete, partial, {key for head in complete for key in others[head]}


def load_heads(files: checkpoint.SafetensorsDir, config: EncoderConfig, dtype: torch.dtype,
               prefix: str) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """The heads whose tensors are all in the checkpoint, and the checkpoint keys they read.

    ``files`` is anything with the interface of ``checkpoint.SafetensorsDir`` (``StateDictSource`` too).
    """
    complete, partial, alternatives = _survey(config, prefix, files.keys)
    used = {key for found in complete.values() for key in found.values()}
    for head, (found, missing) in partial.items():
        stray = sorted(set(found.values()) - used)
        if stray:
            raise LoadError(f"{files.where(missing[0])}: the {head} head is incomplete: it has "
                            f"{', '.join(map(repr, stray))} but is missing {', '.join(map(repr, missing))}")
    shapes = head_shapes(config)
    loaded = {head: checkpoint.load_tensors(files, found, shapes, dtype) for head, found in complete.items()}
    return loaded, used | alternatives


def load_bge_m3(directory: Path | None, config: EncoderConfig, dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.Tensor] | None:
    """BGE-M3's two projections when ``directory`` holds ``colbert_linear.pt`` and ``sparse_linear.pt``
    (None when it holds neither): ``colbert.weight`` ``(D, hidden)`` and ``colbert.bias`` ``(D,)`` (D is
    the hidden size for BAAI/bge-m3), ``sparse.weight`` ``(1, hidden)`` and ``sparse.bias`` ``(1,)``."""
    if directory is None:
        return None
    present = [name for name in BGE_M3_FILES if (Path(directory) / name).is_file()]
    if not present:
        return None
    if len(present) == 1:
        other = next(name for name in BGE_M3_FILES if name not in present)
        raise LoadError(f"{directory}: has {present[0]} but not {other}; a BGE-M3 checkpoint ships both "
                        "(its ColBERT and its lexical-weight projections)")
    H = config.hidden_size
    colbert = checkpoint.read_linear_pt(Path(directory) / "colbert_linear.pt", dtype, device, in_features=H)
    sparse = checkpoint.read_linear_pt(Path(directory) / "sparse_linear.pt", dtype, device, in_features=H,
                                       out_features=1)
    return {"colbert.weight": colbert["weight"], "colbert.bias": colbert["bias"],
            "sparse.weight": sparse["weight"], "sparse.bias": sparse["bias"]}


def missing_tensors(config: EncoderConfig, head: str, path: Path | None = None) -> list[str]:
    """The checkpoint tensors a model of ``config`` would need for ``head`` (for error messages), named as
    the checkpoint in ``path`` would hold them when there is one."""
    specs = head_specs(config)
    if head not in specs:
        return []
    present, prefix = set(), _BASE_PREFIX[config.model_type]
    if path is not None:
        try:
            files = checkpoint.SafetensorsDir(path, torch.device("cpu"))
            present, prefix = set(files.keys), checkpoint.find_base_prefix(files, config)
        except LoadError:
            pass
    tie_allowed = config.tied_embeddings
    missing = []
    for name in specs[head].requires + (head,):
        missing += _resolve(specs[name], prefix, present, tie_allowed)[1]
    return missing


# ------------------------------------------------------------------------------------------------ compute
def first_tokens(hidden: torch.Tensor, lengths) -> torch.Tensor:
    """The first token of each packed sequence: ``(batch, hidden)``; every length must be positive."""
    lengths = list(lengths)
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one token to read its first token")
    starts = torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0).to(hidden.device)
    return hidden.index_select(0, starts)


def last_tokens(hidden: torch.Tensor, lengths) -> torch.Tensor:
    """The last token of each packed sequence (a gather at ``cu_seqlens[1:] - 1``): ``(batch, hidden)``;
    every length must be positive."""
    lengths = list(lengths)
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one token to read its last token")
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
    return hidden.index_select(0, ends.to(hidden.device))


def mean_tokens(hidden: torch.Tensor, lengths) -> torch.Tensor:
    """The mean of each packed sequence's tokens: ``(batch, hidden)``; every length must be positive."""
    lengths = list(lengths)
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one token to average its tokens")
    counts = torch.tensor(lengths, device=hidden.device)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), counts)
    sums = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, rows, hidden)
    return sums / counts[:, None].to(hidden.dtype)


class Heads:
    """The task heads a checkpoint holds, computed over packed ``(tokens, hidden)`` states with the model's
    ops backend (the heads' GEMMs and norms run on the same kernels as the encoder).

    ``tensors`` maps each head found (``HEAD_NAMES``) to its fastenc-named tensors; ``word_embeddings`` is
    the encoder's ``(vocab, E)`` table, the MLM decoder when the checkpoint ties them (reused, not copied).
    ``path`` (the checkpoint directory, if any) lets errors name the tensors a missing head would need.
    """

    def __init__(self, config: EncoderConfig, tensors: dict[str, dict[str, torch.Tensor]], ops,
                 word_embeddings: torch.Tensor, path: Path | None = None):
        self.config = config
        self.ops = ops
        self.path = path
        self._tensors = dict(tensors)
        self._word_embeddings = word_embeddings
        self.names = frozenset(self._tensors)

    def __contains__(self, head: str) -> bool:
        return head in self.names

    def tensors(self, head: str) -> dict[str, torch.Tensor]:
        """The fastenc-named tensors of ``head`` (``LoadError`` when the checkpoint has no such head)."""
        self.require(head)
        return self._tensors[head]

    def require(self, head: str) -> None:
        """Raise ``LoadError`` naming the missing tensors unless the checkpoint has ``head``."""
        if head in self.names:
            return
        where = self.path if self.path is not None else "this encoder"
        if head == "bge_m3":
            raise LoadError(f"{where}: not a BGE-M3 checkpoint: {' and '.join(BGE_M3_FILES)} are missing")
        config = self.config
        missing = ", ".join(map(repr, missing_tensors(config, head, self.path)))
        allowed = _architecture_heads(config)
        if allowed is not None and head != "pooler" and head not in allowed:
            architecture = config.raw["architectures"][0]
            raise LoadError(f"{where}: config.json's architectures names {architecture}, which has no {head} head"
                            + (f" (missing tensor(s) {missing})" if missing else ""))
        if not missing:
            raise LoadError(f"{where}: fastenc has no {head} head for model_type {config.model_type!r}")
        raise LoadError(f"{where}: the checkpoint has no {head} head: missing tensor(s) {missing}")

    def _activation(self, head: str) -> str | None:
        activation = head_specs(self.config)[head].activation
        return self.config.activation if activation == "config" else activation

    def _transform(self, t: dict, task: str, x: torch.Tensor) -> torch.Tensor:
        """ModernBERT's ``head``: ``norm(act(dense(x)))``, before every task's projection; other families: ``x``."""
        if f"{task}.dense.weight" not in t or task == "seq" and self.config.model_type != "modernbert":
            return x
        x = self.ops.linear(x, t[f"{task}.dense.weight"], t.get(f"{task}.dense.bias"))
        return self.ops.gelu_layer_norm(x, t[f"{task}.norm.weight"], t.get(f"{task}.norm.bias"),
                                        self.config.layer_norm_eps, self._activation("token_classification"))

    def pooled(self, hidden: torch.Tensor, lengths) -> torch.Tensor:
        """The pooler: ``tanh(dense(first token))``, ``(batch, hidden)``."""
        t = self.tensors("pooler")
        return torch.tanh(self.ops.linear(first_tokens(hidden, lengths), t["pooler.weight"], t["pooler.bias"]))

    def sequence_logits(self, hidden: torch.Tensor, lengths) -> torch.Tensor:
        """Sequence classification logits ``(batch, num_labels)`` from packed ``(tokens, hidden)`` states."""
        ops, t = self.ops, self.tensors("sequence_classification")
        if self.config.is_decoder:  # the causal models' score at the last token
            x = last_tokens(hidden, lengths)
        elif self.config.model_type == "modernbert":  # pool as classifier_pooling says, then the head
            if self.config.raw.get("classifier_pooling", "cls") == "mean":
                x = mean_tokens(hidden, lengths)
            else:
                x = first_tokens(hidden, lengths)
            x = self._transform(t, "seq", x)
        elif "seq.dense.weight" in t:  # RoBERTa-likes, DistilBERT, ELECTRA: a hidden layer on the first token
            activation = self._activation("sequence_classification")
            x = first_tokens(hidden, lengths)
            if activation == "tanh":  # not an ops activation; the pooler's tanh, through torch
                x = torch.tanh(ops.linear(x, t["seq.dense.weight"], t["seq.dense.bias"]))
            else:
                x = ops.linear(x, t["seq.dense.weight"], t["seq.dense.bias"], activation)
        else:  # BERT, ALBERT: the classifier reads the pooler
            x = self.pooled(hidden, lengths)
        return ops.linear(x, t["seq.out.weight"], t.get("seq.out.bias"))

    def last_token_logits(self, hidden: torch.Tensor, lengths, token_ids) -> torch.Tensor:
        """The causal LM head's float32 logits ``(batch, len(token_ids))`` of the given vocabulary ids at
        each packed sequence's last token: only those rows of ``lm_head`` (the word embeddings when tied)
        meet only those tokens, a ``(batch, hidden) x (hidden, len(token_ids))`` product, never the
        ``(tokens, vocab)`` logits. Gemma's ``final_logit_softcapping`` (``cap * tanh(logit / cap)``)
        applies to them as to all of transformers' logits."""
        t = self.tensors("causal_lm")
        weight = t.get("lm.weight", self._word_embeddings)
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise ValueError(f"token ids {list(token_ids)} are outside the LM head's {weight.shape[0]} rows")
        rows = weight.index_select(0, ids.to(weight.device))  # (n_ids, hidden)
        logits = self.ops.linear(last_tokens(hidden, lengths), rows, None).float()  # (batch, n_ids)
        cap = self.config.raw.get("final_logit_softcapping")
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token classification logits ``(tokens, num_labels)``."""
        t = self.tensors("token_classification")
        return self.ops.linear(self._transform(t, "token", hidden), t["token.weight"], t["token.bias"])

    def qa_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Question answering start and end logits, ``(tokens,)`` each."""
        t = self.tensors("question_answering")
        logits = self.ops.linear(self._transform(t, "qa", hidden), t["qa.weight"], t["qa.bias"])  # (T, 2)
        return logits[:, 0], logits[:, 1]

    def mlm_logits(self, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits ``(len(index), vocab)`` at the packed token positions ``index`` (all when None).

        Only the asked rows go through the head: the decoder GEMM, ``vocab x hidden`` per token, is most of
        its cost, and a fill-mask call needs it at one or two tokens, not at every token.
        """
        if index is not None:
            hidden = hidden.index_select(0, index.to(hidden.device))
        x = self._mlm_transform(hidden)  # (N, E)
        decoder, bias = self._mlm_decoder()
        return self.ops.linear(x, decoder, bias)  # (N, vocab)

    def sparse_vectors(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "max",
                       activation: str = "relu") -> torch.Tensor:
        """SPLADE vectors ``(batch, vocab)`` float32 of packed texts: the MLM head's logits, activated
        (``log1p(relu)``, or ``log1p(log1p(relu))`` for ``"log1p_relu"``) and pooled (max or sum) over each
        text's tokens by ``ops.splade_pool``, which never holds the ``(tokens, vocab)`` logits whole."""
        x = self._mlm_transform(hidden)  # (T, E)
        decoder, bias = self._mlm_decoder()
        return self.ops.splade_pool(x, decoder, bias, cu_seqlens, pooling, activation)

    def colbert_vectors(self, hidden: torch.Tensor) -> torch.Tensor:
        """BGE-M3's ``colbert_linear`` on every token: ``(tokens, D)`` in the model's dtype, not normalised."""
        t = self.tensors("bge_m3")
        return self.ops.linear(hidden, t["colbert.weight"], t["colbert.bias"])

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """BGE-M3's lexical weight of every token, ``relu(sparse_linear(h))``: ``(tokens,)`` float32."""
        t = self.tensors("bge_m3")
        return self.ops.linear(hidden, t["sparse.weight"], t["sparse.bias"], "relu")[:, 0].float()

    def _mlm_transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head's transform ``LayerNorm(act(dense(h)))``: ``(N, E)``."""
        t = self.tensors("mlm")
        x = self.ops.linear(hidden, t["mlm.dense.weight"], t.get("mlm.dense.bias"))  # (N, E)
        return self.ops.gelu_layer_norm(x, t["mlm.norm.weight"], t.get("mlm.norm.bias"), self.config.layer_norm_eps,
                                        self._activation("mlm"))

    def _mlm_decoder(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's ``(vocab, E)`` weight and ``(vocab,)`` bias; tied: the word embeddings themselves."""
        t = self.tensors("mlm")
        decoder = t.get("mlm.decoder.weight")
        if decoder is None:
            decoder = self._word_embeddings
        return decoder, t.get("mlm.decoder.bias")  # None: ModernBERT with decoder_bias false
