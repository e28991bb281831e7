"""``rerank``: ``(query, text)`` pairs scored by a cross-encoder and ordered as sentence-transformers'
``CrossEncoder.rank`` does; or, for a multi-vector model (BGE-M3, a ColBERT ``MultiVectorEncoder``), the
texts scored by late interaction with the query (``LateInteractionRerankPipeline``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .. import heads as task_heads
from ..encoder import Encoder
from ..errors import LoadError
from ..multivector import maxsim
from ..tasks import SequenceScores, TokenLogitScores
from .base import Pipeline, _check_batch_size, _positive_int, _texts

# A CrossEncoder's activation_fn (the dotted path sentence-transformers saves) -> the score function.
SCORE_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid, "torch.nn.Sigmoid": torch.sigmoid,
    "torch.nn.modules.linear.Identity": lambda x: x, "torch.nn.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": torch.tanh, "torch.nn.Tanh": torch.tanh,
}


class RerankPipeline(Pipeline):
    """``p(query, texts, top_k=None, return_text=False)``: ``[{"index", "score"(, "text")}]``, best first.

    As sentence-transformers' ``CrossEncoder.rank``: each ``(query, text)`` pair is tokenized as a pair
    (truncated longest first to the model's length), scored by the one-label classifier and its
    activation (``activation_fn`` from ``config_sentence_transformers.json`` or ``config.json``'s
    ``sentence_transformers``; sigmoid by default), then sorted by score, highest first, ties in input
    order; ``top_k`` keeps the first ones. The pairs run through the encoder packed, without padding. A
    prompt (``prompt``, or ``prompt_name`` of the CrossEncoder's ``prompts``, else its
    ``default_prompt_name``'s) is prepended to the query of every pair, as ``CrossEncoder.predict`` does.

    The score of a decoder backbone is read at each pair's last token: its ``ForSequenceClassification``
    head, or for a ``ForCausalLM`` the ``LogitScore`` of the CrossEncoder (``modules.json``; without one,
    the "yes" and "no" tokens, as ``CrossEncoder`` defaults to): the "yes" logit less the "no" logit,
    computed from those two rows of the LM head only (``score_task``: ``tasks.TokenLogitScores``).
    """

    task, head = "rerank", "sequence_classification"

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        logit_score = self.logit_score(encoder)
        if logit_score is not None:
            self.head = "causal_lm"
            self.score_task = TokenLogitScores(*logit_score)
        else:
            self.score_task = SequenceScores()
        super().__init__(encoder, batch_size=batch_size)
        labels = 1 if logit_score is not None else task_heads.num_labels(encoder.config)
        if labels != 1:
            raise LoadError(f"{encoder.path or 'this encoder'}: reranking needs a cross-encoder with one label "
                            f"(a relevance score); this classifier has {labels}")
        self.activation = self._activation()
        limit = encoder.sentence.max_seq_length if encoder.sentence else None
        self.pair_length = min(limit, self.max_length) if limit else self.max_length

    @staticmethod
    def logit_score(encoder: Encoder) -> tuple[int, int | None] | None:
        """The token ids a causal-LM cross-encoder scores (``(true, false)``), or None for a classifier: its
        ``LogitScore`` module, else for a ``ForCausalLM`` checkpoint without a classifier the tokenizer's
        "yes" and "no" (``CrossEncoder``'s default modules)."""
        module = encoder.sentence.logit_score if encoder.sentence else None
        if module is not None:
            return module.true_token_id, module.false_token_id
        if "causal_lm" in encoder.heads and "sequence_classification" not in encoder.heads and encoder.tokenizer:
            yes, no = (encoder.tokenizer.token_to_id(token) for token in ("yes", "no"))
            if yes is not None and no is not None:
                return yes, no
        return None

    def _activation(self):
        """The score function, found where ``CrossEncoder`` looks for it, in the same order."""
        sentence, raw = self.encoder.sentence, self.encoder.config.raw
        settings = raw.get("sentence_transformers")
        for path in (sentence.activation_fn if sentence else None,
                     settings.get("activation_fn") if isinstance(settings, dict) else None,
                     raw.get("sbert_ce_default_activation_function")):
            if not isinstance(path, str):
                continue
            if not path.startswith("torch."):  # CrossEncoder loads only torch's without trust_remote_code
                warnings.warn(f"activation_fn {path!r} is not a torch module; scoring with the default sigmoid, "
                              "as sentence-transformers does without trust_remote_code", stacklevel=4)
                break
            if path not in SCORE_ACTIVATIONS:
                raise LoadError(f"{self.encoder.path or 'this encoder'}: the cross-encoder's activation_fn {path!r} "
                                f"is not supported; fastenc supports {', '.join(SCORE_ACTIVATIONS)}")
            return SCORE_ACTIVATIONS[path]
        return torch.sigmoid

    def __call__(self, query: str, texts: Sequence[str], *, top_k: int | None = None, return_text: bool = False,
                 raw_scores: bool = False, truncation: bool = True, batch_size: int | None = None,
                 prompt_name: str | None = None, prompt: str | None = None) -> list[dict]:
        """``raw_scores``: the logits, without the activation (text-embeddings-inference's ``raw_scores``);
        ``truncation=False``: a pair over the model's length is an ``InputError`` instead of being cut;
        ``prompt_name`` / ``prompt``: what is prepended to the query (the class docstring)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str (the documents to rank), not one str")
        texts = _texts(texts)
        if top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        pairs = self.pairs(query, texts, truncation=truncation, prompt_name=prompt_name, prompt=prompt)
        logits = self.run(pairs, self.logits, batch_size)
        return self.rank(self.scores(logits, raw_scores), texts, top_k=top_k, return_text=return_text)

    # The steps of a call, each also run by ``fastenc serve``'s ``/rerank`` (which batches the pairs of
    # many requests in its model worker between the first step and the second).
    def pairs(self, query: str, texts: list[str], *, truncation: bool = True, prompt_name: str | None = None,
              prompt: str | None = None) -> list:
        """The encodings of the ``(prompt + query, text)`` pairs: tokenized as pairs, truncated longest first to
        the cross-encoder's length (``max_seq_length``, else the model's), or an ``InputError`` when
        ``truncation=False`` and a pair is over the model's limit. The prompt is resolved as
        ``Encoder.embed`` resolves it (``prompt``, else ``prompt_name``'s, else the default one's)."""
        query = self.text.prompt(prompt_name, prompt).apply([query])[0]
        return self.tokenize([(query, text) for text in texts], truncation=truncation, max_length=self.pair_length)

    def logits(self, packed, hidden: torch.Tensor, rows=None) -> torch.Tensor:
        """The float32 CPU logits ``(n, 1)`` of packed pairs' hidden states ``(tokens, hidden)``: the
        classifier's, or a causal LM's log-odds (``score_task``)."""
        return self.score_task.compute(self.model, hidden, list(packed.lengths))

    def scores(self, logits: Sequence[torch.Tensor], raw_scores: bool = False) -> list[float]:
        """One score per pair from its float32 logits (a ``(1,)`` tensor per pair, in input order): the
        checkpoint's activation, as CrossEncoder applies it, or the logits themselves with ``raw_scores``."""
        if not len(logits):
            return []
        logits = torch.cat([row.reshape(-1) for row in logits])  # (n,) float32, as CrossEncoder scores them
        return (logits if raw_scores else self.activation(logits)).tolist()

    @staticmethod
    def rank(scores: list[float], texts: list[str], *, top_k: int | None = None,
             return_text: bool = False) -> list[dict]:
        """``[{"index", "score"(, "text")}]`` sorted by score, highest first, ties in input order (a stable
        sort, as ``CrossEncoder.rank``); the first ``top_k``."""
        results = [{"index": index, "score": score} for index, score in enumerate(scores)]
        if return_text:
            for result, text in zip(results, texts):
                result["text"] = text
        results.sort(key=lambda result: result["score"], reverse=True)  # stable: ties keep the input order
        return results[:top_k]




def has_multivector(encoder: Encoder) -> bool:
    """Whether ``encoder`` gives multi-vector embeddings (BGE-M3, or a sentence-transformers ColBERT model)."""
    return "bge_m3" in encoder.heads or bool(encoder.sentence and encoder.sentence.multivector)


class LateInteractionRerankPipeline(Pipeline):
    """``p(query, texts, top_k=None, return_text=False)``: ``[{"index", "score"(, "text")}]``, best first,
    for a multi-vector model: late interaction instead of a cross-encoder.

    The query is embedded as a query and each text as a document (``Encoder.embed_multivector`` with
    ``query=True`` / ``False``: a ColBERT model's prompts, lengths, expansion and skiplist), and each text
    scores ``fastenc.maxsim``: the sum over the query's vectors of their largest dot product with the
    text's vectors (a text without vectors scores 0). That is the plain MaxSim sum, which the ranking
    depends on alone: BGE-M3's ``colbert_score`` and a ``meanmaxsim`` ColBERT model divide it by the
    query's vector count, the same for every text. Sorted as ``RerankPipeline.rank`` sorts: highest first,
    ties in input order; ``top_k`` keeps the first ones. Scoring runs on the encoder's device and backend.
    """

    task, head = "rerank", None

    def __call__(self, query: str, texts: Sequence[str], *, top_k: int | None = None, return_text: bool = False,
                 truncation: bool = True, batch_size: int | None = None) -> list[dict]:
        """``truncation=False``: a text or query over the model's length is an ``InputError`` instead of
        being cut."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str (the documents to rank), not one str")
        texts = _texts(texts)
        if top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        return self.rank(self.scores(query, texts, truncation=truncation, batch_size=batch_size), texts, top_k=top_k,
                         return_text=return_text)

    def scores(self, query: str, texts: list[str], *, truncation: bool = True, batch_size: int = 32) -> list[float]:
        """The MaxSim score of each text against ``query``, in input order."""
        if not texts:
            return []
        encoder = self.encoder
        query_vectors = encoder.embed_multivector(query, query=True, truncate=truncation, batch_size=batch_size)
        documents = encoder.embed_multivector(texts, query=False, truncate=truncation, batch_size=batch_size)
        device = encoder.device
        scores = maxsim(query_vectors.to(device), [d.to(device) for d in documents], backend=encoder.backend)
        return scores.cpu().tolist()

    rank = staticmethod(RerankPipeline.rank)
