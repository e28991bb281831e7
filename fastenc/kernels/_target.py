"""Where the kernels run: the Triton interpreter, a CUDA GPU of some architecture, or a compile-only target.

The launchers choose block configs from the architecture (``arch``: the compute capability as an integer,
90 for an H100), never from the token count, so a given GPU always runs the same kernels (batch
invariance) and no autotuning happens on a user's first call. The interpreter and the CPU use the H100's
configs, so the tests exercise the configs the benchmarks time.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

# @triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when the kernel modules are
# imported (they import this module first), so read it once here, at the same moment.
INTERPRETED = bool(triton.knobs.runtime.interpret)

DEFAULT_ARCH = 90  # the configs the interpreter runs: the H100's

# Largest dynamic shared memory one block may use, in bytes (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"); Triton refuses a launch above it.
SHARED_MEMORY = {
    75: 64 * 1024,  # T4
    80: 163 * 1024,  # A100, A30
    86: 99 * 1024,  # A10, A40, RTX 30xx
    87: 163 * 1024,  # Jetson Orin
    89: 99 * 1024,  # L4, L40, RTX 40xx
    90: 227 * 1024,  # H100, H200, GH200
    100: 227 * 1024,  # B200
    120: 99 * 1024,  # RTX 50xx
}

# Compile options every launch passes. FMA contraction is pinned on (Triton 3.9's default, which 3.10
# turns off) so that an upgrade of Triton cannot change the kernels' rounding unannounced.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_compiling_for: int | None = None


def shared_memory_limit(arch: int) -> int:
    """The per-block shared memory limit of ``sm_<arch>`` (an unknown one gets its nearest older kind's)."""
    known = [a for a in SHARED_MEMORY if a <= arch]
    return SHARED_MEMORY[max(known)] if known else min(SHARED_MEMORY.values())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """The architecture whose configs a launch on ``device`` uses."""
    if _compiling_for is not None:
        return _compiling_for
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_ARCH


def compiling() -> bool:
    """Whether a compile-only target (``fastenc.kernels.aot.compile_only``) is active."""
    return _compiling_for is not None


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within the block, launches take CPU tensors and use ``sm_<arch>``'s configs (see ``aot``)."""
    global _compiling_for
    previous, _compiling_for = _compiling_for, arch
    try:
        yield
    finally:
        _compiling_for = previous
