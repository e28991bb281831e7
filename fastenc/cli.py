"""The ``fastenc`` command line: ``embed``, ``check``, ``info`` (and ``bench``).

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
    vectors = encoder.embed(texts, batch_size=args.batch_size, max_length=args.max_length, pooling=args.pooling,
                            progress=None if output is not None else False)
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
    embed.add_argument("texts", nargs="*", metavar="TEXT")
    embed.set_defaults(run=_embed)

    check = commands.add_parser("check", help="compare fastenc with transformers on a checkpoint")
    _load_args(check)
    check.set_defaults(run=_check)

    info = commands.add_parser("info", help="versions, device, default backend, kernels")
    info.set_defaults(run=_info)
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
