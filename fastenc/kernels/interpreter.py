"""A witness that cannot lie about batch invariance: an exact, position-independent ``tl.dot`` for the
Triton interpreter, and round-to-nearest bf16 casts.

Why this exists (measured 2026-11 with numpy's OpenBLAS 0.3.31, Triton 3.6 and 3.9): under the
interpreter, ``tl.dot`` is ``np.matmul``, i.e. the host's BLAS, and a BLAS computes a row's dot
products differently depending on where the row sits in the tile (register blocking, vector tails).
With OpenBLAS's Haswell (AVX2) kernels, one fp32 row times the same (32, 16..128) matrix inside a
block of 16 to 128 rows gives results that differ by up to 4.8e-6 depending only on its row index
(rows 0-5 of a 16-row block agree, row 6 on does not); the AVX2-only EPYC of the issue that asked for
this saw up to 7.6e-6. fp16 operands go the same way (``np.matmul(..., dtype=float32)``). So under the
stock interpreter a test that a text's hidden states are bitwise the same alone and inside a batch
passes or fails with the host's BLAS, not with the kernels: three such tests fail with
``OPENBLAS_CORETYPE=Haswell`` and pass with the SkylakeX kernels, on the same machine. On a GPU the
question does not arise in this form: a tensor-core or FMA dot gives every row of a tile the same
instruction sequence.

``install()`` replaces, for the interpreter only, methods of Triton's ``InterpreterBuilder``:

* ``create_dot``: every output element is ``d + sum_k a[m, k] * b[k, n]``, accumulated in float64
  in increasing ``k``, rounded once to the accumulator's dtype. Products of fp32, fp16 and bf16 values
  are exact in float64, and the sum is formed the same way for every ``(m, n)``, so an element depends
  only on its own row of ``a`` and column of ``b``, never on its position or on the other rows. It is
  also at least as accurate as a GPU's fp32 accumulation (it bounds the kernels' error from below,
  which is what a tolerance test against a float64 reference wants). No BLAS is involved.
* ``cast_impl`` between fp32 and bf16: the stock interpreter converts bf16 operands of ``tl.dot``
  as integers (bf16 is stored as ``uint16`` there, so its bf16 ``tl.dot`` gives wrong numbers) and
  casts fp32 to bf16 by truncation; a GPU's ``cvt.rn.bf16.f32`` rounds to nearest even. Here bf16 ->
  fp32 is the exact bit shift and fp32 -> bf16 rounds to nearest even (NaN stays NaN), so the bf16
  kernels can be tested on the CPU.

What the witness still cannot show: the GPU's own arithmetic (approximate ``exp2`` and fp32 division,
FMA contraction, the tensor cores' accumulation order). Those are checked on a GPU by the CUDA-marked
tests; bitwise claims made under the interpreter are claims about the kernels' data flow (which rows
a result reads, no split reductions, no block size chosen from the token count).

FP8 (e4m3, ``tl.float8e4nv``, stored as ``uint8`` bits): the stock interpreter widens e4m3 dot operands to
fp16 and hands them to the BLAS (position-dependent, as above), and converts to e4m3 by bit surgery that
rounds ties away from zero, drops the carry of a rounded-up mantissa into the exponent and does not
saturate. Here the dot decodes e4m3 exactly (a 256-entry table of torch's own ``float8_e4m3fn`` values)
into the exact float64 dot, and conversions to and from e4m3 go through torch: to e4m3, the values are
clamped to +-448 (a GPU's ``cvt.rn.satfinite``; NaN stays NaN) and rounded to nearest even.

A fourth, smaller repair: Triton 3.6's interpreter turns a scalar into a Python int with
``int(array)``, which numpy 2.4 refuses for the 1-element arrays the interpreter holds ("only
0-dimensional arrays can be converted to Python scalars", raised by every ``range(0, K, BLOCK_K)``);
Triton 3.9 squeezes the array first, and so does the ``__index__`` installed here, on any version.

Idempotent; ``uninstall()`` restores Triton's methods. ``fastenc.kernels`` installs it when it is imported
with the interpreter on, so every process that runs fastenc's kernels on the CPU computes the same bits
(the tests, a server they start in a subprocess, the GPU check's dry run); other Triton kernels of the
same process get the exact dot too.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - every Triton this project supports has it
    _interp = None

_ORIGINAL: dict[str, object] = {}

# numpy views of the floating-point operands a tl.dot can see (bf16 is stored as uint16 bits).
_NUMPY_FLOATS = {tl.float16: np.float16, tl.float32: np.float32, tl.float64: np.float64}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 bits -> the same values as float32 (exact: bf16 is fp32's top half)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 uint16 bits, rounded to nearest even as ``cvt.rn.bf16.f32`` does; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):  # NaN bit patterns may wrap; they are replaced below
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)  # quiet NaN, sign kept
    return rounded.astype(np.uint16)


# e4m3's 256 bit patterns -> their values (448 at most; 0x7F and 0xFF are NaN).
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double().numpy()
_E4M3_MAX = 448.0


def e4m3_bits_to_float64(bits: np.ndarray) -> np.ndarray:
    """e4m3 stored as uint8 bits -> the same values as float64 (exact)."""
    return _E4M3_VALUES[np.asarray(bits, dtype=np.uint8)]


def float32_to_e4m3_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> e4m3 uint8 bits, as ``cvt.rn.satfinite.e4m3x2.f32``: clamped to +-448, nearest even, NaN kept."""
    values = torch.from_numpy(np.array(values, dtype=np.float32, copy=True, ndmin=1))
    codes = values.clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes.reshape(np.shape(values))


