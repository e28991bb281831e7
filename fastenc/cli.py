"""The ``fastenc`` command line: ``embed``, ``run``, ``check``, ``info`` (and ``bench``).

User errors print one line to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USER_ERROR = 2


class UserError(Exception):
    """A mistake on the command line, reported in one line."""


def _load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", help="fp32, fp16, bf16, or fp8 (e4m3 GEMMs on GPUs with FP8 tensor cores; on the "
                                        "CPU a slow exact emulation) (default: fp16 on CUDA, fp32 on CPU)")
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
    """Stream TEXT arguments, then the rows of --file, through ``embed_iter`` into the output, in order."""
    import signal
    import threading

    if args.ray:
        if args.multivector:
            raise UserError("--multivector writes with the plain streaming writer, not --ray")
        return _embed_ray(args)
    if args.query and not args.multivector:
        raise UserError("--query encodes multi-vector queries: use it with --multivector (for a dense model's query "
                        "prompt, use --prompt-name)")
    if args.multivector and args.pooling:
        raise UserError("--pooling applies to dense vectors, not to --multivector outputs")
    if not args.texts and args.file is None:
        raise UserError("no texts to embed: give TEXT arguments or --file PATH (or - for standard input)")
    if args.id_field is not None and args.texts:
        raise UserError("--id-field takes ids from --file rows: give no TEXT arguments with it")
    with_ids = args.id_field is not None
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _embed_stream(args, with_ids)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # unwind like Ctrl-C: the temporary output goes
    try:
        return _embed_stream(args, with_ids)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _embed_stream(args, with_ids: bool) -> int:
    if args.multivector:
        return _embed_multivector_stream(args, with_ids)
    from collections import deque

    from .corpus import BadRow, Row, open_writer, read_ranges, read_rows
    from .encoder import DEFAULT_WINDOW, Encoder

    window = args.window or DEFAULT_WINDOW
    calibration = read_ranges(args.calibration) if args.calibration else None
    # the output first: a path that cannot be written fails before the model loads
    with open_writer(args.output, precision=args.precision, dim=args.dim or 0, with_ids=with_ids) as writer:
        encoder = Encoder.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        writer.dim = args.dim or encoder.embedding_dim
        ids: deque = deque()  # ids of rows read, not yet written (at most two windows)
        skipped = _Skipped()

        def rows():
            for number, text in enumerate(args.texts, start=1):
                yield Row(f"TEXT argument {number}", text)
            if args.file is not None:
                yield from read_rows(args.file, text_field=args.text_field, id_field=args.id_field,
                                     batch_rows=min(window, 65536))

        def texts():  # runs in embed_iter's read-ahead thread
            for row in rows():
                if isinstance(row, BadRow):
                    if args.on_error == "stop":
                        raise row
                    skipped.add(row)
                    continue
                if with_ids:
                    ids.append(row.id)
                yield row.text

        # progress=None: a bar (texts/s, tokens/s) when stderr is a terminal and the input is big
        stream = encoder.embed_iter(texts(), batch_size=args.batch_size, max_tokens=args.max_tokens,
                                    window=window, max_length=args.max_length, pooling=args.pooling,
                                    dim=args.dim, precision=args.precision, calibration=calibration,
                                    prompt_name=args.prompt_name)
        for vectors in stream.windows():
            writer.ranges = stream.calibration
            writer.write([ids.popleft() for _ in range(len(vectors))] if with_ids else None, vectors)
        writer.commit()
    skipped.report(writer.rows)
    return 0


def _embed_multivector_stream(args, with_ids: bool) -> int:
    """``--multivector``: each text's multi-vector embedding (``embed_multivector``), ``--window`` texts at a
    time, stored with ``--precision`` (and ``--dim``) vector by vector, written as a list of vectors per row."""
    import itertools

    import torch

    from .corpus import BadRow, Row, open_writer, read_ranges, read_rows
    from .encoder import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, Encoder
    from .quantize import Storage

    window = args.window or DEFAULT_WINDOW
    calibration = read_ranges(args.calibration) if args.calibration else None
    with open_writer(args.output, precision=args.precision, dim=args.dim or 0, with_ids=with_ids,
                     multivector=True) as writer:
        encoder = Encoder.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        encoder.multivector_task(query=args.query, prompt_name=args.prompt_name, max_length=args.max_length)
        storage = Storage.make(args.dim, args.precision, calibration, hidden_size=encoder.multivector_dim,
                               normalize=True)
        writer.dim = storage.dim
        skipped = _Skipped()

        def rows():
            for number, text in enumerate(args.texts, start=1):
                yield Row(f"TEXT argument {number}", text)
            if args.file is not None:
                for row in read_rows(args.file, text_field=args.text_field, id_field=args.id_field,
                                     batch_rows=min(window, 65536)):
                    if isinstance(row, BadRow):
                        if args.on_error == "stop":
                            raise row
                        skipped.add(row)
                        continue
                    yield row

        stream = rows()
        while chunk := list(itertools.islice(stream, window)):
            vectors = encoder.embed_multivector([row.text for row in chunk], query=args.query,
                                                batch_size=args.batch_size, max_length=args.max_length,
                                                max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
                                                prompt_name=args.prompt_name)
            counts = [len(v) for v in vectors]
            stored = storage.apply(torch.cat(vectors)) if sum(counts) else \
                torch.zeros(0, storage.width, dtype=storage.dtype)
            writer.ranges = storage.ranges
            writer.write([row.id for row in chunk] if with_ids else None, list(stored.split(counts)))
        writer.commit()
    skipped.report(writer.rows)
    return 0


class _Skipped:
    """Bad rows skipped by ``--on-error skip``: each of the first few named on stderr, then a count."""

    SHOWN = 20

    def __init__(self):
        self.count = 0

    def add(self, row) -> None:
        self.count += 1
        if self.count <= self.SHOWN:
            print(f"fastenc: skipped {row}", file=sys.stderr)

    def report(self, written: int) -> None:
        if self.count:
            print(f"fastenc: skipped {self.count} bad row(s) (the first {min(self.count, self.SHOWN)} named above); "
                  f"wrote {written}", file=sys.stderr)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _embed_ray(args) -> int:
    """``--ray``: read --file with Ray Data, embed on ``--concurrency`` actors, write Parquet shards to DIR."""
    import logging
    import os
    import shutil
    import tempfile

    from .corpus import Row, input_format, ranges_document, read_ranges, read_rows
    from .encoder import DEFAULT_WINDOW

    if args.file is None or args.file == "-" or args.texts:
        raise UserError("--ray embeds --file PATH (a .parquet, .jsonl or .txt file or a directory of them); "
                        "not TEXT arguments or standard input")
    if args.output is None or Path(args.output).suffix in (".npy", ".jsonl", ".parquet"):
        raise UserError("--ray writes a directory of Parquet shards: give --output DIR")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} exists; --ray writes a new directory of shards")
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'fastenc[ray]'") from None
    from .integrations.ray import embed_dataset

    calibration = read_ranges(args.calibration) if args.calibration else None
    if args.precision == "int8" and calibration is None:  # one set of ranges for every actor: the first window's
        from .encoder import Encoder

        encoder = Encoder.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        rows = read_rows(args.file, text_field=args.text_field)
        sample = [row.text for _, row in zip(range(args.window or DEFAULT_WINDOW), rows) if isinstance(row, Row)]
        calibration = encoder.calibrate(sample, dim=args.dim, max_length=args.max_length, pooling=args.pooling,
                                        prompt_name=args.prompt_name)
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent))
    except OSError as exc:
        raise UserError(f"cannot write --output {output}: {exc.strerror or exc}") from None
    try:
        if not ray.is_initialized():
            ray.init(logging_level="ERROR", log_to_driver=False)  # RAY_ADDRESS joins a running cluster
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = sys.stderr.isatty()  # else Ray logs its progress: quiet it (errors are ours)
        logging.getLogger("ray.data").setLevel(logging.INFO if sys.stderr.isatty() else logging.CRITICAL)
        fmt = input_format(args.file)
        columns = [args.text_field] + ([args.id_field] if args.id_field else [])
        # Reading and writing take a quarter CPU: actors hold a whole one each, and with as many actors as
        # CPUs, whole-CPU read or write tasks would wait for them forever.
        io = {"num_cpus": _RAY_IO_CPUS}
        if fmt == "parquet":
            ds = ray.data.read_parquet(args.file, columns=columns, **io)
        elif fmt == "jsonl":
            ds = ray.data.read_json(args.file, lines=True, **io)
        else:
            if args.id_field:
                raise UserError(f"{args.file}: --id-field needs a .jsonl or .parquet file (a text file has only lines)")
            ds = ray.data.read_text(args.file, **io)
            if args.text_field != "text":
                ds = ds.rename_columns({"text": args.text_field}, **io)
        num_cpus = args.num_cpus
        if num_cpus is None:  # leave half a CPU of the cluster to reading and writing (else they can starve)
            num_cpus = min(1.0, max(ray.cluster_resources().get("CPU", 1) - 0.5, 0.25) / args.concurrency)
        ds = embed_dataset(ds, column=args.text_field, model=args.model, concurrency=args.concurrency,
                           num_gpus=args.num_gpus, num_cpus=num_cpus, device=args.device, dtype=args.dtype,
                           backend=args.backend, on_error="skip" if args.on_error == "skip" else "raise",
                           batch_size=args.batch_size, max_length=args.max_length, pooling=args.pooling, dim=args.dim,
                           precision=args.precision, calibration=calibration, prompt_name=args.prompt_name)
        if args.id_field and args.id_field != "id":
            ds = ds.rename_columns({args.id_field: "id"}, **io)
        ds = ds.select_columns(["id", "embedding"] if args.id_field else ["embedding"], **io)
        ds.write_parquet(str(temp), ray_remote_args=io)
        if calibration is not None:
            (temp / "ranges.json").write_text(json.dumps(ranges_document(calibration)), encoding="utf-8")
        if output.is_dir():
            output.rmdir()  # empty, checked above
        os.replace(temp, output)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, UserError):
            raise UserError(_ray_error_line(exc)) from None
        raise
    return 0


_RAY_IO_CPUS = 0.25


def _ray_error_line(exc: BaseException) -> str:
    """The fastenc error inside a Ray failure, else Ray's first line.

    Ray hands the driver its own exception (``RayTaskError(UserCodeException)``) whose text holds the
    actor's traceback; the original exception object does not come back, so its last line is read."""
    import re

    from .errors import FastencError

    seen, todo = set(), [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, FastencError):
            return str(error)
        todo += [error.__cause__, error.__context__, getattr(error, "cause", None)]
    text = str(exc)
    ours = re.findall(r"^\s*(?:fastenc\.\w+\.)?(?:InputError|LoadError|BackendError|FastencError|CorpusError|BadRow): "
                      r"(.+)$", text, flags=re.MULTILINE)
    if ours:
        return ours[-1].strip()
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"Ray: {type(exc).__name__}: {first}"


