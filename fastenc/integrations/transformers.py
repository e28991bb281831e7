"""``transformers`` integration: ``optimize_model`` and the ``"fastenc"`` attention implementation.

This module imports torch only; ``transformers`` is imported inside the functions, which run only once
the user has imported it (see ``fastenc/integrations/__init__.py`` for how registration is deferred).

``optimize_model(model)`` replaces the ``forward`` of the model's base model (``model.base_model``:
``BertModel``, ``RobertaModel``, …) by fastenc's encoder, built once from the model's own tensors
(shared, not copied, except Q, K and V, which fastenc stores concatenated). The task head modules of a
``*For…`` model stay as they are and read fastenc's hidden states, so logits and losses keep their
meaning. Like fastenc's encoder, the patched model's hidden states are exactly 0 where the attention
mask is 0 (transformers computes values there that nothing downstream should read). The original
``forward`` still runs, unchanged, when fastenc cannot reproduce a call: in training mode (fastenc does
not backpropagate), with ``output_hidden_states`` / ``output_attentions``, ``inputs_embeds``,
``position_ids``, a 4D attention mask, or anything else it does not know. The encoder is rebuilt when
the model moves to another device or dtype; weights changed in place after ``optimize`` (fine-tuning)
need a new ``optimize`` call.

``attn_implementation="fastenc"``: ``fastenc_attention`` runs fastenc's varlen attention (the Triton
flash kernel on CUDA, ``fastenc.reference`` on the CPU) whenever the mask only says which keys each
row may attend to — no mask, a 2D padding mask, or a boolean or additive (0 / large negative) 4D mask
that is the same for every query and head — and hands everything else (causal or custom patterns,
cross-attention, dropout, gradients, position biases) to transformers' own ``sdpa`` function. Query
rows at masked positions are computed by ``sdpa`` too, so the result matches ``"sdpa"`` everywhere,
padding included. ``fastenc_mask`` is the matching ``AttentionMaskInterface`` entry: for the plain
bidirectional mask of a supported family it returns the 2D padding mask (or None without padding),
sparing the ``(batch, 1, seq, seq)`` tensor; otherwise it returns what ``"sdpa"`` would.

ModernBERT's local layers go through both as well: their mask is the same 2D padding mask, and
``fastenc_attention`` reads the window from the model's config (``config.sliding_window``, the half
width: transformers passes ``sliding_window + 1``, flash-attention's inclusive bound) and runs the
windowed kernel, which skips the key blocks outside the window. Whatever falls back to ``sdpa`` from
there gets the windowed mask ``"sdpa"`` would have built. The other families after BERT (NomicBERT,
GTE, ModernBERT's global layers) rotate Q and K before calling the interface, so theirs is plain
attention. MPNet and DeBERTa compute their attention themselves (with their relative terms), without the
interface; ``optimize`` runs both on fastenc.

The decoder backbones (Qwen3, Qwen2, Mistral, Llama, Gemma3) are not patched: ``optimize`` refuses them
(``Encoder.from_pretrained`` runs them), and their attention calls (grouped-query K/V heads, causal or
windowed masks) go to ``sdpa`` from ``fastenc_attention``, which takes only equal Q and K/V head counts
and masks that say which keys a row may see.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from types import ModuleType

import torch
import torch.nn.functional as F

from ..config import DECODER_MODEL_TYPES, SUPPORTED_MODEL_TYPES

ATTENTION_NAME = "fastenc"
# Arguments the fast path runs on, and the values of others that ask for nothing it cannot do.
_FAST_ARGUMENTS = ("input_ids", "attention_mask", "token_type_ids", "return_dict")
_NEUTRAL = {"position_ids": (None,), "inputs_embeds": (None,), "encoder_hidden_states": (None,),
            "encoder_attention_mask": (None,), "past_key_values": (None,), "head_mask": (None,),
            "cache_position": (None,), "use_cache": (None, False), "output_attentions": (None, False),
            "output_hidden_states": (None, False)}
_POOLED = ("bert", "roberta", "xlm-roberta", "camembert", "albert", "mpnet", "nomic_bert", "gte")


# ------------------------------------------------------------------------------------------- optimize
def optimize_model(model, *, backend: str | None = None, dtype=None):
    """Patch a ``transformers`` model in place (see the module docstring); returns ``model``."""
    config = model.config
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"fastenc.optimize cannot patch a {name}: model_type {model_type!r} is not one of "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type in DECODER_MODEL_TYPES:
        raise TypeError(f"fastenc.optimize cannot patch a {name}: the decoder backbones ({', '.join(DECODER_MODEL_TYPES)}) "
                        "run on fastenc through fastenc.Encoder.from_pretrained(directory) and fastenc.pipeline, "
                        "not by patching a transformers model")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise TypeError(f"fastenc.optimize cannot patch a {name}: it is configured as a decoder "
                        "(is_decoder / add_cross_attention); fastenc runs bidirectional encoders only")
    base = model.base_model
    patch = getattr(base, "_fastenc_patch", None)
    if patch is not None:
        patch.backend, patch.dtype = backend, dtype
        patch.rebuild()
        return model
    base._fastenc_patch = _Patch(base, backend, dtype)
    return model


class _Patch:
    """The replacement ``forward`` of one base model, and the encoder it runs.

    The encoder is not part of the patch's state: a copied or unpickled model (``copy.deepcopy``,
    ``torch.save``) rebuilds its own from its own tensors on its first call.
    """

    def __init__(self, base, backend: str | None, dtype=None):
        self.base = base
        self.backend = backend
        self.dtype = dtype  # None: the model's own; "fp8": quantized GEMMs (fastenc.fp8)
        self.encoder = None
        self.placement = None
        self.rebuild()
        base.forward = self.forward

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None, "placement": None}

    def rebuild(self) -> None:
        from ..encoder import Encoder

        weight = self.base.get_input_embeddings().weight
        self.encoder = Encoder.from_state_dict(self.base.config.to_dict(), self.base.state_dict(),
                                               device=weight.device, dtype=weight.dtype if self.dtype is None
                                               else self.dtype, backend=self.backend)
        self.placement = (weight.device, weight.dtype)

    def original(self, *args, **kwargs):
        """The model class's own ``forward``."""
        return type(self.base).forward(self.base, *args, **kwargs)

    def forward(self, *args, **kwargs):
        signature = _signature(type(self.base))
        try:
            bound = signature.bind(self.base, *args, **kwargs)
        except TypeError:
            return self.original(*args, **kwargs)
        arguments = dict(bound.arguments)
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(parameter.name, {}))
        arguments.pop(next(iter(signature.parameters)))  # self
        inputs = self._fast_inputs(arguments)
        if inputs is None:
            return self.original(*args, **kwargs)
        weight = self.base.get_input_embeddings().weight
        if self.encoder is None or (weight.device, weight.dtype) != self.placement:
            self.rebuild()
        with torch.no_grad():
            hidden = self.encoder(*inputs).to(weight.dtype)  # (batch, seq, hidden); 0 where the mask is 0
        output = self._output(hidden)
        return_dict = arguments.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.base.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def _fast_inputs(self, arguments: dict):
        """``(input_ids, attention_mask, token_type_ids)`` when fastenc can run this call, else None."""
        if self.base.training:
            return None
        config = self.base.config
        for name, value in arguments.items():
            if name not in _FAST_ARGUMENTS and not any(value is neutral for neutral in _NEUTRAL.get(name, ())):
                return None
        for name in ("output_attentions", "output_hidden_states"):
            if arguments.get(name) is None and getattr(config, name, False):
                return None
        ids, mask, types = (arguments.get(k) for k in ("input_ids", "attention_mask", "token_type_ids"))
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
                return None
            if mask.is_floating_point():  # transformers takes 0./1. masks too
                if not bool(((mask == 0) | (mask == 1)).all()):
                    return None
                mask = mask.long()
        if types is not None and (not isinstance(types, torch.Tensor) or types.shape != ids.shape):
            return None
        return ids, mask, types

    def _output(self, hidden: torch.Tensor):
        from transformers import modeling_outputs

        model_type = self.base.config.model_type
        if model_type not in _POOLED:
            return modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
        pooler = getattr(self.base, "pooler", None)
        pooled = None
        if pooler is not None:
            with torch.no_grad():
                if model_type == "albert":  # a Linear and a Tanh on the first token
                    pooled = self.base.pooler_activation(pooler(hidden[:, 0]))
                else:  # BertPooler & co. take the whole sequence
                    pooled = pooler(hidden)
        return modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


