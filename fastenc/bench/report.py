"""The results of ``fastenc bench``: the Report of one run, the environment it ran in (provenance included),
the JSON file (written after every case, merged with an earlier run's rows of other cases), its markdown
table, its plot and the README table.

A results file can hold rows of several runs (a GPU session splits its work over several commands):
``runs`` lists each run's time, commit and measured peaks, and every row names its run, so a row's
``share_of_peak`` is always against the peaks of the run that measured it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import InputError
from .measure import Timing

E2E_BASELINE = "hf-sdpa"
PEAK_OF = {"TFLOP/s": "matmul_tflops", "GB/s": "copy_gbps"}  # a rate's ceiling in "peaks"
README_START, README_END = "<!-- fastenc-bench:start -->", "<!-- fastenc-bench:end -->"


# ========================================================================================== reporting
class Report:
    """Rows, skipped providers and notes of one run; prints progress to stderr as it goes.

    With a ``sink`` (``open``), ``flush()`` rewrites the results JSON whole (the rows of earlier runs kept,
    see ``merge_previous``), so the file is valid after every case: a timeout or a sticky device fault
    loses at most the case in flight.
    """

    def __init__(self, env: dict, peaks: dict, quiet: bool = False):
        self.env, self.peaks, self.quiet = env, peaks, quiet
        self.run_id = env.get("time", "")
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.scope: set[tuple] = set()  # (suite, dtype, case) this run covers: earlier rows of these are replaced
        self.sink: Path | None = None
        self.kept_rows: list[dict] = []  # from an earlier run written to the same file
        self.kept_skipped: list[dict] = []
        self.kept_runs: list[dict] = []

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def skip(self, suite: str, case: str, provider: str, dtype: str, reason: str, model: str | None = None) -> None:
        reason = " ".join(str(reason).split())[:500] or "no reason given"
        entry = {"suite": suite, "case": case, "provider": provider, "dtype": dtype, "reason": reason,
                 "run": self.run_id}
        if model is not None:
            entry["model"] = model
        self.skipped.append(entry)
        self.log(f"  not measured: {suite} {case} {provider} {dtype}: {reason}")

    def case_time(self, suite: str, case: str, dtype: str, estimate: float, seconds: float) -> None:
        """How long a case took beside its estimate (``estimate.py``): what the estimates are checked against."""
        self.env.setdefault("case_seconds", []).append(
            {"suite": suite, "case": case, "dtype": dtype, "estimate_s": round(estimate, 2), "seconds": round(seconds, 2)})

    def add_rates(self, base: dict, timing: Timing, rates: list[tuple[str, float]]) -> None:
        """One ``ms`` row, then one row per ``(metric, work per call)``; TFLOP/s and GB/s rows get their share
        of the matmul or copy peak (see ``set_shares``)."""
        base = {**base, "run": self.run_id}
        self.rows.append({**base, "metric": "ms", "value": timing.median, "p20": timing.p20, "p80": timing.p80})
        for metric, work in rates:
            scale = 1e12 if metric == "TFLOP/s" else 1e9 if metric == "GB/s" else 1.0
            row = {**base, "metric": metric, "value": work / (timing.median * 1e-3) / scale,
                   "p20": work / (timing.p80 * 1e-3) / scale, "p80": work / (timing.p20 * 1e-3) / scale}
            if metric in PEAK_OF:
                row["share_of_peak"] = row["value"] / self.peaks[PEAK_OF[metric]]
            self.rows.append(row)

    def set_shares(self, peaks: dict) -> None:
        """Final peaks of this run: recompute the share of every row this run measured (never an earlier run's)."""
        self.peaks = peaks
        for row in self.rows:
            if row["metric"] in PEAK_OF:
                row["share_of_peak"] = row["value"] / peaks[PEAK_OF[row["metric"]]]

    def open(self, path: Path) -> None:
        """Write to ``path`` from now on, keeping the rows of an earlier run there that this run does not cover."""
        self.sink = path
        merge_previous(self, path)

    def flush(self) -> None:
        if self.sink is not None:
            write_json_atomic(self.sink, self.to_json())

    def run_entry(self) -> dict:
        return {"id": self.run_id, "time": self.env.get("time"), "commit": self.env.get("commit"),
                "gpu": self.env.get("gpu"), "peaks": {k: v for k, v in self.peaks.items()}}

    def to_json(self) -> dict:
        return {"env": self.env, "peaks": self.peaks, "runs": self.kept_runs + [self.run_entry()],
                "rows": self.kept_rows + self.rows, "skipped": self.kept_skipped + self.skipped}


def write_json_atomic(path: Path, data: dict) -> None:
    """The whole file or nothing: written beside ``path``, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _exc_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


ROOT = Path(__file__).resolve().parents[2]  # the source tree (this file is fastenc/bench/report.py)
PROVENANCE = Path(".gpu") / "provenance.json"  # written by ``python -m benchmarks.gpu_check --bundle``


def git_commit(root: Path = ROOT) -> str:
    """The source tree's commit: ``FASTENC_BENCH_COMMIT``, else git, else the bundle's provenance file.

    git gives the short commit (``-dirty`` with uncommitted changes to tracked files). A copy of the tree
    without ``.git`` (a lent GPU machine) reads ``.gpu/provenance.json``, written when the tree was bundled,
    and checks the files it lists: ``-modified`` when one differs from what was bundled. ``unknown`` when
    none of the three is there.
    """
    if os.environ.get("FASTENC_BENCH_COMMIT"):
        return os.environ["FASTENC_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return provenance_commit(root)


def provenance_commit(root: Path = ROOT, path: Path | None = None) -> str:
    """The commit recorded in ``path`` (default ``<root>/.gpu/provenance.json``) when the tree was bundled,
    checked against the tree."""
    try:
        record = json.loads((path or root / PROVENANCE).read_text())
        commit = str(record["commit"])
        digest = tree_digest(root, record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    return commit if digest == record.get("digest") else commit + "-modified"


def tree_digest(root: Path, files: list[str]) -> str:
    """sha256 over the listed files' names and contents (a missing file counts as different)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        try:
            digest.update(hashlib.sha256((root / name).read_bytes()).digest())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def collect_env(device: torch.device, backend: str, quick: bool) -> dict:
    from .. import __version__
    from ..model import triton_interpreter_on

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "commit": git_commit(),
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


def _covered(entry: dict, scope: set[tuple]) -> bool:
    """Whether this run measures ``entry``'s case (then its earlier rows and skips are replaced).

    A skip of a whole suite, model or dtype (case ``all`` or ``<model>:all``) is replaced when this run
    covers any case of that suite and dtype (and model).
    """
    suite, dtype, case = entry["suite"], entry["dtype"], entry["case"]
    if (suite, dtype, case) in scope:
        return True
    if case == "all" or case.endswith(":all"):
        prefix = case[: -len("all")]
        return any(s == suite and d == dtype and c.startswith(prefix) for s, d, c in scope)
    return False


def merge_previous(report: Report, path: Path) -> None:
    """Keep the rows, skips and runs of an earlier file at ``path`` for cases this run does not measure.

    Files written before rows named their run get one run entry made from their ``env`` and ``peaks``.
    """
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    earlier = previous.get("env", {})
    legacy = earlier.get("time", "earlier run")
    kept = [{**r, "run": r.get("run", legacy)} for r in previous.get("rows", []) if not _covered(r, report.scope)]
    kept_skips = [{**s, "run": s.get("run", legacy)} for s in previous.get("skipped", [])
                  if not _covered(s, report.scope)]
    used = {r["run"] for r in kept} | {s["run"] for s in kept_skips}
    runs = previous.get("runs") or [{"id": legacy, "time": earlier.get("time"), "commit": earlier.get("commit"),
                                     "gpu": earlier.get("gpu"), "peaks": previous.get("peaks", {})}]
    report.kept_rows, report.kept_skipped = kept, kept_skips
    report.kept_runs = [run for run in runs if run["id"] in used and run["id"] != report.run_id]
    if kept or kept_skips:
        report.log(f"kept {len(kept)} rows of other cases from {path}")


def _fmt(x: float | None) -> str:
    if x is None or isinstance(x, str):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _key(row: dict) -> tuple:
    """What identifies a measured case (without the provider and metric)."""
    return row["suite"], row.get("model"), row["case"], row["batch"], row["seq"], row["dtype"]


def _lookup(rows: list[dict]) -> dict[tuple, dict]:
    return {(*_key(r), r["provider"], r["metric"]): r for r in rows}


def _peaks_line(peaks: dict) -> str:
    return (f"matmul {_fmt(peaks.get('matmul_tflops'))} TFLOP/s ({peaks.get('matmul')}), "
            f"copy {_fmt(peaks.get('copy_gbps'))} GB/s ({peaks.get('copy')})")


def _provider_label(row: dict) -> str:
    """The provider and what it ran: ``fastenc (graph)``, ``hf-compile (compiled, inductor)``."""
    mode = row.get("mode")
    if not mode:
        return row["provider"]
    if row.get("compile_backend") and row["compile_backend"] != "inductor":
        mode += f", {row['compile_backend']} backend"
    return f"{row['provider']} ({mode})"


def markdown(result: dict) -> str:
    env, peaks, rows = result["env"], result["peaks"], result["rows"]
    table = _lookup(rows)
    lines = [f"# fastenc benchmarks: {env['gpu']}, {env['time'][:10]}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env.get('transformers')}, "
             f"fastenc {env.get('fastenc')} (backend {env.get('fastenc_backend')}), commit {env['commit']}, "
             f"{env['time']}" + (" (--quick: smoke-test shapes, not a result)" if env.get("quick") else ""),
             ""]
    runs = [run for run in result.get("runs", []) if any(r.get("run") == run["id"] for r in rows)]
    if len(runs) > 1:
        lines += ["Rows of several runs; each row's % of peak is against its own run's measured peaks (the higher "
                  "of the measurements before and after its suites):", ""]
        lines += [f"- run {run['id']} (commit {run.get('commit')}): {_peaks_line(run['peaks'])}" for run in runs]
        lines.append("")
    else:
        lines += [f"Measured peaks (the higher of the measurements before and after the suites): {_peaks_line(peaks)}.",
                  ""]
    lines += [f"Note: {note}" for note in env.get("notes", [])]
    if env.get("notes"):
        lines.append("")

    e2e = [r for r in rows if r["suite"] == "e2e" and r["metric"] == "ms"]
    if e2e:
        lines += ["## End to end", "",
                  "Latency median (p20-p80); tokens/s and TFLOP/s on real tokens only; % of the measured matmul "
                  f"peak; speed relative to {E2E_BASELINE}. The provider's mode says what ran: `graph` (a CUDA "
                  "graph replayed), `eager` (kernels launched one by one), `compiled` (torch.compile, whole graph). "
                  "mem MiB: what one call allocates above the resident weights at its peak, plus what the provider "
                  "keeps between calls for it (a CUDA graph's memory pool). first call s: the first call at this "
                  "shape, compilation included (torch.compile's, Triton's, a graph capture).", "",
                  "| case | dtype | provider | ms median (p20-p80) | tokens/s | TFLOP/s | % peak | "
                  f"vs {E2E_BASELINE} | mem MiB | first call s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            key = _key(r)
            tps = table.get((*key, r["provider"], "tokens/s"))
            tfl = table.get((*key, r["provider"], "TFLOP/s"))
            base = table.get((*key, E2E_BASELINE, "ms"))
            rel = f"{base['value'] / r['value']:.2f}x" if base else "n/a"
            share = f"{100 * tfl['share_of_peak']:.1f}%" if tfl and "share_of_peak" in tfl else "n/a"
            lines.append(f"| {r['case']} | {r['dtype']} | {_provider_label(r)} | "
                         f"{_fmt(r['value'])} ({_fmt(r['p20'])}-{_fmt(r['p80'])}) | "
                         f"{_fmt(tps['value']) if tps else 'n/a'} | {_fmt(tfl['value']) if tfl else 'n/a'} | "
                         f"{share} | {rel} | {_fmt(r.get('mem_mib'))} | {_fmt(r.get('first_call_s'))} |")
        lines.append("")

    kernels = [r for r in rows if r["suite"] == "kernel" and r["metric"] == "ms"]
    if kernels:
        lines += ["## Kernels", "",
                  "TFLOP/s for GEMMs and attention, GB/s (each input read once, each output written once) for the "
                  "memory-bound kernels, both for MaxSim (bound by memory); % of the measured copy or matmul peak; "
                  "speed relative to the case's baseline (`sdpa` for attention, `torch-padded` for MaxSim, the "
                  "torch twin `torch` otherwise). Variable-length cases are "
                  "named `varBxMIN-MAX` (B sequences of lengths drawn from MIN..MAX); tokens: real tokens.", "",
                  "| case | tokens | dtype | provider | ms median (p20-p80) | rate | % peak | vs baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            key = _key(r)
            rates = [row for row in (table.get((*key, r["provider"], m)) for m in ("GB/s", "TFLOP/s")) if row]
            base = table.get((*key, r.get("baseline"), "ms"))
            rel = f"{base['value'] / r['value']:.2f}x" if base else "n/a"
            share = ", ".join(f"{100 * row['share_of_peak']:.1f}%" for row in rates if "share_of_peak" in row) or "n/a"
            rate_text = ", ".join(f"{_fmt(row['value'])} {row['metric']}" for row in rates) or "n/a"
            tokens = r.get("tokens", r["batch"] * r["seq"])
            lines.append(f"| {r['case']} | {tokens:,} | {r['dtype']} | {r['provider']} | "
                         f"{_fmt(r['value'])} ({_fmt(r['p20'])}-{_fmt(r['p80'])}) | {rate_text} | {share} | {rel} |")
        lines.append("")

    if env.get("case_seconds"):
        lines += ["## Time per case", "",
                  "Wall time of each case (its model's setup charged to its first case) beside the estimate the time "
                  "budget decided with (`fastenc/bench/estimate.py`).", "",
                  "| suite | case | dtype | estimate s | measured s |", "|---|---|---|---|---|"]
        lines += [f"| {c['suite']} | {c['case']} | {c['dtype']} | {c['estimate_s']:.1f} | {c['seconds']:.1f} |"
                  for c in env["case_seconds"]]
        lines.append("")

    if result.get("skipped"):
        lines += ["## Not measured", ""]
        for s in result["skipped"]:
            where = " ".join(x for x in (s["suite"], s["case"], s["dtype"]) if x)
            lines.append(f"- `{s['provider']}` ({where}): {s['reason']}")
        lines.append("")
    return "\n".join(lines)


def _plot_label(row: dict) -> str:
    if row["suite"] == "e2e":
        return row["case"]
    return f"{row['case']} {row['dtype']}"


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


def results_paths(env: dict, output: Path) -> dict[str, Path]:
    stem = result_stem(env)
    return {"json": output / f"{stem}.json", "md": output / f"{stem}.md", "png": output / f"{stem}.png"}


def write_results(report: Report, output: Path) -> dict[str, Path]:
    """The JSON (through the report's sink when it has one), the markdown and the plot."""
    paths = results_paths(report.env, output)
    if report.sink != paths["json"]:
        report.open(paths["json"])
    report.flush()
    result = report.to_json()
    paths["md"].write_text(markdown(result) + "\n")
    why = plot(result, paths["png"])
    if why:
        report.log(why)
        del paths["png"]
    return paths


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
