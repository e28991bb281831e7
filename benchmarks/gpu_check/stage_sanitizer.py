"""The ``sanitizer`` stage: compute-sanitizer's memcheck on small ragged forwards of every model family's kernel
variants and on the SPLADE kernel, racecheck on the attention variants and the SPLADE kernel.

Targets (``TARGETS``), each a tiny model with random perturbed weights on ragged batches (lengths 7, 97,
129, 33, 1: masked row and key tails, a one-token sequence), torch's caching allocator off so that every
tensor is its own allocation:

* BERT at head dims 64, 40 and 32 (all-MiniLM-L6-v2's, the model the embed stage runs: several
  ``tl.dot`` at a 32-wide block and 4 warps);
* a ModernBERT (RoPE table reads in the QKV epilogue, sliding windows that skip key blocks, the gated
  epilogue, bias-free GEMMs and norms);
* an MPNet (reads of the relative-bias table by distance);
* ``splade_pool`` with and without a decoder bias, max and sum pooling, a partial last vocabulary tile.

Racecheck reports shared-memory hazards. Triton's reductions (the softmax statistics, the norms, the
SPLADE pooling) store a reduced value from every thread that holds a copy of it; racecheck can report
those stores as write-after-write hazards between threads of the same instruction, which are benign: the
same value lands in the same word. Each hazard is recorded with its kernel, and ``classify`` tells a
real race (a read against a write, or writes from different instructions, reported as an error) from
that pattern and from what racecheck itself reports as a warning. Only real races fail the stage.

A device on which the tool is refused ("Device not supported", "LibraryNotLoaded") is recorded as
refused, not failed. The dry run runs the targets without the tool (and the compile stage's plan records
their launches at the GPU's lengths).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .launches import plan_keys
from .processes import GRACE_S, run_member
from .records import ROOT, Stage, log, remaining

LENGTHS, DRY_LENGTHS = [7, 97, 129, 33, 1], [3, 2]
SPLADE_VOCAB = 1000  # a partial last tile of 128 words
REFUSALS = ("Device not supported", "LibraryNotLoaded", "not supported on this", "Unable to find injection",
            "Target application is not supported", "INTERNAL ERROR", "Could not attach")
# (tool, targets, share of the stage's time)
CHECKS = (("memcheck", "bert-hd64,bert-hd40,minilm-hd32,modernbert,mpnet,splade", 0.55),
          ("racecheck", "attention,splade", 1.0))
SANITIZER_TARGETS = list(dict.fromkeys(t for _, targets, _ in CHECKS for t in targets.split(",")))


def target_specs() -> dict:
    """The sanitizer's models (``fastenc.bench`` specs; vocabularies of 1,000 words)."""
    from fastenc.bench.e2e import ModelSpec

    return {
        "bert-hd64": ModelSpec("sanitizer-bert-hd64", layers=2, hidden=128, heads=2, intermediate=256, vocab=1000),
        "bert-hd40": ModelSpec("sanitizer-bert-hd40", layers=2, hidden=120, heads=3, intermediate=256, vocab=1000),
        "minilm-hd32": ModelSpec("sanitizer-minilm-hd32", layers=2, hidden=96, heads=3, intermediate=256, vocab=1000),
        "modernbert": ModelSpec("sanitizer-modernbert", layers=3, hidden=64, heads=2, intermediate=96, vocab=1000,
                                family="modernbert", local_attention=16),
        "mpnet": ModelSpec("sanitizer-mpnet", layers=2, hidden=128, heads=2, intermediate=256, vocab=1000,
                           family="mpnet"),
    }


# ------------------------------------------------------------------------------------------ the targets
def run_targets(names: list[str], device, lengths: list[int], shapes_only: bool = False,
                small: bool = False) -> list[str]:
    """Run the named targets (``attention``: the attention variants alone; ``splade``: the SPLADE kernel); one
    line per result. ``shapes_only``: over zero CPU tensors, for a plan that launches nothing; ``small``: one
    layer per model (ModernBERT's three kinds of block), for the interpreter."""
    import dataclasses

    import torch

    from . import encoders

    specs, lines = target_specs(), []
    for name in names:
        if name in specs:
            spec = specs[name]
            if small and spec.family != "modernbert":
                spec = dataclasses.replace(spec, layers=1)
            encoder = (encoders.shape_encoder(spec, "fp16") if shapes_only
                       else encoders.random_encoder(spec, "fp16", device))
            out = encoder.forward_packed(encoders.packed(encoder, lengths)).cpu()
            ids = torch.randint(5, 1000, (len(lengths), max(lengths)))
            mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
            padded = encoder(ids, mask).cpu()  # the padded call: packing and the scatter back included
            lines.append(_line(name, [out, padded], shapes_only))
        elif name == "attention":
            lines += _attention(device, lengths, shapes_only)
        elif name == "splade":
            lines += _splade(device, lengths, shapes_only)
        else:
            raise ValueError(f"unknown sanitizer target {name!r}")
    return lines


