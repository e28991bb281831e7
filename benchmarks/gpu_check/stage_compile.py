"""The ``compile`` stage: the first call of every kernel at the shapes and dtypes the later stages run, in
parallel groups, each compiling into a Triton cache of its own (its binaries and compile times are its
own: ``launches.compile_timer`` times each compile with Triton's hooks), merged afterwards into the
cache the later stages share.

A group is a dtype and encoders of ``fastenc.bench`` model specs (one layer where every layer runs the
same kernels; ModernBERT's three kinds of block) run on packed batches whose token counts are divisible
by 16 and not (Triton specialises on it), or the sanitizer's targets themselves. Token counts and tile
shapes of every GEMM are in the report: ``tiles at 128 tokens`` is what a one-sequence batch can use of
the GPU.

The dry run rehearses one small group (two models) under the interpreter and, while it runs, plans the
GPU run (``plan``): the launches of the GPU's groups, and of the later stages, recorded at the GPU's
shapes without launching anything, which gives the compiles each stage will cost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

from .launches import plan_keys
from .processes import GRACE_S, run_member
from .records import ROOT, Record, Stage, read_json, remaining


def groups(dry: bool) -> dict[str, dict]:
    """The groups: a dtype and its models, each a model spec with the packed batches' lengths (or the
    sanitizer's targets)."""
    from fastenc.bench.e2e import MODELS, ModelSpec, Shape

    if dry:  # the interpreter runs one program at a time: a few tokens, one process
        return {"tiny-fp16": dict(dtype="fp16", models=[
            (ModelSpec("tiny-hd40", layers=1, hidden=80, heads=2, intermediate=96, vocab=1000), [[8], [3, 2]]),
            # ModernBERT's blocks (global, local, local) with a window of ±4 its 11 tokens span
            (ModelSpec("tiny-modernbert", layers=3, hidden=64, heads=2, intermediate=48, vocab=1000,
                       family="modernbert", local_attention=8), [[11, 3]])])}
    var, ragged = Shape(64, 512, var_min=8).lengths(), [7, 97, 129, 33, 1]
    bert = ModelSpec("bert-base-1l", layers=1)
    qwen3 = dataclasses.replace(MODELS["qwen3-0.6b"], name="qwen3-0.6b-1l", layers=1)
    return {
        # bench: 128 x 128, 1 x 128 (the graph bucket), var64x8-512, attention 64 x 512, the LayerNorms
        "bert-base-fp16": dict(dtype="fp16", models=[(bert, [[128] * 128, [128], var, [512] * 64])]),
        "bert-base-bf16": dict(dtype="bf16", models=[(bert, [[128] * 128, ragged])]),
        # bench's extended tier: BERT-base in FP8 at 128 x 128 and var64x8-512
        "bert-base-fp8": dict(dtype="fp8", models=[(bert, [[128] * 128, var])]),
        # bench: ModernBERT-base at 32 x 512 and var64x8-512; three layers hold its kinds of block
        "modernbert-base-fp16": dict(dtype="fp16", models=[(ModelSpec(
            "modernbert-base-3l", layers=3, intermediate=1152, vocab=50368, family="modernbert"), [[512] * 32, var])]),
        # bench's extended tier: Qwen3-Embedding-0.6B's width (one layer holds its kinds of kernel)
        "qwen3-bf16": dict(dtype="bf16", models=[(qwen3, [[512] * 32, var])]),
        "qwen3-fp16": dict(dtype="fp16", models=[(qwen3, [[512] * 32])]),
        # embed: graph buckets (powers of two) and eager batches of any size
        "minilm-fp16": dict(dtype="fp16", models=[(ModelSpec("minilm-1l", layers=1, hidden=384, heads=12,
                                                             intermediate=1536),
                                                   [[128] * 16, [64], ragged, [37] * 70 + [255] * 3])]),
        # the sanitizer's targets, exactly as it runs them
        "sanitizer": dict(dtype="fp16", models="sanitizer"),
    }


