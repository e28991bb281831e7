"""Compile the Triton kernels for a GPU architecture on a machine that has no GPU.

Triton's compiler, and the ``ptxas`` its wheel ships, need no GPU: only loading and launching a kernel
do. ``compile_only(arch)`` makes Triton's active driver one that targets ``sm_<arch>`` and, at launch,
records the compiled kernel instead of running it. The real launchers, called with CPU tensors of real
shapes, then build exactly the kernels a GPU of that architecture would run: the same constexprs and
block configs, the same specialisation of pointer and integer arguments (divisibility by 16), the same
``num_warps`` and ``num_stages``. Nothing is computed: the outputs stay uninitialised.

For each build, ``CompileOnlyDriver.builds`` reads from the cubin what decides whether a kernel runs,
and how well: dynamic shared memory against the architecture's limit (Triton refuses the launch above
it), registers per thread, bytes spilled to local memory, the tensor-core instruction in the SASS
(``wgmma`` = HGMMA on sm_90, QGMMA with e4m3 operands; ``mma`` = HMMA on sm_8x, QMMA with e4m3
operands; ``none``: CUDA cores) and asynchronous copies
(LDGSTS or TMA: the software-pipelined loads), read with the ``cuobjdump`` that Triton ships; and for
each GEMM the tiles (programs) it launches for a 128-token batch, which decide how much of the GPU a
small batch can use. The command compiles one forward per model shape (``fastenc.bench.compile``, where
the model lives) or, with ``--sweep``, the kernels width by width (here):

    python -m fastenc.kernels.aot [--arch 90,80,86] [--dtype fp16,bf16] [--models bert-base,minilm]
                                  [--markdown FILE] [--json FILE]
    python -m fastenc.kernels.aot --sweep [--positional | --decoder] [--arch 90,86] [--dtype fp16,bf16,fp32] [...]

The decoder backbones (``--models qwen3-0.6b,qwen2-1.5b,mistral-7b,embeddinggemma-300m,gemma3-1b``) are
compiled op by op, one layer of each with the constexprs its family needs (``decoder_forward``).

``--sweep`` compiles, instead of model forwards, the kernels whose configs depend on a width: attention
at every head dim from 16 to 256 (powers of two and the masked ones users run: 24, 40, 48, 80, 96),
the row kernels (LayerNorms, embeddings) at widths from 96 to the largest supported, and the MaxSim
kernel at the multi-vector dims of ColBERT models (48, 96, 128) and BGE-M3 (1024); with
``--positional`` the windowed and relative-bias attention instead, with ``--decoder`` the causal
attention (plain and windowed), the fused QKV with QK-norm and the RMSNorms. ``problems``
lists every build that would fail or slow down on a GPU: over the shared memory limit, or spilling
registers; the command exits non-zero when there is any, so a config change that regresses fails
its test. ``tight`` lists the builds that use all 255 registers without spilling (one change away
from it): reported, not failed.

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as triton_driver

from fastenc.kernels import _target

DECODERS = {
    "qwen3-0.6b": dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, qk_norm=True),
    "qwen2-1.5b": dict(hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, qkv_bias=True),
    "mistral-7b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
    "embeddinggemma-300m": dict(hidden=768, heads=3, kv_heads=1, head_dim=256, intermediate=1152, qk_norm=True,
                                gemma=True, window=256, bidirectional=True),
    "gemma3-1b": dict(hidden=1152, heads=4, kv_heads=1, head_dim=256, intermediate=6912, qk_norm=True, gemma=True,
                      window=511),
}
# fp8: the FP8 encoder (``fastenc.fp8``): e4m3 GEMMs, fp16 activations; compiled for sm_89 and newer only.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
FP8_MIN_ARCH = 89
# Lengths of the packed batches each model is run on: a full 32 x 128 batch (4096 tokens, divisible by
# 16) and a ragged one (263 tokens): Triton specialises integer arguments on divisibility by 16.
BATCHES = ([128] * 32, [7, 128, 1, 127])
SPLADE_VOCAB = 30522  # BERT's vocabulary, for the SPLADE kernel


@dataclasses.dataclass
class KernelBuild:
    """One compiled kernel and what its cubin says."""

    kernel: str
    shape: str  # the launch's sizes that choose the config (K, N, head dim, row width) and activation
    arch: int
    dtype: str
    model: str
    config: dict  # the block constexprs, num_warps, num_stages
    shared: int  # dynamic shared memory, bytes
    shared_limit: int  # the architecture's per-block limit, bytes
    registers: int  # per thread
    spilled: int  # bytes of stack and local memory per thread (register spills)
    tensor_cores: str  # "wgmma" (HGMMA), "mma" (HMMA) or "none"
    async_copies: bool  # cp.async (LDGSTS) or TMA (UTMALDG) loads: the software pipeline is there
    tiles_128: int | None = None  # a GEMM's output tiles (programs) for a batch of 128 tokens

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit


def read_cubin(cubin: bytes) -> dict:
    """Registers, spilled bytes, tensor-core and async-copy instructions of a cubin, from ``cuobjdump``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage, sass = (subprocess.run([str(tool), flag, file.name], capture_output=True, text=True, check=True).stdout
                       for flag in ("-res-usage", "-sass"))
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage}")
    registers, stack, local = map(int, match.groups())
    # HGMMA / QGMMA: 16-bit / e4m3 wgmma (sm_90); HMMA / QMMA: 16-bit / e4m3 mma (sm_8x)
    tensor_cores = ("wgmma" if re.search(r"\b[HQ]GMMA", sass) else "mma" if re.search(r"\b[HQ]MMA", sass)
                    else "none")
    return dict(registers=registers, spilled=stack + local, tensor_cores=tensor_cores,
                async_copies="LDGSTS" in sass or "UTMALDG" in sass)