def _line(name: str, outputs, shapes_only: bool) -> str:
    import torch

    if shapes_only:
        return f"{name}: planned"
    ok = all(bool(torch.isfinite(t).all()) for t in outputs)
    return f"{name}: {'finite' if ok else 'NOT FINITE'}"


def _cu_seqlens(lengths, device):
    import torch

    return torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32, device=device)


def _attention(device, lengths, shapes_only: bool) -> list[str]:
    """Attention alone, inputs made on the host: head dims 64, 40, 32; a window of ±8 and MPNet's bias."""
    import torch

    from fastenc import kernels

    generator, lines, cu = torch.Generator().manual_seed(0), [], _cu_seqlens(lengths, device)
    tokens = sum(lengths)
    positions = (torch.arange(tokens) - torch.repeat_interleave(_cu_seqlens(lengths, "cpu")[:-1].long(),
                                                                torch.tensor(lengths))).to(device)
    for head_dim, heads, window, bias in ((64, 2, None, False), (40, 3, None, False), (32, 3, None, False),
                                          (32, 2, 8, False), (64, 2, None, True)):
        q, k, v = (torch.randn(heads, tokens, head_dim, generator=generator).to(torch.float16).to(device)
                   for _ in range(3))
        q = q * head_dim ** -0.5
        table = (torch.randn(heads, 2 * 514 - 1, generator=generator) * 0.1).to(device) if bias else None
        out = kernels.attention(q, k, v, cu, max(lengths), positions if window or bias else None, window, table)
        kind = "window" if window else "bias" if bias else "plain"
        lines.append(_line(f"attention hd{head_dim} {kind}", [out.cpu()], shapes_only))
    return lines


def _splade(device, lengths, shapes_only: bool) -> list[str]:
    import torch

    from fastenc import kernels

    generator, cu, lines = torch.Generator().manual_seed(1), _cu_seqlens(lengths, device), []
    x = torch.randn(sum(lengths), 128, generator=generator).to(torch.float16).to(device)
    weight = (torch.randn(SPLADE_VOCAB, 128, generator=generator) * 128 ** -0.5).to(torch.float16).to(device)
    bias = (torch.randn(SPLADE_VOCAB, generator=generator) - 1.0).to(torch.float16).to(device)
    for pooling, activation in (("max", "relu"), ("sum", "log1p_relu")):
        for b in (bias, None):
            out = kernels.splade_pool(x, weight, b, cu, pooling, activation)
            name = f"splade {pooling} {'with' if b is not None else 'without'} bias"
            lines.append(_line(name, [out.cpu()], shapes_only))
    return lines


def target_main(args) -> int:
    """The process compute-sanitizer runs: the targets, a line each, then ``TARGET OK`` if all were finite."""
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    lines = []
    for line in run_targets(args.target.split(","), device, DRY_LENGTHS if args.dry_run else LENGTHS,
                            small=args.dry_run):
        print(line, flush=True)
        lines.append(line)
    if any("NOT FINITE" in line for line in lines):
        return 3
    print("TARGET OK", flush=True)
    return 0


# --------------------------------------------------------------------------------------- the tool's output
def find_sanitizer() -> str | None:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                      "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


_HAZARD = re.compile(r"(?P<severity>error|warning|info): race reported between (?P<first>read|write) access at "
                     r"(?P<pc1>0x[0-9a-f]+) in (?P<where1>.+?)\s*$", re.IGNORECASE)
_AND = re.compile(r"^\s*and (?P<second>read|write) access at (?P<pc2>0x[0-9a-f]+) in (?P<where2>.+?)"
                  r"(?: \[(?P<count>\d+) hazards?\])?\s*$", re.IGNORECASE)


def _kernel(where: str) -> str:
    """``/path/attention.py:123:_attention_kernel`` (or a C++ signature) -> ``_attention_kernel``."""
    name = where.rsplit(":", 1)[-1] if ":" in where else where
    return name.split("(")[0].strip()


def parse_hazards(text: str) -> list[dict]:
    """Racecheck's analysis report: one entry per pair of accesses (``Race reported between ... and ...``)."""
    hazards, current = [], None
    for raw in text.splitlines():
        line = raw.lstrip("= ").rstrip()
        match = _HAZARD.search(line)
        if match:
            current = {"severity": match["severity"].lower(), "first": match["first"].lower(), "pc1": match["pc1"],
                       "kernel": _kernel(match["where1"]), "where": match["where1"]}
            continue
        match = _AND.search(line)
        if match and current is not None:
            hazards.append({**current, "second": match["second"].lower(), "pc2": match["pc2"],
                            "where2": match["where2"], "count": int(match["count"] or 1)})
    return hazards


def classify(hazard: dict) -> tuple[str, str]:
    """``("benign", why)`` or ``("real", why)`` (see the module docstring)."""
    if hazard["severity"] != "error":
        return "benign", f"racecheck reports it as a {hazard['severity']}"
    if hazard["first"] == hazard["second"] == "write" and hazard["pc1"] == hazard["pc2"]:
        return "benign", "one store instruction from several threads (a reduction's replicated result)"
    kinds = f"{hazard['first']} / {hazard['second']}"
    return "real", f"{kinds} between {'different instructions' if hazard['pc1'] != hazard['pc2'] else 'threads'}"