@functools.cache
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


# ------------------------------------------------------------------------------------------ attention
def register_attention(modeling_utils: ModuleType) -> None:
    """Register ``"fastenc"`` with ``AttentionInterface`` (``modeling_utils`` is transformers' module)."""
    modeling_utils.AttentionInterface.register(ATTENTION_NAME, fastenc_attention)


def register_mask(masking_utils: ModuleType) -> None:
    """Register ``"fastenc"`` with ``AttentionMaskInterface`` (transformers' ``masking_utils`` module)."""
    interface = getattr(masking_utils, "AttentionMaskInterface", None)
    if interface is not None:  # transformers before 4.53 builds masks without it
        interface.register(ATTENTION_NAME, fastenc_mask)


def fastenc_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                 allow_is_bidirectional_skip: bool = False, config=None, **kwargs):
    """The mask for ``fastenc_attention``: 2D padding (or None) when that says it all, else sdpa's mask."""
    from transformers import masking_utils

    global _LAST_PLAN
    _LAST_PLAN = (None, None, None, None)  # a new forward pass: never reuse a plan across calls

    plain = ((mask_function is masking_utils.bidirectional_mask_function and local_size is None
              or _window_of(config) is not None and local_size == _window_of(config))
             and allow_is_bidirectional_skip and q_offset == 0 and kv_offset == 0 and q_length == kv_length
             and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
             and (attention_mask is None or attention_mask.shape[-1] == kv_length))
    if plain:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.bool()  # (batch, kv_length)
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                                   local_size=local_size, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                                   **kwargs)


