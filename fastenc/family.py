"""What a model family's blocks are made of: one small description read from ``config.json``.

fastenc has one forward pass (``encoder.py``) for every family. What differs between families is a
handful of parts, described here once per checkpoint (STYLE 13; gpt-fast's ``ModelArgs``):

* **norm placement**: ``"post"`` — ``x = LN(x + f(x))`` (BERT and the families of 2018–2020, MPNet,
  NomicBERT, GTE); ``"pre"`` — ``x = x + f(LN(x))`` with a final norm after the last block (ModernBERT,
  whose first block feeds the embeddings to attention without a norm).
* **position scheme**: ``"absolute"`` — a position table added at the embeddings (BERT, MPNet);
  ``"rope"`` — Q and K rotated in the fused-QKV epilogue (ModernBERT, NomicBERT, GTE); ``"relative"`` —
  no position table at all, positions enter only as relative distances inside attention (DeBERTa-v3).
  MPNet also has a ``relative`` bias added to the attention scores (T5-style buckets, one table shared
  by all layers); DeBERTa's disentangled attention (``Disentangled``, below) adds content-to-position
  and position-to-content scores over log-bucketed distances, with or without absolute positions.
* **the softmax scale**: ``1 / sqrt(head_dim * scale_factor)``: 1 for every family but DeBERTa, whose
  ``scale_factor`` is one plus the number of its relative terms.
* **attention**: every key of the sequence, or a sliding window of ``±window`` positions (ModernBERT's
  local layers: ``window = local_attention // 2``, so 128 means 64 keys each side plus the query's own).
* **feed-forward**: ``"plain"`` — ``act(W x + b)``, or ``"gated"`` — ``act(a) * b`` where ``a`` and
  ``b`` are the two halves of one projection (GeGLU in ModernBERT and GTE, SwiGLU in NomicBERT).
* **biases**: which linears and norms have one (ModernBERT none, NomicBERT only in its norms).
* **the decoder backbones** (Llama, Mistral, Qwen2, Qwen3, Gemma3, read as embedders and rerankers):
  pre-norm blocks with RMSNorm (``norm_type="rms"``; Gemma's ``1 + weight`` as ``norm_offset=1``) and
  no norm at the embeddings, causal attention (``causal``; EmbeddingGemma's config turns it off),
  grouped-query attention (fewer K/V heads, read from ``EncoderConfig.num_key_value_heads``), per-head
  RMSNorm of Q and K before RoPE (``qk_norm``: Qwen3, Gemma3), Gemma3's "sandwich" blocks (``sandwich``:
  a norm after attention and after the feed-forward too, before each residual add), its embeddings
  multiplied by ``sqrt(hidden)`` (``embedding_scale``) and its Q scale ``query_pre_attn_scalar ** -0.5``
  (``query_scale``); local layers are windows (Mistral's, Gemma3's every layer but every sixth) with
  their own RoPE base (Gemma3's ``rope_local_base_freq``).
* **DeBERTa's extras**: the embedding projection (``embedding_size != hidden_size``) comes before the
  embeddings' LayerNorm, not after it (``project_before_norm``); a convolution beside the first block
  (``Conv``, DeBERTa-v2's ``conv_kernel_size``).

The second half of this module turns checkpoint tensors into the layouts the kernels want, once at
load: gated weights interleaved row by row (so one GEMM tile holds both halves of its columns), Q and
K rows of rotate-half checkpoints put in rotary-pair order (so a rotation pair is two neighbouring
columns of one tile), the RoPE table of cosines and sines, computed exactly as transformers computes
them, MPNet's bucketed bias unrolled by distance, and DeBERTa's tables: the relative embeddings
normalised and projected by every layer's position key and query projections (constants of the
checkpoint, computed once at load in float32), the bucket of every distance, the convolution as one
``(hidden, kernel * hidden)`` GEMM weight, and the embedding projection folded into the embedding tables.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

NORM_PLACEMENTS = ("post", "pre")
NORM_TYPES = ("layer", "rms")
POSITION_SCHEMES = ("absolute", "rope", "relative")
FFN_KINDS = ("plain", "gated")
BIASED_PARTS = ("qkv", "attn_out", "ffn_in", "ffn_out", "norm")  # "norm": every LayerNorm, embeddings' too
# MPNet's relative position buckets, as transformers computes them (MPNetEncoder.compute_position_bias
# calls relative_position_bucket with its defaults, whatever the config's relative_attention_num_buckets).
MPNET_BUCKETS = 32
MPNET_MAX_DISTANCE = 128


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What differs between the blocks of one model (ModernBERT alternates global and local layers)."""

    window: int | None = None  # sliding window: keys within ±window positions of the query (causal: the
    # window keys before it); None: all keys
    rope_theta: float | None = None  # the RoPE base of this block; None without rotary positions
    attn_norm: bool = True  # pre-LN only: the attention input is normalised (ModernBERT's block 0: not)