def _check(args) -> int:
    try:
        from .check import run_check

        results = run_check(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    except ImportError as exc:
        raise UserError(f"fastenc check needs transformers (pip install 'fastenc[hf]'): {exc}") from None
    for result in results:
        print(result.line())
    return 0 if all(r.ok for r in results) else 1


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value!r}")
    return number


def _top_k(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {value!r}") from None


def _run(args) -> int:
    from .pipelines import pipeline

    options = {name: getattr(args, name) for name in ("top_k", "aggregation_strategy", "max_answer_len",
                                                      "candidate_labels", "hypothesis_template", "multi_label")
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
                            ("question-answering", "the answer span of --context to --question"),
                            ("zero-shot-classification", "--candidate-labels ranked for each text by an NLI "
                                                         "classifier")):
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
        elif task == "zero-shot-classification":
            parser.add_argument("--candidate-labels", required=True, metavar="LABELS",
                                help="comma-separated labels, e.g. 'sports,politics,science'")
            parser.add_argument("--hypothesis-template", metavar="TEMPLATE",
                                help="with {} where a label goes (default 'This example is {}.')")
            parser.add_argument("--multi-label", action="store_true", default=None,
                                help="score each label on its own (entailment against contradiction)")
        parser.set_defaults(run=_run)


def _info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .model import resolve_backend, resolve_device, resolve_dtype, triton_interpreter_on

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


def _serve(args) -> int:
    try:
        from .serve.app import run
    except ImportError as exc:
        raise UserError(f"fastenc serve needs the serve extra: pip install 'fastenc[serve]' ({exc})") from None
    from .serve.connections import ConnectionLimits

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices is not None else None
    if devices is not None and not devices:
        raise UserError("--devices is empty: give device names, e.g. --devices cuda:0,cuda:1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FASTENC_API_KEY") or None
    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key is empty")
    try:
        limits = ConnectionLimits(header_timeout=args.header_timeout, max_connections=args.max_connections,
                                  write_timeout=args.write_timeout, keep_alive_timeout=args.keep_alive_timeout,
                                  body_timeout=args.body_timeout)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    run(args.model, host=args.host, port=args.port, device=args.device, devices=devices, workers=args.workers,
        in_process=args.in_process, dtype=args.dtype, backend=args.backend,
        max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
        max_concurrent_requests=args.max_concurrent_requests, auto_truncate=args.auto_truncate,
        payload_limit=args.payload_limit, max_response_bytes=args.max_response_bytes,
        model_name=args.served_model_name, threads=args.threads, log_level=args.log_level,
        access_log=not args.no_access_log, api_key=api_key, cors_allow_origins=args.cors_allow_origin,
        connection_limits=limits)
    return 0


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="an HTTP server: TEI's routes, OpenAI's /v1/embeddings, /metrics")
    _load_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    serve.add_argument("--max-batch-tokens", type=int, default=16384, metavar="N",
                       help="real tokens per model batch (default 16384)")
    serve.add_argument("--max-client-batch-size", type=int, default=32, metavar="N",
                       help="inputs per request; more is a 413 (default 32)")
    serve.add_argument("--max-concurrent-requests", type=int, default=512, metavar="N",
                       help="requests admitted at once; more is a 429 (default 512)")
    serve.add_argument("--auto-truncate", action="store_true",
                       help="truncate long inputs by default (without it, a request must ask with truncate=true)")
    serve.add_argument("--payload-limit", type=int, default=2_000_000, metavar="BYTES",
                       help="largest request body; more is a 413 (default 2000000)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model name /info and /v1/embeddings give (default: the checkpoint directory's name)")
    serve.add_argument("--threads", type=int, metavar="N",
                       help="torch threads per model worker on the CPU (default: its share of the cores; one worker: "
                            "torch's default, one per core)")
    serve.add_argument("--devices", metavar="LIST",
                       help="a model worker process per device, all fed by one queue: e.g. cuda:0,cuda:1")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="model worker processes on --device (default 1); on the CPU each gets its share of the cores")
    serve.add_argument("--in-process", action="store_true",
                       help="run the one model on a thread of the server process instead of a worker process (no "
                            "restart if it crashes)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require `Authorization: Bearer KEY` on every route but /health (default: $FASTENC_API_KEY)")
    serve.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="let browser pages of ORIGIN (or *) call the server; repeatable (default: none)")
    serve.add_argument("--max-response-bytes", type=int, default=50_000_000, metavar="BYTES",
                       help="largest answer of /embed_all and /tokenize; more is a 413 (default 50000000)")
    serve.add_argument("--max-connections", type=int, default=2048, metavar="N",
                       help="open connections; more are answered 503 and closed (default 2048, within the fd limit)")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                       help="seconds for a request's head to arrive (default 10)")
    serve.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                       help="seconds for a request's body to arrive; else 408 (default 60)")
    serve.add_argument("--write-timeout", type=float, default=30.0, metavar="S",
                       help="seconds a client may leave its answer unread before it is dropped (default 30)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                       help="seconds an idle connection is kept open between requests (default 5)")
    serve.add_argument("--no-access-log", action="store_true", help="no line per request on stderr")
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=_serve)