class _Utils:
    """Device properties of ``sm_<arch>``; "loading" a binary reads its cubin instead."""

    def __init__(self, arch: int):
        self.arch = arch
        self.cubins: list[dict] = []  # the function handle is an index into this list

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": _target.shared_memory_limit(self.arch), "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        self.cubins.append(read_cubin(cubin))
        info = self.cubins[-1]
        return None, len(self.cubins) - 1, info["registers"], info["spilled"], 1024


class _Recorder:
    """Stands in for Triton's kernel launcher: records the kernel and its arguments."""

    def __init__(self, src, metadata, launches: list):
        self.src, self.metadata, self.launches = src, metadata, launches

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        arguments = dict(zip(self.src.fn.arg_names, args))
        self.launches.append((self, function, arguments))


class CompileOnlyDriver(DriverBase):
    """A Triton driver that compiles for ``sm_<arch>`` and never touches a GPU."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _Utils(arch)
        self.launches: list = []
        self.launcher_cls = lambda src, metadata: _Recorder(src, metadata, self.launches)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    # Triton caches compiled kernels per device: one "device" per architecture keeps them apart.
    def get_current_device(self) -> int:
        return 1000 + self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("the compile-only driver has no device")

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver cannot time kernels")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("the compile-only driver builds no launcher")

    def builds(self, dtype: str, model: str) -> list[KernelBuild]:
        """One KernelBuild per distinct kernel launched so far (then forget the launches)."""
        out = []
        for recorder, function, arguments in self.launches:
            config = {name: value for name, value in arguments.items() if name in CONFIG_KEYS}
            config.update(num_warps=recorder.metadata.num_warps, num_stages=recorder.metadata.num_stages)
            shape = " ".join([f"{name}={arguments[name]}" for name in SHAPE_KEYS
                              if arguments.get(name, "none") != "none"]
                             + [f"{name}={arguments[name]}" for name, default in FLAG_DEFAULTS.items()
                                if arguments.get(name, default) != default])
            kernel = recorder.src.fn.__name__.strip("_").removesuffix("_kernel")
            build = KernelBuild(kernel=kernel, shape=shape, arch=self.arch, dtype=dtype, model=model, config=config,
                                shared=recorder.metadata.shared, shared_limit=_target.shared_memory_limit(self.arch),
                                tiles_128=_tiles_128(kernel, arguments, config), **self.utils.cubins[function])
            if build not in out:  # the same build for another token count
                out.append(build)
        self.launches.clear()
        return out


def _tiles_128(kernel: str, arguments: dict, config: dict) -> int | None:
    """A GEMM kernel's tiles for 128 tokens (``gated_linear``'s N counts output features: its tiles span the
    weight's 2 N rows); None for the other kernels."""
    if kernel not in GEMM_KERNELS:
        return None
    from fastenc.kernels.gemm import SMALL_BATCH_TOKENS, tiles_at

    rows = 2 * arguments["N"] if kernel == "gated_linear" else arguments["N"]
    return tiles_at(SMALL_BATCH_TOKENS, rows, config["BLOCK_M"], config["BLOCK_N"])


