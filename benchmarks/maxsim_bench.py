"""MaxSim on the CPU: ``fastenc.maxsim`` and its torch twin against the plain torch formula.

    python benchmarks/maxsim_bench.py [--docs 1000] [--min-tokens 50] [--max-tokens 300] [--query-tokens 32]
                                      [--dim 128] [--dtype fp32|bf16|fp16] [--repeats 7] [--threads N]
                                      [--output DIR]

One query of ``--query-tokens`` vectors against ``--docs`` documents of ``--min-tokens``..``--max-tokens``
vectors each (lengths uniform, seed 0), every vector of unit length as ColBERT's are. The providers, each
given what a caller holds:

* ``fastenc.maxsim (list)``: the public function on a list of ``(tokens, dim)`` tensors (it packs them);
* ``fastenc.maxsim (packed)``: the same on one packed tensor with ``lengths=`` (no packing copy);
* ``twin (packed)``: ``fastenc.reference.maxsim``, the torch twin, on the packed tensor and ``cu_seqlens``;
* ``torch formula (list)``: pad the list (``pad_sequence``), ``einsum`` over the padded documents, padding
  masked to ``-inf``, the max over document tokens, the sum over the query;
* ``torch formula (padded)``: the same formula on documents already padded (padding not timed);
* ``sentence-transformers``: ``sentence_transformers.util.maxsim`` on the list (padded chunks, float32 sum).

Every provider's scores are compared with the formula in float64 first. Timing: ``--repeats`` rounds after
one warm-up call each, the providers' calls interleaved round by round so that a shared machine's
changing load falls on all alike; median, min and max per provider, and GFLOP/s (``2 * query_tokens *
doc_tokens * dim`` per call). Memory: the peak resident set one call adds, sampled every millisecond in a
fresh process per provider, after a warm-up call on two documents. The load average is recorded before
and after: on a shared machine it says how far to trust the numbers.

Writes ``maxsim-cpu-<yyyymmdd>.json`` and ``.md`` under ``--output`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's fastenc, before an installed one

from sparse import ResidentPeak, environment  # noqa: E402  (benchmarks/sparse.py)

import fastenc  # noqa: E402
from fastenc import reference  # noqa: E402
from fastenc.encoder import resolve_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_data(args) -> dict:
    """The query, the documents as a list, packed (with lengths and cu_seqlens) and padded (with its mask)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_tokens, args.max_tokens + 1, (args.docs,), generator=generator).tolist()
    dtype = DTYPES[args.dtype]
    query = F.normalize(torch.randn(args.query_tokens, args.dim, generator=generator), dim=-1).to(dtype)
    packed = F.normalize(torch.randn(sum(lengths), args.dim, generator=generator), dim=-1).to(dtype)
    documents = [d.clone() for d in packed.split(lengths)]  # one tensor each, as embed_multivector gives
    cu_seqlens = torch.zeros(args.docs + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu_seqlens[1:])
    padded, mask = pad(documents)
    return {"query": query, "documents": documents, "packed": packed, "lengths": lengths, "cu_seqlens": cu_seqlens,
            "padded": padded, "mask": mask}


