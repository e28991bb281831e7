"""What a model family's blocks are made of: one small description read from ``config.json``.

fastenc has one forward pass (``encoder.py``) for every family. What differs between families is a
handful of parts, described here once per checkpoint (STYLE 13; gpt-fast's ``ModelArgs``):

* **norm placement**: ``"post"`` — ``x = LN(x + f(x))`` (BERT and the families of 2018–2020, MPNet,
  NomicBERT, GTE); ``"pre"`` — ``x = x + f(LN(x))`` with a final norm after the last block (ModernBERT,
  whose first block feeds the embeddings to attention without a norm).
* **position scheme**: ``"absolute"`` — a position table added at the embeddings (BERT, MPNet);
  ``"rope"`` — Q and K rotated in the fused-QKV epilogue (ModernBERT, NomicBERT, GTE); MPNet also has a
  ``relative`` bias added to the attention scores (T5-style buckets, one table shared by all layers).
* **attention**: every key of the sequence, or a sliding window of ``±window`` positions (ModernBERT's
  local layers: ``window = local_attention // 2``, so 128 means 64 keys each side plus the query's own).
* **feed-forward**: ``"plain"`` — ``act(W x + b)``, or ``"gated"`` — ``act(a) * b`` where ``a`` and
  ``b`` are the two halves of one projection (GeGLU in ModernBERT and GTE, SwiGLU in NomicBERT).
* **biases**: which linears and norms have one (ModernBERT none, NomicBERT only in its norms).

The second half of this module turns checkpoint tensors into the layouts the kernels want, once at
load: gated weights interleaved row by row (so one GEMM tile holds both halves of its columns), Q and
K rows of rotate-half checkpoints put in rotary-pair order (so a rotation pair is two neighbouring
columns of one tile), the RoPE table of cosines and sines, computed exactly as transformers computes
them, and MPNet's bucketed bias unrolled by distance.
"""

from __future__ import annotations

import dataclasses
import math

import torch

NORM_PLACEMENTS = ("post", "pre")
POSITION_SCHEMES = ("absolute", "rope")
FFN_KINDS = ("plain", "gated")
BIASED_PARTS = ("qkv", "attn_out", "ffn_in", "ffn_out", "norm")  # "norm": every LayerNorm, embeddings' too
# MPNet's relative position buckets, as transformers computes them (MPNetEncoder.compute_position_bias
# calls relative_position_bucket with its defaults, whatever the config's relative_attention_num_buckets).
MPNET_BUCKETS = 32
MPNET_MAX_DISTANCE = 128


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What differs between the blocks of one model (ModernBERT alternates global and local layers)."""

    window: int | None = None  # sliding window: keys within ±window positions of the query; None: all keys
    rope_theta: float | None = None  # the RoPE base of this block; None without rotary positions
    attn_norm: bool = True  # pre-LN only: the attention input is normalised (ModernBERT's block 0: not)


@dataclasses.dataclass(frozen=True)
class Family:
    """The parts of a family's blocks (see the module docstring). The default is BERT's."""

    norm: str = "post"  # "post" (LN after the residual add) or "pre" (LN before each sub-block, final norm)
    positions: str = "absolute"  # "absolute" (a table at the embeddings) or "rope" (rotated Q and K)
    relative_bias: bool = False  # MPNet: a bucketed relative position bias added to the scores
    ffn: str = "plain"  # "plain" or "gated"
    biases: frozenset = frozenset(BIASED_PARTS)  # the parts that have a bias
    layers: tuple[LayerKind, ...] = ()  # one per depth; empty: every block is LayerKind()
    rope_pairs: str = "halves"  # the checkpoint's rotary pairs: (d, d + D/2) ("halves") or (2i, 2i + 1)

    def layer(self, depth: int) -> LayerKind:
        return self.layers[depth] if self.layers else LayerKind()

    def has_bias(self, part: str) -> bool:
        return part in self.biases

    @property
    def rope_thetas(self) -> tuple[float, ...]:
        """The distinct RoPE bases of the model's blocks (a table is built for each)."""
        return tuple(sorted({kind.rope_theta for kind in self.layers if kind.rope_theta is not None}))

    @property
    def final_norm(self) -> bool:
        return self.norm == "pre"

    def __post_init__(self):
        if self.norm not in NORM_PLACEMENTS or self.positions not in POSITION_SCHEMES or self.ffn not in FFN_KINDS:
            raise ValueError(f"not a family description: {self}")