GEMM_KERNELS = ("linear", "gated_linear", "fused_qkv")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_Q", "BLOCK", "GROUP_M", "REL_W")
SHAPE_KEYS = ("K", "N", "HEAD_DIM", "n_cols", "ACTIVATION", "POOLING")
# The families' constexpr flags, shown with the shape where they differ from BERT's kernels.
FLAG_DEFAULTS = {"HAS_BIAS": True, "HAS_POSITIONS": True, "HAS_RESIDUAL": False, "ROPE": False, "WINDOW": False,
                 "REL_BIAS": False, "CAUSAL": False, "QK_NORM": False, "HAS_NORM": True, "HAS_SCALE": False,
                 "OFFSET": False, "C2P": False, "P2C": False, "FP8": False, "QUANTIZE_X": False, "QUANTIZE": False}


@contextlib.contextmanager
def compile_only(arch: int):
    """Within the block, the Triton launchers compile for ``sm_<arch>`` and record instead of running."""
    if _target.INTERPRETED:
        raise RuntimeError("compile_only needs the Triton compiler: run it without TRITON_INTERPRET")
    driver = CompileOnlyDriver(arch)
    # Restore the driver that was set, not reset_active(): without a GPU that would build the default
    # CUDA driver, which fails.
    previous = triton_driver._active
    triton_driver.set_active(driver)
    try:
        with _target.compiling_for(arch):
            yield driver
    finally:
        triton_driver._active = previous


def decoder_forward(model: str, dtype: torch.dtype, lengths: list[int]) -> None:
    """Launch, over uninitialised CPU tensors, the ops of one decoder layer of ``model``'s shape: the
    embeddings, the pre-attention norm, the fused QKV (grouped-query heads, RoPE, QK-norm, a Q scale),
    causal attention (and windowed, bidirectional or causal, for Gemma3's local layers), the output
    projection, the gated feed-forward and the norms, as the families' forward calls them."""
    from fastenc import kernels

    m = DECODERS[model]
    hidden, heads, kv_heads, head_dim = m["hidden"], m["heads"], m["kv_heads"], m["head_dim"]
    tokens = sum(lengths)
    cu_seqlens = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    positions = torch.zeros(tokens, dtype=torch.long)
    empty = functools.partial(torch.empty, dtype=dtype)
    offset = 1.0 if m.get("gemma") else 0.0
    x = kernels.embeddings(torch.zeros(tokens, dtype=torch.long), None, None, empty(1024, hidden), None, None, None,
                           None, 0.0, hidden**0.5 if m.get("gemma") else None)
    h = kernels.rms_norm(x, empty(hidden), 1e-6, offset)
    slabs = heads + 2 * kv_heads
    norms = dict(q_norm=empty(head_dim), k_norm=empty(head_dim), norm_offset=offset) if m.get("qk_norm") else {}
    q, k, v = kernels.fused_qkv(h, empty(slabs * head_dim, hidden), empty(slabs * head_dim) if m.get("qkv_bias") else
                                None, heads, positions, torch.empty(1024, head_dim), num_kv_heads=kv_heads,
                                head_dim=head_dim, scale=256**-0.5 if m.get("gemma") else None, **norms)
    a = kernels.attention(q, k, v, cu_seqlens, max(lengths), causal=True)
    if "window" in m:
        kernels.attention(q, k, v, cu_seqlens, max(lengths), positions, m["window"], causal=not m.get("bidirectional"))
    if m.get("gemma"):  # sandwich blocks: post-norm, residual add, next pre-norm
        o = kernels.linear(a, empty(hidden, heads * head_dim), None)
        x, h = kernels.sandwich_rms_norm(o, x, empty(hidden), empty(hidden), 1e-6, offset)
        f = kernels.gated_linear(h, empty(2 * m["intermediate"], hidden), None, "gelu_tanh")
        x, h = kernels.sandwich_rms_norm(kernels.linear(f, empty(hidden, m["intermediate"]), None), x, empty(hidden),
                                         empty(hidden), 1e-6, offset)
    else:  # pre-norm blocks: the residual add in the GEMM epilogue, then the norm
        x = kernels.linear(a, empty(hidden, heads * head_dim), None, residual=x)
        h = kernels.rms_norm(x, empty(hidden), 1e-6, offset)
        f = kernels.gated_linear(h, empty(2 * m["intermediate"], hidden), None, "silu")
        kernels.linear(f, empty(hidden, m["intermediate"]), None, residual=x)


