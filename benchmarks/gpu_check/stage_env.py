"""The ``env`` stage: the GPU, its driver, the versions and the commit; the fp16 and bf16 matmul peaks and the
device copy bandwidth, measured with ``fastenc.bench``'s timing (``triton.testing.do_bench`` on CUDA, median
with p20 / p80): every later ratio is taken against these. On a GPU with FP8 tensor cores (sm_89, sm_90) also
the e4m3 matmul peak, ``torch._scaled_mm`` at the same size (unit scales, bf16 out): the FP8 encoder's GEMMs
are judged against it."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from .records import Stage, log

DISTRIBUTIONS = ("torch", "triton", "transformers", "sentence-transformers", "numpy", "safetensors", "tokenizers",
                 "pytest", "pytest-timeout", "pytest-xdist", "matplotlib")


def version(distribution: str) -> str:
    """From the installed metadata: nothing is imported."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(stage: Stage) -> None:
    import torch

    from fastenc import __version__
    from fastenc.bench.measure import time_providers
    from fastenc.bench.report import git_commit

    info = {"python": platform.python_version(), "platform": platform.platform(), "fastenc": __version__,
            "commit": git_commit(), "cuda_runtime": torch.version.cuda}
    info.update({d.replace("-", "_"): version(d) for d in DISTRIBUTIONS})
    device = stage.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["driver"], info["max_sm_clock"], info["power_limit"] = [x.strip() for x in smi.stdout.split(",")][:3]
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            info["driver"] = f"unknown ({exc})"
    else:
        info.update(gpu=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads; dry run)", sm_count=None,
                    capability=None, driver=None)
    stage.record.update(**info)
    log(f"env: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}")

    n, copy_bytes, repeats = (256, 2**24, 5) if stage.dry else (8192, 2**30, 10)
    generator = torch.Generator(device=device).manual_seed(0)
    a = {dtype: torch.randn(n, n, device=device, generator=generator).to(dtype)  # random data, never zeros
         for dtype in (torch.float16, torch.bfloat16)}
    b = {dtype: torch.randn(n, n, device=device, generator=generator).to(dtype) for dtype in a}
    src = torch.randn(copy_bytes // 4, device=device, generator=generator)
    dst = torch.empty_like(src)
    calls = {"matmul_fp16": lambda: torch.mm(a[torch.float16], b[torch.float16]),
             "matmul_bf16": lambda: torch.mm(a[torch.bfloat16], b[torch.bfloat16]),
             "copy": lambda: dst.copy_(src)}
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8:  # _scaled_mm takes its second operand column-major
        a8, b8 = a[torch.float16].to(torch.float8_e4m3fn), b[torch.float16].to(torch.float8_e4m3fn).t()
        unit = torch.ones((), device=device)
        calls["matmul_fp8"] = lambda: torch._scaled_mm(a8, b8, scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16)
    for fn in calls.values():  # time_providers' CPU rounds expect every call made once already
        fn()
    timings = time_providers(calls, device, repeats)
    failed = {name: t for name, t in timings.items() if isinstance(t, Exception)}
    if failed:
        raise RuntimeError(f"measuring the peaks failed: {failed}")
    how = "do_bench median (p20-p80)" if device.type == "cuda" else f"median of {repeats} interleaved rounds"
    peaks = {"matmul": f"{n}x{n}x{n} torch.mm, {how}", "copy": f"{copy_bytes // 2**20} MiB dst.copy_(src), read + "
             f"write counted, {how}"}
    for name in ("fp16", "bf16", "fp8") if fp8 else ("fp16", "bf16"):
        t = timings[f"matmul_{name}"]
        peaks[f"matmul_{name}_tflops"] = 2 * n**3 / (t.median * 1e-3) / 1e12
        peaks[f"matmul_{name}_ms"] = [round(t.p20, 4), round(t.median, 4), round(t.p80, 4)]
    t = timings["copy"]
    peaks["copy_gbps"] = 2 * copy_bytes / (t.median * 1e-3) / 1e9
    peaks["copy_ms"] = [round(t.p20, 4), round(t.median, 4), round(t.p80, 4)]
    if not fp8:
        peaks["matmul_fp8"] = "not measured: needs FP8 tensor cores (sm_89 or sm_90)"
    stage.record.update(peaks=peaks, status="ok",
                        note=f"matmul fp16 {peaks['matmul_fp16_tflops']:.4g} / bf16 {peaks['matmul_bf16_tflops']:.4g} "
                             + (f"/ fp8 {peaks['matmul_fp8_tflops']:.4g} " if fp8 else "")
                             + f"TFLOP/s, copy {peaks['copy_gbps']:.4g} GB/s")
    log(f"env: {stage.record.data['note']}")
