"""The report: ``summary.md`` (the plan and each stage's outcome, the goals with their measured values and
ratios, ModernBERT beside transformers' own, the GPU subset of the tests per kernel variant, the
sanitizer's targets and hazards, the Triton compilation with each GEMM's tiles, the embed comparison),
``results.json`` (the bench results in the committed format, the whole check under ``"check"``),
``results.md``, ``results.png``, ``check.log`` (every stage's output) and ``junit.xml``: at most 8 files, flat
in the output folder, each under 16 MiB.

The runner rewrites them after every stage (and every few seconds while one runs, without the plot), each
file whole or not at all, so a check stopped at any moment leaves a valid summary of what it did.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

from .plan import CORRECTNESS_WORKERS, REPORT_RESERVE_S, STAGES, TRITON_COMPILE_S, new_compiles, shares
from .records import START, read_json, write_atomic

FILE_LIMIT = 16 * 2**20  # each file that comes back from the GPU machine
FILES = ("summary.md", "results.json", "results.md", "results.png", "check.log", "junit.xml")
LOG_PART = 2 * 2**20  # each stage's log in check.log: head and tail of this much at most


@dataclasses.dataclass
class CheckState:
    """What the runner knows: the options, the stages' outcomes so far, the plan."""

    out: Path
    work: Path
    dry: bool
    budget: float
    commit: str
    selected: list[str]
    planned: dict  # stage -> planned limit, seconds
    stages: dict = dataclasses.field(default_factory=dict)  # stage -> the runner's outcome
    previous: dict = dataclasses.field(default_factory=dict)  # an earlier results.json's check (--only)
    previous_bench: dict = dataclasses.field(default_factory=dict)
    running: tuple[str, float] | None = None  # the stage running now and when it started
    interrupted: str | None = None  # the signal that stopped the check
    plotted: int = 0  # the bench rows results.png shows


GOAL_TEXT = {
    "peak": "e2e BERT-base 128x128 fp16: >= 60% of the matmul peak measured in the same run",
    "vs-compile": "e2e BERT-base 128x128: >= 1.3x hf-compile tokens/s",
    "vs-sdpa": "e2e BERT-base 128x128: >= 1.5x hf-sdpa tokens/s",
    "vs-eager": "e2e BERT-base 128x128: >= 3x hf-eager tokens/s",
    "var": "variable length (var64x8-512): >= 2x hf-sdpa tokens/s",
    "latency": "batch 1x128 latency <= 0.3 ms (CUDA graphs on)",
    "attention": "attention head dim 64, sequence 512: >= 1.0x SDPA's flash path TFLOP/s",
    "add_layer_norm": "add_layer_norm: >= 80% of the measured copy bandwidth",
    "gelu_layer_norm": "gelu_layer_norm: >= 80% of the measured copy bandwidth",
    "embed-vs-st": "embed() on MiniLM, mixed lengths: >= 3x sentence-transformers encode texts/s",
    "embed-vs-forward": "embed() within 1.3x of forward_packed alone (the host keeps the GPU busy)",
    "cold-start": "cold start (import, load, first batch, Triton compilation included) < 20 s",
    "qwen3-full": "Qwen3-Embedding-0.6B's width, bf16, 32x512: >= 1.2x hf-sdpa tokens/s",
    "qwen3-var": "Qwen3-Embedding-0.6B's width, bf16, ragged (var64x8-512): >= 2x hf-sdpa tokens/s",
    "fp8-e2e": "e2e BERT-base 128x128 fp8: >= 1.6x fastenc's fp16 tokens/s",
    "fp8-gemm": "FP8 GEMM (BERT-base's FFN shapes, 16,384 tokens): >= 70% of the measured FP8 matmul peak (the lower "
                "of the two)",
}


