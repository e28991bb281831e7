"""``fill-mask``: the likeliest tokens at each mask token, as transformers' ``FillMaskPipeline``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..encoder import Encoder
from ..errors import InputError, LoadError
from .base import Pipeline, _positive_int, _texts

class FillMaskPipeline(Pipeline):
    """``p(text, top_k=5, targets=None)``: the likeliest tokens at each mask token."""

    task, head = "fill-mask", "mlm"

    def __init__(self, encoder: Encoder, *, batch_size: int = 32):
        super().__init__(encoder, batch_size=batch_size)
        if self.info.mask_token_id is None:
            raise LoadError(f"{encoder.path or 'this encoder'}: the tokenizer has no mask token")

    def __call__(self, inputs: str | Sequence[str], *, top_k: int = 5, targets: str | Sequence[str] | None = None,
                 batch_size: int | None = None):
        texts = _texts(inputs)
        top_k = _positive_int(top_k, "top_k")
        target_ids = None if targets is None else self._target_ids(targets)
        encodings = self.tokenize(texts, truncation=False)
        mask_id = self.info.mask_token_id
        positions = [[j for j, token in enumerate(e.ids) if token == mask_id] for e in encodings]
        for index, found in enumerate(positions):
            if not found:
                raise InputError(f"text {index} has no mask token {self.info.mask_token!r}")

        def compute(packed, hidden, rows):
            starts = np.cumsum([0, *packed.lengths[:-1]])
            found = [positions[row] for row in rows]
            index = torch.tensor([int(start) + p for start, masks in zip(starts, found) for p in masks])
            probs = self.model.heads.mlm_logits(hidden, index).float().softmax(-1).cpu()  # (masks, vocab)
            return probs.split([len(masks) for masks in found])

        probs = self.run(encodings, compute, batch_size)
        results = [self._postprocess(e.ids, found, p, top_k, target_ids)
                   for e, found, p in zip(encodings, positions, probs)]
        if isinstance(inputs, str) or (isinstance(inputs, list) and len(inputs) == 1):
            return results[0]
        return results

    def _postprocess(self, ids, positions, probs, top_k, target_ids):
        if target_ids is not None:
            probs = probs[:, target_ids]
        values, predictions = probs.topk(min(top_k, probs.shape[-1]))
        single_mask = len(positions) == 1
        result = []
        for position, row_values, row_predictions in zip(positions, values.tolist(), predictions.tolist()):
            row = []
            for value, prediction in zip(row_values, row_predictions):
                if target_ids is not None:
                    prediction = target_ids[prediction]
                tokens = list(ids)
                tokens[position] = prediction
                tokens = [t for t in tokens if t != self.info.pad_token_id]
                # transformers keeps the special tokens when there are several masks, so the others show
                sequence = self.decode(tokens, skip_special_tokens=single_mask)
                row.append({"score": value, "token": prediction, "token_str": self.decode([prediction]),
                            "sequence": sequence})
            result.append(row)
        return result[0] if single_mask else result

    def _target_ids(self, targets) -> list[int]:
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        ids = []
        for target in targets:
            if not isinstance(target, str):
                raise TypeError(f"targets must be str or a list of str, got {type(target).__name__}")
            token = vocab.get(target)
            if token is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False).ids
                if not pieces:
                    warnings.warn(f"target {target!r} is not in the vocabulary and tokenizes to nothing; ignoring it",
                                  stacklevel=3)
                    continue
                token = pieces[0]
                warnings.warn(f"target {target!r} is not in the vocabulary; using its first token "
                              f"{self.tokenizer.id_to_token(token)!r}", stacklevel=3)
            ids.append(token)
        if not ids:
            raise InputError("targets: at least one target must be given")
        return sorted(set(ids))


