"""BGE-M3's three outputs: ``Encoder.embed_multi`` against FlagEmbedding's ``BGEM3FlagModel.encode``.

    python benchmarks/bge_m3.py [--device cpu|cuda] [--dtype fp32|fp16] [--layers 2] [--texts 48]
                                [--tokens 64,192] [--batch 32] [--repeats 3] [--threads N] [--output DIR]

The checkpoint is BGE-M3-shaped and built here (nothing downloaded): XLM-R large's width (hidden 1024,
16 heads, intermediate 4096, 250,002 words, 8,194 positions) with ``--layers`` layers (BAAI/bge-m3 has
24; 2 by default on the CPU, a stand-in whose per-token cost is a twelfth of the real model's while the
heads and the vocabulary-wide sparse output cost the same), seeded random weights,
``colbert_linear.pt`` (1024 x 1024) and ``sparse_linear.pt`` (1 x 1024) saved as BAAI/bge-m3 ships them,
and a word-level tokenizer of 30,000 made-up words with XLM-R's special tokens. Texts: seeded random
words, ``--tokens`` (a range) tokens each.

Rows, one call over all the texts each, the providers' timed calls interleaved round by round:

* ``fastenc embed_multi``: dense, lexical weights and ColBERT vectors from one forward;
* ``FlagEmbedding encode``: ``encode(return_dense=True, return_sparse=True, return_colbert_vecs=True)``
  (fp32 on the CPU, ``use_fp16`` on CUDA), the same batch size;
* ``fastenc embed``: the dense vector alone, to show what the two other outputs add.

texts/s (median and range of ``--repeats`` calls) and the peak resident memory one call takes above the
loaded model (the process's resident set sampled every millisecond; CUDA: ``max_memory_allocated``).
The outputs are compared before anything is timed. Writes ``bge-m3-<cpu|gpu>-<yyyymmdd>.json`` and
``.md`` under ``--output``, with the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = 30000
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..3, and its mask


def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(4):
        i, r = divmod(i, 26)
        out = letters[r] + out
    return "w" + out


def build_checkpoint(directory: Path, layers: int) -> Path:
    """The BGE-M3-shaped checkpoint of the module docstring, in ``directory``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(0)
    config = transformers.XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=layers,
                                           num_attention_heads=16, intermediate_size=4096,
                                           max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
                                           bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.XLMRobertaModel(config, add_pooling_layer=True).eval().save_pretrained(directory)
    torch.save(torch.nn.Linear(1024, 1024).state_dict(), directory / "colbert_linear.pt")
    torch.save(torch.nn.Linear(1024, 1).state_dict(), directory / "sparse_linear.pt")
    vocab = {token: i for i, token in enumerate(SPECIALS)} | {_word(i): len(SPECIALS) + i for i in range(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                   ("</s>", 2)])
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
        "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "model_max_length": 8192}))
    return directory


def make_texts(count: int, low: int, high: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low - 2, high - 1, (count,), generator=gen).tolist()  # tokens, less <s> and </s>
    return [" ".join(_word(i) for i in torch.randint(0, WORDS, (n,), generator=gen).tolist()) for n in lengths]


# ---------------------------------------------------------------------------------------------- running
def providers(path: Path, device: str, dtype: torch.dtype, batch: int) -> dict:
    import fastenc
    from FlagEmbedding import BGEM3FlagModel

    encoder = fastenc.Encoder.from_pretrained(path, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flag = BGEM3FlagModel(str(path), use_fp16=dtype == torch.float16, devices=device)

    def flag_encode(texts):
        return flag.encode(texts, batch_size=batch, max_length=8192, return_dense=True, return_sparse=True,
                           return_colbert_vecs=True)

    return {
        "fastenc embed_multi": lambda texts: encoder.embed_multi(texts, batch_size=batch, progress=False),
        "FlagEmbedding encode": flag_encode,
        "fastenc embed": lambda texts: encoder.embed(texts, batch_size=batch, progress=False),
    }, encoder


def check(calls: dict, texts: list[str]) -> dict:
    """The largest differences between the two providers' outputs (raises when they disagree)."""
    ours, theirs = calls["fastenc embed_multi"](texts), calls["FlagEmbedding encode"](texts)
    dense = (ours["dense"] - torch.from_numpy(theirs["dense_vecs"]).float()).abs().max().item()
    colbert = max((a - torch.from_numpy(b).float()).abs().max().item()
                  for a, b in zip(ours["multivector"], theirs["colbert_vecs"]))
    sparse, same_keys = 0.0, True
    for row, weights in enumerate(theirs["lexical_weights"]):
        mine = ours["sparse"][row].coalesce()
        mine = {int(k): float(v) for k, v in zip(mine.indices()[0], mine.values())}
        same_keys &= sorted(mine) == sorted(int(k) for k in weights)
        sparse = max([sparse] + [abs(mine.get(int(k), 0.0) - float(v)) for k, v in weights.items()])
    if not (same_keys and max(dense, colbert, sparse) < 1e-3):
        raise SystemExit(f"fastenc and FlagEmbedding disagree: dense {dense:.3g}, colbert {colbert:.3g}, "
                         f"sparse {sparse:.3g}, same active tokens: {same_keys}")
    return {"dense": dense, "colbert": colbert, "sparse": sparse}


class ResidentPeak:
    """The peak resident set during a block, above the resident set at its start (sampled every ms)."""

    def __enter__(self):
        self.start = self.peak = self._resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _resident() -> int:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._resident())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._resident())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(calls: dict, texts: list[str], device: str, repeats: int) -> dict:
    """texts/s (median, min, max) and the peak memory of one call, per provider; calls interleaved."""
    seconds = {name: [] for name in calls}
    peaks = {}
    for name, call in calls.items():
        call(texts[:4])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call(texts)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with ResidentPeak() as peak:
                call(texts)
            peaks[name] = peak.mib
    for _ in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call(texts)
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    out = {}
    for name, times in seconds.items():
        rates = sorted(len(texts) / t for t in times)
        out[name] = {"texts_per_s": statistics.median(rates), "texts_per_s_min": rates[0],
                     "texts_per_s_max": rates[-1], "peak_mib": peaks[name]}
    return out


