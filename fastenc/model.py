"""The encoder network: one forward pass, written once, over the ops backend chosen at load.

The pass follows the checkpoint's ``Family`` (``fastenc/family.py``): post- or pre-norm blocks (LayerNorm,
or the decoders' RMSNorm, with Gemma3's sandwich norms), absolute positions at the embeddings or RoPE in
the fused-QKV epilogue (after the decoders' QK-norm), MPNet's relative bias, DeBERTa's disentangled
relative terms and sliding windows inside attention, bidirectional or causal, with grouped-query K/V
heads, plain or gated feed-forwards, with or without biases, DeBERTa-v2's convolution beside the first
block. A decoder backbone (Qwen3, Qwen2, Mistral, Llama, Gemma3) is one such description, not a
second forward pass.

The model never sees text. It takes a ``PackedBatch`` (real tokens only, FlashAttention's varlen
layout: ``(tokens,)`` ids and ``cu_seqlens`` offsets), moves it to its device at the door, and every
layer runs on a ``(tokens, hidden)`` tensor. Padded ``(batch, seq)`` tensors are validated and packed
by ``Model.pack``; padding comes back only in ``PackedBatch.pad``. The lengths are host values, so the
forward pass never waits on the device. Small batches replay a CUDA graph (``graphs.py``); the task
heads (``heads.Heads``) run on the same ops over the packed hidden states.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import checkpoint, reference
from . import family as families
from .config import EncoderConfig
from .errors import BackendError, FastencError, InputError
from .graphs import GraphRunner
from .heads import Heads
from .packing import PackedBatch, cu_seqlens_of

BACKENDS = ("torch", "triton")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


# ------------------------------------------------------------------------------------------- placement
def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {str(device)!r} asked for, but CUDA is not available here")
    return device


def resolve_dtype(dtype, device: torch.device, config: EncoderConfig | None = None) -> torch.dtype:
    """``dtype`` as a torch dtype; None: float32 on the CPU, on CUDA float16, or bfloat16 for the decoder
    backbones (``config.is_decoder``), whose activations overflow float16 in some checkpoints."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if config is not None and config.is_decoder else torch.float16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}, or fp8 (e4m3 GEMMs)")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise InputError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, device: torch.device) -> tuple[str, ModuleType]:
    """The backend's name and its ops module (``fastenc.reference`` or ``fastenc.kernels``)."""
    if backend is None:
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return backend, reference
    if backend != "triton":
        raise BackendError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if device.type != "cuda" and not triton_interpreter_on():
        raise BackendError(
            f"backend 'triton' on device {str(device)!r} needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before fastenc (and triton) are imported, or use backend='torch'"
        )
    try:
        from . import kernels
    except ImportError as exc:
        raise BackendError(f"backend 'triton' cannot be used: {exc}") from None
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)
    if major < 8:
        warnings.warn(f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: Triton compiles the kernels to "
                      "CUDA-core code below sm_80 (no tensor cores); backend='torch' uses cuBLAS's tensor cores",
                      stacklevel=3)
    return backend, kernels


def resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device, backend: str) -> bool:
    """CUDA graphs replay small batches: on by default with the Triton backend on CUDA, only there."""
    possible = device.type == "cuda" and backend == "triton"
    if cuda_graphs is None:
        return possible
    if cuda_graphs and not possible:
        raise BackendError(f"cuda_graphs=True needs a CUDA device and the triton backend, not "
                           f"{str(device)!r} with {backend!r}")
    return bool(cuda_graphs)