def pad(documents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    padded = torch.nn.utils.rnn.pad_sequence(documents, batch_first=True)  # (docs, longest, dim)
    lengths = torch.tensor([d.shape[0] for d in documents])
    return padded, torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # (docs, longest)


def formula(query: torch.Tensor, padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain torch formula: einsum over the padded documents, padding masked out of the max, the sum."""
    scores = torch.einsum("qh,bth->bqt", query, padded)  # (docs, query_tokens, longest)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return scores.amax(-1).to(torch.promote_types(scores.dtype, torch.float32)).sum(-1)


def st_maxsim(query: torch.Tensor, documents: list[torch.Tensor]) -> torch.Tensor:
    from sentence_transformers.util import maxsim

    return maxsim(query, documents)[0]


PROVIDERS = {
    "fastenc.maxsim (list)": lambda d: fastenc.maxsim(d["query"], d["documents"]),
    "fastenc.maxsim (packed)": lambda d: fastenc.maxsim(d["query"], d["packed"], lengths=d["lengths"]),
    "twin (packed)": lambda d: reference.maxsim(d["query"], d["packed"], d["cu_seqlens"]),
    "torch formula (list)": lambda d: formula(d["query"], *pad(d["documents"])),
    "torch formula (padded)": lambda d: formula(d["query"], d["padded"], d["mask"]),
    "sentence-transformers": lambda d: st_maxsim(d["query"], d["documents"]),
}


def check(data: dict) -> dict[str, float]:
    """Each provider's largest difference from the formula in float64 (raises when one is off)."""
    expected = formula(data["query"].double(), data["padded"].double(), data["mask"])
    tolerance = 1e-4 if data["query"].dtype == torch.float32 else 0.05 * data["query"].shape[0] ** 0.5
    out = {}
    for name, call in PROVIDERS.items():
        out[name] = (call(data).double() - expected).abs().max().item()
        if not out[name] <= tolerance:
            raise SystemExit(f"{name} is off: max difference {out[name]:.3g} from the float64 formula")
    return out


def timings(data: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each provider, ``repeats`` interleaved rounds after a warm-up call each."""
    for call in PROVIDERS.values():
        call(data)
    seconds = {name: [] for name in PROVIDERS}
    for _ in range(repeats):
        for name, call in PROVIDERS.items():
            start = time.perf_counter()
            call(data)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_memory(provider: str, args) -> float:
    """MiB one call of ``provider`` adds to the resident set, in a fresh process (a warm-up call on two
    documents first)."""
    command = [sys.executable, __file__, "--worker", provider, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{provider}: the memory worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def worker(provider: str, args) -> None:
    data = make_data(args)
    small = {**data, "documents": data["documents"][:2], "lengths": data["lengths"][:2],
             "packed": data["packed"][:sum(data["lengths"][:2])], "cu_seqlens": data["cu_seqlens"][:3],
             "padded": data["padded"][:2], "mask": data["mask"][:2]}
    PROVIDERS[provider](small)
    with ResidentPeak() as peak:
        PROVIDERS[provider](data)
    print(json.dumps({"peak_mib": peak.mib}))


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        "# MaxSim on the CPU: `fastenc.maxsim` and its torch twin vs the plain torch formula\n",
        f"{env['device']} ({env['cpus']} CPUs, torch threads {env['torch_threads']}), torch {env['torch']}, "
        f"sentence-transformers {env['sentence_transformers']}, commit {env['commit']}, {env['time']}.\n",
        f"One query of {args['query_tokens']} vectors against {args['docs']} documents of {args['min_tokens']}-"
        f"{args['max_tokens']} vectors ({result['doc_tokens']:,} in all, seed 0), dim {args['dim']}, {args['dtype']}, "
        f"unit vectors; {args['repeats']} interleaved timed rounds after a warm-up call each. "
        f"{result['gflop']:.2f} GFLOP per call (2 x query tokens x document tokens x dim). fastenc's backend on the "
        f"CPU: `{result['backend']}` (the twin).\n",
        f"Load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}.\n",
        "| provider | ms median (min-max) | GFLOP/s | vs torch formula (list) | peak MiB per call | max diff vs fp64 |",
        "|---|---|---|---|---|---|",
    ]
    base = next(r["ms_median"] for r in result["rows"] if r["provider"] == "torch formula (list)")
    for row in result["rows"]:
        lines.append(f"| {row['provider']} | {row['ms_median']:.1f} ({row['ms_min']:.1f}-{row['ms_max']:.1f}) | "
                     f"{row['gflops']:.1f} | {base / row['ms_median']:.2f}x | {row['peak_mib']:.0f} | "
                     f"{row['max_difference']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--min-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args)
        return 0

    load_before = [round(x, 2) for x in os.getloadavg()]
    env = environment("cpu")
    data = make_data(args)
    differences = check(data)
    memory = {name: peak_memory(name, args) for name in PROVIDERS}
    seconds = timings(data, args.repeats)
    load_after = [round(x, 2) for x in os.getloadavg()]
    doc_tokens = sum(data["lengths"])
    flop = 2 * args.query_tokens * doc_tokens * args.dim
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append({"provider": name, "ms_median": 1e3 * median, "ms_min": 1e3 * min(times),
                     "ms_max": 1e3 * max(times), "gflops": flop / median / 1e9, "peak_mib": memory[name],
                     "max_difference": differences[name]})
        print(f"{name:<26} {1e3 * median:9.1f} ms  {memory[name]:7.0f} MiB", file=sys.stderr)
    args_out = {k: v for k, v in vars(args).items() if k not in ("worker", "output")}
    backend, _ = resolve_backend(None, torch.device("cpu"))
    result = {"env": env, "args": args_out, "backend": backend, "doc_tokens": doc_tokens, "gflop": flop / 1e9,
              "load_before": load_before, "load_after": load_after, "rows": rows}
    stem = args.output / f"maxsim-cpu-{datetime.date.today():%Y%m%d}"
    args.output.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
