"""The ``embed`` stage: ``embed()`` on 5,000 real texts with all-MiniLM-L6-v2 in fp16 against
sentence-transformers' ``encode`` in fp16 and against ``forward_packed`` alone on the same packs, timed in
interleaved rounds (``fastenc.bench.measure.time_cpu``: every call once per round, each call waited for);
then the cold start (import, load, first batch, Triton compilation included) in a fresh process with an
empty Triton cache of its own.

The dry run runs it on a few short texts in float32 on the CPU; the compile stage's plan records the GPU
run's launches on the bundle's texts (``plan_launches``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .bundle import EMBED_TEXTS, MODEL_PACKAGE, make_texts
from .launches import plan_keys
from .processes import run_member
from .records import ROOT, Stage, log, remaining

DRY_TEXTS, DRY_CHARS = 8, 160  # the CPU runs MiniLM at some 10 GFLOP/s: a few short texts
BATCH_SIZE, MAX_TOKENS = 32, 16384  # embed()'s defaults


def model_dir(data: Path, dry: bool) -> tuple[Path, str]:
    bundled = data / "site" / MODEL_PACKAGE / "model"
    if (bundled / "model.safetensors").exists():
        return bundled, "the bundle's fp16 copy"
    if dry:
        from fastenc.encoder import default_model_path

        return default_model_path(), "the installed float32 package (no bundle)"
    raise RuntimeError(f"no all-MiniLM-L6-v2 at {bundled}: run `python -m benchmarks.gpu_check --bundle {data}` "
                       "where the model is installed, and carry the folder")


def texts_of(data: Path, count: int) -> tuple[list[str], str]:
    path = data / "texts.jsonl"
    if path.exists():
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        return texts[:count], f"{path.name} of the bundle"
    return make_texts(count), "generated now (no bundle)"


def run(stage: Stage) -> None:
    import torch

    from fastenc import Encoder
    from fastenc.bench.measure import time_cpu
    from fastenc.packing import token_budget_batches

    from .encoders import replayed

    device = stage.device
    dtype = torch.float32 if stage.dry else torch.float16
    directory, model_source = model_dir(stage.data, stage.dry)
    texts, text_source = texts_of(stage.data, DRY_TEXTS if stage.dry else EMBED_TEXTS)
    if stage.dry:
        texts = [text[:DRY_CHARS] for text in texts]
    record = stage.record
    record.update(model=model_source, texts=len(texts), texts_source=text_source, dtype=str(dtype))
    if stage.dry:
        record.update(plan_keys=plan_keys(stage.work, "embed"))

    record.update(cold_start=cold_start(stage))
    log(f"embed: cold start {record.data['cold_start']}")

    encoder = Encoder.from_pretrained(directory, device=device, dtype=dtype)
    start = time.perf_counter()
    encoder.warmup()  # every CUDA graph bucket captured before timing (what a server does at start)
    record.update(warmup_s=round(time.perf_counter() - start, 2), backend=encoder.backend)
    fastenc_vectors = encoder.embed(texts)
    lengths = list(encoder.pack_texts(texts).lengths)
    packs = [encoder.pack_texts([texts[i] for i in rows]).to(encoder.device)  # on the device: not timed
             for rows in token_budget_batches(lengths, BATCH_SIZE, MAX_TOKENS)]
    record.update(tokens=sum(lengths), tokens_mean=sum(lengths) / len(lengths), tokens_max=max(lengths),
                  batches=len(packs))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def every_pack(forward):
        def call():
            for batch in packs:
                forward(batch)
            sync()

        return call

    calls = {"embed": lambda: encoder.embed(texts), "forward_packed": every_pack(encoder.forward_packed),
             "run": every_pack(lambda batch: replayed(encoder, batch))}
    model = None
    if remaining(stage.deadline) > 20:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(directory), device=str(device)).to(dtype)
        st_vectors = torch.from_numpy(model.encode(texts, batch_size=BATCH_SIZE)).float()
        calls["sentence-transformers"] = lambda: model.encode(texts, batch_size=BATCH_SIZE)
    timings = time_cpu(calls, repeats=1 if stage.dry else 3)  # one warm-up call each, then interleaved rounds
    failed = {name: t for name, t in timings.items() if isinstance(t, Exception)}
    if failed:
        raise RuntimeError(f"timing failed: {failed}")
    seconds = {name: t.median / 1e3 for name, t in timings.items()}
    fastenc_s = seconds["embed"]
    record.update(fastenc_s=fastenc_s, texts_per_s=len(texts) / fastenc_s, forward_packed_s=seconds["forward_packed"],
                  run_s=seconds["run"], timings_ms={name: [t.p20, t.median, t.p80] for name, t in timings.items()})
    log(f"embed: fastenc {len(texts) / fastenc_s:,.0f} texts/s, forward_packed alone "
        f"{seconds['forward_packed'] * 1e3:.1f} ms, through the run path {seconds['run'] * 1e3:.1f} ms")
    if model is None:
        record.update(status="timeout", note="no time left for sentence-transformers")
        return
    st_s = seconds["sentence-transformers"]
    cosine = torch.nn.functional.cosine_similarity(fastenc_vectors, st_vectors, dim=1)
    record.update(sentence_transformers_s=st_s, st_texts_per_s=len(texts) / st_s,
                  cosine_min=float(cosine.min()), cosine_mean=float(cosine.mean()))
    agree = float(cosine.min()) >= 0.99
    over_forward = fastenc_s / seconds["forward_packed"]
    record.update(status="ok" if agree else "failed",
                  note=f"{len(texts) / fastenc_s:,.0f} texts/s vs sentence-transformers {len(texts) / st_s:,.0f} "
                       f"({st_s / fastenc_s:.2f}x); embed / forward_packed {over_forward:.2f}; cosine to "
                       f"sentence-transformers >= {float(cosine.min()):.4f}" + ("" if agree else " (< 0.99: wrong)"))


# ------------------------------------------------------------------------------------------- cold start
def cold_start(stage: Stage) -> dict:
    """Import, load and first batch in a fresh process with an empty Triton cache, each stamped; the times
    are taken from this process's launch (Python's start-up counts; reading the texts does not)."""
    cold_cache = stage.work / "triton-cache-cold"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cold_cache))
    launched = time.time()
    outcome = run_member(stage.command("cold-start", 60), timeout=min(45, max(remaining(stage.deadline) / 2, 5)),
                         cwd=ROOT, env=env, capture=True)
    print(outcome.output[-5000:])
    if outcome.timed_out:
        return {"total_s": None, "note": "the cold start did not finish in time"}
    stamps = [json.loads(line[len("STAMP "):]) for line in outcome.output.splitlines() if line.startswith("STAMP ")]
    marks = {s["what"]: s["time"] - launched for s in stamps}
    cold = {"import_s": None, "load_s": None, "first_batch_s": None, "total_s": None, "returncode": outcome.returncode}
    if {"started", "texts", "imported"} <= marks.keys():
        cold["import_s"] = marks["started"] + marks["imported"] - marks["texts"]
    if "loaded" in marks and "imported" in marks:
        cold["load_s"] = marks["loaded"] - marks["imported"]
    if "first_batch" in marks and "loaded" in marks and cold["import_s"] is not None:
        cold["first_batch_s"] = marks["first_batch"] - marks["loaded"]
        cold["total_s"] = cold["import_s"] + cold["load_s"] + cold["first_batch_s"]
    cold["binaries_compiled"] = sum(1 for _ in cold_cache.rglob("*.cubin")) if cold_cache.is_dir() else 0
    return cold


def cold_start_main(args) -> int:
    """Import, load, first batch, each stamped (the caller takes the times from its own launch)."""
    def stamp(what):
        print("STAMP " + json.dumps({"what": what, "time": time.time()}), flush=True)

    stamp("started")
    data = Path(args.data)
    texts_file = data / "texts.jsonl"  # the texts are ready before the clock that matters runs
    texts = ([json.loads(line)["text"] for line in texts_file.read_text().splitlines()[-32:]]
             if texts_file.exists() else make_texts(32, seed=1))
    if args.dry_run:
        texts = [text[:DRY_CHARS] for text in texts[:DRY_TEXTS]]
    stamp("texts")
    import torch

    import fastenc

    stamp("imported")
    directory, _ = model_dir(data, args.dry_run)
    dtype = torch.float32 if args.dry_run else torch.float16
    encoder = fastenc.Encoder.from_pretrained(directory, device="cpu" if args.dry_run else "cuda", dtype=dtype)
    stamp("loaded")
    vectors = encoder.embed(texts)
    if not torch.isfinite(vectors).all():
        raise RuntimeError("the cold start's first batch is not finite")
    stamp("first_batch")
    return 0


# ------------------------------------------------------------------------------------------------- plan
def plan_launches(data: Path) -> None:
    """The GPU run's launches at its shapes, for a plan (``launches.record(plan_only=True)``): MiniLM's layer
    (one: all six run the same kernels) in fp16 on the packs of the bundle's 5,000 texts, and on a graph
    bucket (token counts of powers of two)."""
    import dataclasses

    from fastenc import Encoder
    from fastenc.bench.e2e import MODELS
    from fastenc.packing import token_budget_batches

    from . import encoders

    directory, _ = model_dir(data, dry=True)
    texts, _ = texts_of(data, EMBED_TEXTS)
    tokenizer = Encoder.from_pretrained(directory)  # the real tokenizer and config
    lengths = list(tokenizer.pack_texts(texts).lengths)
    spec = dataclasses.replace(MODELS["minilm-l6"], layers=1, vocab=tokenizer.config.vocab_size)
    encoder = encoders.shape_encoder(spec, "fp16")
    for rows in token_budget_batches(lengths, BATCH_SIZE, MAX_TOKENS):  # the kernels see only the lengths
        encoder.forward_packed(encoders.packed(encoder, [lengths[i] for i in rows]))
    encoder.forward_packed(encoders.packed(encoder, [64]))  # a graph bucket: 64 tokens, one sequence
