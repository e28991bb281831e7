"""The packed form: real tokens only, one ``(tokens,)`` row per token, with ``cu_seqlens`` offsets.

Every layer of the encoder runs on this form (FlashAttention's varlen layout); padding exists only at
the edges, for callers that hand in or want back ``(batch, seq)`` tensors.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Real tokens only: ``(tokens,)`` id tensors on the device and the sequence offsets.

    ``lengths`` and ``max_seqlen`` are host values, so nothing in the forward pass waits on the device.
    A batch made from padded tensors (``Encoder.pack``) also remembers where each token came from
    (``index`` into the flattened ``(batch, seq)`` layout), so ``pad`` can put the padding back.
    """

    input_ids: torch.Tensor  # (tokens,) int64
    position_ids: torch.Tensor  # (tokens,) int64
    token_type_ids: torch.Tensor | None  # (tokens,) int64; None when the model has no token types
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    lengths: tuple[int, ...]
    max_seqlen: int
    index: torch.Tensor | None = None  # (tokens,) int64 flat positions in the padded (batch, seq) layout
    shape: tuple[int, int] | None = None  # (batch, seq) of the padded layout

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def pad(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(tokens, hidden)`` -> ``(batch, seq, hidden)`` with exact zeros at the padded positions."""
        if self.index is None or self.shape is None:
            raise ValueError("this PackedBatch was not made from padded tensors (Encoder.pack); nothing to pad back to")
        batch, seq = self.shape
        if self.num_tokens == batch * seq:  # no padding: the packed rows are already in (batch, seq) order
            return hidden.view(batch, seq, hidden.shape[-1])
        out = hidden.new_zeros(batch * seq, hidden.shape[-1])
        out[self.index] = hidden
        return out.view(batch, seq, hidden.shape[-1])


def token_budget_batches(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices of texts grouped longest first: each group holds at most ``batch_size`` texts and, unless
    a single text is longer, at most ``max_tokens`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current, tokens = [], [], 0
    for i in order:
        if current and (len(current) == batch_size or tokens + lengths[i] > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches
