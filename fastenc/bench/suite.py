"""The plan of a ``fastenc bench`` run (from the command-line values, or the GPU check's fixed plan) and the
run itself: peaks, kernel cases, e2e cases, peaks again; ``run_from_args`` is ``fastenc bench``.

A plan is a list of cases, each with its own providers and dtype: the full plan is the cross product of
the command line's dtypes, models, shapes and providers; ``check_plan`` is the bench stage of
``benchmarks/gpu_check`` (the cases the performance goals need, nothing more). ``--providers`` and
``--cases`` filter either exactly; ``--budget`` skips, and reports, every case whose estimate
(``estimate.py``) no longer fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..errors import FastencError, InputError
from .e2e import DEFAULT_E2E_PROVIDERS, E2E_PROVIDERS, MODELS, QUICK_SKIPS, E2ECase, ModelSpec, Shape, e2e_shapes, \
    run_e2e
from .estimate import Budget, peaks_seconds
from .kernels import (KernelRun, add_layer_norm_case, attention_case, fp8_kernel_cases, gelu_layer_norm_case,
                      kernel_cases, linear_fp8_case, run_kernels, splade_case)
from .measure import DTYPES, FP8, best_peaks, measure_peaks
from .report import Report, collect_env, results_paths, update_readme, write_results

SUITES = ("e2e", "kernel")
PLANS = ("full", "gpu-check")
CPU_DTYPE_NOTE = ("CPU runs use fp32: fp16/bf16 GEMMs on the CPU take slow paths that say nothing about "
                  "the GPU kernels.")
# The GPU check's plan at small shapes (the CPU rehearsal): a 2-layer BERT with head dim 32, and a 3-layer
# ModernBERT (global, local, local) whose window (16: ±8 tokens) its sequences span several times.
SMALL_MODEL = ModelSpec("bert-small-2l", layers=2, hidden=64, heads=2, intermediate=128, vocab=1000)
SMALL_MODERNBERT = ModelSpec("modernbert-small-3l", layers=3, hidden=64, heads=2, intermediate=96, vocab=1000,
                             family="modernbert", local_attention=16)
SMALL_QWEN3 = ModelSpec("qwen3-small-2l", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=96,
                        vocab=1000, family="qwen3")  # grouped-query attention, head dim 32, causal
SMALL_MODELS = {spec.name: spec for spec in (SMALL_MODEL, SMALL_MODERNBERT, SMALL_QWEN3)}


# =============================================================================================== plan
@dataclasses.dataclass
class Plan:
    device: torch.device
    quick: bool
    backend: str | None = None
    e2e: list[E2ECase] = dataclasses.field(default_factory=list)
    kernels: list[KernelRun] = dataclasses.field(default_factory=list)
    repeats: int = 20
    budget_s: float | None = None
    compile_backend: str = "inductor"  # torch.compile's backend for hf-compile ("eager": Dynamo alone)
    recompile_limit: int | None = None  # Dynamo's recompile limit while e2e runs (None: torch's default)
    triton_warm: bool = False  # Triton's cache already holds the kernels (the estimate then counts no compile)
    name: str = "full"

    @property
    def dtypes(self) -> list[str]:
        return list(dict.fromkeys([c.dtype for c in self.e2e] + [r.dtype for r in self.kernels]))

    @property
    def suites(self) -> list[str]:
        return [s for s, cases in (("kernel", self.kernels), ("e2e", self.e2e)) if cases]

    def case_names(self) -> list[str]:
        return list(dict.fromkeys([c.name for c in self.e2e] + [r.name for r in self.kernels]))


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def check_plan(device: torch.device, small: bool = False) -> Plan:
    """The bench stage of the GPU check: the cases issue 13's goals need.

    Kernels first (no model to load; attention, the two LayerNorms and the SPLADE head), then BERT-base fp16
    at 128 x 128 (fastenc and the eager and SDPA peers), 1 x 128 (latency, a CUDA graph) and
    ``var64x8-512``, bf16 at 128 x 128; then ModernBERT-base fp16 against
    transformers' own ModernBERT at 32 x 512 (with the eager peer) and ``var64x8-512``, lengths
    where its 128-token windows skip most key blocks; then, alone, ``hf-compile`` at 128 x 128 (its
    30-60 s compile is the plan's largest and least certain cost). Then the extended tier: Qwen3-Embedding-0.6B's
    width (causal, grouped-query attention; 12 of its 28 layers, the same per-layer work within the budget) in
    bf16 at 32 x 512 and ``var64x8-512`` and in fp16 at 32 x 512 against transformers' SDPA; FP8: BERT-base at
    128 x 128 and ``var64x8-512`` (fastenc's own; its fp16 rows above are the comparison), then the FP8
    GEMM at BERT-base's two FFN shapes against ``torch._scaled_mm`` (run after every e2e case: the first
    launch of the FP8 kernels on a new GPU cannot cost the core evidence). ``small``: the same plan at small
    shapes, for the CPU.
    """
    if small:
        model, main, latency, var = SMALL_MODEL, Shape(4, 32), Shape(1, 32), Shape(8, 64, var_min=4)
        modernbert, long = SMALL_MODERNBERT, Shape(2, 48)
        qwen3 = SMALL_QWEN3
        attention = attention_case(2, 64, False, heads=2, head_dim=64)
        norms = [add_layer_norm_case(2, 8, 64), gelu_layer_norm_case(2, 8, 64)]
        splade = splade_case(2, 8, 64, 130)  # a partial last vocabulary tile
        fp8_gemms = [linear_fp8_case(2, 8, 64, 128), linear_fp8_case(2, 8, 128, 64)]
    else:
        model, main, latency, var = MODELS["bert-base"], Shape(128, 128), Shape(1, 128), Shape(64, 512, var_min=8)
        modernbert, long = MODELS["modernbert-base"], Shape(32, 512)
        qwen3 = MODELS["qwen3-0.6b-12l"]
        attention = attention_case(64, 512, False)  # 32,768 tokens, 12 heads of 64
        norms = [add_layer_norm_case(128, 512, 768), gelu_layer_norm_case(128, 512, 768)]
        splade = splade_case(32, 128, 768, 30522)  # a retrieval batch against BERT's vocabulary
        fp8_gemms = [linear_fp8_case(128, 128, 768, 3072), linear_fp8_case(128, 128, 3072, 768)]
    kernels = [KernelRun(attention, "fp16", ("fastenc", "sdpa", "sdpa-flash"))]
    kernels += [KernelRun(case, "fp16", ("fastenc", "torch")) for case in [*norms, splade]]
    peers = ("fastenc", "fastenc-packed", "hf-sdpa")
    e2e = [E2ECase(model, main, "fp16", (*peers, "hf-eager")), E2ECase(model, latency, "fp16", peers),
           E2ECase(model, var, "fp16", peers), E2ECase(model, main, "bf16", peers),
           E2ECase(modernbert, long, "fp16", (*peers, "hf-eager")), E2ECase(modernbert, var, "fp16", peers),
           E2ECase(model, main, "fp16", ("hf-compile",)),
           E2ECase(qwen3, long, "bf16", peers), E2ECase(qwen3, var, "bf16", peers), E2ECase(qwen3, long, "fp16", peers),
           E2ECase(model, main, FP8, peers[:2]), E2ECase(model, var, FP8, peers[:2])]
    kernels += [KernelRun(case, FP8, ("fastenc", "torch-scaled-mm"), after_e2e=True) for case in fp8_gemms]
    return Plan(device=device, quick=small, e2e=e2e, kernels=kernels, repeats=3 if small else 50,
                compile_backend="eager" if small and device.type == "cpu" else "inductor", name="gpu-check")


def make_plan(suite: str = "all", device=None, dtype: str | None = None, quick: bool = False,
              models: str | None = None, providers: str | None = None, backend: str | None = None,
              repeats: int | None = None, cases: str | None = None, budget: float | None = None,
              plan: str = "full", for_estimate: bool = False) -> tuple[Plan, list[tuple[str, str]]]:
    """The run's plan from command-line values, and the providers left out on purpose (name, reason).

    ``for_estimate``: the device need not be present (``python -m fastenc.bench estimate --device cuda``).
    """
    from ..model import resolve_device

    device = torch.device(device) if for_estimate else resolve_device(device)
    if suite not in (*SUITES, "all"):
        raise InputError(f"--suite {suite!r}: use e2e, kernel or all")
    if plan not in PLANS:
        raise InputError(f"--plan {plan!r}: use {' or '.join(PLANS)}")
    dtypes = _split(dtype)
    for name in dtypes or ():
        if name not in DTYPES and name != FP8:
            raise InputError(f"--dtype {name!r}: use fp16, bf16, fp32 or fp8 (comma-separated)")
    if backend not in (None, "torch", "triton"):
        raise InputError(f"--backend {backend!r}: use torch or triton")
    model_names = _split(models)
    for name in model_names or ():
        if name not in MODELS and not (plan == "gpu-check" and name in SMALL_MODELS):
            raise InputError(f"--models {name!r}: use one of {', '.join(MODELS)}")
    if repeats is not None and repeats < 1:
        raise InputError(f"--repeats {repeats}: must be at least 1")
    if budget is not None and budget <= 0:
        raise InputError(f"--budget {budget}: must be a positive number of seconds")
    kernel_names = list(dict.fromkeys(n for case in kernel_cases("cuda", False) + fp8_kernel_cases("cuda", False)
                                      for n in case.providers))
    chosen = _split(providers)
    for name in chosen or ():
        if name not in E2E_PROVIDERS and name not in kernel_names:
            raise InputError(f"--providers {name!r}: e2e providers are {', '.join(E2E_PROVIDERS)}; kernel "
                             f"providers are {', '.join(kernel_names)}")
    left_out: list[tuple[str, str]] = []

    if plan == "gpu-check":
        result = check_plan(device, small=quick or device.type == "cpu")
    else:
        dtypes_full = dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
        names = model_names or (["bert-base", "minilm-l6"] if device.type == "cuda" else ["minilm-l6", "bert-base-2l"])
        e2e_providers = [n for n in DEFAULT_E2E_PROVIDERS]
        if quick and not chosen:
            for name, reason in QUICK_SKIPS.items():
                e2e_providers.remove(name)
                left_out.append((name, reason))
        shapes = e2e_shapes(device.type, quick)
        e2e = [E2ECase(MODELS[m], shape, d, tuple(p for p in (e2e_providers if not chosen else E2E_PROVIDERS)
                                                  if d != FP8 or p.startswith("fastenc")))
               for d in dtypes_full for m in names for shape in shapes]
        kernels = [KernelRun(case, d, tuple(case.providers)) for d in dtypes_full
                   for case in (fp8_kernel_cases(device.type, quick) if d == FP8 else kernel_cases(device.type, quick))]
        result = Plan(device=device, quick=quick, e2e=e2e, kernels=kernels)
    result.backend = backend
    if repeats is not None:
        result.repeats = repeats
    elif plan == "full":
        result.repeats = (5 if quick else 20) if device.type == "cpu" else (20 if quick else 100)
    result.budget_s = budget

    # Exact filters: what is named is what runs (an e2e-only --providers runs no kernel case, and loads no
    # model for a kernel-only one).
    if suite != "all":
        result.e2e, result.kernels = (result.e2e, []) if suite == "e2e" else ([], result.kernels)
    if plan == "gpu-check" and dtypes:
        result.e2e = [c for c in result.e2e if c.dtype in dtypes]
        result.kernels = [r for r in result.kernels if r.dtype in dtypes]
    if plan == "gpu-check" and model_names:
        result.e2e = [c for c in result.e2e if c.model.name in model_names]
    if chosen:
        result.e2e = [dataclasses.replace(c, providers=tuple(p for p in c.providers if p in chosen))
                      for c in result.e2e]
        result.kernels = [dataclasses.replace(r, providers=tuple(p for p in r.providers if p in chosen))
                          for r in result.kernels]
        result.e2e = [c for c in result.e2e if c.providers]
        result.kernels = [r for r in result.kernels if r.providers]
    patterns = _split(cases)
    if patterns:
        names = result.case_names()
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise InputError(f"--cases {pattern!r} matches no case of this plan; its cases are "
                                 f"{', '.join(names) or 'none'}")
        result.e2e = [c for c in result.e2e if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
        result.kernels = [r for r in result.kernels if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    return result, left_out


# ================================================================================================ run
def _describe(spec: ModelSpec) -> str:
    window = f", local windows of {spec.local_attention}" if any(spec.windows) else ""
    return f"{spec.name} ({spec.family}, {spec.layers} x {spec.hidden}, {spec.heads} heads{window})"


def _notes(plan: Plan, env: dict, backend: str) -> list[str]:
    notes = []
    if plan.device.type == "cpu":
        notes.append(CPU_DTYPE_NOTE if plan.dtypes == ["fp32"] else
                     "CPU run with " + ", ".join(plan.dtypes) + ": fp16/bf16 GEMMs on the CPU are not representative.")
        if backend == "torch":
            notes.append("fastenc runs its torch backend on the CPU; numbers for the Triton kernels are owed to a "
                         "GPU run.")
        notes.append("Memory peaks are not measured on the CPU (n/a).")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        env["load_average_1m"] = load
        if load > 0.5 * cores:  # other processes share the cores: OpenMP waits turn into millisecond steps
            notes.append(f"The machine was busy when the run started (load {load:.1f} on {cores} cores): these CPU "
                         "timings are not a result; rerun on an idle machine (or with OMP_NUM_THREADS=1).")
    if env["triton_interpreter"] and plan.device.type == "cpu":
        notes.append("Triton interpreter on: fastenc Triton rows time the interpreter, not a GPU kernel.")
    if plan.e2e:
        models = sorted({_describe(c.model) for c in plan.e2e})
        notes.append("End-to-end models are built locally with transformers' own classes and random perturbed weights "
                     "(speed does not depend on the values): " + ", ".join(models) + ".")
        if any(c.model.gated or any(c.model.windows) for c in plan.e2e):
            notes.append("FLOPs per family: a gated FFN (GeGLU, SwiGLU) counts three H x I projections; a "
                         "sliding-window layer (ModernBERT's local layers) counts only the (query, key) pairs "
                         "within its window, for every provider (transformers' eager and SDPA compute the whole "
                         "padded square and mask it).")
        if any(c.model.family == "mpnet" for c in plan.e2e):
            notes.append("MPNet: transformers has no SDPA attention for it; its reference and baseline run eager, and "
                         "no row is relative to hf-sdpa.")
    if any("hf-compile" in c.providers for c in plan.e2e):
        notes.append(f"hf-compile: torch.compile(dynamic=False, fullgraph=True, backend={plan.compile_backend!r}), "
                     "Dynamo reset per model and dtype; a graph break or a recompile past Dynamo's limit is a skip, "
                     "never an eager row.")
    return notes


def run(plan: Plan, left_out: list[tuple[str, str]] = (), quiet: bool = False, output: Path | None = None) -> Report:
    """Measure the peaks, then the cases. With ``output``, the results JSON there is rewritten after each case
    (the markdown and the plot are ``write_results``'s, at the end)."""
    from ..model import resolve_backend

    backend, _ = resolve_backend(plan.backend, plan.device)
    env = collect_env(plan.device, backend, plan.quick)
    env["plan"] = plan.name
    env["notes"] = _notes(plan, env, backend)
    if plan.budget_s is not None:
        env["budget_s"] = plan.budget_s
    report = Report(env, {}, quiet=quiet)
    report.scope |= {("e2e", c.dtype, c.name) for c in plan.e2e} | {("kernel", r.dtype, r.name) for r in plan.kernels}
    budget = Budget(plan.budget_s, reserve=peaks_seconds(plan))
    if not quiet:
        print(f"fastenc bench on {env['gpu']}: plan {plan.name}, suites {', '.join(plan.suites) or 'none'}, dtypes "
              f"{', '.join(plan.dtypes) or 'none'}{', quick' if plan.quick else ''}", file=sys.stderr)
    peaks = measure_peaks(plan.device, plan.quick, plan.repeats)
    report.peaks = budget.peaks = peaks
    if output is not None:
        report.open(results_paths(env, output)["json"])
    report.log(f"peaks: matmul {peaks['matmul_tflops']:.3g} TFLOP/s ({peaks['matmul']}), "
               f"copy {peaks['copy_gbps']:.3g} GB/s")
    for name, reason in left_out:
        for dtype_name in dict.fromkeys(c.dtype for c in plan.e2e):
            report.skip("e2e", "all", name, dtype_name, reason)
    report.flush()
    if any(not r.after_e2e for r in plan.kernels):
        run_kernels(plan, report, budget)
    if plan.e2e:
        run_e2e(plan, report, budget)
    if any(r.after_e2e for r in plan.kernels):
        run_kernels(plan, report, budget, after_e2e=True)
    try:
        second = measure_peaks(plan.device, plan.quick, plan.repeats)
    except Exception as exc:  # noqa: BLE001 - the rows stand on the first measurement
        report.env["notes"].append(f"The peaks could not be measured again after the suites ({exc}): shares are "
                                   "against the measurement before them.")
        second = None
    report.set_shares(best_peaks(peaks, second))
    report.env["seconds"] = round(budget.spent(), 1)
    skipped_by_budget = [s for s in report.skipped if s["reason"].startswith("time budget")]
    if skipped_by_budget:
        report.env["notes"].append(f"The time budget ({plan.budget_s:.0f} s) left {len(skipped_by_budget)} case(s) "
                                   "unmeasured: " + ", ".join(f"{s['case']} {s['dtype']}" for s in skipped_by_budget)
                                   + ".")
    report.flush()
    return report


# ======================================================================================== command line
def run_from_args(args: argparse.Namespace) -> int:
    """``fastenc bench``: the arguments are declared in ``fastenc/cli.py``."""
    plan, left_out = make_plan(args.suite, args.device, args.dtype, args.quick, args.models, args.providers,
                               args.backend, args.repeats, args.cases, args.budget, args.plan)
    if plan.e2e and importlib.util.find_spec("transformers") is None:
        raise FastencError("fastenc bench compares with transformers: pip install 'fastenc[hf]' "
                           "(or run --suite kernel)")
    if args.compile_backend:
        plan.compile_backend = args.compile_backend
    if not plan.e2e and not plan.kernels:
        raise InputError("nothing to run: the filters (--suite, --dtype, --models, --providers, --cases) left no case")
    output = Path(args.output)
    report = run(plan, left_out, output=output)
    paths = write_results(report, output)
    md = paths["md"].read_text()
    print(md)
    if args.readme:
        update_readme(Path(args.readme), md)
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0
