"""pytest-benchmark timings of the CPU kernels: the torch twins (``fastenc.reference``) and SDPA.

    python -m pytest benchmarks/test_reference_cpu.py --benchmark-only [--benchmark-json OUT.json]

Not collected by the default ``python -m pytest`` (its testpaths is ``tests/``). The cases are the kernel
suite's CPU cases (``fastenc.bench.kernel_cases("cpu")``), so both time the same functions at the same
shapes; each result carries its rate (TFLOP/s or GB/s) in ``extra_info``.
"""

import pytest
import torch

from fastenc import bench

CPU = torch.device("cpu")
PARAMS = [(case, provider) for case in bench.kernel_cases("cpu", quick=False)
          for provider in ("torch", "sdpa") if provider in case.providers]


@pytest.mark.parametrize("case, provider", PARAMS,
                         ids=[f"{c.case} {p}" for c, p in PARAMS])
def test_cpu_kernel(benchmark, case, provider):
    inputs = case.make_inputs(CPU, torch.float32)
    run, canonical = case.providers[provider](inputs)
    expected = case.reference(inputs)
    assert torch.allclose(canonical(run()), expected, rtol=1e-4, atol=1e-5)  # never time a wrong answer
    benchmark(run)
    scale = 1e12 if case.unit == "TFLOP/s" else 1e9
    benchmark.extra_info[case.unit] = case.work(torch.float32) / benchmark.stats.stats.median / scale
