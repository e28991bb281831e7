"""FP8 encoders: e4m3 GEMMs with per-channel weight scales and per-token activation scales.

``dtype="fp8"`` at load gives an encoder whose four GEMMs per layer (the fused QKV projection, attention's
output projection, the feed-forward's two) run on ``float8_e4m3fn`` operands with float32 accumulation;
embeddings, norms, attention, pooling and the task heads stay in 16 bits (``ACTIVATION_DTYPE``), and so do
the hidden states the encoder returns. The pieces:

* ``quantize_weights``: at load, each GEMM weight becomes an ``Fp8Weight``: e4m3 codes and one float32
  scale per output channel (``fastenc.reference.quantize_rows`` of the weight's rows), quantized from the
  checkpoint's values read in float32. Everything else is cast to the activation dtype as usual.
* ``QuantizedRows``: a 16-bit activation that carries its own e4m3 codes and one scale per token, as the
  LayerNorm kernels write them in the same pass (``add_layer_norm_fp8``, ``layer_norm_fp8``). It is the
  16-bit tensor for every op that reads one (the residual stream, attention, the heads); the FP8 GEMMs read
  its codes.
* ``Fp8Ops``: the ops backend of such an encoder, over ``fastenc.reference`` or ``fastenc.kernels``. Its
  GEMMs on an ``Fp8Weight`` call the ``*_fp8`` ops, handing them the codes of a ``QuantizedRows`` input, or a
  16-bit input that the GEMM quantizes per token itself (attention's output, the GELU output, an input
  that a family's own norm wrote); its LayerNorms return ``QuantizedRows``; every other op is the base
  backend's. ``Model.forward`` is the same pass as for any dtype.

Per-token and per-channel scales keep a token's result a function of that token alone: bitwise the same
alone or in any batch on the Triton backend, as in 16 bits.

Where it runs: on CUDA, the Triton backend needs FP8 tensor cores (sm_89 or sm_90 and later); anything
older gets a ``BackendError`` naming what is needed. The torch backend (the CPU's default) is an exact
emulation of the FP8 path: the same e4m3 codes and scales, the products of e4m3 values exact in float32
matmuls. It is slow (float32 GEMMs plus the quantization) and meant for checking a model's quality in FP8
before deploying it; ``benchmarks/fp8_quality.py`` measures it against float32.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from types import ModuleType

import torch

from . import reference
from .errors import BackendError

NAMES = ("fp8", "float8_e4m3fn")
ACTIVATION_DTYPE = torch.float16  # the hidden states, norms, attention and heads of an FP8 encoder
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) on
# The GEMM weights of a layer, as fastenc names them (fastenc.checkpoint); embeddings and heads stay 16-bit.
GEMM_WEIGHT = re.compile(r"layers\.\d+\.(qkv|attn_out|ffn_in|ffn_out)\.weight")


def requested(dtype) -> bool:
    """Whether a ``dtype`` argument asks for FP8: ``"fp8"``, ``"float8_e4m3fn"`` or ``torch.float8_e4m3fn``."""
    if isinstance(dtype, str):
        return dtype.lower() in NAMES
    return dtype == torch.float8_e4m3fn


def check_device(device: torch.device, backend: str) -> None:
    """Refuse FP8 where it cannot run, and say that the CPU's emulation is slow."""
    if device.type == "cuda" and backend == "triton":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            major, minor = capability
            raise BackendError(
                f"dtype='fp8' needs a GPU with FP8 tensor cores (sm_89: L4, L40, RTX 40xx; sm_90: H100, H200); "
                f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: use dtype='fp16' or 'bf16' there, or "
                "backend='torch' for the (slow) emulation")
    elif backend == "torch":
        warnings.warn("dtype='fp8' on the torch backend is an exact emulation of the FP8 path (e4m3 codes and scales, "
                      "products in float32 GEMMs): slow, meant for checking a model's quality before deploying it on a "
                      "GPU with FP8 tensor cores", stacklevel=3)


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A GEMM weight quantized per output channel: ``weight ≈ codes * scales[:, None]``."""

    codes: torch.Tensor  # (out, in) float8_e4m3fn
    scales: torch.Tensor  # (out,) float32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Fp8Weight":
        codes, scales = reference.quantize_rows(weight)
        return cls(codes.contiguous(), scales.contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scales[:, None]).to(dtype)


def quantize_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                     keep: frozenset[str] | set[str] = frozenset()) -> dict:
    """The encoder's tensors for an FP8 model: each layer GEMM weight (``GEMM_WEIGHT``) not named in ``keep``
    as an ``Fp8Weight``, every other floating-point tensor cast to ``dtype`` (a kept weight stays a 16-bit
    GEMM: the backend's own op runs it). ``tensors`` are best read in float32, so that a weight is rounded
    once, to e4m3."""
    out = {}
    for name, tensor in tensors.items():
        if GEMM_WEIGHT.fullmatch(name) and name not in keep:
            out[name] = Fp8Weight.quantize(tensor)
        else:
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


class QuantizedRows(torch.Tensor):
    """A ``(tokens, features)`` activation with its FP8 form attached: ``codes`` (e4m3, same shape) and
    ``scales`` (``(tokens,)`` float32), ``quantize_rows`` of this very tensor.

    It is the 16-bit tensor to everything else. Torch operations on it return plain tensors (a result is
    not described by these codes), so the codes can only reach a GEMM together with the values they encode.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def wrap(cls, value: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> "QuantizedRows":
        rows = value.as_subclass(cls)
        rows.codes, rows.scales = codes, scales
        return rows


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A GEMM's ``(x, x_scale)``: the codes of a ``QuantizedRows``, else the 16-bit rows (quantized by the GEMM)."""
    if isinstance(x, QuantizedRows):
        return x.codes, x.scales
    return x, None


class Fp8Ops:
    """The ops backend of an FP8 encoder over ``base`` (``fastenc.reference`` or ``fastenc.kernels``): see the
    module docstring. ``dtype`` is the activations' (16-bit) dtype; names it does not define are ``base``'s."""

    def __init__(self, base: ModuleType, dtype: torch.dtype = ACTIVATION_DTYPE):
        self.base = base
        self.dtype = dtype

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"Fp8Ops({self.base.__name__}, activations={self.dtype})"

    def layer_norm(self, x, weight, bias, eps):
        return QuantizedRows.wrap(*self.base.layer_norm_fp8(x, weight, bias, eps))

    def add_layer_norm(self, x, residual, weight, bias, eps):
        return QuantizedRows.wrap(*self.base.add_layer_norm_fp8(x, residual, weight, bias, eps))

    def linear(self, x, weight, bias, activation=None, residual=None):
        if not isinstance(weight, Fp8Weight):
            return self.base.linear(x, weight, bias, activation, residual)
        return self.base.linear_fp8(*_operand(x), weight.codes, weight.scales, bias, activation, residual,
                                    out_dtype=self.dtype)

    def gated_linear(self, x, weight, bias, activation):
        if not isinstance(weight, Fp8Weight):
            return self.base.gated_linear(x, weight, bias, activation)
        return self.base.gated_linear_fp8(*_operand(x), weight.codes, weight.scales, bias, activation,
                                          out_dtype=self.dtype)

    def fused_qkv(self, x, weight, bias, num_heads, positions=None, rope=None, **kwargs):
        if not isinstance(weight, Fp8Weight):
            return self.base.fused_qkv(x, weight, bias, num_heads, positions, rope, **kwargs)
        return self.base.fused_qkv_fp8(*_operand(x), weight.codes, weight.scales, bias, num_heads, positions, rope,
                                       out_dtype=self.dtype, **kwargs)