def _as_float64(handle) -> np.ndarray | None:
    """A dot operand's values as float64, or None for operand types this dot leaves to Triton."""
    scalar = handle.dtype.scalar
    if scalar == tl.float8e4nv:
        return e4m3_bits_to_float64(handle.data)
    if scalar == tl.bfloat16:
        return bf16_bits_to_float32(handle.data).astype(np.float64)
    if scalar in _NUMPY_FLOATS:
        return np.asarray(handle.data, dtype=np.float64)
    return None


def exact_dot(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``d + a @ b`` per element in float64, ``k`` in increasing order: no BLAS, no position dependence.

    ``a`` is ``(..., M, K)``, ``b`` ``(..., K, N)``, ``d`` ``(..., M, N)``, all float64.
    """
    acc = np.array(d, dtype=np.float64, copy=True)
    product = np.empty(np.broadcast_shapes(a[..., :, :1].shape, b[..., :1, :].shape), dtype=np.float64)
    for k in range(a.shape[-1]):
        np.multiply(a[..., :, k : k + 1], b[..., k : k + 1, :], out=product)
        acc += product
    return acc


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    a64, b64 = _as_float64(a), _as_float64(b)
    acc_scalar = d.dtype.scalar
    if a64 is None or b64 is None or acc_scalar not in _NUMPY_FLOATS:  # integer / other fp8 dots: Triton's own
        return _ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
    out = exact_dot(a64, b64, np.asarray(d.data, dtype=np.float64))
    return _interp.TensorHandle(out.astype(_NUMPY_FLOATS[acc_scalar]), acc_scalar)


def _cast_impl(self, src, dst_type):
    source, target = src.dtype.scalar, dst_type.scalar
    if source == tl.bfloat16 and target == tl.float32:
        return _interp.TensorHandle(bf16_bits_to_float32(src.data), tl.float32)
    if source == tl.float32 and target == tl.bfloat16:
        return _interp.TensorHandle(float32_to_bf16_bits(src.data), tl.bfloat16)
    return _ORIGINAL["cast_impl"](self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    source, target = src.dtype.scalar, dst_type.scalar
    if target == tl.float8e4nv and source in (tl.float32, tl.float16, tl.bfloat16):
        if rounding_mode not in (None, _interp._ir.ROUNDING_MODE.RTNE):
            raise NotImplementedError(f"e4m3 conversions under the interpreter round to nearest even only, not "
                                      f"{rounding_mode}")
        values = bf16_bits_to_float32(src.data) if source == tl.bfloat16 else np.asarray(src.data, dtype=np.float32)
        return _interp.TensorHandle(float32_to_e4m3_bits(values).reshape(np.shape(src.data)), tl.float8e4nv)
    if source == tl.float8e4nv and target in (tl.float32, tl.float16, tl.bfloat16):
        values = e4m3_bits_to_float64(src.data).astype(np.float32)  # exact: e4m3 fits every target
        if target == tl.bfloat16:
            return _interp.TensorHandle(float32_to_bf16_bits(values), tl.bfloat16)
        return _interp.TensorHandle(values.astype(_NUMPY_FLOATS[target]), target)
    return _ORIGINAL["create_fp_to_fp"](self, src, dst_type, rounding_mode)


def _patch_lang_tensor(tensor, scope):
    _ORIGINAL["_patch_lang_tensor"](tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))


def installed() -> bool:
    return bool(_ORIGINAL)


def install() -> None:
    """Use the exact, position-independent dot and round-to-nearest bf16 casts in the interpreter."""
    if _interp is None or installed():
        return
    builder = _interp.InterpreterBuilder
    _ORIGINAL["create_dot"] = builder.create_dot
    _ORIGINAL["cast_impl"] = builder.cast_impl
    _ORIGINAL["create_fp_to_fp"] = builder.create_fp_to_fp
    builder.create_dot = _create_dot
    builder.cast_impl = _cast_impl
    builder.create_fp_to_fp = _create_fp_to_fp
    if hasattr(_interp, "_patch_lang_tensor"):
        _ORIGINAL["_patch_lang_tensor"] = _interp._patch_lang_tensor
        _interp._patch_lang_tensor = _patch_lang_tensor


def uninstall() -> None:
    """Restore Triton's own interpreter methods."""
    if not installed():
        return
    builder = _interp.InterpreterBuilder
    builder.create_dot = _ORIGINAL.pop("create_dot")
    builder.cast_impl = _ORIGINAL.pop("cast_impl")
    builder.create_fp_to_fp = _ORIGINAL.pop("create_fp_to_fp")
    if "_patch_lang_tensor" in _ORIGINAL:
        _interp._patch_lang_tensor = _ORIGINAL.pop("_patch_lang_tensor")