def run(stage: Stage) -> None:
    """One process per group, all at once (Triton compiles in the launching thread, one kernel at a time)."""
    names = list(groups(stage.dry))
    shared = Path(os.environ.get("TRITON_CACHE_DIR", stage.work / "triton-cache"))
    processes = {}
    for name in names:
        env = dict(os.environ, TRITON_CACHE_DIR=str(stage.work / f"triton-{name}"))
        command = stage.command("compile-group", max(remaining(stage.deadline) - GRACE_S - 3, 1), "--group", name)
        processes[name] = (command, env)
    planned = None
    with _started(stage, processes) as outcomes:
        if stage.dry:  # while the groups run: the plan, in this process (its imports paid once)
            try:
                plan(stage.work, stage.data)
            except Exception as exc:  # noqa: BLE001 - the record says so; the groups' results still count
                import traceback

                traceback.print_exc()
                planned = f"the plan failed: {type(exc).__name__}: {exc}"
    results = {name: read_json(stage.work / f"compile-{name}.json") for name in names}
    for name, outcome in outcomes.items():
        if name in results and outcome.timed_out:
            results[name].update(status="timeout")
    merged = sum(_merge(stage.work / f"triton-{name}", shared) for name in names)
    kernels: dict[str, dict] = {}
    for group in results.values():
        for kernel, entry in group.get("kernels", {}).items():
            total = kernels.setdefault(kernel, {"compiles": 0, "loads": 0, "compile_s": 0.0})
            total["compiles"] += entry.get("compiles", 0)
            total["loads"] += entry.get("loads", 0)
            total["compile_s"] = round(total["compile_s"] + entry.get("compile_s", 0.0), 3)
    gemms = {}
    for group in results.values():
        for item in group.get("gemms", []):
            gemms[(item["kernel"], item["N"], item["K"], item["dtype"])] = item
    failed = [name for name, r in results.items() if r.get("status") != "ok"]
    binaries = sum(r.get("binaries", 0) for r in results.values())
    fields = dict(groups=results, kernels=kernels, binaries=binaries, merged=merged, gemms=list(gemms.values()),
                  compile_s=round(sum(k["compile_s"] for k in kernels.values()), 2))
    if stage.dry:
        summary = read_json(stage.work / "plan-compile.json")
        fields.update(plan_keys=plan_keys(stage.work, "compile"), plan_groups=summary.get("groups", {}),
                      gemms=summary.get("gemms", []))
        if planned:
            failed.append(planned)
    note = (f"groups failed: {', '.join(failed)}; " if failed else "") + (
        f"{binaries} Triton binaries compiled, {fields['compile_s']:.1f} s of compilation over {len(names)} "
        f"parallel groups" if not stage.dry else
        f"a small group under the interpreter; the GPU's groups plan "
        f"{len(fields.get('plan_keys', []))} Triton compiles")
    stage.record.update(**fields, status="failed" if failed else "ok", note=note)


@contextlib.contextmanager
def _started(stage: Stage, processes: dict):
    """Start every process (each in the stage's process group); on leaving the block, wait for all within the
    stage's time. Yields the outcomes, filled in on leaving."""
    timeout = max(remaining(stage.deadline) - GRACE_S - 1, 1)
    outcomes: dict = {}
    with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
        futures = {name: pool.submit(run_member, command, timeout=timeout, cwd=ROOT, env=env,
                                     log=stage.work / "compile.log")
                   for name, (command, env) in processes.items()}
        yield outcomes
        outcomes.update({name: future.result() for name, future in futures.items()})


def _merge(source: Path, shared: Path) -> int:
    """Copy a group's Triton cache entries into the shared cache; returns how many were new."""
    if not source.is_dir():
        return 0
    shared.mkdir(parents=True, exist_ok=True)
    new = 0
    for entry in source.iterdir():
        if entry.is_dir() and not (shared / entry.name).exists():
            shutil.copytree(entry, shared / entry.name)
            new += 1
    return new


