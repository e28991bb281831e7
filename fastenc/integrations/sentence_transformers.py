"""``sentence_transformers`` integration: ``optimize`` for ``SentenceTransformer`` (and its siblings).

A sentence-transformers model is a sequence of modules; the transformer module holds a ``transformers``
model (``module.auto_model``) and calls it with the tokenizer's tensors. Patching that model with
``optimize_model`` is all it takes: pooling and normalisation read the token embeddings through the
attention mask, so fastenc's zeros at padded positions change nothing, and the sentence embeddings
keep their values. Only modules already imported are looked at; nothing is imported here.
"""

from __future__ import annotations

import sys

from .transformers import optimize_model


def is_sentence_transformers_model(model) -> bool:
    """A ``SentenceTransformer`` (or ``CrossEncoder`` / ``SparseEncoder``, which share its base class)."""
    library = sys.modules.get("sentence_transformers")
    if library is None:
        return False
    classes = [getattr(library, name, None) for name in ("SentenceTransformer", "CrossEncoder", "SparseEncoder")]
    return any(isinstance(cls, type) and isinstance(model, cls) for cls in classes)


def optimize_sentence_transformer(model, *, backend: str | None = None, dtype=None):
    """Patch every transformer module's model in place; returns ``model``."""
    transformers = sys.modules.get("transformers")
    patched = 0
    for module in model.modules():
        inner = getattr(module, "auto_model", None) if type(module).__name__ == "Transformer" else None
        if transformers is not None and isinstance(inner, transformers.PreTrainedModel):
            optimize_model(inner, backend=backend, dtype=dtype)
            patched += 1
    if not patched:
        raise TypeError(f"fastenc.optimize cannot patch this {type(model).__qualname__}: it has no transformer "
                        "module holding a transformers model")
    return model
