"""Task pipelines: ``fastenc.pipeline(task, model)``, with the outputs of ``transformers.pipeline``.

One module per task, on the shared machinery of ``base.Pipeline`` (the encoder's tokenization, one
batching policy, decoding): ``fill-mask``, ``text-classification``, ``token-classification`` and
``question-answering`` post-process as ``transformers`` v5 does (same keys in the same order, same
words, offsets and labels; scores are Python floats), and so does ``zero-shot-classification`` (any
sequence classifier trained on NLI); ``rerank`` scores ``(query, text)`` pairs with a cross-encoder and
orders them as sentence-transformers' ``CrossEncoder.rank``, or, on a multi-vector model without a
classifier (BGE-M3, a ColBERT model), scores the texts by late interaction (MaxSim).
"""

from __future__ import annotations

from ..encoder import Encoder
from ..errors import InputError
from .base import Pipeline, clean_up_tokenization
from .fill_mask import FillMaskPipeline
from .question_answering import QuestionAnsweringPipeline, best_spans
from .rerank import SCORE_ACTIVATIONS, LateInteractionRerankPipeline, RerankPipeline, has_multivector
from .text_classification import CLASSIFICATION_FUNCTIONS, TextClassificationPipeline
from .token_classification import AGGREGATION_STRATEGIES, TokenClassificationPipeline
from .zero_shot_classification import ZeroShotClassificationPipeline

PIPELINES = {
    "fill-mask": FillMaskPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "rerank": RerankPipeline,
    "zero-shot-classification": ZeroShotClassificationPipeline,
}
TASKS = tuple(PIPELINES)
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def pipeline(task: str, model: str | Encoder | None = None, *, batch_size: int = 32, **load_kwargs) -> Pipeline:
    """A callable for ``task`` on ``model`` (a checkpoint directory or an ``Encoder``).

    ``load_kwargs`` (``device``, ``dtype``, ``backend``) go to ``Encoder.from_pretrained``. A checkpoint
    without the task's head raises ``LoadError`` naming the missing tensors.
    """
    name = TASK_ALIASES.get(task, task)
    if name not in PIPELINES:
        raise InputError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    if isinstance(model, Encoder):
        if load_kwargs:
            raise InputError(f"{', '.join(load_kwargs)}: loading options apply to a path, not to an Encoder")
        encoder = model
    else:
        encoder = Encoder.from_pretrained(model, **load_kwargs)
    if name == "rerank" and "sequence_classification" not in encoder.heads and has_multivector(encoder):
        return LateInteractionRerankPipeline(encoder, batch_size=batch_size)
    return PIPELINES[name](encoder, batch_size=batch_size)


__all__ = ["AGGREGATION_STRATEGIES", "CLASSIFICATION_FUNCTIONS", "PIPELINES", "SCORE_ACTIVATIONS", "TASKS",
           "TASK_ALIASES", "FillMaskPipeline", "LateInteractionRerankPipeline", "Pipeline",
           "QuestionAnsweringPipeline", "RerankPipeline", "TextClassificationPipeline", "TokenClassificationPipeline",
           "ZeroShotClassificationPipeline", "best_spans", "clean_up_tokenization", "has_multivector", "pipeline"]
