"""``fastenc bench``: fastenc side by side with ``transformers`` and ``torch``, end to end and per kernel.

    fastenc bench [--suite e2e|kernel|all] [--device cuda|cpu] [--dtype fp16,bf16] [--quick] [--output DIR]

(also ``python benchmarks/e2e.py`` and ``python benchmarks/kernels.py``). Everything a run needs lives in
this module, so the installed command works without the repository's ``benchmarks/`` folder.

What is measured (STYLE point 11: the unit the hardware is judged by):

* **e2e** — a whole encoder forward on a padded batch, for each provider in the same process: ``fastenc``
  (the public ``encoder(input_ids, attention_mask, token_type_ids)`` call from CPU tensors: validation,
  packing, host-to-device copies and the padded output included), ``fastenc-packed``
  (``encoder.forward_packed`` on a prepared ``PackedBatch``: the kernels alone), ``hf-eager``,
  ``hf-sdpa``, ``hf-compile`` (``torch.compile(dynamic=False)`` of the SDPA model) and ``hf-flash``
  (flash_attention_2, when ``flash_attn`` is importable). The transformers models get their inputs
  already on the device. Metrics: latency (median, p20, p80), tokens/s and TFLOP/s on *real* tokens,
  the TFLOP/s as a share of the matmul peak measured in the same run, and on CUDA the peak memory one
  call allocates above what is resident before it.
* **kernel** — each fastenc kernel against its torch twin (``fastenc.reference``) and, for attention,
  against ``torch.nn.functional.scaled_dot_product_attention`` (default dispatch, and forced to the
  flash backend), ``torch.nn.attention.varlen.varlen_attn`` and ``flash_attn`` when present. GEMMs and
  attention in TFLOP/s, memory-bound kernels (LayerNorms, embeddings) in GB/s and as a share of the
  copy bandwidth measured in the same run.

Work counted (the fewest operations and bytes the computation needs, never what a padded provider
spends): an encoder layer over ``T`` real tokens in sequences of lengths ``L_i``, hidden ``H``,
intermediate ``I``, does ``2·T·(4·H² + 2·H·I)`` FLOPs in its four projections (Q, K, V, output: ``4·H²``
per token; FFN in and out: ``2·H·I``) plus ``4·Σ L_i²·H`` in attention (``QKᵀ`` and ``PV``, each
``2·L_i²·head_dim`` per head). Embeddings, LayerNorms, softmax and activations are not counted.
Memory-bound kernels count each input read once and each output written once.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed between runs,
enough runs for a stable median) with quantiles 0.5, 0.2 and 0.8; on the CPU interleaved
``time.perf_counter`` rounds (every provider once per round, so drift hits all alike). p20/p80 of a
rate (tokens/s, TFLOP/s, GB/s) are the rates at the p80/p20 times, so ``p20 <= value <= p80`` always.

Correctness before speed: every provider's output is checked before it is timed, with
``fastenc.check.compare`` (the project's tolerance rule) against a float32 reference (``hf-sdpa`` run
in float32 for e2e, the torch twin on float32 inputs for kernels), with ``hf-sdpa`` / the torch twin
in the run's dtype as the low-precision baseline; e2e on real tokens only. A provider that raises, is
unavailable, or fails the check is *reported* (``"skipped"`` in the JSON, "Not measured" in the
markdown, a line on stderr) and gets no row: no NaN rows, no silent drops.

Peaks are measured in the run, never assumed: a large square GEMM (bf16 on CUDA, fp32 on the CPU) and a
large ``dst.copy_(src)`` counting bytes read plus bytes written, before and after the suites; the higher
of the two is the ceiling every ``share_of_peak`` divides by.

Results: ``<gpu>-<yyyymmdd>.json`` (``cpu-…`` on the CPU, ``…-quick`` for ``--quick`` runs) in the
schema ``{"env", "peaks", "rows", "skipped"}``, the same stem ``.md`` (a markdown table) and ``.png`` (a
plot, when matplotlib is installed). A run that covers only some suites, dtypes or models keeps the
rows of the others from an existing file of the same name, so a GPU session can split the work over
several commands.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference
from .check import compare
from .errors import BackendError, FastencError, InputError

SUITES = ("e2e", "kernel")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
E2E_BASELINE = "hf-sdpa"
PEAK_OF = {"TFLOP/s": "matmul_tflops", "GB/s": "copy_gbps"}  # a rate's ceiling in "peaks"
CPU_DTYPE_NOTE = ("CPU runs use fp32: fp16/bf16 GEMMs on the CPU take slow paths that say nothing about "
                  "the GPU kernels.")
README_START, README_END = "<!-- fastenc-bench:start -->", "<!-- fastenc-bench:end -->"


# =============================================================================================== work
def encoder_flops(lengths: list[int], hidden: int, intermediate: int, layers: int) -> int:
    """FLOPs of the encoder layers on real tokens only (see the module docstring).

    Per layer: ``2·T·(4·H² + 2·H·I)`` for the Q, K, V, output and two FFN projections, plus
    ``4·Σ L_i²·H`` for ``QKᵀ`` and ``PV`` (``2·L_i²·head_dim`` each, per head; heads·head_dim = H).
    """
    tokens = sum(lengths)
    projections = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
    return layers * (projections + attention_flops(lengths, hidden))


def attention_flops(lengths: list[int], hidden: int) -> int:
    """``QKᵀ`` and ``PV`` over every (query, key) pair within each sequence: ``4·Σ L_i²·H``."""
    return 4 * sum(length * length for length in lengths) * hidden


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
    median, p20, p80 = triton.testing.do_bench(fn, warmup=max(25.0, 5 * estimate), rep=max(100.0, min_runs * estimate),
                                               quantiles=[0.5, 0.2, 0.8])
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


def best_peaks(first: dict, second: dict) -> dict:
    peaks = dict(first)
    for key in ("matmul_tflops", "copy_gbps"):
        peaks[key] = max(first[key], second[key])
        peaks[key + "_measured"] = [first[key], second[key]]
    return peaks


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ========================================================================================== reporting
class Report:
    """Rows, skipped providers and notes of one run; prints progress to stderr as it goes."""

    def __init__(self, env: dict, peaks: dict, quiet: bool = False):
        self.env, self.peaks, self.quiet = env, peaks, quiet
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.scope: set[tuple] = set()  # (suite, dtype, model) this run covered

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def skip(self, suite: str, case: str, provider: str, dtype: str, reason: str, model: str | None = None) -> None:
        reason = " ".join(str(reason).split())[:500] or "no reason given"
        entry = {"suite": suite, "case": case, "provider": provider, "dtype": dtype, "reason": reason}
        if model is not None:
            entry["model"] = model
        self.skipped.append(entry)
        self.log(f"  not measured: {suite} {case} {provider} {dtype}: {reason}")

    def add_rates(self, base: dict, timing: Timing, rates: list[tuple[str, float]]) -> None:
        """One ``ms`` row, then one row per ``(metric, work per call)``; TFLOP/s and GB/s rows get their share
        of the matmul or copy peak (see ``set_shares``)."""
        self.rows.append({**base, "metric": "ms", "value": timing.median, "p20": timing.p20, "p80": timing.p80})
        for metric, work in rates:
            scale = 1e12 if metric == "TFLOP/s" else 1e9 if metric == "GB/s" else 1.0
            row = {**base, "metric": metric, "value": work / (timing.median * 1e-3) / scale,
                   "p20": work / (timing.p80 * 1e-3) / scale, "p80": work / (timing.p20 * 1e-3) / scale}
            if metric in PEAK_OF:
                row["share_of_peak"] = row["value"] / self.peaks[PEAK_OF[metric]]
            self.rows.append(row)

    def set_shares(self, peaks: dict) -> None:
        """Final peaks: recompute every row's share of them."""
        self.peaks = peaks
        for row in self.rows:
            if row["metric"] in PEAK_OF:
                row["share_of_peak"] = row["value"] / peaks[PEAK_OF[row["metric"]]]

    def to_json(self) -> dict:
        return {"env": self.env, "peaks": self.peaks, "rows": self.rows, "skipped": self.skipped}


