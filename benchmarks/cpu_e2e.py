"""fastenc's torch backend against transformers on the CPU: same model, same texts, same batch, one run.

    python benchmarks/cpu_e2e.py [--model DIR] [--repeats 30] [--output benchmarks/results/cpu-YYYYMMDD.json]

Providers: ``fastenc`` (``encoder(input_ids, attention_mask)``, the torch backend), ``hf-sdpa`` and
``hf-eager`` (``AutoModel`` with that ``attn_implementation``), all float32 under ``torch.inference_mode``.
Cases: a batch of real sentences of mixed lengths (padded to the longest, as both receive it) and a
fixed-shape batch with no padding. Runs are interleaved across providers so drift hits all alike;
the table gives the median (p20-p80) latency and each provider's speed relative to ``hf-sdpa``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fastenc
from fastenc.check import compare

SENTENCES = [
    "Welcome to NYC",
    "The quick brown fox jumps over the lazy dog.",
    "Encoders turn text into one contextual vector per token, and pooled they make sentence embeddings.",
    "A short one.",
    "Benchmarks should measure the thing users run, side by side, in one process, with the same inputs.",
    "def add(a, b): return a + b",
    "It rained all day in the city, so the museum was full of people who had planned to walk in the park.",
    "OK",
] * 4  # 32 texts


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), cuts[1], cuts[7]


def measure(providers: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Interleaved timing: each round runs every provider once. Seconds per call."""
    for run in providers.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in providers}
    for _ in range(repeats):
        for name, run in providers.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled MiniLM)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default=None, help="write the raw results as JSON here")
    args = parser.parse_args()

    from transformers import AutoModel

    encoder = fastenc.Encoder.from_pretrained(args.model, device="cpu", dtype="fp32", backend="torch")
    hf = {impl: AutoModel.from_pretrained(str(encoder.path), attn_implementation=impl, dtype=torch.float32).eval()
          for impl in ("sdpa", "eager")}
    mixed = encoder.tokenize(SENTENCES)
    generator = torch.Generator().manual_seed(0)
    fixed_ids = torch.randint(1000, encoder.config.vocab_size, (32, 128), generator=generator)
    fixed = {"input_ids": fixed_ids, "attention_mask": torch.ones_like(fixed_ids),
             "token_type_ids": torch.zeros_like(fixed_ids)}

    rows = []
    for case, batch in (("mixed-32", mixed), ("fixed-32x128", fixed)):
        real_tokens = int(batch["attention_mask"].sum())

        def hf_run(model, batch=batch):
            with torch.inference_mode():
                return model(**batch).last_hidden_state

        def ours(batch=batch):
            with torch.inference_mode():
                return encoder(**batch)

        providers = {"fastenc": ours, "hf-sdpa": lambda: hf_run(hf["sdpa"]), "hf-eager": lambda: hf_run(hf["eager"])}
        with torch.inference_mode():
            reference = hf_run(hf["sdpa"])
            check = compare("last_hidden_state", ours(), reference, mask=batch["attention_mask"])
        assert check.ok, check.line()  # never time a wrong answer
        times = measure(providers, args.repeats)
        base = statistics.median(times["hf-sdpa"])
        for name, samples in times.items():
            median, p20, p80 = _quantiles(samples)
            rows.append({"suite": "e2e", "case": case, "provider": name, "dtype": "fp32",
                         "batch": batch["input_ids"].shape[0], "seq": batch["input_ids"].shape[1],
                         "metric": "ms", "value": median * 1e3, "p20": p20 * 1e3, "p80": p80 * 1e3,
                         "tokens_per_s": real_tokens / median, "speedup_vs_hf_sdpa": base / median})

    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "fastenc": fastenc.__version__, "commit": _commit(),
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": str(encoder.config.model_type) + f"-{encoder.config.num_hidden_layers}x{encoder.config.hidden_size}"}
    print(f"# CPU end-to-end ({env['model']}, fp32, {env['threads']} threads, torch {env['torch']}, {env['commit']})")
    print("| case | batch x seq | provider | ms median (p20-p80) | tokens/s | vs hf-sdpa |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']}x{r['seq']} | {r['provider']} | {r['value']:.1f} "
              f"({r['p20']:.1f}-{r['p80']:.1f}) | {r['tokens_per_s']:.0f} | {r['speedup_vs_hf_sdpa']:.2f}x |")
    if args.output:
        Path(args.output).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
