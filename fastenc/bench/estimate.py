"""How long a ``fastenc bench`` case takes, estimated before it runs: the suite's time budget decides with it
(a case that would not fit is skipped and reported), and ``python -m fastenc.bench estimate`` prints a plan
with it.

A case costs, in seconds:

* **setup**, once per model and dtype (charged to the group's first case): building the random checkpoint
  (``parameters × BUILD_S``, once per model), loading the float32 reference, fastenc and each transformers
  model (``bytes / LOAD_GBPS + LOAD_S`` each);
* **per provider**: the first call (compilation included: torch.compile per shape, Triton per new kernel on a
  cold cache, a CUDA-graph capture), the output check, and the timing. On CUDA ``time_cuda``'s floors:
  ``max(25 ms, 5·t)`` warm-up + ``max(100 ms, R·t)`` timed + 9 calls around them + one memory call; on the
  CPU ``(1 + R)·t`` in interleaved rounds;
* ``t``, one call: ``max(FLOPs / (matmul peak · efficiency), bytes / copy bandwidth) + launches · host cost
  per launch``, the FLOPs counted on what the provider computes (padded providers compute the padding).

The peaks are the run's measured ones; the other constants (``MACHINES``) are per device kind, read off
GPU.md (torch.compile 30-60 s per BERT-base shape, do_bench's floors, Triton's compile per kernel) and off
CPU runs of this suite. They are estimates for planning, not results: ``benchmarks/README.md`` sets the
estimate of the GPU check's bench plan beside a measured CPU run of the same plan at small shapes.
"""

from __future__ import annotations

import dataclasses
import time