def _bench(args) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastenc", description="Fast BERT-family encoders on Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed texts or a corpus file; JSON lines on stdout or "
                                              ".npy/.jsonl/.parquet to --output")
    _load_args(embed)
    embed.add_argument("--file", metavar="PATH", help=".txt (a text a line; - reads standard input), .jsonl or "
                                                      ".parquet, streamed with bounded memory")
    embed.add_argument("--text-field", default="text", metavar="NAME", help="the text's field or column (default: text)")
    embed.add_argument("--id-field", metavar="NAME", help="a field or column of ids to carry to the output")
    embed.add_argument("--output", metavar="PATH", help="write vectors to PATH (.npy, .jsonl or .parquet; with --ray "
                                                        "a directory of Parquet shards), whole or not at all")
    embed.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="a bad row (not UTF-8, no text field, not a string) stops the run (default) or is "
                            "skipped and reported")
    embed.add_argument("--dim", type=_positive_int, metavar="N", help="keep the first N coordinates, re-normalised")
    embed.add_argument("--precision", choices=("float32", "float16", "int8", "binary"), default="float32",
                       help="int8 writes its calibration ranges beside the output (NAME.ranges.json); binary packs "
                            "8 signs per byte")
    embed.add_argument("--calibration", metavar="JSON", help="int8 ranges from an earlier NAME.ranges.json "
                                                             "(default: those of the first window)")
    embed.add_argument("--batch-size", type=_positive_int, default=32)
    embed.add_argument("--max-tokens", type=_positive_int, metavar="N", help="real tokens per batch (default 16384)")
    embed.add_argument("--window", type=_positive_int, metavar="N",
                       help="texts read, tokenized and batched together: the memory bound (default 4096)")
    embed.add_argument("--max-length", type=int, default=None)
    embed.add_argument("--pooling", choices=("mean", "cls", "max", "mean_sqrt_len"), default=None)
    embed.add_argument("--ray", action="store_true", help="run on Ray Data (fastenc[ray]): --file in, Parquet shards "
                                                          "out to --output DIR")
    embed.add_argument("--concurrency", type=_positive_int, default=1, metavar="N", help="Ray actors (default 1)")
    embed.add_argument("--num-gpus", type=float, default=None, metavar="G", help="GPUs per Ray actor")
    embed.add_argument("--num-cpus", type=float, default=None, metavar="C",
                       help="CPUs per Ray actor (default: the cluster's less half a CPU, shared by the actors, "
                            "at most 1)")
    embed.add_argument("--prompt-name", metavar="NAME", help="prepend the checkpoint's prompt NAME "
                                                              "(config_sentence_transformers.json), e.g. query")
    embed.add_argument("--multivector", action="store_true",
                       help="write each text's multi-vector (ColBERT) embedding, BGE-M3's or a ColBERT model's: a "
                            "list of vectors per row (.npy: all vectors, with NAME.lengths.npy beside)")
    embed.add_argument("--query", action="store_true", help="with --multivector: encode the texts as queries "
                                                            "(a ColBERT model's query prompt, length and expansion)")
    embed.add_argument("texts", nargs="*", metavar="TEXT")
    embed.set_defaults(run=_embed)

    check = commands.add_parser("check", help="compare fastenc with transformers on a checkpoint")
    _load_args(check)
    check.set_defaults(run=_check)

    _add_run(commands)
    _add_serve(commands)

    info = commands.add_parser("info", help="versions, device, default backend, kernels")
    info.set_defaults(run=_info)

    bench = commands.add_parser("bench", help="fastenc side by side with transformers and torch; writes results")
    bench.add_argument("--plan", choices=("full", "gpu-check"), default="full",
                       help="full: the cross product of the options below (default); gpu-check: the GPU check's "
                            "bench stage (the cases the performance goals need; small shapes on the CPU)")
    bench.add_argument("--suite", choices=("e2e", "kernel", "all"), default="all")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", help="comma-separated fp16,bf16,fp32,fp8 (fp8: fastenc alone, e4m3 GEMMs; "
                                       "default: fp16,bf16 on CUDA, fp32 on the CPU)")
    bench.add_argument("--quick", action="store_true", help="small shapes, few runs: a smoke test, not a result")
    bench.add_argument("--output", metavar="DIR", default="benchmarks/results",
                       help="where the .json (rewritten after every case), .md and .png go "
                            "(default: benchmarks/results)")
    bench.add_argument("--models", help="comma-separated: bert-base, bert-base-2l, minilm-l6, and the families "
                                        "after BERT mpnet-base, modernbert-base, nomic-embed, gte-base with their "
                                        "CPU stand-ins mpnet-base-2l, modernbert-base-3l, nomic-embed-2l, gte-base-2l "
                                        "(default: bert-base,minilm-l6 on CUDA; minilm-l6,bert-base-2l on the CPU)")
    bench.add_argument("--providers", help="comma-separated subset of the providers; exactly these run "
                                           "(default: all that can run)")
    bench.add_argument("--cases", metavar="PATTERNS", help="comma-separated case names or shell patterns, e.g. "
                                                           "'bert-base:128x128,attention:*' (default: every case)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="stop starting cases whose estimate no longer fits; what is skipped is reported")
    bench.add_argument("--backend", choices=("torch", "triton"), help="fastenc's backend (default: the device's)")
    bench.add_argument("--compile-backend", choices=("inductor", "eager", "aot_eager"),
                       help="torch.compile's backend for hf-compile (default: inductor; 'eager': Dynamo alone, "
                            "labelled as such)")
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
