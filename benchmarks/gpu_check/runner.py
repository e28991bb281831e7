"""The command line and the run: each stage in its own process group with its share of the budget, the
report rewritten after every stage, the whole group of a stage stopped at its limit or when the check is
interrupted.

A stage's process is ``python -m benchmarks.gpu_check --stage NAME`` (and the helpers stages start:
``compile-group``, ``sanitizer-target``, ``cold-start``), from the tree's root with the tree (and the
bundle's ``site``) on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import plan as planning
from .processes import CheckInterrupted, run_group
from .records import ROOT, START, Stage, log, read_json, stage_command
from .summary import CheckState, write_fallback_summary, write_report

DEFAULT_DATA = ROOT / ".gpu"
STATUS_OK = ("ok", "skipped", "refused")
PROG = "python -m benchmarks.gpu_check"


def child_env(work: Path, data: Path, dry: bool, commit: str) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(data / "site")] if (data / "site").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TRITON_CACHE_DIR=str(work / "triton-cache"),
               FASTENC_BENCH_COMMIT=commit, MPLBACKEND="Agg")
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def binaries(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0


def run_child(stage: str, work: Path, env: dict, limit: float, *, data: Path, dry: bool, extra: tuple = (),
              tick=None) -> dict:
    """Run one stage in its own process group, stopped at its limit (``processes.run_group``); returns the
    runner's outcome: status, seconds, limit, note, exit code, CPU seconds, new binaries in the shared cache."""
    import resource

    cache = Path(env.get("TRITON_CACHE_DIR", work / "triton-cache"))
    before_binaries = binaries(cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = stage_command(stage, work, limit, data, dry, *extra)
    with open(work / f"{stage}.log", "ab") as out:
        outcome = run_group(command, limit=limit, cwd=ROOT, env=env, stdout=out, tick=tick)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and every process of it that was reaped
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    record = read_json(work / f"{stage}.json")
    status = record.get("status", "failed")
    if outcome.timed_out:
        status, note = "timeout", f"stopped at its {limit:.0f} s limit; what it wrote before is kept"
    elif outcome.returncode != 0 and status in ("running", "ok"):
        status, note = "failed", f"the stage's process exited with {outcome.returncode}"
    elif status == "running":
        status, note = "failed", "the stage ended without a result"
    else:
        note = record.get("note", "")
    return {"status": status, "seconds": round(outcome.seconds, 1), "limit_s": round(limit, 1), "note": note,
            "returncode": outcome.returncode, "cpu_s": round(cpu, 1),
            "binaries_new": binaries(cache) - before_binaries}


def _raise_interrupted(signum, frame):
    raise CheckInterrupted(signal.Signals(signum).name)


def run_check(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    selected = [s for s in planning.STAGES if s in args.only] if args.only else list(planning.STAGES)
    work = Path(tempfile.mkdtemp(prefix="fastenc-gpu-check-"))
    from fastenc.bench.report import git_commit, provenance_commit

    commit = git_commit()
    if commit == "unknown":
        commit = provenance_commit(ROOT, data / "provenance.json")
    previous_results = read_json(out / "results.json")  # read before the first report replaces it
    state = CheckState(out=out, work=work, dry=args.dry_run, budget=args.budget, commit=commit, selected=selected,
                       planned=planning.planned_limits(args.budget, selected, args.dry_run),
                       previous=previous_results.get("check", {}) if args.only else {},
                       previous_bench={k: v for k, v in previous_results.items() if k != "check"} if args.only else {})
    env = child_env(work, data, args.dry_run, commit)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    log(f"fastenc GPU check{' (dry run)' if args.dry_run else ''}: stages {', '.join(selected)}, budget "
        f"{args.budget:.0f} s, commit {commit}, work {work}")
    code = 0
    try:
        _report(state, full=False)
        for stage in selected:
            if stage == "report":
                continue
            later = [s for s in selected[selected.index(stage) + 1:] if s != "report"]
            left = args.budget - (time.time() - START) - planning.REPORT_RESERVE_S
            limit = planning.stage_limit(stage, left, later, args.dry_run)
            if limit is None:
                state.stages[stage] = {"status": "skipped", "seconds": 0.0, "limit_s": 0.0,
                                       "note": f"not started: {max(left, 0):.0f} s of the budget left for it and the "
                                               "stages after it"}
                log(f"{stage}: skipped ({state.stages[stage]['note']})")
                _report(state, full=False)
                continue
            warm = stage == "bench" and state.stages.get("compile", {}).get("status") == "ok"
            log(f"{stage}: started, limit {limit:.0f} s")
            state.running = (stage, time.time())
            _report(state, full=False)
            try:
                state.stages[stage] = run_child(stage, work, env, limit, data=data, dry=args.dry_run,
                                                extra=("--triton-warm",) if warm else (),
                                                tick=lambda: _report(state, full=False))
            except CheckInterrupted as exc:
                state.stages[stage] = {"status": "interrupted", "seconds": round(time.time() - state.running[1], 1),
                                       "limit_s": round(limit, 1), "note": f"the check got {exc} while it ran; its "
                                       "process group was interrupted, then killed"}
                raise
            finally:
                state.running = None
            s = state.stages[stage]
            log(f"{stage}: {s['status']} in {s['seconds']:.1f} s{': ' + s['note'] if s['note'] else ''}")
            _report(state, full=True)
    except CheckInterrupted as exc:
        log(f"interrupted ({exc}): writing what was done")
        state.interrupted = str(exc)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    start = time.time()
    if "report" in selected:
        state.stages["report"] = {"status": "running", "seconds": 0.0, "limit_s": planning.REPORT_RESERVE_S,
                                  "note": ""}
    try:
        files = write_report(state, full=True)
        if "report" in selected:
            state.stages["report"].update(status="ok", seconds=round(time.time() - start, 1),
                                          note=f"{len(files)} files in {out}")
    except Exception as exc:  # noqa: BLE001 - the summary says so, with the stages' table
        traceback.print_exc()
        state.stages["report"] = {"status": "failed", "seconds": round(time.time() - start, 1),
                                  "limit_s": planning.REPORT_RESERVE_S, "note": f"{type(exc).__name__}: {exc}"}
        write_fallback_summary(out, state.stages, exc)
    log(f"done in {time.time() - START:.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in state.stages.items()))
    summary = out / "summary.md"
    if summary.exists():
        print(summary.read_text())
    shutil.rmtree(work, ignore_errors=True)
    if code:
        return code
    return 0 if all(s["status"] in STATUS_OK for s in state.stages.values()) else 1


def _report(state: CheckState, full: bool) -> None:
    """Rewrite the check's files; a failure to do so is logged, never the end of the check."""
    try:
        write_report(state, full=full)
    except CheckInterrupted:
        raise
    except Exception:  # noqa: BLE001
        traceback.print_exc()


# ============================================================================================== stages
def run_stage(args) -> int:
    """The body of a stage's (or a helper's) process: run it, and record a failure with its traceback in the
    log; an interrupt (the runner's SIGINT at the stage's limit) is recorded as such."""
    from . import stage_bench, stage_compile, stage_correctness, stage_embed, stage_env, stage_sanitizer

    helpers = {"compile-group": stage_compile.group_main, "sanitizer-target": stage_sanitizer.target_main,
               "cold-start": stage_embed.cold_start_main}
    if args.stage in helpers:
        try:
            return helpers[args.stage](args)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            if args.stage == "compile-group":
                path = Path(args.work) / f"compile-{args.group}.json"
                from .records import Record

                Record(path, **{**read_json(path), "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
            return 1
    stages = {"env": stage_env.run, "compile": stage_compile.run, "correctness": stage_correctness.run,
              "sanitizer": stage_sanitizer.run, "bench": stage_bench.run, "embed": stage_embed.run}
    stage = Stage(args.stage, Path(args.work), args.limit, args.dry_run, Path(args.data),
                  triton_warm=args.triton_warm)
    try:
        stages[args.stage](stage)
    except KeyboardInterrupt:
        stage.record.update(status="timeout", note="interrupted at the stage's limit; what it found before is kept")
        return 130
    except Exception as exc:  # noqa: BLE001 - the record says what broke; the log has the traceback
        traceback.print_exc()
        stage.record.update(status="failed", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        return 1
    return 0


# ========================================================================================= command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="prove and measure fastenc on a GPU in one command "
                                     "(run from the tree's root)")
    parser.add_argument("--out", metavar="DIR", help="where the files go (at most 8, flat)")
    parser.add_argument("--budget", type=float, default=planning.DEFAULT_BUDGET, metavar="SECONDS",
                        help=f"for the whole check (default {planning.DEFAULT_BUDGET:.0f})")
    parser.add_argument("--only", metavar="STAGES", help=f"comma-separated stages ({', '.join(planning.STAGES)})")
    parser.add_argument("--dry-run", action="store_true", help="rehearse every stage on the CPU at small shapes")
    parser.add_argument("--data", metavar="DIR", default=str(DEFAULT_DATA),
                        help="the bundle written by --bundle (default: .gpu in the tree)")
    parser.add_argument("--bundle", metavar="DIR", help="write what the GPU machine lacks into DIR, then stop")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # a stage's own process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--triton-warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        return run_stage(args)
    if args.bundle:
        from .bundle import main as bundle_main

        return bundle_main(args.bundle)
    if not args.out:
        parser.error("--out DIR is required (or --bundle DIR)")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    for stage in args.only or ():
        if stage not in planning.STAGES:
            parser.error(f"--only {stage!r}: stages are {', '.join(planning.STAGES)}")
    if args.budget <= 0:
        parser.error("--budget must be a positive number of seconds")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