def _binaries(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0


def gemm_tiles(keys: list[dict]) -> list[dict]:
    """The GEMM launches among ``keys`` (``launches.read_keys``): N, K, tile, tiles at 128 tokens."""
    from fastenc.kernels.gemm import SMALL_BATCH_TOKENS, tiles_at

    out = {}
    for item in keys:
        shape, kernel = item["shape"], item["kernel"].strip("_").removesuffix("_kernel")
        if kernel not in ("linear", "gated_linear", "fused_qkv") or "BLOCK_M" not in shape:
            continue
        rows = 2 * shape["N"] if kernel == "gated_linear" else shape["N"]
        dtype = shape.get("dtype")
        out[(kernel, shape["N"], shape["K"], dtype)] = {
            "kernel": kernel, "N": shape["N"], "K": shape["K"], "dtype": dtype,
            "tile": f"{shape['BLOCK_M']}x{shape['BLOCK_N']}x{shape['BLOCK_K']}",
            "tiles_128": tiles_at(SMALL_BATCH_TOKENS, rows, shape["BLOCK_M"], shape["BLOCK_N"])}
    return list(out.values())


def group_main(args) -> int:
    """One group's process: build its encoders and run their batches (or the sanitizer's targets), recording
    what Triton compiled."""
    import time

    import torch

    from . import encoders
    from .launches import compile_timer, read_keys, record
    from .stage_sanitizer import DRY_LENGTHS, LENGTHS, SANITIZER_TARGETS, run_targets

    work, name = Path(args.work), args.group
    spec = groups(args.dry_run)[name]
    device = torch.device("cpu" if args.dry_run else "cuda")
    cache = Path(os.environ.get("TRITON_CACHE_DIR", work / f"triton-{name}"))
    keys_path = work / f"compile-{name}.jsonl"
    record(keys_path)  # the launches' keys, and the GEMMs' tiles, alongside the real run
    rec = Record(work / f"compile-{name}.json", group=name, dtype=spec["dtype"], kernels={}, forwards=[])
    forwards = []
    with compile_timer() as timer:
        if spec["models"] == "sanitizer":
            start = time.perf_counter()
            lines = run_targets(SANITIZER_TARGETS, device, DRY_LENGTHS if args.dry_run else LENGTHS)
            bad = [line for line in lines if "NOT FINITE" in line]
            if bad:
                raise RuntimeError(f"non-finite output: {bad}")
            forwards.append({"targets": len(lines), "seconds": round(time.perf_counter() - start, 3)})
        for model, batches in ([] if spec["models"] == "sanitizer" else spec["models"]):
            start = time.perf_counter()
            encoder = encoders.random_encoder(model, spec["dtype"], device)
            rec.update(setup_s=round(rec.data.get("setup_s", 0) + time.perf_counter() - start, 2))
            for lengths in batches:
                start = time.perf_counter()
                out = encoder.forward_packed(encoders.packed(encoder, lengths))
                if not torch.isfinite(out).all():
                    raise RuntimeError(f"non-finite output of {model.name} at {len(lengths)} sequences")
                forwards.append({"model": model.name, "sequences": len(lengths), "tokens": sum(lengths),
                                 "max": max(lengths), "seconds": round(time.perf_counter() - start, 3)})
                rec.update(forwards=forwards, kernels=timer.kernels)
    rec.update(status="ok", forwards=forwards, kernels=timer.kernels, binaries=_binaries(cache),
               launches=len(read_keys(keys_path)), gemms=gemm_tiles(read_keys(keys_path, every_shape=True)))
    return 0


def plan(work: Path, data: Path) -> None:
    """The dry run's plan of the GPU run: the launches of the GPU's groups, of the sanitizer's targets, of the
    bench plan's fastenc cases and of the embed stage, each recorded at the GPU's shapes without launching
    anything, into ``plan-<stage>.jsonl`` in ``work`` (a group's into ``plan-compile-<group>.jsonl`` too)."""
    import torch

    from . import encoders, stage_bench, stage_embed, stage_sanitizer
    from .launches import read_keys, record
    from .stage_sanitizer import LENGTHS, SANITIZER_TARGETS, run_targets

    per_group = {}
    for name, spec in groups(dry=False).items():
        path = work / f"plan-compile-{name}.jsonl"
        record(path, plan_only=True)  # each group's keys to its own file, counted afresh
        if spec["models"] == "sanitizer":
            run_targets(SANITIZER_TARGETS, torch.device("cpu"), LENGTHS, shapes_only=True)
        for model, batches in ([] if spec["models"] == "sanitizer" else spec["models"]):
            encoder = encoders.shape_encoder(model, spec["dtype"])
            for lengths in batches:
                encoder.forward_packed(encoders.packed(encoder, lengths))
        per_group[name] = read_keys(path, every_shape=True)
    items = [item for group in per_group.values() for item in group]
    (work / "plan-compile.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    Record(work / "plan-compile.json", status="ok", gemms=gemm_tiles(items),
           groups={name: len({item["key"] for item in group}) for name, group in per_group.items()})
    for stage, launches in (("sanitizer", stage_sanitizer.plan_launches), ("bench", stage_bench.plan_launches),
                            ("embed", lambda: stage_embed.plan_launches(data))):
        record(work / f"plan-{stage}.jsonl", plan_only=True)
        launches()