BERT = Family()


# ---------------------------------------------------------------------------------- load-time layouts
def interleave_gate(tensor: torch.Tensor, linear_first: bool = False) -> torch.Tensor:
    """``(2n, ...)`` stacked as ``[activated; linear]`` (``[linear; activated]`` with ``linear_first``) ->
    rows ``activated_0, linear_0, activated_1, linear_1, ...``.

    A new tensor (the checkpoint's, maybe shared with a transformers model, is never changed).
    """
    half = tensor.shape[0] // 2
    halves = tensor.reshape(2, half, *tensor.shape[1:])
    if linear_first:
        halves = halves.flip(0)
    return halves.transpose(0, 1).reshape(tensor.shape).contiguous()


def rotary_pair_order(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Q and K rows of a rotate-half checkpoint (``d`` pairs with ``d + head_dim / 2``) in rotary-pair
    order (pair ``i`` at rows ``2i, 2i + 1`` of its head); V untouched. ``qkv``: ``(3 * hidden, ...)``.

    The attention scores do not change (Q and K are permuted alike); the fused-QKV epilogue then finds
    each pair in two neighbouring columns of one tile, whatever the head dim and the tile width.
    """
    rest = qkv.shape[1:]
    head_dim = qkv.shape[0] // (3 * num_heads)
    qk = qkv[: 2 * num_heads * head_dim].reshape(2 * num_heads, 2, head_dim // 2, *rest).transpose(1, 2)
    return torch.cat([qk.reshape(-1, *rest), qkv[2 * num_heads * head_dim:]]).contiguous()


def rope_table(theta: float, head_dim: int, max_positions: int, device=None) -> torch.Tensor:
    """``(max_positions, head_dim)`` float32: the cosines, then the sines, of every position's angles.

    Computed on the CPU in float32 with the operations of transformers' default RoPE
    (``compute_default_rope_parameters`` and the rotary embedding's ``forward``), so the angles and
    their cosines are the ones transformers uses, bit for bit; the kernels only gather them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.long)[:, None].float() * inv_freq[None, :]  # (P, D/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=1).to(device)


def mpnet_bucket(relative_position: torch.Tensor, num_buckets: int = MPNET_BUCKETS,
                 max_distance: int = MPNET_MAX_DISTANCE) -> torch.Tensor:
    """transformers' ``MPNetEncoder.relative_position_bucket``, operation for operation (float32 logs)."""
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0).to(torch.long) * num_buckets
    n = torch.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def relative_bias_by_distance(table: torch.Tensor, max_positions: int) -> torch.Tensor:
    """MPNet's ``(buckets, heads)`` bias table -> ``(heads, 2 * max_positions - 1)`` float32 by distance.

    Column ``d + max_positions - 1`` holds each head's bias for ``key position - query position = d``:
    the bucket of every distance is computed once here, with transformers' own float32 arithmetic, so
    the attention kernel reads one value per score and the ``(seq, seq)`` bias is never built.
    """
    distance = torch.arange(-(max_positions - 1), max_positions, dtype=torch.long)
    buckets = mpnet_bucket(distance).to(table.device)
    return table.float()[buckets].t().contiguous()


def prepare(tensors: dict, family: Family, num_heads: int, num_layers: int, *, gate_linear_first: bool = False) -> dict:
    """The checkpoint's encoder tensors in the kernels' layouts (new tensors where a layout changes).

    ``gate_linear_first``: the checkpoint stores a gated projection as ``[linear; activated]``."""
    out = dict(tensors)
    for i in range(num_layers):
        if family.positions == "rope" and family.rope_pairs == "halves":  # "interleaved": already pair order
            for part in ("weight", "bias"):
                name = f"layers.{i}.qkv.{part}"
                if name in out:
                    out[name] = rotary_pair_order(out[name], num_heads)
        if family.ffn == "gated":
            for part in ("weight", "bias"):
                name = f"layers.{i}.ffn_in.{part}"
                if name in out:
                    out[name] = interleave_gate(out[name], gate_linear_first)
    return out