@dataclasses.dataclass(frozen=True)
class Disentangled:
    """DeBERTa's disentangled attention (He et al. 2021, arXiv:2006.03654; transformers' DebertaV2).

    Besides content-to-content ``q_i · k_j``, a score gets content-to-position ``q_i · Kr[b(i, j)]`` (c2p)
    and position-to-content ``k_j · Qr[b(i, j)]`` (p2c), where ``Kr`` and ``Qr`` are the relative
    embeddings (``2 * span`` rows, LayerNorm-ed when ``norm``) through the layer's position key and query
    projections (its own K and Q projections when ``shared_keys``), and ``b(i, j)`` is the row of the
    distance ``i - j``: ``clamp(bucket(i - j) + span, 0, 2 * span - 1)``, exact within ``±buckets / 2``
    and logarithmic beyond, up to ``max_distance`` (no buckets: the distance itself).
    """

    c2p: bool  # "c2p" in pos_att_type
    p2c: bool  # "p2c" in pos_att_type
    buckets: int  # position_buckets; 0: distances are not bucketed
    max_distance: int  # max_relative_positions (max_position_embeddings when the config says -1)
    shared_keys: bool = False  # share_att_key: the position projections are the layer's Q and K
    norm: bool = False  # norm_rel_ebd "layer_norm": the relative embeddings are LayerNorm-ed first

    @property
    def span(self) -> int:
        """Half the rows of the relative embeddings: ``buckets``, or ``max_distance`` without buckets."""
        return self.buckets if self.buckets > 0 else self.max_distance


@dataclasses.dataclass(frozen=True)
class Conv:
    """DeBERTa-v2's convolution beside the first block: ``LN(block_0(x) + act(conv1d(embeddings)))``."""

    kernel_size: int  # odd: (kernel_size - 1) // 2 tokens each side, zeros past the sequence
    groups: int = 1
    activation: str = "tanh"  # conv_act: "tanh" or a canonical activation of the ops interface


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
    # DeBERTa
    disentangled: Disentangled | None = None  # c2p / p2c relative attention
    scale_factor: int = 1  # the softmax scale is 1 / sqrt(head_dim * scale_factor)
    project_before_norm: bool = False  # the embedding projection precedes the embeddings' LayerNorm
    conv: Conv | None = None  # a convolution beside the first block
    # the decoder backbones
    norm_type: str = "layer"  # "layer" (LayerNorm) or "rms" (RMSNorm, transformers' roundings)
    norm_offset: float = 0.0  # RMSNorm's weight is norm_offset + weight (Gemma: 1)
    embedding_norm: bool = True  # a norm at the embeddings (the decoders have none)
    embedding_scale: float | None = None  # the word rows' factor (Gemma: sqrt(hidden))
    causal: bool = False  # a token attends to itself and the tokens before it only
    qk_norm: bool = False  # RMSNorm over each head of Q and of K, before RoPE (Qwen3, Gemma3)
    sandwich: bool = False  # norms after attention and after the feed-forward too (Gemma3)
    query_scale: float | None = None  # Q's factor when not 1 / sqrt(head_dim) (Gemma3's query_pre_attn_scalar)

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
        if (self.norm not in NORM_PLACEMENTS or self.positions not in POSITION_SCHEMES or self.ffn not in FFN_KINDS
                or self.norm_type not in NORM_TYPES or self.sandwich and self.norm != "pre"):
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


