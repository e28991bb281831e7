"""The packed form: real tokens only, one ``(tokens,)`` row per token, with ``cu_seqlens`` offsets.

Every layer of the encoder runs on this form (FlashAttention's varlen layout); padding exists only at
the edges, for callers that hand in or want back ``(batch, seq)`` tensors. A batch is made on the host
(``pack_sequences`` from token lists, ``Model.pack`` from padded tensors) and moved to the model's
device at the model's door (``PackedBatch.to``), so text never meets a device and a batch can be
made in one thread or process and run in another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device) -> "PackedBatch":
        """The same batch with its tensors on ``device`` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self

        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return dataclasses.replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                                   token_type_ids=move(self.token_type_ids), cu_seqlens=move(self.cu_seqlens),
                                   index=move(self.index))

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


def cu_seqlens_of(lengths) -> torch.Tensor:
    """``(len(lengths) + 1,)`` int32 offsets on the host: 0, then the running sum of ``lengths``."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(list(lengths), dtype=torch.int32), 0, out=cu[1:])
    return cu


def sequence_positions(ids: torch.Tensor, lengths, pad_token_id: int | None = None) -> torch.Tensor:
    """Position ids ``(tokens,)`` int64 of packed ``ids``, as transformers counts them: each token's index in
    its sequence, or with ``pad_token_id`` (RoBERTa-style) ``pad_token_id + 1 +`` the count of
    non-padding tokens before it in its sequence, and ``pad_token_id`` itself at padding tokens."""
    counts = torch.tensor(list(lengths), dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    if pad_token_id is None:
        return torch.arange(ids.numel()) - torch.repeat_interleave(starts, counts)
    not_pad = ids.ne(pad_token_id).to(torch.long)
    seen = torch.cumsum(not_pad, 0)
    before = torch.cat([seen.new_zeros(1), seen])[starts]  # non-padding tokens before each sequence
    seen = seen - torch.repeat_interleave(before, counts)
    return seen * not_pad + pad_token_id


def pack_sequences(ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None, *,
                   pad_token_id: int | None = None) -> PackedBatch:
    """A host ``PackedBatch`` of token id lists (one per sequence; ``type_ids`` alike, or None for a model
    without token types); positions as ``sequence_positions`` counts them."""
    lengths = [len(row) for row in ids]
    flat = torch.tensor([token for row in ids for token in row], dtype=torch.long)
    types = None if type_ids is None else torch.tensor([t for row in type_ids for t in row], dtype=torch.long)
    if types is not None and types.numel() != flat.numel():
        raise ValueError(f"type_ids hold {types.numel()} tokens, ids {flat.numel()}")
    return PackedBatch(input_ids=flat, position_ids=sequence_positions(flat, lengths, pad_token_id),
                       token_type_ids=types, cu_seqlens=cu_seqlens_of(lengths), lengths=tuple(lengths),
                       max_seqlen=max(lengths, default=0))


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
