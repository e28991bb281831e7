"""Load test of embedding servers: ``fastenc serve`` beside ``infinity-emb`` on the same model and machine.

A closed-loop load generator (asyncio + httpx): ``C`` clients, each on its own connection, send one
request, wait for its answer, and send the next; the answers of ``--duration`` seconds count, after
``--warmup`` seconds that do not, at each concurrency level (default 1, 8, 32, 128). Every request is
OpenAI's ``POST .../embeddings`` with ``--texts-per-request`` texts (default 1) drawn in turn from a
fixed corpus of mixed lengths; an answer counts only if it is a 200 with one vector per text.
Reported per level: requests/s, texts/s, p50 and p99 latency, errors, and the machine's load average
before and after.

The servers are started together and take turns, level by level, ``--rounds`` times (the rounds are
pooled), so only one is under load at any moment and a change in the machine's load falls on both.
They share the CPU with this load generator (and, on a shared machine, with whatever else runs: the
load averages say how much).

    python benchmarks/serve.py                                  # fastenc and infinity, bundled MiniLM
    python benchmarks/serve.py --servers fastenc --levels 1,32
    python benchmarks/serve.py --url http://127.0.0.1:8080/v1/embeddings   # any running server
    python benchmarks/serve.py --infinity-python /path/to/venv/bin/python   # infinity-emb's own venv

infinity-emb pins older transformers and sentence-transformers, so it lives in a venv of its own
(``python -m venv V && V/bin/pip install "infinity-emb[server,torch]"``); it is started as
``V/bin/python -m infinity_emb.cli v2 --model-id MODEL --engine torch``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there been one all we their has would when if so no will more can who what out "
          "up about into than them some could only other new time these two may then do first any now such like "
          "our over man me even most made after also did many before must through back years where much your way "
          "well down should because each just those people how too little state good very make world still own "
          "see men work long get here between both life being under never day same another know while last might "
          "us great old year off come since against go came right used take three city river market model server "
          "language question answer search engine vector query document embedding network battery weather travel "
          "kitchen garden music history science energy policy museum festival railway island village").split()


def corpus(n: int = 512, seed: int = 0) -> list[str]:
    """``n`` sentences of 4 to 80 words (most of them short, as search queries and passages mix)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = int(min(80, 4 + rng.expovariate(1 / 14)))
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        texts.append(text[0].upper() + text[1:] + ".")
    return texts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def load(url: str, model: str, texts: list[str], concurrency: int, duration: float, warmup: float,
               per_request: int) -> dict:
    """``concurrency`` closed-loop clients for ``warmup + duration`` seconds; the answers that arrive in the
    last ``duration`` seconds count (requests/s is completions per second in that window, in steady state).

    Each client has its own connection (an ``httpx.AsyncClient`` of one): one pool shared by 128 clients
    costs the generator several times more CPU per request, CPU the servers would then lack."""
    latencies, errors, counter = [], [], [0]
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = begin + duration
    headers = {"content-type": "application/json"}
    tls = ssl.create_default_context()  # one for all: httpx builds one per client otherwise, 25 ms of CPU each

    async def client() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0), verify=tls) as http:
            while loop.time() < end:
                i = counter[0]
                counter[0] += per_request
                body = json.dumps({"input": [texts[(i + k) % len(texts)] for k in range(per_request)],
                                   "model": model})
                start = time.perf_counter()
                try:
                    response = await http.post(url, content=body, headers=headers)
                    ok = response.status_code == 200 and len(response.json()["data"]) == per_request
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                if begin <= loop.time() <= end:  # answered inside the measured window
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    done = len(latencies)
    return {
        "latencies": latencies,
        "requests": done,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": duration,
        "requests_per_s": done / duration,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was healthy")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s")


def start_fastenc(model: str | None, args, extra: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "fastenc", "serve", "--port", str(port)]
    if model:
        command += ["--model", model]
    command += (args.fastenc_args + " " + extra).split()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base + "/health", process)
    return process, base + "/v1/embeddings"


def start_infinity(model: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", model,
               "--engine", "torch", "--device", "cpu" if args.device == "cpu" else "cuda", "--port", str(port),
               "--log-level", "warning"] + args.infinity_args.split()
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base + "/health", process)
    return process, base + "/embeddings"


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def infinity_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "not installed"