SWEEP_HEAD_DIMS = (16, 24, 32, 40, 48, 64, 80, 96, 128, 256)
SWEEP_WIDTHS = (96, 384, 768, 1024, 4096, 8192, 16384)
# Multi-vector dims: mxbai-edge-colbert (48), answerai-colbert-small (96), most ColBERT models (128), BGE-M3 (1024).
SWEEP_MAXSIM_DIMS = (48, 96, 128, 1024)
# The decoders' hidden sizes, on either side of row_config's block edges (2048, 8192): EmbeddingGemma, Qwen3,
# Qwen2-1.5B, Qwen3-1.7B, Qwen3-4B and Gemma3-4B, Qwen2-7B, Mistral-7B and Qwen3-8B, Gemma3-27B.
DECODER_WIDTHS = (96, 768, 1024, 1536, 2048, 2560, 3584, 4096, 5376, 8192, 16384)


def sweep_report(archs=(90, 86), dtypes=("fp16", "bf16", "fp32")) -> list[KernelBuild]:
    """Compile attention at every head dim, the row kernels at every width and MaxSim at every multi-vector
    dim, per architecture and dtype."""
    from fastenc import kernels
    from fastenc.kernels.layer_norm import MAX_HIDDEN

    lengths = [7, 128, 1, 127]  # ragged: masked query and key tails
    cu_seqlens = torch.tensor([0, 7, 135, 136, 263], dtype=torch.int32)
    tokens, builds = sum(lengths), []
    for arch in archs:
        for name in dtypes:
            dtype = DTYPES[name]
            with compile_only(arch) as driver:
                for head_dim in SWEEP_HEAD_DIMS:
                    q = torch.empty(2, tokens, head_dim, dtype=dtype)
                    kernels.attention(q, q, q, cu_seqlens, max(lengths))
                for width in (w for w in SWEEP_WIDTHS if w <= MAX_HIDDEN):
                    x, w = torch.empty(tokens, width, dtype=dtype), torch.empty(width, dtype=dtype)
                    ids = torch.zeros(tokens, dtype=torch.long)
                    kernels.add_layer_norm(x, x, w, w, 1e-12)
                    kernels.gelu_layer_norm(x, w, w, 1e-12, "gelu_tanh")
                    kernels.embeddings(ids, ids, ids, x, x, x, w, w, 1e-12)
                for dim in SWEEP_MAXSIM_DIMS:  # a 32-token query (ColBERT's) against the ragged documents
                    kernels.maxsim(torch.empty(32, dim, dtype=dtype), torch.empty(tokens, dim, dtype=dtype),
                                   cu_seqlens)
                builds.extend(driver.builds(name, "sweep"))
    return builds


def positional_sweep_report(archs=(90, 86), dtypes=("fp16", "bf16", "fp32"),
                            head_dims=SWEEP_HEAD_DIMS) -> list[KernelBuild]:
    """The windowed, the relative-bias and the disentangled attention (ModernBERT's local layers, MPNet,
    DeBERTa with c2p and p2c over 256 buckets) at every head dim."""
    from fastenc import kernels

    lengths = [7, 128, 1, 127]
    cu_seqlens = torch.tensor([0, 7, 135, 136, 263], dtype=torch.int32)
    tokens, builds = sum(lengths), []
    positions = torch.zeros(tokens, dtype=torch.long)
    bias = torch.empty(2, 2 * 514 - 1, dtype=torch.float32)
    rel_index = torch.zeros(2 * 512 - 1, dtype=torch.int32)
    for arch in archs:
        for name in dtypes:
            with compile_only(arch) as driver:
                for head_dim in head_dims:
                    q = torch.empty(2, tokens, head_dim, dtype=DTYPES[name])
                    kernels.attention(q, q, q, cu_seqlens, max(lengths), positions, 64)
                    kernels.attention(q, q, q, cu_seqlens, max(lengths), positions, None, bias)
                    tables = torch.empty(512, 2, head_dim, dtype=DTYPES[name])
                    kernels.attention(q, q, q, cu_seqlens, max(lengths), positions, rel_keys=tables,
                                      rel_queries=tables, rel_index=rel_index)
                builds.extend(driver.builds(name, "sweep"))
    return builds