def goals(bench: dict, env: dict, embed: dict, dry: bool) -> list[dict]:
    """Every performance goal: measured value, target, ratio (measured over target, >= 1 is met)."""
    import torch

    from fastenc.bench.suite import check_plan

    plan = check_plan(torch.device("cpu" if dry else "cuda"), small=dry)
    main, latency, var = plan.e2e[0].name, plan.e2e[1].name, plan.e2e[2].name
    attention = plan.kernels[0].name
    norms = [r.name for r in plan.kernels if r.case.kernel in ("add_layer_norm", "gelu_layer_norm")]
    rows = bench.get("rows", [])

    def row(case, provider, metric, dtype="fp16"):
        return next((r for r in rows if (r["case"], r["provider"], r["metric"], r["dtype"]) ==
                     (case, provider, metric, dtype)), None)

    def entry(key, measured, target, ratio, unit, missing):
        met = None if ratio is None else ratio >= 1.0
        return {"goal": key, "text": GOAL_TEXT[key], "measured": measured, "unit": unit, "target": target,
                "ratio": ratio, "met": met, "note": missing if ratio is None else ""}

    out = []
    peaks = env.get("peaks", {})
    fastenc_tflops = row(main, "fastenc", "TFLOP/s")
    peak = peaks.get("matmul_fp16_tflops")
    share = fastenc_tflops["value"] / peak if fastenc_tflops and peak else None
    out.append(entry("peak", share, 0.60, share / 0.60 if share is not None else None, "share of peak",
                     "no fastenc row or no measured peak"))
    for key, peer, target in (("vs-compile", "hf-compile", 1.3), ("vs-sdpa", "hf-sdpa", 1.5),
                              ("vs-eager", "hf-eager", 3.0)):
        ours, theirs = row(main, "fastenc", "tokens/s"), row(main, peer, "tokens/s")
        speedup = ours["value"] / theirs["value"] if ours and theirs else None
        out.append(entry(key, speedup, target, speedup / target if speedup else None, "x",
                         f"missing row: {'fastenc' if not ours else peer} at {main}"))
    ours, theirs = row(var, "fastenc", "tokens/s"), row(var, "hf-sdpa", "tokens/s")
    speedup = ours["value"] / theirs["value"] if ours and theirs else None
    out.append(entry("var", speedup, 2.0, speedup / 2.0 if speedup else None, "x", f"missing rows at {var}"))
    ms = row(latency, "fastenc", "ms")
    item = entry("latency", ms["value"] if ms else None, 0.3, 0.3 / ms["value"] if ms else None, "ms",
                 f"no fastenc row at {latency}")
    if ms:
        item["note"] = f"mode {ms.get('mode')}"
    out.append(item)
    ours, theirs = row(attention, "fastenc", "TFLOP/s"), row(attention, "sdpa-flash", "TFLOP/s")
    speedup = ours["value"] / theirs["value"] if ours and theirs else None
    out.append(entry("attention", speedup, 1.0, speedup, "x", f"missing rows at {attention}"))
    copy = peaks.get("copy_gbps")
    for key, case in zip(("add_layer_norm", "gelu_layer_norm"), norms):
        rate = row(case, "fastenc", "GB/s")
        share = rate["value"] / copy if rate and copy else None
        out.append(entry(key, share, 0.80, share / 0.80 if share is not None else None, "share of copy",
                         f"no fastenc row at {case} or no measured copy bandwidth"))
    fastenc_s, st_s, forward_s = embed.get("fastenc_s"), embed.get("sentence_transformers_s"), \
        embed.get("forward_packed_s")
    speedup = st_s / fastenc_s if fastenc_s and st_s else None
    out.append(entry("embed-vs-st", speedup, 3.0, speedup / 3.0 if speedup else None, "x", "embed stage incomplete"))
    over = fastenc_s / forward_s if fastenc_s and forward_s else None
    out.append(entry("embed-vs-forward", over, 1.3, 1.3 / over if over else None, "x of forward_packed",
                     "embed stage incomplete"))
    cold = (embed.get("cold_start") or {}).get("total_s")
    out.append(entry("cold-start", cold, 20.0, 20.0 / cold if cold else None, "s", "cold start not measured"))
    qwen3 = [c.name for c in plan.e2e if c.model.family == "qwen3" and c.dtype == "bf16"]
    for key, case, target in (("qwen3-full", qwen3[0], 1.2), ("qwen3-var", qwen3[1], 2.0)):
        ours, theirs = row(case, "fastenc", "tokens/s", "bf16"), row(case, "hf-sdpa", "tokens/s", "bf16")
        speedup = ours["value"] / theirs["value"] if ours and theirs else None
        out.append(entry(key, speedup, target, speedup / target if speedup else None, "x", f"missing rows at {case}"))
    fp8_main = next(c.name for c in plan.e2e if c.dtype == "fp8")
    ours, fp16 = row(fp8_main, "fastenc", "tokens/s", "fp8"), row(main, "fastenc", "tokens/s")
    speedup = ours["value"] / fp16["value"] if ours and fp16 else None
    out.append(entry("fp8-e2e", speedup, 1.6, speedup / 1.6 if speedup else None, "x of fp16",
                     f"missing row: fastenc {'fp8 at ' + fp8_main if not ours else 'fp16 at ' + main}"))
    fp8_peak = peaks.get("matmul_fp8_tflops")
    gemms = [r.name for r in plan.kernels if r.dtype == "fp8"]
    rates = {case: row(case, "fastenc", "TFLOP/s", "fp8") for case in gemms}
    shares = {case: r["value"] / fp8_peak for case, r in rates.items() if r and fp8_peak}
    share = min(shares.values()) if len(shares) == len(gemms) and shares else None
    item = entry("fp8-gemm", share, 0.70, share / 0.70 if share is not None else None, "share of FP8 peak",
                 "no measured FP8 peak (needs sm_89 or sm_90)" if not fp8_peak else
                 "missing fastenc rows at " + ", ".join(c for c in gemms if c not in shares))
    if share is not None:
        item["note"] = ", ".join(f"{case.split(':')[1]} {value:.0%}" for case, value in shares.items())
    out.append(item)
    return out


