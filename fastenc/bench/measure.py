"""What ``fastenc bench`` measures with: the work counted (FLOPs), timing, output checks, memory and the
ceilings.

Timing is ``triton.testing.do_bench`` on CUDA and interleaved ``time.perf_counter`` rounds on the CPU;
the ceilings (a square GEMM, a device copy) are measured in the run, never assumed. Output checks apply
``fastenc.check``'s tolerance rule on the tensors' own device and copy back only its scalars (a whole
BERT-base output is tens of MB; a kernel suite's worth is GBs). The package docstring
(``fastenc/bench/__init__.py``) has the FLOP formula and the rules.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch

from ..check import FP32_RTOL, LOW_PRECISION_FACTOR, Comparison

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = "fp8"  # a case dtype beside DTYPES: e4m3 GEMM operands, 16-bit activations (compute_dtype)


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a case's activations: ``DTYPES[name]``, or for ``"fp8"`` the 16-bit dtype of an FP8
    encoder's hidden states (``fastenc.fp8.ACTIVATION_DTYPE``), in which its inputs are made and its
    low-precision baseline rounds."""
    if name == FP8:
        from ..fp8 import ACTIVATION_DTYPE

        return ACTIVATION_DTYPE
    return DTYPES[name]

# triton.testing.do_bench's floors as time_cuda calls it: every timing spends at least WARMUP_MS warming up
# and REP_MS timed, whatever the call's speed (and min_runs calls when those take longer).
WARMUP_MS, REP_MS = 25.0, 100.0