def rotary_pair_order(qkv: torch.Tensor, num_heads: int, num_kv_heads: int | None = None,
                      head_dim: int | None = None) -> torch.Tensor:
    """Q and K rows of a rotate-half checkpoint (``d`` pairs with ``d + head_dim / 2``) in rotary-pair
    order (pair ``i`` at rows ``2i, 2i + 1`` of its head); V untouched. ``qkv``: ``((num_heads + 2 *
    num_kv_heads) * head_dim, ...)``, the Q heads, then the K heads, then the V heads (``num_kv_heads``
    None: as many as Q; ``head_dim`` None: the rows divided evenly).

    The attention scores do not change (Q and K are permuted alike); the fused-QKV epilogue then finds
    each pair in two neighbouring columns of one tile, whatever the head dim and the tile width.
    """
    rest = qkv.shape[1:]
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = qkv.shape[0] // (num_heads + 2 * kv_heads) if head_dim is None else head_dim
    qk_heads = num_heads + kv_heads
    qk = qkv[: qk_heads * head_dim].reshape(qk_heads, 2, head_dim // 2, *rest).transpose(1, 2)
    return torch.cat([qk.reshape(-1, *rest), qkv[qk_heads * head_dim:]]).contiguous()


def head_pair_order(weight: torch.Tensor) -> torch.Tensor:
    """A per-head ``(head_dim,)`` vector (the QK-norm weights) in the rotary-pair order of ``rotary_pair_order``."""
    return weight.reshape(2, -1).t().reshape(-1).contiguous()


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


def deberta_bucket(relative_position: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """transformers' DeBERTa-v2 ``make_log_bucket_position``, operation for operation (float32 logs):
    distances within ``±buckets / 2`` as they are, farther ones on a log scale up to ``max_distance``."""
    sign = torch.sign(relative_position)
    mid = buckets // 2
    abs_pos = torch.where((relative_position < mid) & (relative_position > -mid),
                          torch.tensor(mid - 1).type_as(relative_position), torch.abs(relative_position))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_distance - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_position.type_as(log_pos), log_pos * sign)


def relative_index_by_distance(disentangled: Disentangled, max_positions: int) -> torch.Tensor:
    """DeBERTa's row of the relative tables for every distance: ``(2 * max_positions - 1,)`` int32.

    Column ``d + max_positions - 1`` holds the row for ``key position - query position = d``:
    ``clamp(bucket(-d) + span, 0, 2 * span - 1)`` with transformers' own bucket arithmetic
    (``build_relative_position`` then the clamp of ``disentangled_attention_bias``). The bucket is odd
    (``bucket(-x) = -bucket(x)``), so the p2c term, which transformers indexes by ``-bucket(j - i)``,
    reads the same row as c2p: one index serves both.
    """
    distance = torch.arange(-(max_positions - 1), max_positions, dtype=torch.long)
    relative = -distance  # query - key, as transformers counts it
    if disentangled.buckets > 0 and disentangled.max_distance > 0:
        relative = deberta_bucket(relative, disentangled.buckets, disentangled.max_distance).to(torch.long)
    span = disentangled.span
    return torch.clamp(relative + span, 0, 2 * span - 1).to(torch.int32)


def disentangled_tables(tensors: dict, family: Family, num_heads: int, num_layers: int, eps: float) -> dict:
    """DeBERTa's per-layer relative tables, replacing the tensors they are made of.

    The relative embeddings (LayerNorm-ed when the family says so) through each layer's position key
    projection (``layers.{i}.rel.keys``, for c2p) and position query projection (``layers.{i}.rel.queries``,
    for p2c), ``(2 * span, heads, head_dim)`` in the checkpoint's dtype: the layer's own K and Q rows of
    the fused QKV weight with ``shared_keys``. They depend on no input, so they are computed here, once,
    in float32 (transformers recomputes them at every forward, in the model's dtype). The queries carry
    the softmax scale ``1 / sqrt(head_dim * scale_factor)``, as Q does (``fused_qkv``), so the attention
    kernel adds the three terms unscaled; that scale is applied in float32 before the single rounding.
    """
    spec = family.disentangled
    out = dict(tensors)
    rel = out.pop("relative.embeddings")
    dtype = rel.dtype
    rel = rel.float()  # (2 * span, hidden)
    hidden = rel.shape[1]
    head_dim = hidden // num_heads
    if spec.norm:
        weight, bias = out.pop("relative.norm.weight"), out.pop("relative.norm.bias", None)
        rel = F.layer_norm(rel, (hidden,), weight.float(), None if bias is None else bias.float(), eps)
    scale = 1.0 / math.sqrt(head_dim * family.scale_factor)
    for i in range(num_layers):
        qkv_weight, qkv_bias = out[f"layers.{i}.qkv.weight"], out.get(f"layers.{i}.qkv.bias")
        for term, part, rows, factor in (("c2p", "keys", slice(hidden, 2 * hidden), 1.0),
                                         ("p2c", "queries", slice(0, hidden), scale)):
            own = {"keys": "pos_key", "queries": "pos_query"}[part]
            weight, bias = out.pop(f"layers.{i}.{own}.weight", None), out.pop(f"layers.{i}.{own}.bias", None)
            if not getattr(spec, term):
                continue
            if spec.shared_keys:
                weight, bias = qkv_weight[rows], None if qkv_bias is None else qkv_bias[rows]
            table = rel @ weight.float().t()
            if bias is not None:
                table += bias.float()
            out[f"layers.{i}.rel.{part}"] = (table * factor).to(dtype).view(-1, num_heads, head_dim)
    return out


def conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``(hidden, hidden / groups, kernel)`` Conv1d weight as one ``(hidden, kernel * hidden)`` GEMM weight:
    column ``o * hidden + c`` multiplies input channel ``c`` at offset ``o - (kernel - 1) // 2``. Grouped
    convolutions become block-diagonal (the zeros add exact zeros)."""
    hidden, per_group, kernel = weight.shape
    dense = weight.new_zeros(hidden, kernel, hidden)
    out_per_group = hidden // groups
    for g in range(groups):
        rows, cols = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * per_group, (g + 1) * per_group)
        dense[rows, :, cols] = weight[rows].permute(0, 2, 1)
    return dense.reshape(hidden, kernel * hidden).contiguous()


def fold_projection(tensors: dict) -> dict:
    """DeBERTa's embeddings project ``word + position + type`` before their LayerNorm: the projection is
    linear, so it is folded into each table once (``(rows, emb) -> (rows, hidden)``, in float32), and the
    embeddings op then sums and normalises ``hidden``-wide rows. The unprojected word table stays as
    ``embeddings.word_unprojected``: the masked-LM decoder tied to it reads it."""
    out = dict(tensors)
    projection = out.pop("embeddings.project.weight").float()  # (hidden, emb), no bias
    out["embeddings.word_unprojected"] = out["embeddings.word"]
    for name in ("embeddings.word", "embeddings.position", "embeddings.token_type"):
        if name in out:
            out[name] = (out[name].float() @ projection.t()).to(out[name].dtype)
    return out


def prepare(tensors: dict, family: Family, num_heads: int, num_layers: int, *, gate_linear_first: bool = False,
            eps: float = 1e-12, num_kv_heads: int | None = None, head_dim: int | None = None) -> dict:
    """The checkpoint's encoder tensors in the kernels' layouts (new tensors where a layout changes).

    ``gate_linear_first``: the checkpoint stores a gated projection as ``[linear; activated]``. ``eps``:
    the LayerNorms' (DeBERTa's relative embeddings are normalised here). ``num_kv_heads`` and
    ``head_dim``: grouped-query attention's K/V heads and the checkpoint's head dim (None: as many K/V
    heads as Q heads, ``hidden / heads``)."""
    out = dict(tensors)
    if family.disentangled is not None:
        out = disentangled_tables(out, family, num_heads, num_layers, eps)
    if family.conv is not None:
        out["conv.weight"] = conv_weight(out["conv.weight"], family.conv.groups)
    if family.project_before_norm and "embeddings.project.weight" in out:
        out = fold_projection(out)
    for i in range(num_layers):
        if family.positions == "rope" and family.rope_pairs == "halves":  # "interleaved": already pair order
            for part in ("weight", "bias"):
                name = f"layers.{i}.qkv.{part}"
                if name in out:
                    out[name] = rotary_pair_order(out[name], num_heads, num_kv_heads, head_dim)
            for name in (f"layers.{i}.q_norm.weight", f"layers.{i}.k_norm.weight"):
                if name in out:
                    out[name] = head_pair_order(out[name])
        if family.ffn == "gated":
            for part in ("weight", "bias"):
                name = f"layers.{i}.ffn_in.{part}"
                if name in out:
                    out[name] = interleave_gate(out[name], gate_linear_first)
    return out