def modernbert_comparison(bench: dict, dry: bool) -> list[dict]:
    """fastenc's ModernBERT against transformers' own (SDPA, eager) in the bench stage's ModernBERT cases,
    tokens/s and fastenc's speedup. No target is set for it."""
    import torch

    from fastenc.bench.suite import check_plan

    plan = check_plan(torch.device("cpu" if dry else "cuda"), small=dry)
    rows = {(r["case"], r["provider"], r["dtype"]): r for r in bench.get("rows", []) if r["metric"] == "tokens/s"}
    out = []
    for case in plan.e2e:
        if case.model.family != "modernbert":
            continue
        ours = rows.get((case.name, "fastenc", case.dtype))
        for peer in (p for p in case.providers if p.startswith("hf-")):
            theirs = rows.get((case.name, peer, case.dtype))
            out.append({"case": case.name, "dtype": case.dtype, "peer": peer,
                        "fastenc_tokens_s": ours["value"] if ours else None,
                        "peer_tokens_s": theirs["value"] if theirs else None,
                        "speedup": ours["value"] / theirs["value"] if ours and theirs else None})
    return out


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit.startswith("share"):
        return f"{100 * value:.1f}%"
    if unit == "x" or unit.startswith("x "):
        return f"{value:.2f}x"
    return f"{value:.3g} {unit}".strip()


# ============================================================================================== records
def stage_records(state: CheckState) -> dict[str, dict]:
    """Each stage's record (written by its process) merged with the runner's outcome; an unselected stage
    keeps an earlier run's record (``--only``)."""
    records = {}
    for stage in STAGES[:-1]:
        if stage in state.stages:
            records[stage] = {**read_json(state.work / f"{stage}.json"), **state.stages[stage]}
        elif state.running and state.running[0] == stage:
            records[stage] = {**read_json(state.work / f"{stage}.json"), "status": "running",
                              "seconds": round(time.time() - state.running[1], 1), "limit_s": 0.0,
                              "note": "running when this summary was written"}
        elif stage in state.selected and state.interrupted:
            records[stage] = {"status": "not run", "seconds": 0.0, "limit_s": 0.0,
                              "note": f"the check got {state.interrupted} before it started"}
        elif stage in state.selected:
            records[stage] = {"status": "pending", "seconds": 0.0, "limit_s": 0.0, "note": "not started yet"}
        elif stage in state.previous.get("stages", {}):
            records[stage] = {**state.previous["stages"][stage], "from_earlier_run": True}
        else:
            records[stage] = {"status": "not run", "seconds": 0.0, "limit_s": 0.0, "note": "not selected (--only)"}
        if stage in state.planned:
            records[stage]["planned_limit_s"] = round(state.planned[stage], 1)
    return records