# =============================================================================================== work
def encoder_flops(lengths: list[int], hidden: int, intermediate: int, layers: int, *, gated: bool = False,
                  windows: tuple[int | None, ...] | None = None, relative_terms: int = 0, attention: int | None = None,
                  kv: int | None = None) -> int:
    """FLOPs of the encoder layers on real tokens only (see the package docstring).

    Per layer: ``2·T·(4·H² + 2·H·I)`` for the Q, K, V, output and two FFN projections (``gated``: the FFN-in
    projection makes both halves, ``H → 2·I``, so ``2·T·(4·H² + 3·H·I)``: three ``H×I`` projections), plus
    ``4·P·H`` for ``QKᵀ`` and ``PV`` (``2·head_dim`` per (query, key) pair and head; heads·head_dim = H), ``P``
    the pairs the layer attends: ``Σ L_i²`` for a global layer, only the pairs within the window for a
    sliding-window one (``windows``: one entry per layer, the window ``w`` — keys within ``±w`` positions of
    the query — or None for every key; None: every layer global). DeBERTa's ``relative_terms`` (c2p, p2c)
    each add one more ``head_dim`` dot product per pair and head: ``2·P·H`` a term. The decoders' widths:
    ``attention`` = heads·head_dim (None: H; Qwen3's is not H) and ``kv`` = kv_heads·head_dim (None:
    ``attention``; grouped-query attention's K and V are narrower), so the Q, K, V and output projections
    are ``2·T·H·(2·attention + 2·kv)`` and ``QKᵀ``, ``PV`` ``4·P·attention``.
    """
    if windows is None:
        windows = (None,) * layers
    if len(windows) != layers:
        raise ValueError(f"{len(windows)} windows for {layers} layers")
    attention = hidden if attention is None else attention
    kv = attention if kv is None else kv
    tokens = sum(lengths)
    ffn = 3 if gated else 2
    projections = 2 * tokens * (hidden * (2 * attention + 2 * kv) + ffn * hidden * intermediate)
    pairs = sum(attention_flops(lengths, attention, window) * (2 + relative_terms) // 2 for window in windows)
    return layers * projections + pairs


def attention_flops(lengths: list[int], hidden: int, window: int | None = None) -> int:
    """``QKᵀ`` and ``PV`` over the (query, key) pairs attended within each sequence: ``4·P·H`` (``P``:
    ``attended_pairs``)."""
    return 4 * sum(attended_pairs(length, window) for length in lengths) * hidden


def attended_pairs(length: int, window: int | None = None) -> int:
    """The (query, key) pairs of a sequence of ``length`` tokens whose keys lie within ``±window`` positions
    of the query (None: all ``length²``). The pairs farther apart number ``2·Σ_{d>w} (L - d) = (L-w-1)(L-w)``.

    These are the pairs the result needs; a kernel that skips whole key blocks outside the window still
    computes (and masks) the rest of the blocks the window's edges cut, which is not counted.
    """
    far = length - window - 1 if window is not None else 0
    return length * length - (far * (far + 1) if far > 0 else 0)


# ============================================================================================= timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median: float
    p20: float
    p80: float


def _quantiles_ms(seconds: list[float]) -> Timing:
    if len(seconds) == 1:
        return Timing(seconds[0] * 1e3, seconds[0] * 1e3, seconds[0] * 1e3)
    cuts = statistics.quantiles(seconds, n=10, method="inclusive")
    return Timing(statistics.median(seconds) * 1e3, cuts[1] * 1e3, cuts[7] * 1e3)


def time_cpu(fns: dict[str, Callable], repeats: int, warmup: int = 1) -> dict[str, Timing | Exception]:
    """Interleaved rounds: each round runs every provider once, so drift hits all alike.

    The callers have already run each provider once (the output check), so one warm-up call suffices.
    """
    failed: dict[str, Exception] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # noqa: BLE001 - reported by the caller, never a NaN row
            failed[name] = exc
    samples: dict[str, list[float]] = {name: [] for name in fns if name not in failed}
    for _ in range(repeats):
        for name in list(samples):
            start = time.perf_counter()
            try:
                fns[name]()
            except Exception as exc:  # noqa: BLE001
                failed[name] = exc
                del samples[name]
                continue
            samples[name].append(time.perf_counter() - start)
    return {**{name: _quantiles_ms(s) for name, s in samples.items()}, **failed}


def time_cuda(fn: Callable, min_runs: int) -> Timing:
    """``triton.testing.do_bench`` median / p20 / p80 after warm-up, with at least ``min_runs`` runs."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)  # ms per call
    median, p20, p80 = triton.testing.do_bench(fn, warmup=max(WARMUP_MS, 5 * estimate),
                                               rep=max(REP_MS, min_runs * estimate), quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def time_providers(fns: dict[str, Callable], device: torch.device, repeats: int) -> dict[str, Timing | Exception]:
    if device.type != "cuda":
        return time_cpu(fns, repeats)
    out: dict[str, Timing | Exception] = {}
    for name, fn in fns.items():
        try:
            out[name] = time_cuda(fn, min_runs=repeats)
        except Exception as exc:  # noqa: BLE001
            out[name] = exc
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ===================================================================================== output checks
def device_compare(name: str, ours: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> Comparison:
    """``fastenc.check.compare``'s rule, reduced where the tensors live; only four scalars are copied back.

    ``mask`` (``(batch, seq)``, 1 = real token) limits the comparison to real tokens of padded outputs.
    """
    device = reference.device
    ours = ours.to(device)
    if mask is not None:
        keep = mask.to(device).bool()[..., None]  # (batch, seq, 1): broadcast over the hidden size
        if not bool(keep.any()):
            return Comparison(name, 0.0, 0.0, 0.0)
    elif reference.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0)

    def largest(x: torch.Tensor) -> torch.Tensor:  # max |x| over the compared positions, as fp32
        x = x.abs().float()
        return (torch.where(keep, x, 0.0) if mask is not None else x).amax()

    finite = torch.isfinite(torch.where(keep, ours, 0.0) if mask is not None else ours).all()
    error = largest(ours.float() - reference.float())
    scale = largest(reference)
    base = largest(baseline.to(device).float() - reference.float()) if baseline is not None else torch.zeros_like(scale)
    finite, error, scale, base = torch.stack([finite.float(), error, scale, base]).tolist()  # one copy to the host
    if not finite:
        return Comparison(name, float("inf"), scale, 0.0)
    limit = FP32_RTOL * scale
    if baseline is not None:
        limit = max(limit, LOW_PRECISION_FACTOR * base)
    return Comparison(name, error, scale, limit)


# ============================================================================================= memory
def settled_reserved(device: torch.device) -> int:
    """Bytes the caching allocator holds once freed blocks are returned to the driver (CUDA; 0 elsewhere).

    What stays is what something keeps alive: tensors, and a CUDA graph's private memory pool.
    """
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


def release(device: torch.device) -> None:
    """Return cached memory between cases; never raises (after a device fault there is nothing to return)."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def memory_peak_mib(fn: Callable, device: torch.device) -> float | None:
    """MiB one call allocates above what is resident before it (CUDA); ``None`` on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - resident
    del out
    return peak / 2**20


# ============================================================================================== peaks
def measure_peaks(device: torch.device, quick: bool, repeats: int) -> dict:
    """The two ceilings, measured now: a square GEMM and a device copy (bytes read + written).

    ``run`` measures them before and after the suites and keeps the higher: a ceiling is the best the
    machine showed in this run (on a shared CPU a single measurement can land in a busy moment).
    """
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        n, dtype, copy_bytes = (4096 if quick else 8192), torch.bfloat16, (2**28 if quick else 2**30)
    else:
        n, dtype, copy_bytes = (512 if quick else 2048), torch.float32, (2**25 if quick else 2**28)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)  # never zeros (METHOD.md)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    src = torch.randn(copy_bytes // 4, device=device, generator=generator)
    dst = torch.empty_like(src)
    timings = time_providers({"matmul": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)}, device, repeats)
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            raise RuntimeError(f"measuring the {name} peak failed: {timing}") from timing
    return {
        "matmul_tflops": 2 * n**3 / (timings["matmul"].median * 1e-3) / 1e12,
        "copy_gbps": 2 * src.numel() * 4 / (timings["copy"].median * 1e-3) / 1e9,
        "matmul": f"{n}x{n}x{n} {_dtype_name(dtype)} torch.mm",
        "copy": f"{copy_bytes // 2**20} MiB dst.copy_(src), read + write counted",
    }


def best_peaks(first: dict, second: dict | None) -> dict:
    """The higher of the two measurements of each ceiling (``second`` is None when it could not be taken)."""
    peaks = dict(first)
    if second is None:
        for key in ("matmul_tflops", "copy_gbps"):
            peaks[key + "_measured"] = [first[key]]
        return peaks
    for key in ("matmul_tflops", "copy_gbps"):
        peaks[key] = max(first[key], second[key])
        peaks[key + "_measured"] = [first[key], second[key]]
    return peaks


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)
