"""``python -m fastenc.bench render RESULTS.json [--readme README.md]``: rewrite the .md and .png of a results
JSON (e.g. one measured where matplotlib was missing).

``python -m fastenc.bench estimate [--plan gpu-check] [--device cuda|cpu] [--quick] [--matmul-tflops X]
[--copy-gbps Y]``: the plan's cases with their estimated seconds (``fastenc/bench/estimate.py``), without
running anything. On CUDA the peaks default to those measured on an H200 (GPU.md: 780 TFLOP/s bf16, 4.3 TB/s
copy); on the CPU they are measured now.
"""

import argparse
import sys
from pathlib import Path

from .estimate import plan_estimate
from .measure import measure_peaks
from .report import render
from .suite import make_plan

parser = argparse.ArgumentParser(prog="python -m fastenc.bench",
                                 description="rewrite the .md and .png of a results JSON, or estimate a plan")
parser.add_argument("action", choices=("render", "estimate"))
parser.add_argument("json", type=Path, nargs="?", help="render: the results JSON")
parser.add_argument("--readme", type=Path)
parser.add_argument("--plan", choices=("full", "gpu-check"), default="gpu-check")
parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
parser.add_argument("--quick", action="store_true")
parser.add_argument("--repeats", type=int)
parser.add_argument("--matmul-tflops", type=float, help="the matmul peak to estimate with (CUDA default 780)")
parser.add_argument("--copy-gbps", type=float, help="the copy bandwidth to estimate with (CUDA default 4300)")
parser.add_argument("--triton-warm", action="store_true", help="Triton's cache holds the kernels already")
arguments = parser.parse_args()
if arguments.action == "render":
    if arguments.json is None:
        parser.error("render needs the results JSON")
    for written in render(arguments.json, arguments.readme).values():
        print(f"wrote {written}", file=sys.stderr)
else:
    plan, _ = make_plan(device=arguments.device, quick=arguments.quick, plan=arguments.plan,
                        repeats=arguments.repeats, for_estimate=True)
    plan.triton_warm = arguments.triton_warm
    if arguments.device == "cuda":
        peaks = {"matmul_tflops": 780.0, "copy_gbps": 4300.0}
    else:
        peaks = measure_peaks(plan.device, True, 5)
    peaks["matmul_tflops"] = arguments.matmul_tflops or peaks["matmul_tflops"]
    peaks["copy_gbps"] = arguments.copy_gbps or peaks["copy_gbps"]
    rows = plan_estimate(plan, peaks)
    print(f"plan {plan.name} on {arguments.device}: matmul {peaks['matmul_tflops']:.3g} TFLOP/s, copy "
          f"{peaks['copy_gbps']:.3g} GB/s, {plan.repeats} runs per timing\n")
    print("| suite | case | dtype | providers | estimate s |\n|---|---|---|---|---|")
    for suite, case, dtype, providers, seconds in rows:
        print(f"| {suite} | {case} | {dtype} | {', '.join(providers)} | {seconds:.1f} |")
    print(f"| | total | | | {sum(r[-1] for r in rows):.0f} |")
