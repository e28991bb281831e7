"""The HTTP layer: Starlette routes that validate, tokenize and enqueue, and never touch the model.

A request is read (at most ``payload_limit`` bytes), parsed (``schema``), admitted (at most
``max_concurrent_requests`` at once; past that 429 at once, never an unbounded queue), tokenized on
the one tokenizer thread (fastenc's tokenizer object is not shared between threads), and queued as a
``Job`` in the ``Batcher``; the handler then waits for the ``Worker``'s result, or for its client to
disconnect, in which case the job is cancelled and its sequences never reach the model. Routes and
shapes are text-embeddings-inference's (``/embed``, ``/embed_all``, ``/embed_sparse``, ``/predict``,
``/rerank``, ``/tokenize``, ``/info``, ``/health``) and OpenAI's ``/v1/embeddings``; ``/metrics`` is
Prometheus text. Each answers what the Python API answers for the same input: ``embed(prompt_name=...)``,
``embed_tokens``, ``embed_sparse``, the text-classification pipeline and ``pipeline("rerank")``, whose
tokenization, scoring and ranking ``/rerank`` calls (only the forward pass is the worker's, batched
with other requests).

Shutdown (SIGTERM, through uvicorn) stops accepting connections, lets the requests in flight finish,
then closes the batcher and joins the worker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from .. import heads as task_heads
from ..encoder import DEFAULT_MAX_TOKENS, Encoder
from ..errors import FastencError, InputError, LoadError
from ..text import Prompt
from ..pipelines import RerankPipeline, TextClassificationPipeline
from ..tasks import SentenceEmbedding, SequenceScores, SparseEmbedding, TokenEmbeddings
from . import schema
from .batcher import Batcher, Closed, Job
from .metrics import Metrics
from .schema import ServeError, unprocessable
from .worker import Worker

log = logging.getLogger("fastenc.serve")

DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # bytes, as TEI


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _json(data, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that alone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _settle(future: asyncio.Future, outcome, finished: float) -> None:
    if not future.done():
        future.set_result((outcome, finished))


class Service:
    """The handlers' side of the server: limits, the tokenizer thread, admission, and the route handlers."""

    def __init__(self, encoder: Encoder, *, max_batch_tokens: int = DEFAULT_MAX_TOKENS,
                 max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
                 max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS, auto_truncate: bool = False,
                 payload_limit: int = DEFAULT_PAYLOAD_LIMIT, model_name: str | None = None, warmup: bool = True):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_client_batch_size", max_client_batch_size),
                            ("max_concurrent_requests", max_concurrent_requests), ("payload_limit", payload_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if encoder.tokenizer is None:
            raise InputError(f"{encoder.path or 'this encoder'}: fastenc serve needs the checkpoint's tokenizer "
                             "files (tokenizer.json, vocab.txt or vocab.json + merges.txt)")
        self.encoder = encoder
        self.model_name = model_name or (encoder.path.name if encoder.path is not None else "fastenc")
        self.max_concurrent_requests = max_concurrent_requests
        self.payload_limit = payload_limit
        self.limits = schema.Limits(max_client_batch_size, encoder.config.hidden_size, auto_truncate)
        self.metrics = Metrics()
        self.batcher = Batcher(max_batch_tokens, on_cancelled=self.metrics.cancelled.inc)
        self.metrics.track(self.batcher)
        self.worker = Worker(encoder, self.batcher, self.metrics, warmup=warmup)
        self._tokenizer_thread = None  # a one-thread executor, made at startup
        self._in_flight = 0
        self.text = encoder.text
        self.embedding, self._embed_error = self._embedding_setup(encoder)
        self.classifier = (TextClassificationPipeline(encoder) if "sequence_classification" in encoder.heads
                           else None)
        self.reranker, self._rerank_error = self._rerank_setup()
        self._sparse_error = None if "mlm" in encoder.heads else (
            "/embed_sparse needs a masked-language-model head (a SPLADE checkpoint) and this model has none "
            f"(heads: {', '.join(sorted(encoder.heads)) or 'none'})")
        # each prompt with its tokens left out of the pooling (include_prompt: false), measured once
        self._prompts = {name: self.text.prompt(name) for name in (None, *self.text.prompts)}

    @staticmethod
    def _embedding_setup(encoder: Encoder) -> tuple[SentenceEmbedding | None, str | None]:
        """What ``embed()`` computes by default, or why this checkpoint serves no embeddings."""
        sentence = encoder.sentence
        if sentence is not None and sentence.splade is not None:  # as embed(), which asks for embed_sparse()
            return None, ("this checkpoint is a sentence-transformers SparseEncoder (SPLADE): its vectors come "
                          "from /embed_sparse")
        try:
            return SentenceEmbedding.for_checkpoint(sentence, encoder.config.hidden_size), None
        except FastencError as exc:
            return None, f"this checkpoint serves no embeddings: {exc}"

    def _embedding(self, prompt_name: str | None, normalize: bool, dimensions: int | None) -> SentenceEmbedding:
        """``embed(prompt_name=..., normalize=..., dim=...)``'s task with the checkpoint's pooling."""
        if self._embed_error:
            raise ServeError(400, self._embed_error, "model")
        return dataclasses.replace(self.embedding, normalize=normalize, dim=dimensions,
                                   skip=self._prompt(prompt_name).skip)

    def _rerank_setup(self) -> tuple[RerankPipeline | None, str | None]:
        """The rerank pipeline whose tokenization, scores and ranking ``/rerank`` uses, or why there is none."""
        if self.classifier is None:
            return None, (f"/rerank needs a sequence-classification head and this model has none "
                          f"(heads: {', '.join(sorted(self.encoder.heads)) or 'none'})")
        labels = task_heads.num_labels(self.encoder.config)
        if labels != 1:
            return None, (f"/rerank needs a cross-encoder: a sequence-classification head with one label, and "
                          f"this one has {labels}")
        try:
            return RerankPipeline(self.encoder), None
        except LoadError as exc:  # e.g. an activation_fn fastenc does not know
            return None, f"/rerank cannot score with this checkpoint: {exc}"

    # ------------------------------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="fastenc-tokenize")
        self.worker.start()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.ready.wait)
        if self.worker.error is not None:
            raise RuntimeError(f"the model failed its warm-up: {self.worker.error}")

    async def shutdown(self) -> None:
        self.batcher.close()  # the worker drains what is queued, then stops
        await asyncio.get_running_loop().run_in_executor(None, self.worker.join)
        self._tokenizer_thread.shutdown(wait=True)

    # --------------------------------------------------------------------------------------- helpers
    async def _body(self, request: Request) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.payload_limit:
            raise ServeError(413, f"the request body is {length} bytes, over the limit of {self.payload_limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.payload_limit:
                raise ServeError(413, f"the request body is over the limit of {self.payload_limit} bytes")
            chunks.append(chunk)
        return schema.parse_body(b"".join(chunks))

    @contextlib.contextmanager
    def _admitted(self):
        """Count the request in, or 429 at once when ``max_concurrent_requests`` are already in."""
        if self._in_flight >= self.max_concurrent_requests:
            raise ServeError(429, f"the server is at its limit of {self.max_concurrent_requests} concurrent "
                                  "requests; retry later", "overloaded")
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()

    async def _tokenized(self, fn: Callable, *args):
        """``fn(*args)`` on the tokenizer thread; an ``InputError`` is the client's 422."""
        start = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)
        except InputError as exc:
            raise unprocessable(str(exc)) from None
        self.metrics.stage.labels("tokenize").observe(time.perf_counter() - start)
        return result

    async def _infer(self, request: Request, rows, task) -> list:
        """Queue ``rows`` for ``task`` and wait for the worker; a disconnect cancels the job."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = Job(rows, task, lambda outcome: loop.call_soon_threadsafe(_settle, future, outcome,
                                                                        time.perf_counter()))
        try:
            self.batcher.put(job)
        except Closed:
            raise ServeError(503, "the server is shutting down", "unhealthy") from None
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((future, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not future.done():
            job.cancel()
            raise ClientGone()
        outcome, finished = future.result()
        if isinstance(outcome, BaseException):
            raise ServeError(500, f"inference failed: {outcome}", "backend")
        self.metrics.stage.labels("queue").observe(job.started - job.enqueued)
        self.metrics.stage.labels("inference").observe(finished - job.started)
        return outcome

    def _classifier(self, route: str) -> TextClassificationPipeline:
        if self.classifier is None:
            raise ServeError(400, f"{route} needs a sequence-classification head and this model has none "
                                  f"(heads: {', '.join(sorted(self.encoder.heads)) or 'none'})", "model")
        return self.classifier

    def _prompt(self, prompt_name: str | None) -> Prompt:
        """What ``embed(prompt_name=...)`` prepends (the checkpoint's ``default_prompt_name``'s prompt when None,
        as sentence-transformers does) and its tokens left out of the pooling; 422 for an unknown name."""
        if prompt_name not in self._prompts:
            try:
                self.text.prompt(prompt_name)
            except InputError as exc:  # names the prompts the checkpoint has
                raise unprocessable(str(exc)) from None
        return self._prompts[prompt_name]

    # ------------------------------------------------------------------------------ tokenizer thread
    def _encode_texts(self, texts: list[str], truncate: bool, field: str, prompt: Prompt = Prompt()) -> list:
        """``embed()``'s tokenization (the prompt prepended; its casing, limit and checks)."""
        try:
            return self.text.encode(prompt.apply(texts), truncate=truncate)
        except InputError as exc:
            raise InputError(f"`{field}`: {exc}") from None

    def _encode_pairs(self, query: str, texts: list[str], truncate: bool) -> list:
        """The rerank pipeline's tokenization of ``(query, text)`` pairs."""
        try:
            return self.reranker.pairs(query, texts, truncation=truncate)
        except InputError as exc:
            raise InputError(f"`texts`: {exc}") from None

    def _encode_items(self, items: list, truncate: bool) -> list:
        """The text-classification pipeline's tokenization of texts and (text, text_pair) pairs."""
        pipe = self.classifier
        if truncate:
            return pipe.tokenize(items, truncation=True)
        # without truncation, TEI's limit: the tokenizer's (the pipeline's own is the model's positions)
        return self.text.encode(items, max_length=pipe.max_length, truncate=False, lower_case=False, what="input")

    def _tokens(self, texts: list[str], add_special_tokens: bool, prompt: Prompt = Prompt()) -> list[list[dict]]:
        texts = prompt.apply(texts)  # as TEI: the tokens (and their offsets) of the prompted text
        sentence = self.encoder.sentence
        if sentence is not None and sentence.do_lower_case:  # as embed() sees the text
            texts = [text.lower() for text in texts]
        encodings = self.text.encode(texts, special_tokens=add_special_tokens, truncate=False, check_length=False,
                                     lower_case=False)
        out = []
        for text, encoding in zip(texts, encodings):
            tokens = []
            for token_id, token, (start, stop), special in zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                               encoding.special_tokens_mask):
                if special:
                    tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
                else:
                    tokens.append({"id": token_id, "text": text[start:stop], "special": False, "start": start,
                                   "stop": stop})
            out.append(tokens)
        return out

    # ---------------------------------------------------------------------------------------- routes
    async def embed(self, request: Request) -> Response:
        req = schema.parse_embed(await self._body(request), self.limits)
        task = self._embedding(req.prompt_name, req.normalize, req.dimensions)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            rows = await self._tokenized(self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            vectors = await self._infer(request, rows, task)
        return _json(np.stack([v.numpy() for v in vectors]))

    async def embed_all(self, request: Request) -> Response:
        """TEI's ``/embed_all``: per input its token vectors ``[[float, ...], ...]``, as ``embed_tokens()``."""
        req = schema.parse_embed_all(await self._body(request), self.limits)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            rows = await self._tokenized(self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            vectors = await self._infer(request, rows, TokenEmbeddings())
        return _json([v.numpy() for v in vectors])

    async def embed_sparse(self, request: Request) -> Response:
        """TEI's ``/embed_sparse``: per input its active words ``[{"index", "value"}, ...]`` in increasing
        ``index`` order, as ``embed_sparse()`` (``top_k``, else the checkpoint's ``max_active_dims``)."""
        req = schema.parse_embed_sparse(await self._body(request), self.limits)
        if self._sparse_error:
            raise ServeError(400, self._sparse_error, "model")
        prompt = self._prompt(req.prompt_name)
        task = SparseEmbedding.for_checkpoint(self.encoder.sentence, req.top_k)
        with self._admitted():
            rows = await self._tokenized(self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            vectors = await self._infer(request, rows, task)
        return _json([[{"index": index, "value": value} for index, value in zip(words.tolist(), values.numpy())]
                      for words, values in vectors])

    async def openai_embeddings(self, request: Request) -> Response:
        req = schema.parse_openai_embed(await self._body(request), self.limits)
        task = self._embedding(req.prompt_name, True, req.dimensions)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            truncate = self.limits.auto_truncate
            rows = await self._tokenized(self._encode_texts, req.texts, truncate, "input", prompt)
            vectors = await self._infer(request, rows, task)
        tokens = sum(len(row.ids) for row in rows)
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = [v.numpy() for v in vectors]
        return _json({"object": "list",
                      "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                      "model": req.model or self.model_name,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def predict(self, request: Request) -> Response:
        req = schema.parse_predict(await self._body(request), self.limits)
        pipe = self._classifier("/predict")
        with self._admitted():
            rows = await self._tokenized(self._encode_items, req.items, req.truncate)
            logits = await self._infer(request, rows, SequenceScores())
        predictions = [self._predictions(row.numpy(), req.raw_scores, pipe.id2label) for row in logits]
        return _json(predictions[0] if req.single else predictions)

    @staticmethod
    def _scores(logits: np.ndarray, raw: bool) -> np.ndarray:
        """TEI's scores: the logits with ``raw_scores``, else a softmax over several labels, a sigmoid of one."""
        if raw:
            return logits
        if logits.shape[-1] == 1:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def _predictions(self, logits: np.ndarray, raw: bool, id2label: dict) -> list[dict]:
        scores = self._scores(logits, raw)
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        return [{"score": float(scores[i]), "label": id2label[i]} for i in ranked]

    async def rerank(self, request: Request) -> Response:
        """TEI's ``/rerank`` on ``pipeline("rerank")``: its pair tokenization, the checkpoint's activation (or
        ``raw_scores``), its order (highest first, ties in input order); TEI's key order on the wire."""
        req = schema.parse_rerank(await self._body(request), self.limits)
        pipe = self.reranker
        if pipe is None:
            raise ServeError(400, self._rerank_error, "model")
        with self._admitted():
            rows = await self._tokenized(self._encode_pairs, req.query, req.texts, req.truncate)
            logits = await self._infer(request, rows, SequenceScores())
        ranks = pipe.rank(pipe.scores(logits, req.raw_scores), req.texts, return_text=req.return_text)
        if req.return_text:
            ranks = [{"index": rank["index"], "text": rank["text"], "score": rank["score"]} for rank in ranks]
        return _json(ranks)

    async def tokenize(self, request: Request) -> Response:
        req = schema.parse_tokenize(await self._body(request), self.limits)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            tokens = await self._tokenized(self._tokens, req.texts, req.add_special_tokens, prompt)
        return _json(tokens)

    async def info(self, request: Request) -> Response:
        config = self.encoder.config
        sentence = self.encoder.sentence
        if self.classifier is not None:
            id2label = {str(i): label for i, label in self.classifier.id2label.items()}
            kind = "reranker" if task_heads.num_labels(config) == 1 else "classifier"
            model_type = {kind: {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}}
        elif sentence is not None and sentence.splade is not None:
            model_type = {"embedding": {"pooling": "splade"}}  # as TEI names a SPLADE model's pooling
        else:
            model_type = {"embedding": {"pooling": self.embedding.pooling if self.embedding else "mean"}}
        routes = {"/embed": not self._embed_error, "/v1/embeddings": not self._embed_error, "/embed_all": True,
                  "/embed_sparse": not self._sparse_error, "/predict": self.classifier is not None,
                  "/rerank": self.reranker is not None, "/tokenize": True}
        return _json({
            "model_id": str(self.encoder.path) if self.encoder.path is not None else self.model_name,
            "model_sha": None,
            "model_dtype": str(self.encoder.dtype).replace("torch.", ""),
            "served_model_name": self.model_name,
            "model_type": model_type,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_input_length": self.text.max_length,
            "max_batch_tokens": self.batcher.max_batch_tokens,
            "max_batch_requests": self.batcher.max_batch_size,
            "max_client_batch_size": self.limits.max_client_batch_size,
            "auto_truncate": self.limits.auto_truncate,
            "tokenization_workers": 1,
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "device": str(self.encoder.device),
            "backend": self.encoder.backend,
            "hidden_size": config.hidden_size,
            # fastenc's: what this checkpoint serves, and the prompt names prompt_name takes
            "routes": sorted(route for route, served in routes.items() if served),
            "prompts": list(sentence.prompts) if sentence else [],
            "default_prompt_name": sentence.default_prompt_name if sentence else None,
        })

    async def health(self, request: Request) -> Response:
        if self.worker.ready.is_set() and self.worker.is_alive():
            return Response(status_code=200)
        return _json({"error": "the model worker is not running", "error_type": "unhealthy"}, 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -------------------------------------------------------------------------------------- plumbing
    def endpoint(self, route: str, handler, *, openai: bool = False):
        """``handler`` with errors turned into answers (TEI's or OpenAI's error body) and counted."""

        async def run(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except ServeError as exc:
                response = self._error(exc, openai)
            except (ClientGone, ClientDisconnect):
                response = Response(status_code=499)  # nobody reads it; counted as nginx counts it
            except Exception as exc:  # a bug, not the client's fault: say so, keep serving
                log.exception("%s failed", route)
                response = self._error(ServeError(500, f"internal error: {exc}", "backend"), openai)
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            if response.status_code == 200:
                self.metrics.stage.labels("request").observe(time.perf_counter() - start)
            return response

        return run

    @staticmethod
    def _error(exc: ServeError, openai: bool) -> Response:
        if openai:
            return _json({"error": {"message": exc.message, "type": exc.error_type, "param": None,
                                    "code": exc.status}}, exc.status)
        return _json({"error": exc.message, "error_type": exc.error_type}, exc.status)

    def routes(self) -> list[Route]:
        return [
            Route("/embed", self.endpoint("/embed", self.embed), methods=["POST"]),
            Route("/v1/embeddings", self.endpoint("/v1/embeddings", self.openai_embeddings, openai=True),
                  methods=["POST"]),
            Route("/embed_all", self.endpoint("/embed_all", self.embed_all), methods=["POST"]),
            Route("/embed_sparse", self.endpoint("/embed_sparse", self.embed_sparse), methods=["POST"]),
            Route("/predict", self.endpoint("/predict", self.predict), methods=["POST"]),
            Route("/rerank", self.endpoint("/rerank", self.rerank), methods=["POST"]),
            Route("/tokenize", self.endpoint("/tokenize", self.tokenize), methods=["POST"]),
            Route("/info", self.endpoint("/info", self.info), methods=["GET"]),
            Route("/health", self.endpoint("/health", self.health), methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]


def create_app(encoder: Encoder, *, on_ready: Callable[[], None] | None = None,
               on_stopped: Callable[[], None] | None = None, **options) -> Starlette:
    """A Starlette app serving ``encoder``; ``options`` are ``Service``'s (limits, ``auto_truncate`` …).
    ``on_ready`` is called once the model is warm, ``on_stopped`` once the last request is answered."""
    service = Service(encoder, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await service.shutdown()
            if on_stopped is not None:
                on_stopped()

    app = Starlette(routes=service.routes(), lifespan=lifespan)
    app.state.service = service
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def run(model=None, *, host: str = "127.0.0.1", port: int = 8080, device=None, dtype=None, backend=None,
        threads: int | None = None, log_level: str = "warning", **options) -> None:
    """Load the model, listen on ``host:port`` and serve until SIGINT/SIGTERM (then finish what is in flight;
    uvicorn then re-raises the signal, so the exit status is the signal's, as for any terminated process).

    ``threads``: torch's intra-op threads for the model (CPU); None leaves torch's default (one per core).
    """
    import torch
    import uvicorn

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise FastencError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    encoder = Encoder.from_pretrained(model, device=device, dtype=dtype, backend=backend)

    def ready():
        print(f"fastenc serve: {encoder.path} on {encoder.device} ({encoder.backend}), listening on {url}",
              file=sys.stderr, flush=True)

    def stopped():
        print("fastenc serve: stopped (every request in flight was answered)", file=sys.stderr, flush=True)

    app = create_app(encoder, on_ready=ready, on_stopped=stopped, **options)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=60)
    uvicorn.Server(config).run(sockets=[sock])
