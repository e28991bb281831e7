"""The ``fastenc`` command line: ``embed``, ``run``, ``check``, ``info`` (and ``bench``).

User errors print one line to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USER_ERROR = 2


class UserError(Exception):
    """A mistake on the command line, reported in one line."""


def _load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--backend", help="torch or triton (default: triton on CUDA, torch on CPU)")


def _read_texts(args) -> list[str]:
    texts = list(args.texts)
    if args.file is not None:
        if args.file == "-":
            texts += sys.stdin.read().splitlines()
        else:
            try:
                texts += Path(args.file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"cannot read --file {args.file}: {exc}") from None
    if not texts:
        raise UserError("no texts to embed: give TEXT arguments or --file PATH (or - for standard input)")
    return texts


def _embed(args) -> int:
    from .encoder import Encoder

    texts = _read_texts(args)
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix not in (".npy", ".jsonl"):
        raise UserError(f"--output {output}: the suffix must be .npy or .jsonl")
    encoder = Encoder.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    # progress=None: a bar on stderr when it is a terminal and the input is big (stdout stays clean)
    vectors = encoder.embed(texts, batch_size=args.batch_size, max_length=args.max_length, pooling=args.pooling,
                            prompt_name=args.prompt_name)
    if output is not None and output.suffix == ".npy":
        import numpy as np

        np.save(output, vectors.numpy())
        return 0
    lines = (json.dumps([round(x, 7) for x in row]) for row in vectors.tolist())
    if output is None:
        for line in lines:
            sys.stdout.write(line + "\n")
    else:
        with output.open("w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    return 0


def _check(args) -> int:
    try:
        from .check import run_check

        results = run_check(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    except ImportError as exc:
        raise UserError(f"fastenc check needs transformers (pip install 'fastenc[hf]'): {exc}") from None
    for result in results:
        print(result.line())
    return 0 if all(r.ok for r in results) else 1


def _top_k(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {value!r}") from None


def _run(args) -> int:
    from .pipelines import pipeline

    options = {name: getattr(args, name) for name in ("top_k", "aggregation_strategy", "max_answer_len")
               if getattr(args, name, None) is not None}
    if options.get("top_k") == "all":
        options["top_k"] = None
    if args.task != "question-answering" and not args.texts and args.file is None:
        raise UserError(f"no texts for {args.task}: give TEXT arguments or --file PATH (or - for standard input)")
    task = pipeline(args.task, args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                    backend=args.backend)
    if args.task == "question-answering":
        results = [task(question=args.question, context=args.context, **options)]
    else:
        texts = _read_texts(args)
        results = task(texts, **options)  # one output per text, as a batched call gives them
        if len(texts) == 1 and args.task == "fill-mask":
            results = [results]  # fill-mask unwraps a list of one text, as transformers does
    for result in results:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="run a task pipeline: one JSON line of output per input")
    tasks = run.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, help_text in (("fill-mask", "the likeliest tokens at each mask token"),
                            ("text-classification", "labels and scores for each text"),
                            ("token-classification", "entities with their words and character offsets"),
                            ("question-answering", "the answer span of --context to --question")):
        parser = tasks.add_parser(task, help=help_text)
        _load_args(parser)
        parser.add_argument("--batch-size", type=int, default=32)
        if task == "question-answering":
            parser.add_argument("--question", required=True)
            parser.add_argument("--context", required=True, help="the text holding the answer")
            parser.add_argument("--max-answer-len", type=int, metavar="N", help="in tokens (default 15)")
            parser.add_argument("--top-k", type=int, metavar="K", help="answers to return (default 1)")
        else:
            parser.add_argument("--file", metavar="PATH", help="one text per line; - reads standard input")
            parser.add_argument("texts", nargs="*", metavar="TEXT")
        if task == "fill-mask":
            parser.add_argument("--top-k", type=int, metavar="K", help="tokens per mask (default 5)")
        elif task == "text-classification":
            parser.add_argument("--top-k", type=_top_k, metavar="K", help="labels per text, or 'all' (default: "
                                "the best label, as a single result)")
        elif task == "token-classification":
            parser.add_argument("--aggregation-strategy", choices=("none", "simple", "first", "average", "max"))
        parser.set_defaults(run=_run)


def _info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .encoder import resolve_backend, resolve_device, resolve_dtype, triton_interpreter_on

    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except ImportError:
            return "not installed"
        except AttributeError:
            return "installed"

    device = resolve_device(None)
    print(f"fastenc {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for module in ("torch", "triton", "safetensors", "tokenizers", "numpy", "transformers", "sentence_transformers"):
        print(f"{module} {version(module)}")
    print(f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"triton interpreter: {'on' if triton_interpreter_on() else 'off'}")
    backend, _ = resolve_backend(None, device)
    print(f"default: device {device}, dtype {str(resolve_dtype(None, device)).replace('torch.', '')}, "
          f"backend {backend}")
    try:
        from .kernels import KERNELS
    except ImportError as exc:
        print(f"kernels: not available ({exc})")
    else:
        print("kernels:")
        for name, description in KERNELS:
            print(f"  {name:<16} {description}")
    return 0


def _bench(args) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastenc", description="Fast BERT-family encoders on Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed texts; JSON lines on stdout or .npy/.jsonl to --output")
    _load_args(embed)
    embed.add_argument("--file", metavar="PATH", help="one text per line; - reads standard input")
    embed.add_argument("--output", metavar="PATH", help="write vectors to PATH (.npy or .jsonl)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--max-length", type=int, default=None)
    embed.add_argument("--pooling", choices=("mean", "cls", "max", "mean_sqrt_len"), default=None)
    embed.add_argument("--prompt-name", metavar="NAME", help="prepend the checkpoint's prompt NAME "
                                                              "(config_sentence_transformers.json), e.g. query")
    embed.add_argument("texts", nargs="*", metavar="TEXT")
    embed.set_defaults(run=_embed)

    check = commands.add_parser("check", help="compare fastenc with transformers on a checkpoint")
    _load_args(check)
    check.set_defaults(run=_check)

    _add_run(commands)

    info = commands.add_parser("info", help="versions, device, default backend, kernels")
    info.set_defaults(run=_info)

    bench = commands.add_parser("bench", help="fastenc side by side with transformers and torch; writes results")
    bench.add_argument("--suite", choices=("e2e", "kernel", "all"), default="all")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", help="comma-separated fp16,bf16,fp32 (default: fp16,bf16 on CUDA, fp32 on the CPU)")
    bench.add_argument("--quick", action="store_true", help="small shapes, few runs: a smoke test, not a result")
    bench.add_argument("--output", metavar="DIR", default="benchmarks/results",
                       help="where the .json, .md and .png go (default: benchmarks/results)")
    bench.add_argument("--models", help="comma-separated: bert-base, bert-base-2l, minilm "
                                        "(default: bert-base,minilm on CUDA; minilm,bert-base-2l on the CPU)")
    bench.add_argument("--providers", help="comma-separated subset of the providers (default: all that can run)")
    bench.add_argument("--backend", choices=("torch", "triton"), help="fastenc's backend (default: the device's)")
    bench.add_argument("--repeats", type=int, help="timed rounds on the CPU, minimum timed runs on CUDA")
    bench.add_argument("--readme", metavar="PATH", help="also put the table between this README's "
                                                        "<!-- fastenc-bench:start/end --> markers")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FastencError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, FastencError) as exc:
        print(f"fastenc: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