# --------------------------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    import FlagEmbedding  # noqa: F401
    import transformers
    from importlib.metadata import version

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
            "transformers": transformers.__version__, "FlagEmbedding": version("FlagEmbedding"), "commit": commit,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    diff = result["max_difference"]
    lines = [
        "# BGE-M3's three outputs: fastenc `embed_multi` vs FlagEmbedding `BGEM3FlagModel.encode`\n",
        f"{env['device']} ({env['cpus']} CPUs, torch threads {env['torch_threads']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, FlagEmbedding {env['FlagEmbedding']}, commit {env['commit']}, "
        f"{env['time']}.\n",
        f"BGE-M3-shaped stand-in: XLM-R large's width (1024, 16 heads, 4096, 250,002 words) with {args['layers']} "
        f"layers, random weights; {args['dtype']}; {args['texts']} texts of {args['tokens']} tokens "
        f"({result['tokens']} in all), batch size {args['batch']}, {args['repeats']} timed calls per row; fastenc "
        f"backend `{result['backend']}`. Outputs compared first: max difference dense {diff['dense']:.2g}, "
        f"ColBERT {diff['colbert']:.2g}, lexical weights {diff['sparse']:.2g} (same active tokens).\n",
        f"Load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}.\n",
        "| provider | outputs | texts/s median (min-max) | tokens/s | peak MiB per call |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['provider']} | {row['outputs']} | {row['texts_per_s']:.2f} "
                     f"({row['texts_per_s_min']:.2f}-{row['texts_per_s_max']:.2f}) | "
                     f"{row['texts_per_s'] * result['tokens'] / args['texts']:.0f} | {row['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--layers", type=int, default=None, help="default: 2 on the CPU, 24 on CUDA")
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--tokens", default="64,192", help="a range of tokens per text (default 64,192)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.layers = args.layers or (24 if cuda else 2)
    low, high = (int(x) for x in args.tokens.split(","))
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]

    load_before = [round(x, 2) for x in os.getloadavg()]
    env = environment(args.device)
    with tempfile.TemporaryDirectory(prefix="fastenc-bge-m3-") as tmp:
        path = build_checkpoint(Path(tmp), args.layers)
        texts = make_texts(args.texts, low, high)
        calls, encoder = providers(path, args.device, dtype, args.batch)
        tokens = int(encoder.tokenize(texts)["attention_mask"].sum())
        difference = check(calls, texts[:8])
        measured = measure(calls, texts, args.device, args.repeats)
        backend = encoder.backend
    outputs = {"fastenc embed_multi": "dense + sparse + ColBERT", "FlagEmbedding encode": "dense + sparse + ColBERT",
               "fastenc embed": "dense"}
    rows = [{"provider": name, "outputs": outputs[name], "texts": len(texts), **values}
            for name, values in measured.items()]
    for row in rows:
        print(f"{row['provider']:<22} {row['texts_per_s']:8.2f} texts/s {row['peak_mib']:8.0f} MiB", file=sys.stderr)
    result = {"env": env, "args": {k: v for k, v in vars(args).items()}, "backend": backend, "tokens": tokens,
              "max_difference": difference, "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    output = args.output.resolve()  # no machine paths in results: relative to the working directory
    result["args"]["output"] = str(output.relative_to(Path.cwd()) if output.is_relative_to(Path.cwd()) else
                                   args.output.name)
    name = "cpu" if not cuda else env["device"].lower().replace("nvidia ", "").replace(" ", "-")
    stem = args.output / f"bge-m3-{name}-{datetime.date.today():%Y%m%d}"
    args.output.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