def parse_sanitizer(text: str) -> dict:
    errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
    refused = next((marker for marker in REFUSALS if marker in text), None)
    found = []
    for hazard in parse_hazards(text):
        verdict, why = classify(hazard)
        found.append({"kernel": hazard["kernel"], "accesses": f"{hazard['first']}/{hazard['second']}",
                      "severity": hazard["severity"], "count": hazard["count"], "verdict": verdict, "why": why,
                      "where": hazard["where"]})
    return {"errors": int(errors.group(1)) if errors else None,
            "hazards": int(hazards.group(1)) if hazards else None, "refused": refused,
            "target_ok": "TARGET OK" in text, "races": found,
            "real_races": sum(1 for h in found if h["verdict"] == "real")}


def verdict(tool: str, parsed: dict, returncode: int | None, with_tool: bool) -> str:
    if returncode is None:
        return "timeout"
    if not with_tool:
        return "rehearsed" if returncode == 0 and parsed["target_ok"] else "failed"
    if parsed["refused"] or (returncode != 0 and parsed["errors"] is None and parsed["hazards"] is None):
        return "refused"
    if not parsed["target_ok"]:
        return "failed"
    if tool == "racecheck":  # its hazards count as errors too: only real races fail, or hazards not understood
        return "failed" if parsed["real_races"] or (parsed["hazards"] and not parsed["races"]) else "ok"
    return "ok" if returncode == 0 and not parsed["errors"] else "failed"


# -------------------------------------------------------------------------------------------- the stage
def run(stage: Stage) -> None:
    checks = [("none", ",".join(t for _, targets, _ in CHECKS for t in targets.split(",")), 1.0)] if stage.dry \
        else list(CHECKS)
    targets = sorted({t for _, names, _ in checks for t in names.split(",")})
    stage.record.update(targets={tool: names.split(",") for tool, names, _ in CHECKS})
    sanitizer = None if stage.dry else find_sanitizer()
    results = {}
    output = stage.work / "sanitizer-output.log"
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every tensor its own allocation
    for tool, names, share in checks:
        if tool == "none":  # the dry run: every target once, without the tool
            names = ",".join(dict.fromkeys(names.split(",")))
        command = stage.command("sanitizer-target", 600, "--target", names)
        if sanitizer:
            command = [sanitizer, "--tool", tool, "--print-limit", "50", "--error-exitcode", "86", *command]
        timeout = max((remaining(stage.deadline) - GRACE_S - 2) * share, 5)  # done before the runner's SIGINT
        with open(output, "a") as handle:
            handle.write(f"===== {tool} on {names}: {' '.join(command)}\n")
        outcome = run_member(command, timeout=timeout, cwd=ROOT, env=env, capture=True)
        with open(output, "a") as handle:
            handle.write(outcome.output[-400_000:] + "\n")
        print(outcome.output[-20_000:])
        parsed = parse_sanitizer(outcome.output)
        status = verdict(tool, parsed, None if outcome.timed_out else outcome.returncode, sanitizer is not None)
        results[tool] = {"targets": names.split(","), "status": status, "returncode": outcome.returncode,
                         "seconds": round(outcome.seconds, 1), **parsed,
                         "lines": [line for line in outcome.output.splitlines() if ": " in line and (
                             "finite" in line or "FINITE" in line)]}
        stage.record.update(checks=results, sanitizer=sanitizer)
        if outcome.interrupted:
            break
    if stage.dry:
        stage.record.update(plan_keys=plan_keys(stage.work, "sanitizer"))
    statuses = {r["status"] for r in results.values()}
    if stage.dry:
        status = "skipped"
        note = (f"dry run: no compute-sanitizer; its {len(targets)} targets ran without it: "
                + ", ".join(f"{r['status']}" for r in results.values()))
    elif not sanitizer:
        status, note = "refused", "compute-sanitizer was not found"
    else:
        status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses
                  else "refused" if statuses == {"refused"} else "ok")
        note = ", ".join(_summary(tool, r) for tool, r in results.items())
    stage.record.update(status=status, note=note)
    log(f"sanitizer: {note}")


def _summary(tool: str, result: dict) -> str:
    if tool == "memcheck":
        return f"memcheck {result['status']} ({result['errors']} errors)"
    benign = len(result["races"]) - result["real_races"]
    return (f"racecheck {result['status']} ({result['hazards']} hazards: {result['real_races']} real, "
            f"{benign} benign)")


def plan_launches() -> None:
    """Every target at the GPU's lengths over zero tensors, for a plan (``launches.record(plan_only=True)``)."""
    import torch

    run_targets(SANITIZER_TARGETS, torch.device("cpu"), LENGTHS, shapes_only=True)