def bench_results(state: CheckState, records: dict) -> dict:
    """The bench stage's results file (what it wrote so far), or an earlier run's (``--only``)."""
    bench_record = records["bench"]
    path = Path(bench_record["results"]) if bench_record.get("results") else None
    if path is None or not path.exists():  # a bench stage stopped early still wrote its JSON
        found = sorted((state.work / "bench").glob("*.json")) if (state.work / "bench").is_dir() else []
        path = found[0] if found else None
    if path is not None:
        bench = read_json(path)
    elif "bench" not in state.selected:
        bench = dict(state.previous_bench)
    else:
        bench = {}
    env = records["env"]
    bench.setdefault("env", {"gpu": env.get("gpu"), "commit": state.commit})
    for key in ("peaks", "runs", "rows", "skipped"):
        bench.setdefault(key, {} if key == "peaks" else [])
    return bench


def compile_plan(records: dict) -> dict[str, int]:
    """Planned new Triton compiles per stage (the dry run's recorded launches at the GPU's shapes)."""
    keys = {stage: record["plan_keys"] for stage, record in records.items() if "plan_keys" in record}
    return new_compiles(keys) if keys else {}


def compile_seconds(stage: str, count: int, records: dict) -> float:
    """What ``count`` new compiles cost a stage on the GPU machine's host: the compile stage's groups run in
    parallel (its longest group counts), the correctness stage's tests in ``CORRECTNESS_WORKERS`` workers."""
    if stage == "compile":
        return TRITON_COMPILE_S * max((records["compile"].get("plan_groups") or {"": count}).values())
    return TRITON_COMPILE_S * count / (CORRECTNESS_WORKERS if stage == "correctness" else 1)