def _exc_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _commit() -> str:
    """The checkout's short commit (``-dirty`` with uncommitted changes to tracked files).

    ``FASTENC_BENCH_COMMIT`` overrides it, for a copy of the tree that has no ``.git`` (a lent GPU machine).
    """
    if os.environ.get("FASTENC_BENCH_COMMIT"):
        return os.environ["FASTENC_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def collect_env(device: torch.device, backend: str, quick: bool) -> dict:
    from . import __version__
    from .encoder import triton_interpreter_on

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "commit": _commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "fastenc": __version__,
        "fastenc_backend": backend,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "triton_interpreter": triton_interpreter_on(),
        "quick": quick,
    }


def result_stem(env: dict) -> str:
    """``<gpu>-<yyyymmdd>``: ``h100-80gb-hbm3-20261124``, ``cpu-20261124``; ``-quick`` for quick runs."""
    name = "cpu" if env["device"].startswith("cpu") else env["gpu"].lower().replace("nvidia", "")
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    day = env["time"][:10].replace("-", "")
    return f"{slug}-{day}" + ("-quick" if env.get("quick") else "")


def _row_scope(row: dict) -> tuple:
    return row["suite"], row["dtype"], row.get("model")


def merge_previous(report: Report, path: Path) -> None:
    """Keep rows of another suite, dtype or model from an earlier run written to the same file."""
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    kept = [r for r in previous.get("rows", []) if _row_scope(r) not in report.scope]
    kept_skips = [s for s in previous.get("skipped", []) if _row_scope(s) not in report.scope]
    if kept or kept_skips:
        report.rows = kept + report.rows
        report.skipped = kept_skips + report.skipped
        earlier = previous.get("env", {})
        report.env["kept_rows_from"] = ([f"{earlier.get('time')} {earlier.get('commit')}"]
                                        + earlier.get("kept_rows_from", []))
        report.log(f"kept {len(kept)} rows of other suites/dtypes/models from {path}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _key(row: dict) -> tuple:
    """What identifies a measured case (without the provider and metric)."""
    return row["suite"], row.get("model"), row["case"], row["batch"], row["seq"], row["dtype"]


def _lookup(rows: list[dict]) -> dict[tuple, dict]:
    return {(*_key(r), r["provider"], r["metric"]): r for r in rows}


def markdown(result: dict) -> str:
    env, peaks, rows = result["env"], result["peaks"], result["rows"]
    table = _lookup(rows)
    lines = [f"# fastenc benchmarks: {env['gpu']}, {env['time'][:10]}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env.get('transformers')}, "
             f"fastenc {env.get('fastenc')} (backend {env.get('fastenc_backend')}), commit {env['commit']}, "
             f"{env['time']}" + (" (--quick: smoke-test shapes, not a result)" if env.get("quick") else ""),
             "",
             f"Measured peaks (the higher of the measurements before and after the suites): matmul "
             f"{_fmt(peaks['matmul_tflops'])} TFLOP/s ({peaks.get('matmul')}), copy {_fmt(peaks['copy_gbps'])} GB/s "
             f"({peaks.get('copy')}).", ""]
    if env.get("kept_rows_from"):
        lines += [f"Rows of other suites/dtypes/models kept from earlier runs: {', '.join(env['kept_rows_from'])}.",
                  ""]
    lines += [f"Note: {note}" for note in env.get("notes", [])]
    if env.get("notes"):
        lines.append("")

    e2e = [r for r in rows if r["suite"] == "e2e" and r["metric"] == "ms"]
    if e2e:
        lines += ["## End to end", "",
                  "Latency median (p20-p80); tokens/s and TFLOP/s on real tokens only; % of the measured matmul "
                  f"peak; speed relative to {E2E_BASELINE}; memory: MiB one call allocates above the resident "
                  "weights.", "",
                  "| model | case | dtype | provider | ms median (p20-p80) | tokens/s | TFLOP/s | % peak | "
                  f"vs {E2E_BASELINE} | mem MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            key = _key(r)
            tps = table.get((*key, r["provider"], "tokens/s"))
            tfl = table.get((*key, r["provider"], "TFLOP/s"))
            base = table.get((*key, E2E_BASELINE, "ms"))
            rel = f"{base['value'] / r['value']:.2f}x" if base else "n/a"
            share = f"{100 * tfl['share_of_peak']:.1f}%" if tfl and "share_of_peak" in tfl else "n/a"
            lines.append(f"| {r.get('model')} | {r['case']} | {r['dtype']} | {r['provider']} | "
                         f"{_fmt(r['value'])} ({_fmt(r['p20'])}-{_fmt(r['p80'])}) | "
                         f"{_fmt(tps['value']) if tps else 'n/a'} | {_fmt(tfl['value']) if tfl else 'n/a'} | "
                         f"{share} | {rel} | {_fmt(r.get('mem_mib'))} |")
        lines.append("")

    kernels = [r for r in rows if r["suite"] == "kernel" and r["metric"] == "ms"]
    if kernels:
        lines += ["## Kernels", "",
                  "TFLOP/s for GEMMs and attention, GB/s (each input read once, each output written once) for the "
                  "memory-bound kernels; % of the measured matmul or copy peak; speed relative to the case's "
                  "baseline (`sdpa` for attention, the torch twin `torch` otherwise).", "",
                  "| case | batch x seq | dtype | provider | ms median (p20-p80) | rate | % peak | vs baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            key = _key(r)
            rate = table.get((*key, r["provider"], "TFLOP/s")) or table.get((*key, r["provider"], "GB/s"))
            base = table.get((*key, r.get("baseline"), "ms"))
            rel = f"{base['value'] / r['value']:.2f}x" if base else "n/a"
            share = f"{100 * rate['share_of_peak']:.1f}%" if rate and "share_of_peak" in rate else "n/a"
            rate_text = f"{_fmt(rate['value'])} {rate['metric']}" if rate else "n/a"
            lines.append(f"| {r['case']} | {r['batch']}x{r['seq']} | {r['dtype']} | {r['provider']} | "
                         f"{_fmt(r['value'])} ({_fmt(r['p20'])}-{_fmt(r['p80'])}) | {rate_text} | {share} | {rel} |")
        lines.append("")

    if result.get("skipped"):
        lines += ["## Not measured", ""]
        for s in result["skipped"]:
            where = " ".join(x for x in (s["suite"], s.get("model"), s["case"], s["dtype"]) if x)
            lines.append(f"- `{s['provider']}` ({where}): {s['reason']}")
        lines.append("")
    return "\n".join(lines)


def _plot_label(row: dict) -> str:
    if row["suite"] == "e2e":
        return f"{row.get('model')} {row['case']}"
    return f"{row['case']} {row['batch']}x{row['seq']} {row['dtype']}"


def plot(result: dict, path: Path) -> str | None:
    """Write the PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot not written: matplotlib is not installed (pip install matplotlib)"
    rows = result["rows"]
    panels = []  # (title, metric, rows)
    for dtype in sorted({r["dtype"] for r in rows if r["suite"] == "e2e"}):
        panels.append((f"end to end, {dtype}: tokens/s (real tokens)", "tokens/s",
                       [r for r in rows if r["suite"] == "e2e" and r["dtype"] == dtype and r["metric"] == "tokens/s"]))
    for metric in ("TFLOP/s", "GB/s"):
        panels.append((f"kernels: {metric}", metric,
                       [r for r in rows if r["suite"] == "kernel" and r["metric"] == metric]))
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return "plot not written: no rows"
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.2 * len(panels)), squeeze=False)
    for ax, (title, metric, picked) in zip(axes[:, 0], panels):
        groups = list(dict.fromkeys(_plot_label(r) for r in picked))
        providers = list(dict.fromkeys(r["provider"] for r in picked))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for r in picked:
                if r["provider"] != provider:
                    continue
                xs.append(groups.index(_plot_label(r)) + (i - (len(providers) - 1) / 2) * width)
                ys.append(r["value"])
                lo.append(r["value"] - r["p20"])
                hi.append(r["p80"] - r["value"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(providers), 6))
    env = result["env"]
    fig.suptitle(f"fastenc on {env['gpu']} — {env['time'][:10]}, commit {env['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def update_readme(readme: Path, md: str) -> None:
    """Replace the text between the README's bench markers with the latest table."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise InputError(f"{readme} has no '{README_START}' ... '{README_END}' markers to put the table between")
    body = md.split("\n", 1)[1] if md.startswith("# ") else md  # the README has its own heading
    readme.write_text(text[:start + len(README_START)] + "\n" + body.strip() + "\n" + text[end:], encoding="utf-8")


def write_results(report: Report, output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(report.env)
    paths = {"json": output / f"{stem}.json", "md": output / f"{stem}.md", "png": output / f"{stem}.png"}
    merge_previous(report, paths["json"])
    result = report.to_json()
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["md"].write_text(markdown(result) + "\n")
    why = plot(result, paths["png"])
    if why:
        report.log(why)
        del paths["png"]
    return paths


# ============================================================================================= models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model the e2e suite runs: the bundled MiniLM (``layers=None``), or a BERT of the given shape with
    random weights built locally."""

    name: str
    layers: int | None = None
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522

    def materialize(self, workdir: Path) -> Path:
        """A checkpoint directory (config.json + model.safetensors) both fastenc and transformers load."""
        if self.layers is None:
            from .encoder import default_model_path
            from .pooling import SentenceConfig

            return SentenceConfig.from_dir(default_model_path()).transformer_dir
        return make_bert_checkpoint(workdir / self.name, layers=self.layers, hidden=self.hidden, heads=self.heads,
                                    intermediate=self.intermediate, vocab=self.vocab)


MODELS = {
    "bert-base": ModelSpec("bert-base", layers=12),
    "bert-base-2l": ModelSpec("bert-base-2l", layers=2),  # BERT-base width, 2 layers: the CPU's stand-in
    "minilm": ModelSpec("minilm"),
}


def make_bert_checkpoint(path: Path, *, layers: int = 12, hidden: int = 768, heads: int = 12,
                         intermediate: int = 3072, vocab: int = 30522, seed: int = 0) -> Path:
    """A BERT checkpoint with random, perturbed weights (LayerNorms not 1/0), built locally."""
    from transformers import BertConfig, BertModel

    if (path / "model.safetensors").exists():
        return path
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=512, type_vocab_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "LayerNorm.weight" in name:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
                elif name.endswith("bias"):
                    param.copy_(0.02 * torch.randn_like(param))
                else:
                    param.add_(0.002 * torch.randn_like(param))
    with _quiet_transformers():
        model.save_pretrained(path)
    return path


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


# ========================================================================================= e2e inputs
@dataclasses.dataclass(frozen=True)
class Shape:
    """``batch`` sequences of ``seq`` tokens, or of lengths drawn uniformly from ``[var_min, seq]``."""

    batch: int
    seq: int
    var_min: int | None = None

    @property
    def var(self) -> bool:
        return self.var_min is not None

    def lengths(self, seed: int = 0) -> list[int]:
        if not self.var:
            return [self.seq] * self.batch
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(self.var_min, self.seq + 1, (self.batch,), generator=generator).tolist()

    def case(self) -> str:
        return f"var{self.batch}x{self.var_min}-{self.seq}" if self.var else f"{self.batch}x{self.seq}"


@dataclasses.dataclass
class Inputs:
    """One right-padded batch (CPU int64, as a tokenizer gives it) and its device copy."""

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq) 0/1
    token_type_ids: torch.Tensor  # (batch, seq)
    lengths: list[int]
    device: torch.device

    @classmethod
    def random(cls, shape: Shape, vocab_size: int, pad_id: int, device: torch.device, seed: int = 0) -> "Inputs":
        lengths = shape.lengths(seed)
        width = max(lengths)
        generator = torch.Generator().manual_seed(seed + 1)
        low = min(1000, vocab_size // 2)  # clear of the special tokens at the start of the vocabulary
        ids = torch.randint(low, vocab_size, (shape.batch, width), generator=generator)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        return cls(ids, mask, torch.zeros_like(ids), lengths, device)

    def cpu(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}

    def on_device(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.cpu().items()}


# ====================================================================================== e2e providers
@dataclasses.dataclass
class ModelContext:
    """What a provider's loader gets: one model, one device, one dtype."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    backend: str | None  # fastenc backend for the ``fastenc`` providers (None: the device's default)
    cache: dict = dataclasses.field(default_factory=dict)  # shared between providers (one Encoder)


@dataclasses.dataclass
class Runner:
    """A loaded provider: ``prepare(inputs)`` returns the zero-argument call that is timed.

    ``packed``: the call returns ``(tokens, hidden)`` real tokens only, not ``(batch, seq, hidden)``.
    """

    prepare: Callable[[Inputs], Callable[[], torch.Tensor]]
    packed: bool = False


def _encoder(ctx: ModelContext, backend: str | None):
    from .encoder import Encoder

    key = ("encoder", backend)
    if key not in ctx.cache:
        ctx.cache[key] = Encoder.from_pretrained(ctx.model_dir, device=ctx.device, dtype=ctx.dtype, backend=backend)
    return ctx.cache[key]


def _fastenc_call(backend_override: str | None = None) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        encoder = _encoder(ctx, backend_override or ctx.backend)

        def prepare(inputs: Inputs):
            batch = inputs.cpu()
            return lambda: encoder(**batch)

        return Runner(prepare)

    return load


def _fastenc_packed(ctx: ModelContext) -> Runner:
    encoder = _encoder(ctx, ctx.backend)

    def prepare(inputs: Inputs):
        # What encoder.__call__ does before its forward pass (validation aside), done once here.
        keep = inputs.attention_mask.bool()
        positions = encoder._positions(inputs.input_ids)
        packed = encoder._pack(inputs.input_ids[keep], positions[keep], inputs.token_type_ids[keep], inputs.lengths)

        def run():
            with torch.inference_mode():
                return encoder.forward_packed(packed)

        return run

    return Runner(prepare, packed=True)


def _hf(implementation: str, compiled: bool = False) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        from transformers import AutoModel

        with _quiet_transformers():
            model = AutoModel.from_pretrained(str(ctx.model_dir), attn_implementation=implementation, dtype=ctx.dtype)
        model = model.to(ctx.device).eval()
        forward = torch.compile(model, dynamic=False) if compiled else model

        def prepare(inputs: Inputs):
            batch = inputs.on_device()

            def run():
                with torch.inference_mode():
                    return forward(**batch).last_hidden_state

            return run

        return Runner(prepare)

    return load


def _needs_flash_attn(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    return None


# name -> (loader, availability check returning the reason it cannot run here, or None)
E2E_PROVIDERS: dict[str, tuple[Callable[[ModelContext], Runner], Callable[[torch.device], str | None]]] = {
    "fastenc": (_fastenc_call(), lambda device: None),
    "fastenc-packed": (_fastenc_packed, lambda device: None),
    "fastenc-torch": (_fastenc_call("torch"), lambda device: None),
    "hf-eager": (_hf("eager"), lambda device: None),
    "hf-sdpa": (_hf("sdpa"), lambda device: None),
    "hf-compile": (_hf("sdpa", compiled=True), lambda device: None),
    "hf-flash": (_hf("flash_attention_2"), _needs_flash_attn),
}
DEFAULT_E2E_PROVIDERS = ("fastenc", "fastenc-packed", "hf-eager", "hf-sdpa", "hf-compile", "hf-flash")
QUICK_SKIPS = {"hf-compile": "not run with --quick: torch.compile spends tens of seconds per shape compiling "
                             "(about 40 s on a 2-core CPU); run without --quick, or name it in --providers"}


def _read_config(model_dir: Path):
    from .config import EncoderConfig

    return EncoderConfig.from_file(model_dir / "config.json")


def run_e2e(plan: "Plan", report: Report) -> None:
    """Every provider on every (model, shape, dtype), checked against hf-sdpa before it is timed."""
    device = plan.device
    with tempfile.TemporaryDirectory(prefix="fastenc-bench-") as tmp:
        for dtype_name in plan.dtypes:
            dtype = DTYPES[dtype_name]
            report.scope.add(("e2e", dtype_name, None))  # provider-level skips name no model
            for spec in plan.models:
                report.scope.add(("e2e", dtype_name, spec.name))
                _run_e2e_model(plan, report, spec, Path(tmp), dtype_name, dtype)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _run_e2e_model(plan, report: Report, spec: ModelSpec, workdir: Path, dtype_name: str,
                   dtype: torch.dtype) -> None:
    device = plan.device
    report.log(f"e2e {spec.name} {dtype_name}")
    try:
        model_dir = spec.materialize(workdir)
        config = _read_config(model_dir)
        reference_run = _hf("sdpa")(ModelContext(model_dir, device, torch.float32, None))
        baseline_run = (_hf("sdpa")(ModelContext(model_dir, device, dtype, None))
                        if dtype != torch.float32 else None)
    except Exception as exc:  # noqa: BLE001
        report.skip("e2e", "all", "all", dtype_name, f"the model or its float32 hf-sdpa reference did not load: "
                    f"{_exc_line(exc)}", model=spec.name)
        return
    ctx = ModelContext(model_dir, device, dtype, plan.backend)
    runners: dict[str, Runner] = {}
    for name in plan.providers:
        loader, unavailable = E2E_PROVIDERS[name]
        reason = unavailable(device)
        if reason is None:
            try:
                runners[name] = loader(ctx)
            except Exception as exc:  # noqa: BLE001
                reason = f"failed to load: {_exc_line(exc)}"
        if reason is not None:
            report.skip("e2e", "all", name, dtype_name, reason, model=spec.name)

    for shape in plan.shapes:
        if shape.seq > config.max_length:
            report.skip("e2e", shape.case(), "all", dtype_name,
                        f"sequence {shape.seq} is over the model's {config.max_length} positions", model=spec.name)
            continue
        inputs = Inputs.random(shape, config.vocab_size, config.pad_token_id, device)
        case = shape.case()
        mask = inputs.attention_mask.bool()
        try:
            with torch.inference_mode():
                reference_out = reference_run.prepare(inputs)().float().cpu()  # (batch, seq, hidden)
                baseline_out = baseline_run.prepare(inputs)().float().cpu() if baseline_run else None
        except Exception as exc:  # noqa: BLE001
            report.skip("e2e", case, "all", dtype_name, f"the {E2E_BASELINE} reference failed: {_exc_line(exc)}",
                        model=spec.name)
            continue
        fns, first_call = {}, {}
        for name, runner in runners.items():
            try:
                fn = runner.prepare(inputs)
                start = time.perf_counter()
                out = fn()
                _sync(device)
                first_call[name] = time.perf_counter() - start
                if runner.packed:  # (tokens, hidden): compare with the real tokens of the references
                    check = compare(f"{name} {case}", out, reference_out[mask],
                                    baseline_out[mask] if baseline_out is not None else None)
                else:
                    check = compare(f"{name} {case}", out, reference_out, baseline_out, mask=inputs.attention_mask)
                del out
            except Exception as exc:  # noqa: BLE001
                report.skip("e2e", case, name, dtype_name, _exc_line(exc), model=spec.name)
                continue
            if not check.ok:  # never time a wrong answer
                report.skip("e2e", case, name, dtype_name, f"output check against {E2E_BASELINE} (float32 "
                            f"reference) failed: {check.line()}", model=spec.name)
                continue
            fns[name] = fn
        timings = time_providers(fns, device, plan.repeats)
        flops = encoder_flops(inputs.lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        tokens = sum(inputs.lengths)
        for name, timing in timings.items():
            if isinstance(timing, Exception):
                report.skip("e2e", case, name, dtype_name, f"failed while timed: {_exc_line(timing)}", model=spec.name)
                continue
            base = {"suite": "e2e", "case": case, "provider": name, "dtype": dtype_name,
                    "batch": shape.batch, "seq": inputs.input_ids.shape[1], "model": spec.name, "tokens": tokens,
                    "mem_mib": memory_peak_mib(fns[name], device), "first_call_s": first_call[name]}
            report.add_rates(base, timing, [("tokens/s", tokens), ("TFLOP/s", flops)])
            report.log(f"  {spec.name} {case} {dtype_name} {name}: {timing.median:.3f} ms "
                       f"({timing.p20:.3f}-{timing.p80:.3f}), {tokens / timing.median * 1e3:,.0f} tokens/s")
        del fns
    del runners, ctx, reference_run, baseline_run


# ====================================================================================== kernel cases
@dataclasses.dataclass
class KernelCase:
    """One kernel at one shape: inputs, the fp32 reference, the providers and the work per call.

    ``providers[name](inputs) -> (run, canonical)``: ``run()`` is timed; ``canonical(out)`` maps its output
    to the reference layout for the check. ``unit`` is ``"TFLOP/s"`` (work in FLOPs) or ``"GB/s"`` (bytes).
    """

    kernel: str
    case: str
    batch: int
    seq: int
    make_inputs: Callable[[torch.device, torch.dtype], dict]
    reference: Callable[[dict], torch.Tensor]  # the torch twin, also run on float32 copies of the inputs
    providers: dict[str, Callable[[dict], tuple[Callable, Callable]]]
    work: Callable[[torch.dtype], float]
    unit: str
    baseline: str = "torch"


def _randn(shape, device, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _identity(out):
    return out


def _twin(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], tuple[Callable, Callable]]:
    return lambda inputs: (lambda: fn(inputs), _identity)


def _kernel(name: str, call: Callable[[Callable, dict], torch.Tensor]):
    """A fastenc Triton launcher (``fastenc.kernels.<name>``), imported when first used."""
    def provider(inputs):
        from . import kernels

        launcher = getattr(kernels, name)
        return (lambda: call(launcher, inputs)), _identity

    return provider


def _lengths(batch: int, seq: int, var: bool, seed: int = 0) -> list[int]:
    return Shape(batch, seq, 8 if var and seq > 8 else None).lengths(seed) if var else [seq] * batch


def attention_case(batch: int, seq: int, var: bool, heads: int = 12, head_dim: int = 64) -> KernelCase:
    lengths = _lengths(batch, seq, var)
    tokens, width = sum(lengths), max(lengths)

    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        qkv = _randn((3, heads, tokens, head_dim), device, dtype, generator)  # (3, H, T, D), as fused_qkv gives
        qkv[0] *= head_dim ** -0.5  # Q pre-scaled (the ops interface)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:])
        return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "cu": cu.to(device), "max": width}

    def ref(x):
        return reference.attention(x["q"], x["k"], x["v"], x["cu"], x["max"])

    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)

    def padded(x):  # (H, T, D) -> (B, H, S, D), zero padding; and the key mask for variable lengths
        device = x["q"].device
        slots = keep.reshape(-1).nonzero().squeeze(1).to(device)
        out = []
        for t in (x["q"], x["k"], x["v"]):
            p = t.new_zeros(heads, batch * width, head_dim)
            p[:, slots] = t
            out.append(p.view(heads, batch, width, head_dim).transpose(0, 1).contiguous())
        mask = None if tokens == batch * width else keep.to(device)[:, None, None, :]
        return out, mask, slots

    def sdpa(flash_only: bool):
        def provider(x):
            (q, k, v), mask, slots = padded(x)
            context = contextlib.nullcontext
            if flash_only:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def context():
                    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

            def run():
                with context():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

            def canonical(out):  # (B, H, S, D) -> (T, H*D)
                return out.permute(0, 2, 1, 3).reshape(batch * width, heads * head_dim)[slots]

            return run, canonical

        return provider

    def varlen(x):  # torch's flash varlen: (T, H, D)
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t.transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"]))
        return (lambda: varlen_attn(q, k, v, x["cu"], x["cu"], width, width, scale=1.0),
                lambda out: out.reshape(tokens, heads * head_dim))

    def flash_attn(x):
        from flash_attn import flash_attn_varlen_func

        q, k, v = (t.transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"]))
        return (lambda: flash_attn_varlen_func(q, k, v, x["cu"], x["cu"], width, width, softmax_scale=1.0),
                lambda out: out.reshape(tokens, heads * head_dim))

    providers = {
        "fastenc": _kernel("attention", lambda f, x: f(x["q"], x["k"], x["v"], x["cu"], x["max"])),
        "torch": _twin(ref),
        "sdpa": sdpa(False),
        "sdpa-flash": sdpa(True),
        "sdpa-varlen": varlen,
        "flash-attn": flash_attn,
    }
    return KernelCase("attention", f"attention{'-var' if var else ''} hd{head_dim}", batch, width, make_inputs, ref,
                      providers, lambda dtype: attention_flops(lengths, heads * head_dim), "TFLOP/s", baseline="sdpa")


def fused_qkv_case(batch: int, seq: int, hidden: int = 768, heads: int = 12) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), "w": _randn((3 * hidden, hidden), device, dtype, g,
                                                                               hidden ** -0.5),
                "b": _randn((3 * hidden,), device, dtype, g, 0.1)}

    def ref(x):  # F.linear (addmm) + split into heads, Q scaled: the torch twin
        return torch.stack(reference.fused_qkv(x["x"], x["w"], x["b"], heads).unbind(0))

    def fastenc_provider(x):
        from . import kernels

        return (lambda: kernels.fused_qkv(x["x"], x["w"], x["b"], heads)), (lambda out: torch.stack(tuple(out)))

    def twin(x):
        return (lambda: reference.fused_qkv(x["x"], x["w"], x["b"], heads)), (lambda out: torch.stack(tuple(out)))

    return KernelCase("fused_qkv", f"fused_qkv h{hidden}", batch, seq, make_inputs, ref,
                      {"fastenc": fastenc_provider, "torch": twin},
                      lambda dtype: 2 * tokens * hidden * 3 * hidden, "TFLOP/s")


def linear_case(batch: int, seq: int, n_in: int, n_out: int, activation: str | None) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, n_in), device, dtype, g), "w": _randn((n_out, n_in), device, dtype, g, n_in ** -0.5),
                "b": _randn((n_out,), device, dtype, g, 0.1)}

    def ref(x):
        return reference.linear(x["x"], x["w"], x["b"], activation)

    return KernelCase("linear", f"linear {n_in}->{n_out}{' ' + activation if activation else ''}", batch, seq,
                      make_inputs, ref,
                      {"fastenc": _kernel("linear", lambda f, x: f(x["x"], x["w"], x["b"], activation)),
                       "torch": _twin(ref)},
                      lambda dtype: 2 * tokens * n_in * n_out, "TFLOP/s")


