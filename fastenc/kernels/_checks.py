"""Argument checks shared by the Triton launchers.

A launcher checks everything a kernel takes for granted (rank, shape, dtype, device, unit inner stride)
and raises a ``ValueError`` naming the argument, so that a caller never meets a Triton crash or a
silent out-of-bounds read. Environment problems (a CPU tensor without the Triton interpreter, a device
Triton cannot drive) raise ``fastenc.errors.BackendError``.
"""

from __future__ import annotations

import contextlib

import torch

from fastenc.errors import BackendError
from fastenc.kernels import _target
from fastenc.reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_backend(name: str, tensor: torch.Tensor) -> torch.device:
    """Return the device of the launch's leading tensor, or raise ``BackendError`` if Triton cannot run there."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    device = tensor.device
    if device.type == "cuda":
        return device
    if device.type == "cpu":
        if _target.INTERPRETED or _target.compiling():
            return device
        raise BackendError(
            f"{name} is on the CPU: the Triton kernels need CUDA tensors, or the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported) to run on the CPU"
        )
    raise BackendError(f"{name} is on {device}: the Triton kernels run on CUDA devices (or the CPU interpreter)")


def on_device(device: torch.device):
    """Launch under ``device``: Triton launches on the current CUDA device and its current stream, so an
    encoder on ``cuda:1`` while device 0 is current would otherwise launch on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    shape: tuple[int | None, ...],
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> None:
    """Check one argument: its rank and sizes (``None`` matches any size), dtype, device, unit inner stride."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    expected = "(" + ", ".join("*" if size is None else str(size) for size in shape) + ")"
    sizes_ok = all(size is None or size == actual for size, actual in zip(shape, tensor.shape))
    if tensor.dim() != len(shape) or not sizes_ok:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(dtype) for dtype in dtypes)
        raise ValueError(f"{name} has dtype {tensor.dtype}; expected one of {allowed}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, but the other arguments are on {device}")
    # The kernels address rows through strides but assume the last dimension is packed.
    if tensor.dim() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {tensor.stride()}")


def check_activation(name: str, activation: str | None) -> str:
    """Return the kernels' constexpr spelling of a canonical activation (``"none"`` for ``None``)."""
    if activation is None:
        return "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS} or None, got {activation!r}")
    return activation