from .measure import REP_MS, WARMUP_MS, encoder_flops


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the estimate assumes about a device kind, beyond its measured peaks."""

    launch_s: float  # host cost of one eager kernel launch through torch (dispatch + launch)
    graph_launch_s: float  # one kernel inside a CUDA graph replay
    compile_fixed_s: float  # torch.compile of a model at one shape: fixed part ...
    compile_layer_s: float  # ... plus this per encoder layer (inductor); Dynamo alone ("eager" backend): 1/10
    triton_compile_s: float  # one new Triton kernel specialisation, cold cache (the interpreter: none)
    load_gbps: float  # checkpoint read + copy to the device
    load_s: float  # fixed cost of one from_pretrained
    build_s: float  # seconds per parameter to build and save a random checkpoint ...
    build_fixed_s: float  # ... plus this
    import_s: float  # importing transformers, once per process (the first e2e group pays it)
    efficiency: dict  # provider -> share of the matmul peak its GEMMs reach
    interpreter_program_s: float  # the Triton interpreter (CPU): seconds per program (a row, a query block)


MACHINES = {
    "cuda": Machine(launch_s=8e-6, graph_launch_s=2e-6, compile_fixed_s=10.0, compile_layer_s=2.5,
                    triton_compile_s=0.8, load_gbps=2.0, load_s=1.0, build_s=4e-8, build_fixed_s=1.0, import_s=4.0,
                    efficiency={"fastenc": 0.6, "fastenc-packed": 0.6, "hf-sdpa": 0.45, "hf-eager": 0.35,
                                "hf-compile": 0.5, "hf-flash": 0.5, "torch": 0.5, "sdpa": 0.5, "sdpa-flash": 0.5,
                                "sdpa-varlen": 0.5, "flash-attn": 0.5},
                    interpreter_program_s=0.0),
    "cpu": Machine(launch_s=6e-5, graph_launch_s=6e-5, compile_fixed_s=15.0, compile_layer_s=2.5,
                   triton_compile_s=0.0, load_gbps=1.0, load_s=0.4, build_s=1e-7, build_fixed_s=0.5, import_s=3.0,
                   efficiency={"fastenc": 0.8, "fastenc-packed": 0.8, "fastenc-torch": 0.8, "hf-sdpa": 0.8,
                               "hf-eager": 0.6, "hf-compile": 0.8, "torch": 0.5, "sdpa": 0.5, "sdpa-flash": 0.5},
                   interpreter_program_s=4e-3),
}
LAUNCHES_PER_LAYER = {"fastenc": 7, "fastenc-packed": 7, "fastenc-torch": 12, "hf-sdpa": 20, "hf-eager": 26,
                      "hf-compile": 8, "hf-flash": 20}
TRITON_KERNELS_PER_MODEL = 8  # new specialisations one (model, dtype) compiles: embeddings, QKV, attention,
#                               three linears, two LayerNorm kinds (fastenc/kernels/aot's report lists them)
# ModernBERT: global and windowed attention, QKV with RoPE, the gated FFN-in, residual epilogues, its norms
TRITON_KERNELS_BY_FAMILY = {"modernbert": 10}
EAGER_BACKEND_FACTOR = 0.1  # Dynamo's tracing alone, against inductor's whole compile


def _machine(plan) -> Machine:
    return MACHINES["cuda" if plan.device.type == "cuda" else "cpu"]


def _timing_s(plan, t: float) -> float:
    """Wall time of one timing of a call of ``t`` seconds (see the module docstring)."""
    if plan.device.type == "cuda":
        return (max(WARMUP_MS / 1e3, 5 * t) + max(REP_MS / 1e3, plan.repeats * t) + 10 * t)
    return (1 + plan.repeats) * t


def _interpreted(plan, provider: str) -> bool:
    from ..model import triton_interpreter_on

    return plan.device.type != "cuda" and triton_interpreter_on() and provider.startswith("fastenc") and (
        provider != "fastenc-torch")


def e2e_call_seconds(plan, case, provider: str, peaks: dict) -> float:
    """One call of ``provider`` on ``case`` (an ``E2ECase``)."""
    machine, spec = _machine(plan), case.model
    lengths = case.shape.lengths()
    padded = not provider.startswith("fastenc")
    # transformers' eager and SDPA attention compute every padded (query, key) pair and mask the window after;
    # fastenc computes real tokens only and skips the key blocks outside a window
    attention, kv = spec.widths
    flops = (encoder_flops([max(lengths)] * len(lengths), spec.hidden, spec.intermediate, spec.layers,
                           gated=spec.gated, attention=attention, kv=kv) if padded else spec.flops(lengths))
    dtype_bytes = 4 if case.dtype == "fp32" else 2
    bytes_moved = spec.parameters * dtype_bytes + 6 * sum(lengths) * spec.hidden * dtype_bytes * spec.layers
    if provider == "hf-eager":  # the (batch, heads, seq, seq) scores, written and read four times per layer
        bytes_moved += 4 * len(lengths) * spec.heads * max(lengths) ** 2 * dtype_bytes * spec.layers
    if provider.startswith("fastenc") and plan.backend == "triton" and _interpreted(plan, provider):
        programs = spec.layers * (6 * sum(lengths) + spec.heads * sum(-(-n // 64) for n in lengths)) + sum(lengths)
        return programs * machine.interpreter_program_s
    efficiency = machine.efficiency.get(provider, 0.4)
    device_s = max(flops / (peaks["matmul_tflops"] * 1e12 * efficiency), bytes_moved / (peaks["copy_gbps"] * 1e9))
    launches = LAUNCHES_PER_LAYER.get(provider, 20) * spec.layers + 4
    graph = provider == "fastenc" and plan.device.type == "cuda" and sum(lengths) <= 2048 and len(lengths) <= 64
    host_s = launches * (machine.graph_launch_s if graph else machine.launch_s)
    if provider == "fastenc":  # validation and packing on the host, host-to-device copies
        host_s += 2e-4 + 2e-8 * len(lengths) * max(lengths)
    return max(device_s, host_s) if plan.device.type == "cuda" else device_s + host_s


def e2e_case_seconds(plan, case, peaks: dict) -> float:
    """The providers of ``case``: first calls (compilation included), output checks, timings."""
    machine, spec = _machine(plan), case.model
    reference = e2e_call_seconds(plan, dataclasses.replace(case, dtype="fp32"), "hf-sdpa", peaks)
    total = 2 * reference  # the float32 reference and the low-precision baseline
    for provider in case.providers:
        t = e2e_call_seconds(plan, case, provider, peaks)
        first = t
        if provider == "hf-compile":
            compile_s = machine.compile_fixed_s + machine.compile_layer_s * spec.layers
            first += compile_s * (EAGER_BACKEND_FACTOR if plan.compile_backend == "eager" else 1.0)
        if provider == "fastenc" and plan.device.type == "cuda" and sum(case.shape.lengths()) <= 2048:
            first += 3 * e2e_call_seconds(plan, case, "fastenc-packed", peaks)  # a graph capture: two warm-ups + one
        total += first + t + _timing_s(plan, t) + (t if plan.device.type == "cuda" else 0.0)
    return total


def e2e_group_seconds(plan, case, providers: list[str], peaks: dict, build: bool = True,
                      first: bool | None = None) -> float:
    """Setup of a model in a dtype: build (once per model), the reference and every provider's model loaded,
    Triton's kernels compiled for it on a cold cache; the first group also imports transformers (``first``:
    None asks whether this process has imported it yet)."""
    machine, spec = _machine(plan), case.model
    dtype_bytes = 4 if case.dtype == "fp32" else 2
    weights_gb = spec.parameters * dtype_bytes / 1e9
    hf_models = {"hf-eager": "eager", "hf-sdpa": "sdpa", "hf-compile": "sdpa", "hf-flash": "flash"}
    loads = 1 + len({hf_models[p] for p in providers if p in hf_models} | ({"sdpa"} if case.dtype != "fp32" else set()))
    loads += any(p.startswith("fastenc") for p in providers)
    if first is None:
        import sys

        first = "transformers" not in sys.modules
    total = (spec.parameters * machine.build_s + machine.build_fixed_s) * build + machine.import_s * first
    total += loads * (machine.load_s + weights_gb / machine.load_gbps)
    if any(p in ("fastenc", "fastenc-packed") for p in providers) and not plan.triton_warm:
        kernels = TRITON_KERNELS_BY_FAMILY.get(spec.family, TRITON_KERNELS_PER_MODEL)
        total += 2 * kernels * machine.triton_compile_s  # full and ragged token counts
    return total


def kernel_call_seconds(plan, run, provider: str, peaks: dict) -> float:
    """One call of ``provider`` on ``run`` (a ``KernelRun``)."""
    machine, case = _machine(plan), run.case
    from .measure import compute_dtype

    dtype = compute_dtype(run.dtype)
    work = case.work(dtype)
    if case.unit == "GB/s":
        flops, bytes_moved = 0.0, work * (1 if provider == "fastenc" else 3)  # the twin: several passes
    else:
        flops, bytes_moved = work, 4 * case.tokens * 768 * dtype.itemsize
    if provider == "fastenc" and _interpreted(plan, provider):  # row kernels: a program per token; others: tiles
        programs = case.tokens if case.unit == "GB/s" else 2 * case.tokens * 12 // 64
        return programs * machine.interpreter_program_s
    efficiency = machine.efficiency.get(provider, 0.4)
    device_s = max(flops / (peaks["matmul_tflops"] * 1e12 * efficiency), bytes_moved / (peaks["copy_gbps"] * 1e9))
    return device_s + 4 * machine.launch_s


def kernel_case_seconds(plan, run, peaks: dict) -> float:
    machine = _machine(plan)
    total = 0.0
    for provider in run.providers:
        t = kernel_call_seconds(plan, run, provider, peaks)
        first = t + (machine.triton_compile_s if provider == "fastenc" and not plan.triton_warm else 0.0)
        total += first + t + _timing_s(plan, t)
    return total


def peaks_seconds(plan) -> float:
    """One measurement of the two ceilings (``measure_peaks``), timed like any provider."""
    if plan.device.type == "cuda":
        return 2 * (WARMUP_MS + REP_MS) / 1e3 + 0.5
    return 2.0 if plan.quick else 10.0


def plan_estimate(plan, peaks: dict) -> list[tuple[str, str, str, tuple[str, ...], float]]:
    """``(suite, case, dtype, providers, seconds)`` for every case of ``plan`` in the order ``suite.run`` runs
    them (kernels, then e2e, then the kernels marked ``after_e2e``), each model's setup charged to its group's
    first case, and the two peak measurements."""
    out = [("peaks", "before the suites", "", (), peaks_seconds(plan))]
    for run in plan.kernels:
        if not run.after_e2e:
            out.append(("kernel", run.name, run.dtype, run.providers, kernel_case_seconds(plan, run, peaks)))
    previous, built = None, set()
    for i, case in enumerate(plan.e2e):
        seconds = e2e_case_seconds(plan, case, peaks)
        if (case.model.name, case.dtype) != previous:
            group = []
            for later in plan.e2e[i:]:
                if (later.model.name, later.dtype) != (case.model.name, case.dtype):
                    break
                group.append(later)
            seconds += e2e_group_seconds(plan, case, list(dict.fromkeys(p for c in group for p in c.providers)), peaks,
                                         build=case.model.name not in built, first=not built)
            previous = (case.model.name, case.dtype)
            built.add(case.model.name)
        out.append(("e2e", case.name, case.dtype, case.providers, seconds))
    for run in plan.kernels:
        if run.after_e2e:
            out.append(("kernel", run.name, run.dtype, run.providers, kernel_case_seconds(plan, run, peaks)))
    out.append(("peaks", "after the suites", "", (), peaks_seconds(plan)))
    return out


class Budget:
    """The suite's time budget: a case starts only when its estimate fits in what is left."""

    def __init__(self, seconds: float | None, peaks: dict | None = None, reserve: float = 0.0):
        self.seconds, self.peaks, self.reserve = seconds, peaks or {}, reserve
        self.start = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start

    def refuse(self, estimate: float) -> str | None:
        """Why a case estimated at ``estimate`` seconds must not start, or None when it fits."""
        if self.seconds is None:
            return None
        left = self.seconds - self.reserve - self.spent()
        if estimate <= left:
            return None
        return (f"time budget: {self.spent():.0f} s of {self.seconds:.0f} s spent, this case is estimated at "
                f"{estimate:.0f} s (fastenc/bench/estimate.py)")
