"""FP8 quality on the CPU: ``dtype="fp8"`` (the torch backend's exact emulation) beside fp16 and bf16, against fp32.

    python benchmarks/fp8_quality.py [--texts 2000] [--bert-texts 1000] [--sensitivity-texts 400]
                                     [--output benchmarks/results]

Models:

- ``all-MiniLM-L6-v2`` (bundled, trained): sentence vectors from ``embed()`` (mean pooling, normalised);
- ``bert-base`` shape (12 x 768, intermediate 3072; ``fastenc.bench``'s random, perturbed checkpoint, as the
  GPU benchmarks use; no trained BERT-base can be fetched here): the mean of its last hidden states over
  the real tokens, the texts tokenized by all-MiniLM-L6-v2's tokenizer (BERT-base's uncased vocabulary).
  Random weights have none of a trained model's outlier channels: this row measures the arithmetic at
  BERT-base's widths, not a trained model's sensitivity.

Metrics, each against the same model in fp32 on the torch backend:

- cosine: of each text's vector, over ``--texts`` texts (``benchmarks/corpus.py``'s generator: one to six
  template sentences, about 10 to 75 tokens): minimum, 0.1th percentile and mean;
- top-10: the retrieval corpus of ``tests/test_quantize.py`` (500 documents, 50 queries), the mean overlap of
  each query's 10 nearest documents with fp32's;
- labels: the tests' task checkpoints (``tests/checkpoints.py``: tiny, random, perturbed BERTs with a
  sequence-classification and a token-classification head), the share of predicted labels (per text, per
  token) equal to fp32's over ``--texts`` texts, and the share of those whose fp32 top-2 logit margin is
  above 0.01 (the random heads' near-ties are where any rounding flips a label);
- sensitivity: all-MiniLM-L6-v2's cosines and top-10 with one source of error at a time: e4m3 weights with
  exact (float32) activations, e4m3 activations with exact weights, and all FP8 but one GEMM kind, or one
  layer, kept in 16 bits (``fastenc.fp8.quantize_weights(..., keep=)``): where the loss comes from, and
  what keeping layers in 16 bits would buy;
- activations: for all-MiniLM-L6-v2, the largest ratio of a token's absolute maximum to its RMS at each
  FP8 GEMM's input (how far one outlier channel stretches a per-token scale), per GEMM kind.

Writes ``fp8-quality-cpu-<yyyymmdd>.json`` and ``.md`` under ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fastenc  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402
from fastenc import fp8  # noqa: E402

PRECISIONS = ("fp16", "bf16", "fp8")
GATES = {"cosine_min": 0.999, "top10": 0.99, "labels": 0.995}


def retrieval_corpus() -> tuple[list[str], list[str]]:
    """tests/test_quantize.py's 500 documents and 50 queries."""
    from test_quantize import sentences

    return sentences(500, seed=0), sentences(50, seed=1)


def load(path, dtype, **kwargs) -> fastenc.Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulation's "slow" notice
        return fastenc.Encoder.from_pretrained(path, device="cpu", backend="torch", dtype=dtype, **kwargs)


def top10_overlap(reference_scores: torch.Tensor, scores: torch.Tensor) -> float:
    a, b = reference_scores.topk(10, dim=1).indices, scores.topk(10, dim=1).indices
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(a, b)]))