# ============================================================================================== report
def write_report(state: CheckState, *, full: bool = True) -> list[Path]:
    """The check's files in ``state.out`` (see the module docstring); ``full=False`` (while a stage runs):
    summary.md, results.json and check.log only."""
    out = state.out
    records = stage_records(state)
    bench = bench_results(state, records)
    env = records["env"]
    goal_list = goals(bench, env, records["embed"], state.dry)
    share, floor = shares(state.dry)
    check = {"version": 2, "dry_run": state.dry, "commit": state.commit, "budget_s": state.budget,
             "total_s": round(time.time() - START, 1),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "gpu": env.get("gpu"), "complete": state.running is None and all(
                 s in state.stages for s in state.selected if s != "report"),
             "plan": {"shares": share, "floors": floor, "report_reserve_s": REPORT_RESERVE_S,
                      "planned_limits_s": {k: round(v, 1) for k, v in state.planned.items()},
                      "planned_compiles": (compiles := compile_plan(records)),
                      "planned_compile_s": {k: round(compile_seconds(k, n, records), 1) for k, n in compiles.items()}},
             "stages": records, "goals": goal_list, "modernbert": modernbert_comparison(bench, state.dry)}
    # summary.md before results.json, so a reader that finds results.json finds the summary too
    write_atomic(out / "summary.md", summary_markdown(check, bench))
    written = [out / "summary.md"]
    write_atomic(out / "results.json", json.dumps(dict(bench, check=check), indent=1, default=str) + "\n")
    written.append(out / "results.json")
    if full and (bench.get("rows") or bench.get("skipped")):
        from fastenc.bench.report import markdown, plot

        try:
            write_atomic(out / "results.md", markdown(bench) + "\n")
            written.append(out / "results.md")
        except (KeyError, TypeError) as exc:
            records["bench"]["note"] = f"{records['bench'].get('note', '')}; results.md not written ({exc})"
        if bench.get("rows") and (len(bench["rows"]) != state.plotted or not (out / "results.png").exists()):
            tmp = out / ".results.png.tmp.png"
            if plot(bench, tmp) is None:
                tmp.replace(out / "results.png")
                state.plotted = len(bench["rows"])
        if (out / "results.png").exists():
            written.append(out / "results.png")
    junit = state.work / "junit.xml"
    if full and junit.exists():
        write_atomic(out / "junit.xml", junit.read_bytes())
        written.append(out / "junit.xml")
    write_log(out / "check.log", state.work)
    written.append(out / "check.log")
    for path in written:  # at most 16 MiB each: logs are cut in the middle, nothing else gets near it
        if path.stat().st_size > FILE_LIMIT:
            data = path.read_bytes()
            write_atomic(path, data[: FILE_LIMIT // 2 - 1024] + b"\n[... cut ...]\n" + data[-FILE_LIMIT // 2 + 1024:])
    return written


def write_log(path: Path, work: Path) -> None:
    """Every stage's output so far, in stage order, each cut to its head and tail if longer than 2 MiB."""
    parts = []
    for stage in STAGES[:-1]:
        for name in (f"{stage}.log", "correctness-plan.log" if stage == "correctness" else None,
                     "sanitizer-output.log" if stage == "sanitizer" else None):
            if not name or not (work / name).exists():
                continue
            data = (work / name).read_bytes()
            if len(data) > 2 * LOG_PART:
                data = data[:LOG_PART] + b"\n[... cut ...]\n" + data[-LOG_PART:]
            parts.append(f"\n===== {name} =====\n".encode() + data)
    write_atomic(path, b"".join(parts))


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def summary_markdown(check: dict, bench: dict) -> str:
    stages, env = check["stages"], check["stages"]["env"]
    lines = [f"# fastenc GPU check: {check.get('gpu') or 'unknown device'}, {check['time'][:10]}", ""]
    if check["dry_run"]:
        lines += ["**Dry run on the CPU** (small shapes, torch backend and the Triton interpreter, no sanitizer): "
                  "the numbers below rehearse the check; they are not results.", ""]
    if not check["complete"]:
        lines += ["**Partial**: written while the check ran; the stages marked pending or running had not "
                  "finished.", ""]
    lines += [f"commit {check['commit']}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
              f"{env.get('transformers')}, sentence-transformers {env.get('sentence_transformers')}; "
              f"{env.get('sm_count') or '-'} SMs, driver {env.get('driver') or '-'}; "
              f"total {check['total_s']:.0f} s of a {check['budget_s']:.0f} s budget.", ""]
    peaks = env.get("peaks") or {}
    if peaks:
        lines += [f"Measured in this run: matmul fp16 {_fmt(peaks.get('matmul_fp16_tflops'), 'TFLOP/s')}, bf16 "
                  f"{_fmt(peaks.get('matmul_bf16_tflops'), 'TFLOP/s')}, fp8 "
                  f"{_fmt(peaks.get('matmul_fp8_tflops'), 'TFLOP/s')} "
                  f"({peaks.get('matmul')}); copy "
                  f"{_fmt(peaks.get('copy_gbps'), 'GB/s')} ({peaks.get('copy')}).", ""]
    plan = check["plan"]
    compiles = plan["planned_compiles"]
    lines += ["## Stages", "", "| stage | status | seconds | limit s | planned limit s | share | Triton compiles "
              "(planned new / built) | note |", "|---|---|---|---|---|---|---|---|"]
    for stage, record in stages.items():
        note = _cell(record.get("note", ""))
        if record.get("from_earlier_run"):
            note = "(from an earlier run) " + note
        share = plan["shares"].get(stage)
        built = record.get("binaries_new")
        planned = compiles.get(stage, "-")
        if stage in plan["planned_compile_s"]:
            planned = f"{planned} (~{plan['planned_compile_s'][stage]:.0f} s)"
        compiled = f"{planned} / {'-' if built is None else built}"
        lines.append(f"| {stage} | {record.get('status')} | {record.get('seconds', 0):.1f} | "
                     f"{record.get('limit_s', 0):.0f} | {record.get('planned_limit_s', '-')} | "
                     f"{'-' if share is None else f'{share:.0%}'} | {compiled} | {note} |")
    limits = plan["planned_limits_s"]
    lines += ["", f"The planned limits add up to {sum(limits.values()):.0f} s of the {check['budget_s']:.0f} s budget "
              f"({plan['report_reserve_s']:.0f} s are kept for the report): each stage starts with its share of what "
              "is left, so time one does not use goes to the later ones. Planned compiles: the Triton "
              "specialisations a stage launches at the GPU's shapes that no earlier stage launched (recorded by the "
              f"dry run without running them), with what they cost at ~{TRITON_COMPILE_S} s each on the GPU "
              f"machine's host (the compile stage's groups in parallel, the tests in {CORRECTNESS_WORKERS} workers); "
              "built: new binaries in the shared Triton cache after the stage."]
    lines += ["", "## Goals (issues 13, 29 and 33)", "", "| goal | measured | target | ratio | met |", "|---|---|---|---|---|"]
    for goal in check["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        measured = _fmt(goal["measured"], goal["unit"])
        if goal["note"]:
            measured += f" ({goal['note']})"
        ratio = "n/a" if goal["ratio"] is None else f"{goal['ratio']:.2f}"
        lines.append(f"| {goal['text']} | {measured} | {_fmt(goal['target'], goal['unit'])} | {ratio} | {met} |")
    if check.get("modernbert"):
        lines += ["", "## ModernBERT-base against transformers' ModernBERT (issue 16)", "",
                  "| case | dtype | peer | fastenc tokens/s | peer tokens/s | speedup |", "|---|---|---|---|---|---|"]
        for item in check["modernbert"]:
            lines.append(f"| {item['case']} | {item['dtype']} | {item['peer']} | {_fmt(item['fastenc_tokens_s'])} | "
                         f"{_fmt(item['peer_tokens_s'])} | {_fmt(item['speedup'], 'x')} |")
    lines += _correctness_section(stages["correctness"])
    lines += _sanitizer_section(stages["sanitizer"])
    lines += _compile_section(stages["compile"])
    lines += _embed_section(stages["embed"])
    skipped = bench.get("skipped") or []
    if skipped:
        lines += ["", "## Not measured in the bench stage", ""]
        lines += [f"- `{s['provider']}` ({s['suite']} {s['case']} {s['dtype']}): {s['reason']}" for s in skipped]
    lines += ["", "Files: summary.md, results.json (the bench results in the committed format, this check under "
              "\"check\"), results.md, results.png, check.log, junit.xml.", ""]
    return "\n".join(lines)


def _correctness_section(record: dict) -> list[str]:
    lines = []
    failed = record.get("failed_tests") or []
    if failed:
        lines += ["", "## Failed tests", ""]
        lines += [f"- `{t['test']}` ({t['kind']}): {_cell(t['message'])}" for t in failed]
    subset = record.get("subset") or {}
    if subset:
        total = sum(len(ids) for ids in subset.values())
        lines += ["", f"## The GPU subset of the tests ({total} tests; correctness stage)", "",
                  "Per test function, which is per kernel variant: `gpu` marks the fp16/bf16 cases of tests that run "
                  "on the CPU too, `cuda` the GPU-only ones.", "", "| test | cases | marked |", "|---|---|---|"]
        for test, ids in sorted(subset.items()):
            marks = sorted({i.rsplit(" ", 1)[-1] for i in ids})
            lines.append(f"| `{test}` | {len(ids)} | {', '.join(marks)} |")
    return lines


def _sanitizer_section(record: dict) -> list[str]:
    targets = record.get("targets") or {}
    if not targets:
        return []
    lines = ["", "## Sanitizer", ""]
    lines += ["Targets per tool:", ""] + [f"- {tool}: {', '.join(names)}" for tool, names in targets.items()]
    for tool, result in (record.get("checks") or {}).items():
        lines += ["", f"Results ({tool if tool != 'none' else 'the targets without the tool'}): "
                  + "; ".join(result.get("lines", [])) + "."]
    for tool, result in (record.get("checks") or {}).items():
        races = result.get("races") or []
        if races:
            lines += ["", f"{tool}: {len(races)} reported hazards", "", "| kernel | accesses | severity | count | "
                      "verdict | why |", "|---|---|---|---|---|---|"]
            lines += [f"| {h['kernel']} | {h['accesses']} | {h['severity']} | {h['count']} | {h['verdict']} | "
                      f"{_cell(h['why'])} |" for h in races]
    return lines


def _compile_section(record: dict) -> list[str]:
    lines = []
    if record.get("kernels"):
        lines += ["", "## Triton compilation (compile stage, a cache per group)", "",
                  "| kernel | compiled | loaded from a group's cache | seconds |", "|---|---|---|---|"]
        for kernel, entry in sorted(record["kernels"].items()):
            lines.append(f"| {kernel} | {entry['compiles']} | {entry.get('loads', 0)} | {entry['compile_s']:.2f} |")
    if record.get("plan_groups"):
        lines += ["", "Planned launches per group at the GPU's shapes: " + ", ".join(
            f"{name} {count}" for name, count in record["plan_groups"].items()) + "."]
    gemms = record.get("gemms") or []
    if gemms:
        lines += ["", "GEMM tiles (chosen from N and K only; a 128-token batch launches `tiles at 128`):", "",
                  "| kernel | dtype | N | K | tile (M x N x K) | tiles at 128 tokens |", "|---|---|---|---|---|---|"]
        for g in sorted(gemms, key=lambda g: (g["kernel"], str(g["dtype"]), g["N"], g["K"])):
            lines.append(f"| {g['kernel']} | {g['dtype']} | {g['N']} | {g['K']} | {g['tile']} | {g['tiles_128']} |")
    return lines


def _embed_section(embed: dict) -> list[str]:
    if not embed.get("texts") or embed.get("fastenc_s") is None:
        return []
    cold = embed.get("cold_start") or {}
    return ["", "## Embed", "",
            f"{embed.get('texts')} texts ({embed.get('texts_source')}), {embed.get('tokens')} tokens "
            f"(mean {_fmt(embed.get('tokens_mean'))}, max {embed.get('tokens_max')}), model: "
            f"{embed.get('model')}, {embed.get('dtype')}.", "",
            f"- fastenc embed(): {_fmt(embed.get('fastenc_s'), 's')} ({_fmt(embed.get('texts_per_s'))} texts/s)",
            f"- forward_packed alone on the same {embed.get('batches')} packs: "
            f"{_fmt(embed.get('forward_packed_s'), 's')}; through the encoder's run path (a CUDA-graph replay "
            f"where a batch fits one): {_fmt(embed.get('run_s'), 's')}",
            f"- sentence-transformers encode: {_fmt(embed.get('sentence_transformers_s'), 's')} "
            f"({_fmt(embed.get('st_texts_per_s'))} texts/s); cosine to fastenc >= {_fmt(embed.get('cosine_min'))}",
            f"- cold start: import {_fmt(cold.get('import_s'), 's')}, load {_fmt(cold.get('load_s'), 's')}, "
            f"first batch {_fmt(cold.get('first_batch_s'), 's')} ({cold.get('binaries_compiled', 'n/a')} "
            f"Triton binaries compiled), total {_fmt(cold.get('total_s'), 's')}"]


def write_fallback_summary(out: Path, stages: dict, exc: BaseException) -> None:
    lines = ["# fastenc GPU check: the report failed", "", f"{type(exc).__name__}: {exc}", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} | {_cell(v.get('note', ''))} |" for k, v in stages.items()]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")