def _window_of(config) -> int | None:
    """ModernBERT's sliding window, as a half width (``|query - key| <= window``); None for other models."""
    if getattr(config, "model_type", None) != "modernbert":
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def _layer_window(module, kwargs) -> int | None:
    """The window of this attention call: ModernBERT's local layers pass ``sliding_window`` (its half width + 1)."""
    if kwargs.get("sliding_window") is None:
        return None
    return _window_of(getattr(module, "config", None))


def _windowed(mask: torch.Tensor | None, batch: int, seq: int, window: int, device) -> torch.Tensor:
    """sdpa's mask for a local layer: may attend to key ``j`` from query ``i`` when ``|i - j| <= window``
    and the padding mask keeps ``j``. ``(B, 1, S, S)`` bool."""
    near = (torch.arange(seq, device=device)[None, :] - torch.arange(seq, device=device)[:, None]).abs() <= window
    if mask is None:
        return near[None, None].expand(batch, 1, seq, seq)
    if mask.dim() == 2:
        mask = mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return mask.to(torch.bool) & near


def fastenc_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function interface: ``(B, H, S, D)`` in, ``((B, S, H, D), None)`` out."""
    window = _layer_window(module, kwargs)
    if window is not None:  # ModernBERT's local layer: the window is read from the config, not from kwargs
        kwargs = {name: value for name, value in kwargs.items() if name != "sliding_window"}
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[-1] != query.shape[2]):
            window = None  # a mask built by someone else: it carries the window already; sdpa takes it
    plan = _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    ops = None if plan is None else _ops_for(query)
    batch, heads, seq, head_dim = query.shape
    if ops is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if window is not None:
            attention_mask = _windowed(attention_mask, batch, seq, window, query.device)
        elif attention_mask is not None and attention_mask.dim() == 2:  # fastenc_mask's padding form
            attention_mask = attention_mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = head_dim ** -0.5 if scaling is None else scaling

    def pack(t: torch.Tensor) -> torch.Tensor:  # (B, H, S, D) -> (H, T, D)
        t = t.transpose(0, 1).reshape(heads, batch * seq, head_dim)
        return t.contiguous() if plan.flat is None else t.index_select(1, plan.flat)

    positions = None
    if window is not None:  # each kept token's column in the padded row
        positions = (torch.arange(batch * seq, device=query.device) if plan.flat is None else plan.flat) % seq
    packed = ops.attention(pack(query * scale), pack(key), pack(value), plan.cu_seqlens, plan.max_seqlen, positions,
                           window)  # (T, H*D)
    if plan.flat is None:  # every position is a real token
        return packed.view(batch, seq, heads, head_dim).to(query.dtype), None
    out = query.new_zeros(batch * seq, heads, head_dim)
    out.index_copy_(0, plan.flat, packed.view(-1, heads, head_dim).to(out.dtype))
    if window is not None:
        attention_mask = _windowed(attention_mask, batch, seq, window, query.device)
    _masked_queries(out, query, key, value, plan.keep, attention_mask, scale)
    return out.view(batch, seq, heads, head_dim), None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one batch packs: which positions are keys, and the varlen offsets."""

    keep: torch.Tensor  # (B, S) bool: may be attended to
    flat: torch.Tensor | None  # (T,) flat positions of the kept tokens; None when all are kept
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int


