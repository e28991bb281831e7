"""The plan of a ``fastenc bench`` run (from the command-line values) and the run itself: peaks, suites,
peaks again; ``run_from_args`` is ``fastenc bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..errors import FastencError, InputError
from .e2e import DEFAULT_E2E_PROVIDERS, E2E_PROVIDERS, MODELS, QUICK_SKIPS, ModelSpec, Shape, e2e_shapes, run_e2e
from .kernels import KernelCase, kernel_cases, run_kernels
from .measure import DTYPES, best_peaks, measure_peaks
from .report import Report, collect_env, update_readme, write_results

SUITES = ("e2e", "kernel")
CPU_DTYPE_NOTE = ("CPU runs use fp32: fp16/bf16 GEMMs on the CPU take slow paths that say nothing about "
                  "the GPU kernels.")


# =============================================================================================== plan
@dataclasses.dataclass
class Plan:
    device: torch.device
    dtypes: list[str]
    suites: list[str]
    quick: bool
    backend: str | None = None
    models: list[ModelSpec] = dataclasses.field(default_factory=list)
    shapes: list[Shape] = dataclasses.field(default_factory=list)
    providers: list[str] = dataclasses.field(default_factory=list)
    kernel_cases: list[KernelCase] = dataclasses.field(default_factory=list)
    kernel_providers: list[str] | None = None  # None: all
    repeats: int = 20


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def make_plan(suite: str = "all", device=None, dtype: str | None = None, quick: bool = False,
              models: str | None = None, providers: str | None = None, backend: str | None = None,
              repeats: int | None = None) -> tuple[Plan, list[tuple[str, str]]]:
    """The run's plan from command-line values, and the providers left out on purpose (name, reason)."""
    from ..encoder import resolve_device

    device = resolve_device(device)
    if suite not in (*SUITES, "all"):
        raise InputError(f"--suite {suite!r}: use e2e, kernel or all")
    dtypes = _split(dtype) or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    for name in dtypes:
        if name not in DTYPES:
            raise InputError(f"--dtype {name!r}: use fp16, bf16 or fp32 (comma-separated)")
    if backend not in (None, "torch", "triton"):
        raise InputError(f"--backend {backend!r}: use torch or triton")
    model_names = _split(models) or (["bert-base", "minilm"] if device.type == "cuda" else ["minilm", "bert-base-2l"])
    for name in model_names:
        if name not in MODELS:
            raise InputError(f"--models {name!r}: use one of {', '.join(MODELS)}")
    cases = kernel_cases(device.type, quick)
    kernel_names = list(dict.fromkeys(n for case in cases for n in case.providers))
    chosen = _split(providers)
    left_out: list[tuple[str, str]] = []
    if chosen:
        for name in chosen:
            if name not in E2E_PROVIDERS and name not in kernel_names:
                raise InputError(f"--providers {name!r}: e2e providers are {', '.join(E2E_PROVIDERS)}; kernel "
                                 f"providers are {', '.join(kernel_names)}")
        e2e_providers = [n for n in chosen if n in E2E_PROVIDERS]
        kernel_providers = [n for n in chosen if n in kernel_names]
    else:
        e2e_providers = list(DEFAULT_E2E_PROVIDERS)
        kernel_providers = None
        if quick:
            for name, reason in QUICK_SKIPS.items():
                e2e_providers.remove(name)
                left_out.append((name, reason))
    if repeats is None:
        repeats = (5 if quick else 20) if device.type == "cpu" else (20 if quick else 100)
    if repeats < 1:
        raise InputError(f"--repeats {repeats}: must be at least 1")
    plan = Plan(device=device, dtypes=dtypes, suites=list(SUITES) if suite == "all" else [suite], quick=quick,
                backend=backend, models=[MODELS[n] for n in model_names], shapes=e2e_shapes(device.type, quick),
                providers=e2e_providers, kernel_cases=cases, kernel_providers=kernel_providers, repeats=repeats)
    return plan, left_out


def run(plan: Plan, left_out: list[tuple[str, str]] = (), quiet: bool = False) -> Report:
    """Measure the peaks, then the suites; returns the report (nothing written yet)."""
    from ..encoder import resolve_backend

    backend, _ = resolve_backend(plan.backend, plan.device)
    env = collect_env(plan.device, backend, plan.quick)
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
    env["notes"] = notes
    if not quiet:
        print(f"fastenc bench on {env['gpu']}: suites {', '.join(plan.suites)}, dtypes {', '.join(plan.dtypes)}"
              f"{', quick' if plan.quick else ''}", file=sys.stderr)
    peaks = measure_peaks(plan.device, plan.quick, plan.repeats)
    report = Report(env, peaks, quiet=quiet)
    report.log(f"peaks: matmul {peaks['matmul_tflops']:.3g} TFLOP/s ({peaks['matmul']}), "
               f"copy {peaks['copy_gbps']:.3g} GB/s")
    if "e2e" in plan.suites:
        for name, reason in left_out:
            for dtype_name in plan.dtypes:
                report.skip("e2e", "all", name, dtype_name, reason)
        run_e2e(plan, report)
    if "kernel" in plan.suites:
        run_kernels(plan, report)
    report.set_shares(best_peaks(peaks, measure_peaks(plan.device, plan.quick, plan.repeats)))
    return report


# ======================================================================================== command line
def run_from_args(args: argparse.Namespace) -> int:
    """``fastenc bench``: the arguments are declared in ``fastenc/cli.py``."""
    if args.suite != "kernel" and importlib.util.find_spec("transformers") is None:
        raise FastencError("fastenc bench compares with transformers: pip install 'fastenc[hf]' "
                           "(or run --suite kernel)")
    plan, left_out = make_plan(args.suite, args.device, args.dtype, args.quick, args.models, args.providers,
                               args.backend, args.repeats)
    report = run(plan, left_out)
    paths = write_results(report, Path(args.output))
    md = paths["md"].read_text()
    print(md)
    if args.readme:
        update_readme(Path(args.readme), md)
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0