def decoder_sweep_report(archs=(90, 86), dtypes=("fp16", "bf16", "fp32"), head_dims=SWEEP_HEAD_DIMS,
                         widths=DECODER_WIDTHS) -> list[KernelBuild]:
    """The decoders' kernels where their configs depend on a width: causal attention (plain and windowed,
    grouped-query) at every head dim, the fused QKV with QK-norm at every power-of-two head dim, and the
    RMSNorms (both forms) at every width."""
    from fastenc import kernels
    from fastenc.kernels.layer_norm import MAX_HIDDEN

    lengths = [7, 128, 1, 127]
    cu_seqlens = torch.tensor([0, 7, 135, 136, 263], dtype=torch.int32)
    tokens, builds = sum(lengths), []
    positions = torch.zeros(tokens, dtype=torch.long)
    for arch in archs:
        for name in dtypes:
            dtype = DTYPES[name]
            with compile_only(arch) as driver:
                for head_dim in head_dims:
                    q, kv = torch.empty(4, tokens, head_dim, dtype=dtype), torch.empty(2, tokens, head_dim, dtype=dtype)
                    kernels.attention(q, kv, kv, cu_seqlens, max(lengths), causal=True)
                    kernels.attention(q, kv, kv, cu_seqlens, max(lengths), positions, 64, causal=True)
                    if head_dim & (head_dim - 1) == 0:
                        x, n = torch.empty(tokens, 1024, dtype=dtype), torch.empty(head_dim, dtype=dtype)
                        kernels.fused_qkv(x, torch.empty(8 * head_dim, 1024, dtype=dtype), None, 4, positions,
                                          torch.empty(1024, head_dim), num_kv_heads=2, head_dim=head_dim, q_norm=n,
                                          k_norm=n)
                for width in (w for w in widths if w <= MAX_HIDDEN):
                    x, w = torch.empty(tokens, width, dtype=dtype), torch.empty(width, dtype=dtype)
                    for offset in (0.0, 1.0):
                        kernels.rms_norm(x, w, 1e-6, offset)
                        kernels.sandwich_rms_norm(x, x, w, w, 1e-6, offset)
                builds.extend(driver.builds(name, "sweep"))
    return builds


def _where(b: KernelBuild) -> str:
    return f"sm_{b.arch} {b.dtype} {b.kernel} {b.shape}"


def problems(builds: list[KernelBuild]) -> list[str]:
    """Every build that would fail (shared memory) or slow down (register spills) on a GPU."""
    out = []
    for b in builds:
        if not b.fits:
            out.append(f"{_where(b)}: {_size(b.shared)} of shared memory, over the limit of {_size(b.shared_limit)}")
        if b.spilled:
            out.append(f"{_where(b)}: spills {b.spilled} B a thread")
    return out


def tight(builds: list[KernelBuild]) -> list[str]:
    """Builds that use every one of the 255 registers without spilling: no headroom left."""
    return [f"{_where(b)}: uses all 255 registers" for b in builds if b.registers >= 255 and not b.spilled]


def toolchain() -> dict:
    """Triton's, torch's and ptxas's versions: what the builds depend on."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    lines = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    release = next((line.split(", ", 1)[1] for line in lines if ", release " in line), "unknown")
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": f"ptxas {release}"}


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:g} KiB"


def markdown(builds: list[KernelBuild]) -> str:
    header = ("| arch | dtype | model | kernel | shape | config | tiles at 128 tokens | shared (limit) | regs "
              "| spilled B | tensor cores | async copies |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in builds:
        config = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_').lower()}{v}" for k, v in b.config.items())
        tiles = "-" if b.tiles_128 is None else b.tiles_128
        lines.append(f"| sm_{b.arch} | {b.dtype} | {b.model} | {b.kernel} | {b.shape} | {config} | {tiles} "
                     f"| {_size(b.shared)} "
                     f"({_size(b.shared_limit)}){'' if b.fits else ' **over**'} | {b.registers} | {b.spilled} "
                     f"| {b.tensor_cores} | {'yes' if b.async_copies else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # The command: these builds for the model forwards and sweeps, composed in fastenc.bench.compile (the
    # model's forward pass lives above the kernels; this module imports nothing from there).
    from fastenc.bench.compile import main

    sys.exit(main())