# ---------------------------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """One transformer block: its weights, and what kind of block it is (``kind``, ``family``).

    A bias is ``None`` where the family has none; ``attn_norm`` is ``None`` for ModernBERT's first block.
    Post-LN (``family.norm == "post"``): ``attn_norm`` and ``ffn_norm`` follow attention and the
    feed-forward; pre-LN: they precede them, and Gemma3's sandwich adds ``post_attn_norm`` and
    ``post_ffn_norm`` after them.
    """

    kind: families.LayerKind
    qkv_weight: torch.Tensor  # ((heads + 2 * kv_heads) * head_dim, hidden); Q and K rows in rotary-pair order
    qkv_bias: torch.Tensor | None  # ((heads + 2 * kv_heads) * head_dim,)
    attn_out_weight: torch.Tensor  # (hidden, heads * head_dim)
    attn_out_bias: torch.Tensor | None
    attn_norm_weight: torch.Tensor | None  # (hidden,)
    attn_norm_bias: torch.Tensor | None
    ffn_in_weight: torch.Tensor  # (intermediate, hidden); gated: (2 * intermediate, hidden), halves interleaved
    ffn_in_bias: torch.Tensor | None
    ffn_out_weight: torch.Tensor  # (hidden, intermediate)
    ffn_out_bias: torch.Tensor | None
    ffn_norm_weight: torch.Tensor  # (hidden,)
    ffn_norm_bias: torch.Tensor | None
    rel_keys: torch.Tensor | None = None  # (2 * span, heads, head_dim): DeBERTa's c2p table
    rel_queries: torch.Tensor | None = None  # (2 * span, heads, head_dim): DeBERTa's p2c table, scaled
    q_norm_weight: torch.Tensor | None = None  # (head_dim,): QK-norm of each Q head, in rotary-pair order
    k_norm_weight: torch.Tensor | None = None  # (head_dim,)
    post_attn_norm_weight: torch.Tensor | None = None  # (hidden,): Gemma3's norm after attention
    post_ffn_norm_weight: torch.Tensor | None = None  # (hidden,): Gemma3's norm after the feed-forward

    @classmethod
    def from_tensors(cls, tensors: dict, index: int, kind: families.LayerKind) -> "Layer":
        # field "attn_out_weight" <- tensor "layers.{index}.attn_out.weight" (None when the family has none)
        return cls(kind=kind, **{f.name: tensors.get(f"layers.{index}." + ".".join(f.name.rsplit("_", 1)))
                                 for f in dataclasses.fields(cls) if f.name != "kind"})


class Model:
    """The encoder's layers, position tables, ops backend, CUDA graphs and task heads.

    ``model(batch)`` runs a ``PackedBatch`` (moved to the model's device if it is not there) and returns
    the last hidden states ``(tokens, hidden)`` in the model's dtype, replayed from a CUDA graph when the
    batch fits one; ``model.forward(batch)`` always runs eagerly. ``tensors`` are the encoder's,
    fastenc-named and in the kernels' layouts (``checkpoint.load_encoder``); ``head_tensors`` the heads'.
    ``cuda_graphs``: None turns graphs on where they can run (the Triton backend on CUDA).
    """

    def __init__(self, config: EncoderConfig, tensors: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, backend: str, ops: ModuleType, head_tensors: dict | None = None,
                 path: Path | None = None, cuda_graphs: bool | None = None):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.ops = ops
        self.tensors = tensors
        # the word table the masked-LM decoder is tied to (DeBERTa's, before its projection is folded in)
        self.heads = Heads(config, head_tensors or {}, ops, tensors.get("embeddings.word_unprojected",
                                                                       tensors["embeddings.word"]), path)
        family = config.family
        self.layers = [Layer.from_tensors(tensors, unique, family.layer(depth))
                       for depth, unique in enumerate(checkpoint.layer_schedule(config))]
        # Tables built once from the config: RoPE's cosines and sines per base, MPNet's bias by distance.
        self.rope = {theta: families.rope_table(theta, config.head_dim, config.max_position_embeddings, device)
                     for theta in family.rope_thetas}
        self.relative_bias = (families.relative_bias_by_distance(tensors["relative_bias"],
                                                                 config.max_position_embeddings)
                              if family.relative_bias else None)
        # Q's scale (Gemma3's query_pre_attn_scalar, DeBERTa's scale factor), and DeBERTa's row of the
        # relative tables for every distance.
        self.q_scale = family.query_scale if family.query_scale is not None else (
            None if family.scale_factor == 1 else 1.0 / math.sqrt(config.head_dim * family.scale_factor))
        self.rel_index = (families.relative_index_by_distance(family.disentangled, config.max_position_embeddings)
                          .to(device) if family.disentangled is not None else None)
        self.graphs = GraphRunner(self) if resolve_cuda_graphs(cuda_graphs, device, backend) else None

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, device={self.device}, dtype={self.dtype}, backend={self.backend!r})")

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The family's norm: LayerNorm, or the decoders' RMSNorm (with Gemma's ``1 + weight``)."""
        family, eps = self.config.family, self.config.layer_norm_eps
        if family.norm_type == "rms":
            return self.ops.rms_norm(x, weight, eps, family.norm_offset)
        return self.ops.layer_norm(x, weight, bias, eps)

    # ----------------------------------------------------------------------------------------- forward
    @torch.no_grad()  # not inference_mode: callers (optimize's task heads) may feed the result to autograd
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """The encoder on packed tokens, eagerly: ``(tokens, hidden)`` in the model's dtype."""
        batch = batch.to(self.device)
        ops, c, t, family = self.ops, self.config, self.tensors, self.config.family
        eps, positions = c.layer_norm_eps, batch.position_ids
        x = ops.embeddings(batch.input_ids, positions, batch.token_type_ids, t["embeddings.word"],
                           t.get("embeddings.position"), t.get("embeddings.token_type"), t.get("embeddings.norm.weight"),
                           t.get("embeddings.norm.bias"), eps, family.embedding_scale)  # (T, E)
        if "embeddings.project.weight" in t:
            x = ops.linear(x, t["embeddings.project.weight"], t["embeddings.project.bias"])  # (T, H)
        cu_seqlens, max_seqlen = batch.cu_seqlens, batch.max_seqlen
        # Attention needs positions only for a window or relative terms; BERT's stays position-free.
        attn_positions = positions if (family.relative_bias or family.disentangled is not None
                                       or any(k.window is not None for k in family.layers)) else None
        pre_norm, sandwich = family.norm == "pre", family.sandwich
        kv = {} if c.kv_heads == c.num_attention_heads and c.head_dim * c.num_attention_heads == c.hidden_size \
            else {"num_kv_heads": c.kv_heads, "head_dim": c.head_dim}
        embedded = x  # DeBERTa-v2's convolution reads the embeddings
        h = x  # the input of the next attention: x itself, or norm(x) in a pre-norm block
        for depth, layer in enumerate(self.layers):
            kind = layer.kind
            if pre_norm and layer.attn_norm_weight is not None and not (sandwich and depth > 0):
                h = self._norm(x, layer.attn_norm_weight, layer.attn_norm_bias)  # sandwich: made by the last step
            rope = self.rope.get(kind.rope_theta)
            qk_norm = {} if layer.q_norm_weight is None else dict(
                q_norm=layer.q_norm_weight, k_norm=layer.k_norm_weight, norm_eps=eps, norm_offset=family.norm_offset)
            q, k, v = ops.fused_qkv(h, layer.qkv_weight, layer.qkv_bias, c.num_attention_heads,
                                    positions if rope is not None else None, rope, scale=self.q_scale, **kv,
                                    **qk_norm)  # (H, T, D), K and V (kv_heads, T, D)
            a = ops.attention(q, k, v, cu_seqlens, max_seqlen, attn_positions, kind.window, self.relative_bias,
                              causal=family.causal, rel_keys=layer.rel_keys, rel_queries=layer.rel_queries,
                              rel_index=self.rel_index)  # (T, heads * head_dim)
            if sandwich:  # x = x + post_norm(f(pre_norm(x))) for each sub-block, the next pre-norm fused in
                a = ops.linear(a, layer.attn_out_weight, layer.attn_out_bias)
                x, h = ops.sandwich_rms_norm(a, x, layer.post_attn_norm_weight, layer.ffn_norm_weight, eps,
                                             family.norm_offset)
            elif pre_norm:  # x = x + f(LN(x)); the residual add rides in the GEMM epilogue
                x = ops.linear(a, layer.attn_out_weight, layer.attn_out_bias, residual=x)
                h = self._norm(x, layer.ffn_norm_weight, layer.ffn_norm_bias)
            else:  # x = LN(x + f(x))
                a = ops.linear(a, layer.attn_out_weight, layer.attn_out_bias)
                x = h = ops.add_layer_norm(a, x, layer.attn_norm_weight, layer.attn_norm_bias, eps)
            if family.ffn == "gated":
                f = ops.gated_linear(h, layer.ffn_in_weight, layer.ffn_in_bias, c.activation)  # (T, intermediate)
            else:
                f = ops.linear(h, layer.ffn_in_weight, layer.ffn_in_bias, c.activation)
            if sandwich:  # the next pre-norm: the next layer's input norm, or the final norm after the last
                f = ops.linear(f, layer.ffn_out_weight, layer.ffn_out_bias)
                following = (self.layers[depth + 1].attn_norm_weight if depth + 1 < len(self.layers)
                             else t["final_norm.weight"])
                x, h = ops.sandwich_rms_norm(f, x, layer.post_ffn_norm_weight, following, eps, family.norm_offset)
            elif pre_norm:
                x = ops.linear(f, layer.ffn_out_weight, layer.ffn_out_bias, residual=x)
                h = x
            else:
                f = ops.linear(f, layer.ffn_out_weight, layer.ffn_out_bias)
                x = h = ops.add_layer_norm(f, x, layer.ffn_norm_weight, layer.ffn_norm_bias, eps)
            if depth == 0 and family.conv is not None:  # DeBERTa-v2: LN(x + act(conv(embeddings)))
                x = h = self._conv(embedded, x, batch)
        if sandwich:
            return h  # the final norm of the last residual, made by the last sandwich step
        if family.final_norm:
            x = self._norm(x, t["final_norm.weight"], t.get("final_norm.bias"))
        return x

    def _conv(self, embedded: torch.Tensor, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """DeBERTa-v2's ``ConvLayer``: ``LN(x + act(conv1d(embedded)))`` per sequence, zeros past its ends.

        The convolution is one GEMM over each token's ``kernel_size`` neighbours side by side
        (``(tokens, kernel * hidden)``, the weight laid out by ``fastenc.family.conv_weight``). A neighbour is
        the token of the same sequence at ``position + offset``: a position the caller masked out (or past
        the sequence) is a zero, as in transformers' padded layout, whose masked embeddings are zeros.
        """
        ops, t, conv = self.ops, self.tensors, self.config.family.conv
        tokens = embedded.shape[0]
        token = torch.arange(tokens, device=embedded.device)
        sequence = torch.searchsorted(batch.cu_seqlens[1:].long(), token, right=True)  # (T,) which sequence
        key = sequence * (2 * self.config.max_position_embeddings) + batch.position_ids.long()  # (T,) increasing
        padded = torch.cat([embedded, embedded.new_zeros(1, embedded.shape[1])])  # row T: the zero neighbour
        columns = []
        for offset in range(-(conv.kernel_size // 2), conv.kernel_size // 2 + 1):
            found = torch.searchsorted(key, key + offset).clamp(max=tokens - 1)
            columns.append(padded[torch.where(key[found] == key + offset, found, tokens)])
        neighbours = torch.cat(columns, dim=1)  # (T, kernel * hidden)
        activation = None if conv.activation == "tanh" else conv.activation
        out = ops.linear(neighbours, t["conv.weight"], t["conv.bias"], activation)  # (T, hidden)
        if conv.activation == "tanh":  # not an ops activation (as the pooler's tanh)
            out = torch.tanh(out)
        return ops.add_layer_norm(out, x, t["conv.norm.weight"], t["conv.norm.bias"], self.config.layer_norm_eps)

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        """``forward``, replayed from a CUDA graph when the batch is small enough for one."""
        if batch.num_tokens == 0:
            return torch.zeros(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        batch = batch.to(self.device)
        if self.graphs is not None and self.graphs.fits(batch):
            out = self.graphs.run(batch)
        else:
            out = self.forward(batch)
        if self.dtype == torch.float16 and self.config.is_decoder and not bool(torch.isfinite(out).all()):
            raise FastencError(f"the {self.config.model_type} forward pass overflowed float16 (non-finite hidden "
                               "states); decoder backbones need a wider range: load with dtype='bf16' (the default "
                               "on CUDA) or 'fp32'")
        return out

    def warmup(self) -> None:
        """Compile the kernels and capture every CUDA graph bucket now, so no real call pays for it."""
        if self.graphs is not None:
            self.graphs.capture_all()
        else:
            ids = torch.full((1, min(8, self.config.max_length)), self.config.pad_token_id + 1)
            self(self.pack(ids % self.config.vocab_size))

    # ------------------------------------------------------------------------------------------ inputs
    def pack(self, input_ids, attention_mask=None, token_type_ids=None) -> PackedBatch:
        """Validate padded ``(batch, seq)`` inputs on the host and keep their real tokens: a host
        ``PackedBatch`` that remembers where each token came from (``pad`` puts the padding back).

        Raises ``InputError`` naming the problem before any kernel runs (see ``check_inputs``).
        """
        ids, mask, types = self.check_inputs(input_ids, attention_mask, token_type_ids)
        keep = mask.reshape(-1).nonzero().squeeze(1)  # (tokens,) flat positions of real tokens
        lengths = mask.sum(1).tolist()
        return PackedBatch(
            input_ids=ids.reshape(-1)[keep],
            position_ids=self.positions(ids).reshape(-1)[keep],
            token_type_ids=types.reshape(-1)[keep] if self.config.type_vocab_size else None,
            cu_seqlens=cu_seqlens_of(lengths),
            lengths=tuple(lengths),
            max_seqlen=max(lengths, default=0),
            index=keep,
            shape=tuple(ids.shape),
        )

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position ids of padded ``(batch, seq)`` ids as transformers computes them: 0.. per row, or
        RoBERTa's count of non-padding tokens from ``pad_token_id + 1``."""
        if self.config.padding_positions:
            not_pad = ids.ne(self.config.pad_token_id).to(torch.long)
            return torch.cumsum(not_pad, dim=1) * not_pad + self.config.pad_token_id
        return torch.arange(ids.shape[1]).expand_as(ids)

    def check_inputs(self, input_ids, attention_mask=None, token_type_ids=None):
        """Validate padded inputs on the host, before any kernel; returns CPU int64 ids and types and a bool
        mask, or raises ``InputError``: an id outside ``[0, vocab_size)``, a token type outside
        ``[0, type_vocab_size)`` (unless the family ignores them: ``EncoderConfig.ignores_token_types``),
        ``seq`` over ``max_length``, mismatched shapes, a rank other than 2, a floating-point ``input_ids``,
        mask values other than 0/1."""
        c = self.config
        ids = _as_tensor(input_ids, "input_ids")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2:
            raise InputError(f"input_ids must have rank 2 (batch, seq), got shape {list(ids.shape)}")
        ids = ids.cpu().to(torch.long)
        if ids.shape[1] > c.max_length:
            raise InputError(f"sequence length {ids.shape[1]} is over the model's limit of {c.max_length} tokens")
        _check_range(ids, c.vocab_size, "input_ids", "vocab_size")

        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = _as_tensor(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
            if mask.is_floating_point() or mask.is_complex():
                raise InputError(f"attention_mask must be bool or integer 0/1, got {mask.dtype}")
            mask = mask.cpu()
            if mask.dtype != torch.bool:
                bad = ((mask != 0) & (mask != 1)).nonzero()
                if len(bad):
                    row, col = bad[0].tolist()
                    raise InputError(f"attention_mask[{row}, {col}] = {mask[row, col].item()}; values must be 0 or 1")
                mask = mask.bool()

        if token_type_ids is None:
            types = torch.zeros_like(ids)
        else:
            types = _as_tensor(token_type_ids, "token_type_ids")
            if types.shape != ids.shape:
                raise InputError(f"token_type_ids has shape {list(types.shape)}, input_ids {list(ids.shape)}")
            if types.is_floating_point() or types.is_complex() or types.dtype == torch.bool:
                raise InputError(f"token_type_ids must be an integer tensor, got {types.dtype}")
            types = types.cpu().to(torch.long)
            if c.ignores_token_types:  # as transformers' DeBERTa without a type table: any types, ignored
                types = torch.zeros_like(ids)
            _check_range(types, max(c.type_vocab_size, 1), "token_type_ids", "type_vocab_size")
        return ids, mask, types


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} cannot be read as a tensor ({exc})") from None


def _check_range(values: torch.Tensor, limit: int, name: str, limit_name: str) -> None:
    bad = ((values < 0) | (values >= limit)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise InputError(f"{name}[{row}, {col}] = {values[row, col].item()} is outside [0, {limit_name}={limit})")