# Every layer of a forward pass gets the same mask tensor: its plan (or its verdict None, for masks the
# fast path cannot take) is worked out once, with the device syncs that costs, and reused while the
# mask is the same unmodified object. ``fastenc_mask`` (once per forward pass) starts afresh.
_LAST_PLAN: tuple = (None, None, None, None)  # (mask, its version counter, (B, S, device), plan or None)


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _plan(module, query, key, value, mask, dropout, is_causal, kwargs) -> _Plan | None:
    """The packing plan when the fast path applies (see the module docstring), else None."""
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        return None  # cross-attention, grouped KV heads, a cache longer than the queries
    if dropout or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return None
    if any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "sliding_window", "cache",
                                                     "s_aux", "sinks")):
        return None
    if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
        return None
    batch, _, seq, _ = query.shape
    device = query.device
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and seq > 1:
            return None
        cu_seqlens = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
        return _Plan(torch.ones(batch, seq, dtype=torch.bool, device=device), None, cu_seqlens, seq)
    global _LAST_PLAN
    where = (batch, seq, device)
    cached_mask, version, cached_where, plan = _LAST_PLAN
    if cached_mask is mask and version == _version(mask) and cached_where == where:
        return plan
    keep = _key_padding(mask, batch, seq)
    plan = None
    if keep is not None:
        keep = keep.to(device).expand(batch, seq)
        lengths = keep.sum(1, dtype=torch.int32)  # (B,)
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        flat = None if bool(keep.all()) else keep.reshape(-1).nonzero().squeeze(1)
        plan = _Plan(keep, flat, cu_seqlens, int(lengths.max()) if batch else 0)
    _LAST_PLAN = (mask, _version(mask), where, plan)
    return plan


def _key_padding(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """The ``(B or 1, S)`` bool "may attend to this key" mask, or None when ``mask`` says more than that."""
    if mask.dim() == 2:
        if mask.shape[-1] != seq or mask.shape[0] not in (1, batch):
            return None
        return mask.bool()
    if mask.dim() != 4 or mask.shape[-1] != seq or mask.shape[-2] not in (1, seq) or mask.shape[0] not in (1, batch):
        return None
    row = mask[:, :1, :1, :]  # (B, 1, 1, S): the first query's row of the first head
    if not bool((mask == row).all()):
        return None  # the mask depends on the query or the head: not a padding mask
    if mask.dtype == torch.bool:
        return row[:, 0, 0, :]
    if not mask.is_floating_point():
        return None
    zero, blocked = row == 0, row <= torch.finfo(mask.dtype).min / 2
    if not bool((zero | blocked).all()):
        return None  # a real bias, not just "attend / do not attend"
    return zero[:, 0, 0, :]


def _masked_queries(out: torch.Tensor, query, key, value, keep: torch.Tensor, mask, scale: float) -> None:
    """Rows at masked positions, exactly as sdpa computes them (against the row's own mask)."""
    batch, heads, seq, head_dim = query.shape
    missing = (~keep).sum(1)  # (B,) masked query positions per row
    width = int(missing.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, :width]  # masked positions first
    valid = torch.arange(width, device=query.device)[None, :] < missing[:, None]  # (B, P)
    rows = query.gather(2, order[:, None, :, None].expand(batch, heads, width, head_dim))  # (B, H, P, D)
    if mask is None:
        row_mask = None
    elif mask.dim() == 2:
        row_mask = mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
    elif mask.shape[-2] == seq and not bool((mask == mask[:, :, :1, :]).all()):  # query-dependent (a window)
        row_mask = mask.to(query.device).expand(batch, mask.shape[1], seq, seq).gather(
            2, order[:, None, :, None].expand(batch, mask.shape[1], width, seq))  # (B, 1, P, S): each row's own
    else:
        row_mask = mask[:, :, :1, :].to(query.device)  # broadcasts over the P rows
    result = F.scaled_dot_product_attention(rows, key, value, attn_mask=row_mask, scale=scale)  # (B, H, P, D)
    flat = (torch.arange(batch, device=query.device)[:, None] * seq + order)[valid]
    out.index_copy_(0, flat, result.transpose(1, 2)[valid].to(out.dtype))


_OPS: dict[str, ModuleType | None] = {}


def _ops_for(query: torch.Tensor) -> ModuleType | None:
    """The ops backend for the query's device (Triton on CUDA, the reference on the CPU), None to use sdpa."""
    from .. import reference
    from ..model import resolve_backend
    from ..errors import BackendError

    device = query.device
    if device.type not in _OPS:
        try:
            _OPS[device.type] = resolve_backend(None, device)[1]
        except BackendError:
            _OPS[device.type] = reference if device.type == "cpu" else None
    ops = _OPS[device.type]
    if ops is not None and ops is not reference and not 16 <= query.shape[-1] <= 128:
        return None  # head_dim outside what the flash kernel supports
    return ops
