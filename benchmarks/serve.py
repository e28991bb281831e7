"""Load test of embedding servers: ``fastenc serve`` (its worker layouts) beside ``infinity-emb`` and beside
fastenc's own offline ``embed()``, on the same model, texts and machine, with the serving goals judged
in the same run.

A closed-loop load generator (asyncio + httpx): ``C`` clients, each on its own connection, send one
request, wait for its answer, and send the next; the answers of ``--duration`` seconds count, after
``--warmup`` seconds that do not, at each concurrency level (default 1 and 32). Every request is
OpenAI's ``POST .../embeddings`` with ``--texts-per-request`` texts (default 1) drawn in turn from a
fixed corpus; there are two corpora (``--corpora``): ``short`` sentences of about 20 tokens and ``long``
passages of about 80. An answer counts only if it is a 200 with one vector per text. Reported per
server, corpus and level: requests/s (the median of the rounds, and each round's), texts/s, p50 and
p99 latency (of all rounds' requests), errors, and the machine's load average before and after each
measurement; per corpus the offline ``Encoder.embed`` throughput of the same texts (texts/s, median of
``--rounds`` passes, in this process with torch's default threads, while the servers idle).

The servers (by default: ``fastenc`` as it starts, one worker process with torch's threads;
``fastenc --in-process``, the model on a thread of the server process; ``fastenc --workers 2 --threads
1``, two CPU worker processes of one thread; and infinity when its venv is there) are started together
and take turns, corpus by corpus and level by level, ``--rounds`` times, so only one is under load at
any moment and a change in the machine's load falls on all. They share the CPU with this load generator
(and, on a shared machine, with whatever else runs: the load averages say how much).

The goals, judged at concurrency 32 on each corpus: ``fastenc`` reaches >= 90% of offline ``embed()``'s
texts/s; two workers of one thread beat one worker of two threads; fastenc answers >= 2x infinity's
requests/s, with a lower p99 at every level.

    python benchmarks/serve.py --output benchmarks/results/serve-cpu-DATE    # everything, bundled MiniLM
    python benchmarks/serve.py --servers fastenc --corpora short --levels 1,32
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


CORPORA = {"short": (4, 14, 80), "long": (55, 20, 180)}  # words: fewest, mean above the fewest, most


def corpus(n: int = 512, seed: int = 0, kind: str = "short") -> list[str]:
    """``n`` texts: ``short`` sentences of 4 to 80 words (about 20 tokens on average, most of them short, as
    search queries and passages mix) or ``long`` passages of 55 to 180 words (about 80 tokens)."""
    fewest, mean, most = CORPORA[kind]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = int(min(most, fewest + rng.expovariate(1 / mean)))
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
    from fastenc.bench.report import git_commit

    commit = git_commit(ROOT)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "fastenc": fastenc.__version__, "commit": commit, "httpx": httpx.__version__,
            "python": platform.python_version(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def offline(model: str, texts: list[str]) -> float:
    """Texts/s of ``Encoder.embed`` over ``texts`` in this process (torch's default threads), after one
    warm-up pass: what the server's throughput is judged against."""
    from fastenc import Encoder

    encoder = offline.encoders.get(model) or offline.encoders.setdefault(model, Encoder.from_pretrained(model))
    encoder.embed(texts[:64])
    start = time.perf_counter()
    encoder.embed(texts)
    return len(texts) / (time.perf_counter() - start)


offline.encoders = {}

_OFFLINE_CHILD = """
import json, sys, time
from fastenc import Encoder
texts = json.load(sys.stdin)
encoder = Encoder.from_pretrained(sys.argv[1])
encoder.embed(texts[:64])
start = time.perf_counter()
encoder.embed(texts)
print(len(texts) / (time.perf_counter() - start))
"""


def offline_passive(model: str, texts: list[str]) -> float:
    """``offline`` in a fresh process whose OpenMP threads sleep between ops (``OMP_WAIT_POLICY=PASSIVE``),
    as ``fastenc serve``'s CPU worker processes run: the same compute without the spinning threads that
    a loaded machine punishes."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _OFFLINE_CHILD, model], input=json.dumps(texts), env=env,
                         capture_output=True, text=True, timeout=1200, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(servers: dict[str, str], model: str, corpora: dict[str, list[str]], args) -> tuple[list[dict], dict]:
    """Every level of every corpus on every server, ``--rounds`` times, the servers taking turns at each
    level (so a change in the machine's load falls on all), and per round the offline throughput of each
    corpus; returns the rows (one per server, corpus and level) and the offline texts/s per corpus."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    offline_runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for kind, texts in corpora.items():
            if args.offline:
                for label, fn in (("offline embed()", offline), ("offline embed() PASSIVE", offline_passive)):
                    before = os.getloadavg()[0]
                    rate = fn(model, texts)
                    key = kind if fn is offline else f"{kind} PASSIVE"
                    offline_runs.setdefault(key, []).append({"texts_per_s": rate, "loadavg": [
                        round(before, 2), round(os.getloadavg()[0], 2)]})
                    print(f"round {round_ + 1} {label:>32} {kind:>5} {rate:8.1f} texts/s "
                          f"load {offline_runs[key][-1]['loadavg']}", file=sys.stderr, flush=True)
            for level in args.levels:
                for name, url in servers.items():
                    before = os.getloadavg()[0]
                    result = asyncio.run(load(url, model, texts, level, args.duration, args.warmup,
                                              args.texts_per_request))
                    result["loadavg"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                    runs.setdefault((name, kind, level), []).append(result)
                    print(f"round {round_ + 1} {name:>32} {kind:>5} c={level:<4} {result['requests_per_s']:8.1f} "
                          f"req/s p50 {result['p50_ms'] or float('nan'):8.1f} ms p99 "
                          f"{result['p99_ms'] or float('nan'):8.1f} ms errors {result['errors']} load "
                          f"{result['loadavg']}", file=sys.stderr, flush=True)
    rows = []
    for (name, kind, level), results in runs.items():
        latencies = [x for r in results for x in r.pop("latencies")]
        rates = [r["requests_per_s"] for r in results]
        loads = [x for r in results for x in r["loadavg"]]
        rows.append({"server": name, "corpus": kind, "concurrency": level, "texts_per_request": args.texts_per_request,
                     "requests": len(latencies), "errors": sum(r["errors"] for r in results),
                     "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
                     "seconds": sum(r["seconds"] for r in results), "requests_per_s": statistics.median(rates),
                     "requests_per_s_rounds": [round(x, 1) for x in rates],
                     "texts_per_s": statistics.median(rates) * args.texts_per_request,
                     "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
                     "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
                     "loadavg_min": min(loads), "loadavg_max": max(loads),
                     "rounds": [{k: v for k, v in r.items() if k != "first_error"} for r in results]})
    offline_rates = {kind: {"texts_per_s": statistics.median(r["texts_per_s"] for r in rs),
                            "rounds": [round(r["texts_per_s"], 1) for r in rs],
                            "loadavg": [x for r in rs for x in r["loadavg"]]} for kind, rs in offline_runs.items()}
    return rows, offline_rates


def goals(rows: list[dict], offline_rates: dict, level: int = 32) -> list[dict]:
    """The serving goals at concurrency ``level``, per corpus, from the medians: each with its value,
    target and verdict."""
    by = {(r["server"], r["corpus"], r["concurrency"]): r for r in rows}
    out = []
    for kind in dict.fromkeys(r["corpus"] for r in rows):
        one = by.get(("fastenc", kind, level))
        for key, label in ((kind, "offline embed()"), (f"{kind} PASSIVE", "offline embed() with OMP_WAIT_POLICY=PASSIVE")):
            if one and key in offline_rates:
                ratio = one["texts_per_s"] / offline_rates[key]["texts_per_s"]
                out.append({"corpus": kind, "goal": f"fastenc (1 worker) at c={level} / {label} texts/s",
                            "value": ratio, "target": ">= 0.90", "met": ratio >= 0.9})
        inproc = by.get(("fastenc --in-process", kind, level))
        if one and inproc:
            ratio = one["requests_per_s"] / inproc["requests_per_s"]
            out.append({"corpus": kind, "goal": f"worker process / in-process thread, requests/s at c={level}",
                        "value": ratio, "target": "(measurement)", "met": None})
        two = by.get(("fastenc --workers 2 --threads 1", kind, level))
        if one and two:
            ratio = two["requests_per_s"] / one["requests_per_s"]
            out.append({"corpus": kind, "goal": f"2 workers x 1 thread / 1 worker x 2 threads, requests/s at c={level}",
                        "value": ratio, "target": "> 1.00", "met": ratio > 1.0})
        infinity = by.get(("infinity", kind, level))
        if one and infinity and infinity["requests_per_s"]:
            ratio = one["requests_per_s"] / infinity["requests_per_s"]
            out.append({"corpus": kind, "goal": f"fastenc / infinity requests/s at c={level}", "value": ratio,
                        "target": ">= 2.00", "met": ratio >= 2.0})
            levels = sorted({r["concurrency"] for r in rows if r["corpus"] == kind})
            lower = all(by[("fastenc", kind, c)]["p99_ms"] < by[("infinity", kind, c)]["p99_ms"] for c in levels
                        if ("fastenc", kind, c) in by and ("infinity", kind, c) in by)
            out.append({"corpus": kind, "goal": "fastenc p99 lower than infinity's at every level", "value": None,
                        "target": "lower", "met": lower})
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    infinity = report["infinity_version"] or "not measured"
    lines = [f"# Serving benchmark: {report['device']}, {env['time'][:10]}", "",
             f"{env['cpu']}, {env['cores']} cores (torch threads {env['torch_threads']}), shared with the load "
             f"generator and, on this machine, with other engineers' work; torch {env['torch']}, fastenc "
             f"{env['fastenc']} (commit {env['commit']}), infinity-emb {infinity}; model {report['model_name']}; "
             f"{report['texts_per_request']} text(s) per request from fixed corpora ("
             + ", ".join(f"{kind}: mean {tokens} tokens" for kind, tokens in report["corpus_mean_tokens"].items())
             + f"); {report['rounds']} rounds of {report['duration']} s measured per server, corpus and level (after "
             f"{report['warmup']} s of warm-up each), the servers taking turns; requests/s is the median of the "
             "rounds, latencies pool all rounds' requests; closed loop (each client waits for its answer). Load "
             "average: the machine's 1-minute load before and after each measurement (2 cores: above 2 means "
             f"other work was running). `uptime` at the start: {report['uptime_start']}; at the end: "
             f"{report['uptime_end']}.", ""]
    if report["offline"]:
        lines += ["| corpus (PASSIVE: OMP_WAIT_POLICY=PASSIVE, in a fresh process) | offline embed() texts/s (median) "
                  "| rounds | load avg |", "|---|---|---|---|"]
        for kind, value in report["offline"].items():
            lines.append(f"| {kind} | {value['texts_per_s']:.1f} | {', '.join(map(str, value['rounds']))} | "
                         f"{min(value['loadavg'])}–{max(value['loadavg'])} |")
        lines.append("")
    lines += ["| server | corpus | concurrency | requests/s (median) | rounds | p50 ms | p99 ms | errors | load avg |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(report["rows"], key=lambda r: (r["corpus"], r["concurrency"], r["server"])):
        lines.append(f"| {row['server']} | {row['corpus']} | {row['concurrency']} | {row['requests_per_s']:.1f} | "
                     f"{', '.join(map(str, row['requests_per_s_rounds']))} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['errors']} | {row['loadavg_min']}–{row['loadavg_max']} |")
    if report["goals"]:
        lines += ["", "| corpus | goal | value | target | met |", "|---|---|---|---|---|"]
        for goal in report["goals"]:
            value = "" if goal["value"] is None else f"{goal['value']:.2f}"
            met = {True: "yes", False: "no", None: ""}[goal["met"]]
            lines.append(f"| {goal['corpus']} | {goal['goal']} | {value} | {goal['target']} | {met} |")
    return "\n".join(lines) + "\n"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="fastenc,infinity",
                        help="comma-separated: fastenc, infinity (infinity is skipped when its venv is missing)")
    parser.add_argument("--url", help="benchmark a running server at this embeddings URL instead of starting any")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--corpora", default="short,long", help="comma-separated: short, long (default both)")
    parser.add_argument("--levels", default="1,32", help="concurrency levels (default 1,32)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per server, corpus, level and round (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over everything; medians (default 3)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--fastenc-args", default="", help="extra arguments for every fastenc serve")
    parser.add_argument("--also-fastenc", action="append", default=None, metavar="ARGS",
                        help="also measure fastenc serve with these extra arguments (repeatable; default: "
                             "'--in-process' and '--workers 2 --threads 1'; give '' for none)")
    parser.add_argument("--no-offline", dest="offline", action="store_false",
                        help="skip the offline embed() throughput")
    parser.add_argument("--infinity-python", default=os.environ.get("INFINITY_PYTHON", "infinity-venv/bin/python"),
                        help="the python of infinity-emb's venv (default $INFINITY_PYTHON)")
    parser.add_argument("--infinity-args", default="", help="extra arguments for infinity_emb v2")
    parser.add_argument("--output", help="write the report to OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.also_fastenc is None:
        args.also_fastenc = ["--in-process", "--workers 2 --threads 1"]
    args.also_fastenc = [extra for extra in args.also_fastenc if extra.strip()]

    from fastenc.encoder import Encoder, default_model_path

    model = str(Path(args.model).resolve()) if args.model else str(default_model_path())
    corpora = {kind: corpus(kind=kind) for kind in args.corpora.split(",")}
    tokenizer = Encoder.from_pretrained(model).tokenizer
    mean_tokens = {kind: round(statistics.mean(len(e.ids) for e in tokenizer.encode_batch(texts)), 1)
                   for kind, texts in corpora.items()}
    model_name = Path(model).name if Path(model).name != "model" else Path(model).parent.name
    names = args.servers.split(",")
    if "infinity" in names and not Path(args.infinity_python).exists():
        print(f"infinity-emb's python {args.infinity_python} is missing: infinity is not measured",
              file=sys.stderr, flush=True)
        names.remove("infinity")
    uptime_start = _uptime()
    if args.url:
        rows, offline_rates = measure({"server": args.url}, model, corpora, args)
    else:
        processes, servers = [], {}
        try:
            for name in names:
                process, servers[name] = {"fastenc": start_fastenc, "infinity": start_infinity}[name](model, args)
                processes.append(process)
            for extra in args.also_fastenc:  # variants, labelled by their arguments
                process, servers[f"fastenc {extra}"] = start_fastenc(model, args, extra)
                processes.append(process)
            rows, offline_rates = measure(servers, model, corpora, args)
        finally:
            for process in processes:
                stop(process)
    report = {"device": args.device, "env": environment(args), "model_name": model_name,
              "infinity_version": infinity_version(args.infinity_python) if "infinity" in names else None,
              "texts_per_request": args.texts_per_request, "corpus_mean_tokens": mean_tokens,
              "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
              "uptime_start": uptime_start, "uptime_end": _uptime(), "offline": offline_rates, "rows": rows}
    report["goals"] = goals(rows, offline_rates)
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