def environment(args) -> dict:
    import torch

    import fastenc

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "fastenc": fastenc.__version__, "commit": commit, "httpx": httpx.__version__,
            "python": platform.python_version(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def measure(servers: dict[str, str], model_name: str, texts: list[str], args) -> list[dict]:
    """Every level on every server, ``--rounds`` times, the servers taking turns at each level (so a change
    in the machine's load falls on both); the rounds of one server and level are pooled."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for level in args.levels:
            for name, url in servers.items():
                before = os.getloadavg()[0]
                result = asyncio.run(load(url, model_name, texts, level, args.duration, args.warmup,
                                          args.texts_per_request))
                result["loadavg"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                runs.setdefault((name, level), []).append(result)
                print(f"round {round_ + 1} {name:>9} c={level:<4} {result['requests_per_s']:8.1f} req/s "
                      f"p50 {result['p50_ms'] or float('nan'):8.1f} ms p99 {result['p99_ms'] or float('nan'):8.1f} "
                      f"ms errors {result['errors']} load {result['loadavg']}", file=sys.stderr, flush=True)
    rows = []
    for (name, level), results in runs.items():
        latencies = [x for r in results for x in r.pop("latencies")]
        seconds = sum(r["seconds"] for r in results)
        loads = [x for r in results for x in r["loadavg"]]
        rows.append({"server": name, "concurrency": level, "texts_per_request": args.texts_per_request,
                     "requests": len(latencies), "errors": sum(r["errors"] for r in results),
                     "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
                     "seconds": seconds, "requests_per_s": len(latencies) / seconds,
                     "texts_per_s": len(latencies) * args.texts_per_request / seconds,
                     "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
                     "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
                     "loadavg_min": min(loads), "loadavg_max": max(loads),
                     "rounds": [{k: v for k, v in r.items() if k != "first_error"} for r in results]})
    return rows


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# Serving benchmark: {report['device']}, {env['time'][:10]}", "",
             f"{env['cpu']}, {env['cores']} cores (torch threads {env['torch_threads']}), shared with the load "
             f"generator; torch {env['torch']}, fastenc {env['fastenc']} (commit {env['commit']}), infinity-emb "
             f"{report['infinity_version']}; model {report['model_name']}; {report['texts_per_request']} text(s) "
             f"per request from a fixed corpus of mixed lengths (mean {report['corpus_mean_tokens']} tokens); "
             f"{report['rounds']} rounds of {report['duration']} s measured per server and level (after "
             f"{report['warmup']} s of warm-up each), the servers taking turns, rounds pooled; closed loop (each "
             "client waits for its answer). Load average: the machine's 1-minute load before and after each "
             "measurement (2 cores: above 2 means other work was running).", "",
             "| server | concurrency | requests/s | texts/s | p50 ms | p99 ms | errors | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(report["rows"], key=lambda r: (r["concurrency"], r["server"])):
        lines.append(f"| {row['server']} | {row['concurrency']} | {row['requests_per_s']:.1f} | "
                     f"{row['texts_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | "
                     f"{row['loadavg_min']}–{row['loadavg_max']} |")
    ratios = report.get("ratios")
    if ratios:
        lines += ["", "fastenc / infinity: " + ", ".join(
            f"c={r['concurrency']}: {r['throughput_ratio']:.2f}x requests/s, p99 {r['p99_ratio']:.2f}x"
            for r in ratios)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="fastenc,infinity", help="comma-separated: fastenc, infinity")
    parser.add_argument("--url", help="benchmark a running server at this embeddings URL instead of starting any")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="measured seconds per server, level and round (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the levels, pooled (default 2)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--fastenc-args", default="", help="extra arguments for fastenc serve")
    parser.add_argument("--also-fastenc", action="append", default=[], metavar="ARGS",
                        help="also measure fastenc serve with these extra arguments (repeatable)")
    parser.add_argument("--infinity-python", default=os.environ.get("INFINITY_PYTHON", "infinity-venv/bin/python"),
                        help="the python of infinity-emb's venv (default $INFINITY_PYTHON)")
    parser.add_argument("--infinity-args", default="", help="extra arguments for infinity_emb v2")
    parser.add_argument("--output", help="write the report to OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]

    from fastenc.encoder import Encoder, default_model_path

    model = str(Path(args.model).resolve()) if args.model else str(default_model_path())
    texts = corpus()
    tokenizer = Encoder.from_pretrained(model).tokenizer
    mean_tokens = round(statistics.mean(len(e.ids) for e in tokenizer.encode_batch(texts)), 1)
    model_name = Path(model).name if Path(model).name != "model" else Path(model).parent.name
    if args.url:
        rows = measure({"server": args.url}, model, texts, args)
    else:
        processes, servers = [], {}
        try:
            for name in args.servers.split(","):
                process, servers[name] = {"fastenc": start_fastenc, "infinity": start_infinity}[name](model, args)
                processes.append(process)
            for extra in args.also_fastenc:  # variants, labelled by their arguments
                process, servers[f"fastenc {extra}"] = start_fastenc(model, args, extra)
                processes.append(process)
            rows = measure(servers, model, texts, args)
        finally:
            for process in processes:
                stop(process)
    report = {"device": args.device, "env": environment(args), "model_name": model_name,
              "infinity_version": infinity_version(args.infinity_python) if "infinity" in args.servers else None,
              "texts_per_request": args.texts_per_request, "corpus_mean_tokens": mean_tokens,
              "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds, "rows": rows}
    by = {(r["server"], r["concurrency"]): r for r in rows}
    report["ratios"] = [
        {"concurrency": c, "throughput_ratio": by["fastenc", c]["requests_per_s"] / by["infinity", c]["requests_per_s"],
         "p99_ratio": by["fastenc", c]["p99_ms"] / by["infinity", c]["p99_ms"]}
        for c in args.levels if ("fastenc", c) in by and ("infinity", c) in by
        and by["infinity", c]["requests_per_s"] and by["infinity", c]["p99_ms"]]
    text = markdown(report)
    print(text)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        for suffix, content in ((".json", json.dumps(report, indent=1) + "\n"), (".md", text)):
            tmp = output.with_name(output.name + suffix + ".tmp")
            tmp.write_text(content, encoding="utf-8")
            tmp.replace(output.with_name(output.name + suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