def _norm_params(hidden, device, dtype, g):
    return {"weight": (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype),
            "bias": _randn((hidden,), device, dtype, g, 0.1), "eps": 1e-12}


def add_layer_norm_case(batch: int, seq: int, hidden: int = 768) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), "r": _randn((tokens, hidden), device, dtype, g),
                **_norm_params(hidden, device, dtype, g)}

    def ref(x):
        return reference.add_layer_norm(x["x"], x["r"], x["weight"], x["bias"], x["eps"])

    def work(dtype):  # read x and residual, write the output; weight and bias once
        return (3 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("add_layer_norm", f"add_layer_norm h{hidden}", batch, seq, make_inputs, ref,
                      {"fastenc": _kernel("add_layer_norm",
                                          lambda f, x: f(x["x"], x["r"], x["weight"], x["bias"], x["eps"])),
                       "torch": _twin(ref)},
                      work, "GB/s")


def gelu_layer_norm_case(batch: int, seq: int, hidden: int = 768) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), **_norm_params(hidden, device, dtype, g)}

    def ref(x):
        return reference.gelu_layer_norm(x["x"], x["weight"], x["bias"], x["eps"], "gelu")

    def work(dtype):  # read x, write the output; weight and bias once
        return (2 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("gelu_layer_norm", f"gelu_layer_norm h{hidden}", batch, seq, make_inputs, ref,
                      {"fastenc": _kernel("gelu_layer_norm",
                                          lambda f, x: f(x["x"], x["weight"], x["bias"], x["eps"], "gelu")),
                       "torch": _twin(ref)},
                      work, "GB/s")


def embeddings_case(batch: int, seq: int, hidden: int = 768, vocab: int = 30522) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"ids": torch.randint(0, vocab, (tokens,), generator=g, device=device),
                "pos": torch.arange(seq, device=device).repeat(batch),
                "types": torch.randint(0, 2, (tokens,), generator=g, device=device),
                "word": _randn((vocab, hidden), device, dtype, g), "position": _randn((512, hidden), device, dtype, g),
                "type": _randn((2, hidden), device, dtype, g), **_norm_params(hidden, device, dtype, g)}

    def args(x):
        return (x["ids"], x["pos"], x["types"], x["word"], x["position"], x["type"], x["weight"], x["bias"], x["eps"])

    def ref(x):
        return reference.embeddings(*args(x))

    def work(dtype):  # three int64 ids and three gathered rows read per token, one row written
        return tokens * 3 * 8 + (4 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("embeddings", f"embeddings h{hidden}", batch, seq, make_inputs, ref,
                      {"fastenc": _kernel("embeddings", lambda f, x: f(*args(x))), "torch": _twin(ref)},
                      work, "GB/s")


def kernel_cases(device_type: str, quick: bool) -> list[KernelCase]:
    """The kernel plan: attention over sequence lengths; the token-wise kernels at the e2e shapes."""
    if device_type == "cuda":
        seqs = (128, 512, 2048) if quick else (128, 256, 512, 1024, 2048, 4096)
        attention = [attention_case(max(1, 32768 // s), s, var) for var in (False, True) for s in seqs]
        shapes = ((32, 128), (32, 512)) if quick else ((32, 128), (32, 512), (128, 512))
        hiddens = ((768, 12),) if quick else ((768, 12), (1024, 16))
    elif quick:  # tiny: also what the tests run through the Triton interpreter
        attention = [attention_case(2, 32, var, heads=2) for var in (False, True)]
        shapes, hiddens = ((2, 8),), ((64, 2),)
    else:
        attention = [attention_case(4, s, var) for var in (False, True) for s in (128, 256)]
        shapes, hiddens = ((8, 128),), ((768, 12),)
    cases = list(attention)
    for batch, seq in shapes:
        for hidden, heads in hiddens:
            cases += [
                fused_qkv_case(batch, seq, hidden, heads),
                linear_case(batch, seq, hidden, 4 * hidden, "gelu"),
                linear_case(batch, seq, 4 * hidden, hidden, None),
                add_layer_norm_case(batch, seq, hidden),
                gelu_layer_norm_case(batch, seq, hidden),
                embeddings_case(batch, seq, hidden, vocab=1000 if quick else 30522),
            ]
    return cases


def _kernel_provider_unavailable(name: str, device: torch.device) -> str | None:
    if name == "fastenc":
        from .encoder import resolve_backend

        try:
            resolve_backend("triton", device)
        except BackendError as exc:
            return str(exc)
        return None
    if name in ("sdpa-varlen", "flash-attn") and device.type != "cuda":
        return "needs CUDA"
    if name == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    if name == "sdpa-varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def run_kernels(plan: "Plan", report: Report) -> None:
    device = plan.device
    cases = plan.kernel_cases
    names = list(dict.fromkeys(name for case in cases for name in case.providers))
    unavailable = {name: _kernel_provider_unavailable(name, device) for name in names}
    for dtype_name in plan.dtypes:
        report.scope.add(("kernel", dtype_name, None))
        for name, reason in unavailable.items():
            if reason:
                report.skip("kernel", "all", name, dtype_name, reason)
    for dtype_name in plan.dtypes:
        dtype = DTYPES[dtype_name]
        report.log(f"kernels {dtype_name}")
        for case in cases:
            _run_kernel_case(plan, report, case, dtype_name, dtype, unavailable)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _run_kernel_case(plan, report: Report, case: KernelCase, dtype_name: str, dtype: torch.dtype,
                     unavailable: dict) -> None:
    device = plan.device
    try:
        inputs = case.make_inputs(device, dtype)
        upcast = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        expected = case.reference(upcast)
        baseline = case.reference(inputs) if dtype != torch.float32 else None
    except Exception as exc:  # noqa: BLE001
        report.skip("kernel", case.case, "all", dtype_name, f"inputs or reference failed: {_exc_line(exc)}")
        return
    fns = {}
    for name, provider in case.providers.items():
        if unavailable.get(name) or (plan.kernel_providers and name not in plan.kernel_providers):
            continue
        try:
            run, canonical = provider(inputs)
            out = canonical(run())
            check = compare(f"{name} {case.case}", out, expected, baseline)
            del out
        except Exception as exc:  # noqa: BLE001
            report.skip("kernel", case.case, name, dtype_name, _exc_line(exc))
            continue
        if not check.ok:  # never time a wrong answer
            report.skip("kernel", case.case, name, dtype_name, f"output check against the float32 torch twin "
                        f"failed: {check.line()}")
            continue
        fns[name] = run
    del expected, baseline
    work = case.work(dtype)
    for name, timing in time_providers(fns, device, plan.repeats).items():
        if isinstance(timing, Exception):
            report.skip("kernel", case.case, name, dtype_name, f"failed while timed: {_exc_line(timing)}")
            continue
        base = {"suite": "kernel", "case": case.case, "provider": name, "dtype": dtype_name, "batch": case.batch,
                "seq": case.seq, "kernel": case.kernel, "baseline": case.baseline}
        report.add_rates(base, timing, [(case.unit, work)])
        rate = work / (timing.median * 1e-3) / (1e12 if case.unit == "TFLOP/s" else 1e9)
        report.log(f"  {case.case} {case.batch}x{case.seq} {dtype_name} {name}: {timing.median:.4f} ms, "
                   f"{rate:.3g} {case.unit}")


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


def e2e_shapes(device_type: str, quick: bool) -> list[Shape]:
    if device_type == "cuda":
        if quick:
            return [Shape(1, 128), Shape(32, 128), Shape(64, 512, var_min=8)]
        return [Shape(1, 128), Shape(32, 128), Shape(128, 128), Shape(32, 512), Shape(64, 512, var_min=8)]
    if quick:
        return [Shape(1, 16), Shape(2, 32), Shape(4, 32, var_min=8)]
    return [Shape(1, 128), Shape(8, 128), Shape(16, 256, var_min=8)]


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def make_plan(suite: str = "all", device=None, dtype: str | None = None, quick: bool = False,
              models: str | None = None, providers: str | None = None, backend: str | None = None,
              repeats: int | None = None) -> tuple[Plan, list[tuple[str, str]]]:
    """The run's plan from command-line values, and the providers left out on purpose (name, reason)."""
    from .encoder import resolve_device

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
    from .encoder import resolve_backend

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
    for kind, path in paths.items():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def render(path: Path, readme: Path | None = None) -> dict[str, Path]:
    """Rewrite the markdown and the plot of a results JSON (e.g. one measured where matplotlib was missing)."""
    result = json.loads(path.read_text())
    paths = {"json": path, "md": path.with_suffix(".md")}
    md = markdown(result)
    paths["md"].write_text(md + "\n")
    why = plot(result, path.with_suffix(".png"))
    if why:
        print(why, file=sys.stderr)
    else:
        paths["png"] = path.with_suffix(".png")
    if readme is not None:
        update_readme(readme, md)
    return paths


if __name__ == "__main__":  # python -m fastenc.bench render RESULTS.json [--readme README.md]
    parser = argparse.ArgumentParser(prog="python -m fastenc.bench",
                                     description="rewrite the .md and .png of a fastenc bench results JSON")
    parser.add_argument("action", choices=("render",))
    parser.add_argument("json", type=Path)
    parser.add_argument("--readme", type=Path)
    arguments = parser.parse_args()
    for written in render(arguments.json, arguments.readme).values():
        print(f"wrote {written}", file=sys.stderr)