def cosines(vectors: torch.Tensor, reference: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(vectors.double(), reference.double(), dim=1)
    return {"min": float(cos.min()), "p0.1": float(torch.quantile(cos, 0.001)), "mean": float(cos.mean()),
            "n": int(cos.numel())}


# ------------------------------------------------------------------------------------ sentence vectors
def minilm_vectors(encoder, texts):
    return encoder.embed(texts, batch_size=64, progress=False)


def mean_pooled(encoder, tokenizer_encoder, texts, batch_size=32):
    """Mean of the last hidden states over real tokens, float32 ``(n, hidden)``; ids from ``tokenizer_encoder``."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer_encoder.tokenize(texts[start:start + batch_size], max_length=128)
        hidden = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()
        mask = batch["attention_mask"][..., None].float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def vector_metrics(name, vectors_of, path, texts, docs, queries, log) -> dict:
    rows = {}
    start = time.perf_counter()
    exact = load(path, "fp32")
    ref_texts, ref_docs, ref_queries = (vectors_of(exact, t) for t in (texts, docs, queries))
    log(f"{name} fp32: {time.perf_counter() - start:.0f} s")
    for precision in PRECISIONS:
        start = time.perf_counter()
        encoder = load(path, precision)
        vecs, d, q = (vectors_of(encoder, t) for t in (texts, docs, queries))
        seconds = time.perf_counter() - start
        rows[precision] = {"cosine": cosines(vecs, ref_texts),
                           "top10": top10_overlap(ref_queries @ ref_docs.T, q @ d.T), "seconds": round(seconds, 1)}
        log(f"{name} {precision}: {rows[precision]} ")
        del encoder
    return rows


# ----------------------------------------------------------------------------------------- task labels
def label_metrics(texts, log) -> dict:
    import checkpoints as C

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for head, task in (("sequence_classification", "text-classification"),
                           ("token_classification", "token-classification")):
            path = C.make_checkpoint(Path(tmp) / head, "bert", head=head, seed=7)
            logits = {}
            for precision in ("fp32", *PRECISIONS):
                encoder = load(path, precision)
                logits[precision] = head_logits(encoder, head, texts)
            reference = logits["fp32"]
            top2 = reference.topk(2, dim=-1).values
            clear = (top2[..., 0] - top2[..., 1]) > 0.01
            labels = reference.argmax(-1)
            rows[task] = {}
            for precision in PRECISIONS:
                same = logits[precision].argmax(-1) == labels
                rows[task][precision] = {"agreement": float(same.float().mean()),
                                         "agreement_clear_margin": float(same[clear].float().mean()),
                                         "n": int(same.numel()), "n_clear": int(clear.sum())}
            log(f"labels {task}: {rows[task]}")
    return rows


def head_logits(encoder, head, texts, batch_size=32) -> torch.Tensor:
    """``(texts, labels)`` sequence logits or ``(tokens, labels)`` token logits, float32."""
    out = []
    for start in range(0, len(texts), batch_size):
        encodings = encoder.text.encode(texts[start:start + batch_size])
        packed = encoder.text.pack(encodings)
        hidden = encoder.model(packed)
        lengths = packed.lengths
        if head == "sequence_classification":
            out.append(encoder.model.heads.sequence_logits(hidden, lengths).float())
        else:
            out.append(encoder.model.heads.token_logits(hidden).float())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ sensitivity
def _keeping(names):
    """``fp8.quantize_weights`` that keeps the layer GEMM weights ``names`` in 16 bits."""
    quantize = fp8.quantize_weights
    return lambda tensors, dtype, keep=frozenset(): quantize(tensors, dtype, keep=frozenset(keep) | set(names))


def sensitivity(path, texts, docs, queries, log) -> dict:
    """all-MiniLM-L6-v2 with one source of FP8 error at a time (see the module docstring). The emulation
    rounds to ``fastenc.reference.FP8_DTYPE``: float32 there makes that rounding exact."""
    from fastenc import reference

    exact = load(path, "fp32")
    ref_texts, ref_docs, ref_queries = (minilm_vectors(exact, t) for t in (texts, docs, queries))
    layers = exact.config.num_hidden_layers
    kinds = ("qkv", "attn_out", "ffn_in", "ffn_out")

    def measure(label, encoder, during=contextlib.nullcontext):
        with during():
            vecs, d, q = (minilm_vectors(encoder, t) for t in (texts, docs, queries))
        rows[label] = {"cosine": cosines(vecs, ref_texts), "top10": top10_overlap(ref_queries @ ref_docs.T, q @ d.T)}
        log(f"sensitivity {label}: {rows[label]}")

    def exact_rounding():
        return mock.patch.object(reference, "FP8_DTYPE", torch.float32)

    rows: dict[str, dict] = {}
    measure("all FP8", load(path, "fp8"))
    measure("weights e4m3 only (activations exact)", load(path, "fp8"), exact_rounding)
    with exact_rounding():
        weights_exact = load(path, "fp8")
    measure("activations e4m3 only (weights exact)", weights_exact)
    for kind in kinds:
        with mock.patch.object(fp8, "quantize_weights", _keeping(f"layers.{i}.{kind}.weight" for i in range(layers))):
            encoder = load(path, "fp8")
        measure(f"{kind} of every layer in 16 bits", encoder)
    for layer in range(layers):
        with mock.patch.object(fp8, "quantize_weights", _keeping(f"layers.{layer}.{kind}.weight" for kind in kinds)):
            encoder = load(path, "fp8")
        measure(f"layer {layer} in 16 bits", encoder)
    return rows


# ------------------------------------------------------------------------------------ activation ranges
def activation_outliers(path, texts) -> dict:
    """Per FP8 GEMM input kind: the largest ``max|x| / rms(x)`` of a token row (a row of all equal
    magnitudes gives 1; one outlier channel among ``n`` gives up to ``sqrt(n)``)."""
    encoder = load(path, "fp8")
    ops = encoder.model.ops
    worst: dict[str, float] = {}
    kinds = {"fused_qkv": "qkv input (LayerNorm output)", "linear": "attention output / GELU output",
             "gated_linear": "gated input"}

    def spy(name, original):
        def wrapped(x, weight, *args, **kwargs):
            if isinstance(weight, fp8.Fp8Weight):
                rows = x.float()
                ratio = (rows.abs().amax(1) / rows.pow(2).mean(1).sqrt().clamp_min(1e-30)).max().item()
                key = f"{name} K={rows.shape[1]}"
                worst[key] = max(worst.get(key, 0.0), ratio)
            return original(x, weight, *args, **kwargs)
        return wrapped

    for name in kinds:
        setattr(ops, name, spy(name, getattr(fp8.Fp8Ops, name).__get__(ops)))
    encoder.embed(texts, batch_size=64, progress=False)
    return {key: round(value, 1) for key, value in sorted(worst.items())}


# ---------------------------------------------------------------------------------------------- report
def environment() -> dict:
    from fastenc.bench.report import git_commit

    commit = git_commit(REPO)
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "commit": commit,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_before": [round(v, 2) for v in os.getloadavg()]}


def render(result: dict) -> str:
    env = result["environment"]
    lines = ["# FP8 quality on the CPU: the emulation of `dtype=\"fp8\"` beside fp16 and bf16, against fp32", "",
             f"{env['cpu']} ({env['cores']} CPUs, torch threads {env['torch_threads']}), torch {env['torch']}, "
             f"commit {env['commit']}, {env['time']}. Load average before: {env['load_before']}, after: "
             f"{env['load_after']}.", "",
             "fp8: e4m3 GEMM operands, one scale per token and per output channel, float32 accumulation; "
             "activations, norms, attention and heads in fp16 (as on the GPU). fp16/bf16: the torch backend in "
             "that dtype. Gates (the issue's): cosine min >= 0.999, top-10 >= 0.99, labels >= 0.995.", "",
             "| model | precision | cosine min | cosine p0.1 | cosine mean | texts | top-10 overlap | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for model, rows in result["vectors"].items():
        for precision, row in rows.items():
            c = row["cosine"]
            lines.append(f"| {model} | {precision} | {c['min']:.6f} | {c['p0.1']:.6f} | {c['mean']:.6f} | {c['n']} "
                         f"| {row['top10']:.3f} | {row['seconds']} |")
    lines += ["", "Label agreement with fp32 on the tests' task checkpoints (tiny random BERTs; \"clear\": fp32's "
              "top-2 logit margin above 0.01):", "",
              "| task | precision | agreement | agreement (clear margin) | predictions (clear) |", "|---|---|---|---|---|"]
    for task, rows in result["labels"].items():
        for precision, row in rows.items():
            lines.append(f"| {task} | {precision} | {row['agreement']:.4f} | {row['agreement_clear_margin']:.4f} | "
                         f"{row['n']} ({row['n_clear']}) |")
    if result.get("sensitivity"):
        lines += ["", "Where all-MiniLM-L6-v2's FP8 loss comes from: one source of error at a time, on the same texts "
                  "(\"exact\": rounded to float32 instead of e4m3; \"in 16 bits\": those GEMMs run unquantized):", "",
                  "| variant | cosine min | cosine mean | top-10 overlap |", "|---|---|---|---|"]
        for label, row in result["sensitivity"].items():
            lines.append(f"| {label} | {row['cosine']['min']:.6f} | {row['cosine']['mean']:.6f} | {row['top10']:.3f} |")
    lines += ["", "all-MiniLM-L6-v2's FP8 GEMM inputs: the largest max|x| / rms(x) of a token row (1: flat; an "
              "outlier channel among K stretches it towards sqrt(K)):", "", "| GEMM input | ratio |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in result["activation_outliers"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000, help="texts for all-MiniLM-L6-v2's cosines and the labels")
    parser.add_argument("--bert-texts", type=int, default=1000, help="texts (and retrieval documents, a tenth as "
                        "many queries) for the BERT-base-shaped model")
    parser.add_argument("--sensitivity-texts", type=int, default=400, help="texts for all-MiniLM-L6-v2's "
                        "sensitivity rows (0: none)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    from fastenc.bench.e2e import MODELS
    from fastenc.encoder import default_model_path

    result = {"environment": environment(), "gates": GATES}
    texts = make_corpus(args.texts, seed=3)
    docs, queries = retrieval_corpus()
    minilm = default_model_path()
    result["vectors"] = {"all-MiniLM-L6-v2": vector_metrics("all-MiniLM-L6-v2", minilm_vectors, minilm, texts, docs,
                                                            queries, log)}
    tokenizer = load(minilm, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        bert = MODELS["bert-base"].materialize(Path(tmp))
        few = max(10, args.bert_texts // 10)  # the retrieval corpus cut to --bert-texts documents
        result["vectors"]["bert-base shape (random)"] = vector_metrics(
            "bert-base", lambda encoder, t: mean_pooled(encoder, tokenizer, t), bert, texts[:args.bert_texts],
            docs[:args.bert_texts], queries[:few], log)
    result["labels"] = label_metrics(texts, log)
    if args.sensitivity_texts:
        result["sensitivity"] = sensitivity(minilm, texts[:args.sensitivity_texts], docs, queries, log)
    result["activation_outliers"] = activation_outliers(minilm, texts[:200])
    result["environment"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
    stamp = datetime.date.today().strftime("%Y%m%d")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"fp8-quality-cpu-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / f"fp8-quality-cpu-{stamp}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
