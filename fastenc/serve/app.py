"""The HTTP layer: Starlette routes that validate, tokenize and enqueue, and never touch the model.

A request is read (JSON only: another ``Content-Type`` is a 415; at most ``payload_limit`` bytes, within
``body_timeout`` seconds), parsed (``schema``), admitted (at most ``max_concurrent_requests`` at once;
past that 429 with ``Retry-After`` at once, never an unbounded queue), tokenized on the one tokenizer
thread (fastenc's tokenizer object is not shared between threads; a request whose client leaves while
it waits for that thread is never tokenized), and queued as a ``Job`` in the ``Batcher``; the handler
then waits for a worker's result, or for its client to disconnect, in which case the job is cancelled
and its sequences never reach the model. The workers (``worker``: processes, one per device, or one
thread of this process) all take their batches from that one batcher. Routes and
shapes are text-embeddings-inference's (``/embed``, ``/embed_all``, ``/embed_sparse``, ``/predict``,
``/rerank``, ``/tokenize``, ``/info``, ``/health``) and OpenAI's ``/v1/embeddings``; fastenc's own
``/embed_multivector`` and ``/embed_multi`` give the outputs TEI has no route for (ColBERT vectors, and
BGE-M3's three outputs from one forward pass); ``/metrics`` is Prometheus text. Each answers what the
Python API answers for the same input: ``embed(prompt_name=...)``, ``embed_tokens``, ``embed_sparse``,
``embed_multivector``, ``embed_multi``, the text-classification pipeline and ``pipeline("rerank")``, whose
tokenization, scoring and ranking ``/rerank`` calls (only the forward pass is the worker's, batched
with other requests).

The route table (``Service.endpoints``) is the one place a route is declared: its handler, its error
shape (TEI's, or OpenAI's under ``/v1/``), its request and answer schemas (``openapi``, served at
``/openapi.json``) and whether it needs the API key. Around the routes: a request id and access log
(``middleware.RequestContext``), CORS only for the origins configured, the API key (``middleware.ApiKey``),
and under them the connection limits of ``connections``.

Shutdown (SIGTERM, through uvicorn) stops accepting connections, lets the requests in flight finish,
then closes the batcher and joins the workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from .. import heads as task_heads
from ..encoder import DEFAULT_MAX_TOKENS, Encoder
from ..errors import FastencError, InputError
from ..text import Prompt
from ..pipelines import RerankPipeline, TextClassificationPipeline
from ..tasks import SentenceEmbedding, SequenceScores, TokenEmbeddings
from . import openapi, schema
from .batcher import Batcher, Closed, Job
from .connections import CHUNK, ConnectionLimits, protocol_class
from .metrics import Metrics
from .middleware import ApiKey, RequestContext, family_is_openai
from .schema import ServeError, error_body, unprocessable
from .worker import ProcessWorker, Worker, WorkerDied, WorkerSpec

log = logging.getLogger("fastenc.serve")

DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # bytes, as TEI
DEFAULT_MAX_RESPONSE_BYTES = 50_000_000  # the per-token routes' answers
RETRY_AFTER = "1"  # seconds, on a 429 and on a 503 a retry can cure
_FLOAT_BYTES = 15  # the most a float32 takes in the JSON answer, with its comma: "-1.1754944e-38,"
_TOKEN_BYTES = 80  # /tokenize's fixed part per token: {"id":…,"text":"","special":false,"start":…,"stop":…},


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One route: ``method path`` answered by ``handler``, with its error shape (OpenAI's when ``openai``),
    the names of its request and answer schemas in ``openapi.SCHEMAS``, the error statuses it may
    answer, whether it is served without the API key (``public``) and left out of the OpenAPI document
    (``hidden``)."""

    path: str
    method: str
    handler: Callable
    summary: str
    request: str | None = None
    response: str | None = None
    errors: tuple[int, ...] = ()
    openai: bool = False
    public: bool = False
    hidden: bool = False
    media_type: str = "application/json"


_POST_ERRORS = (408, 413, 415, 422, 429, 503)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _served_name(path) -> str:
    """The checkpoint directory's name (its parent's when it is a packaged model's generic ``model``)."""
    if path is None:
        return "fastenc"
    return path.parent.name if path.name == "model" and path.parent.name else path.name


class ChunkedResponse(Response):
    """A response whose body goes out in ``CHUNK``-byte pieces, each waiting for the connection to drain:
    a large answer to a slow reader never sits twice in memory (the body and a copy in the send buffer)."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = memoryview(self.body)
        for start in range(0, len(body), CHUNK):
            end = start + CHUNK
            await send({"type": "http.response.body", "body": bytes(body[start:end]), "more_body": end < len(body)})


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    kind = ChunkedResponse if len(body) > CHUNK else Response
    return kind(body, status_code=status, media_type="application/json", headers=headers)


def _json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters (charset …)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that alone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _settle(future: asyncio.Future, outcome, finished: float) -> None:
    if not future.done():
        future.set_result((outcome, finished))


class Service:
    """The handlers' side of the server: limits, the tokenizer thread, admission, the workers and the route
    handlers.

    ``workers``: one ``WorkerSpec`` per model worker process (each loads the checkpoint on its device);
    None runs the model of ``encoder`` itself on one thread of this process. ``encoder`` gives the
    tokenizer, the configuration and the heads either way. ``api_key``: ``Authorization: Bearer`` needed
    on every route but ``/health`` (``create_app`` adds the check; the OpenAPI document says so).
    """

    def __init__(self, encoder: Encoder, *, max_batch_tokens: int = DEFAULT_MAX_TOKENS,
                 max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
                 max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS, auto_truncate: bool = False,
                 payload_limit: int = DEFAULT_PAYLOAD_LIMIT, model_name: str | None = None, warmup: bool = True,
                 workers: list[WorkerSpec] | None = None, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 body_timeout: float = ConnectionLimits.body_timeout, api_key: str | None = None):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_client_batch_size", max_client_batch_size),
                            ("max_concurrent_requests", max_concurrent_requests), ("payload_limit", payload_limit),
                            ("max_response_bytes", max_response_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if workers is not None and not workers:
            raise InputError("workers is empty: give one WorkerSpec per model worker, or None for one in this process")
        if api_key is not None and not api_key:
            raise InputError("the API key is empty")
        if encoder.tokenizer is None:
            raise InputError(f"{encoder.path or 'this encoder'}: fastenc serve needs the checkpoint's tokenizer "
                             "files (tokenizer.json, vocab.txt or vocab.json + merges.txt)")
        self.encoder = encoder
        self.model_name = model_name or _served_name(encoder.path)
        self.max_concurrent_requests = max_concurrent_requests
        self.payload_limit = payload_limit
        self.max_response_bytes = max_response_bytes
        self.body_timeout = body_timeout
        self.api_key = api_key
        self.limits = schema.Limits(max_client_batch_size, encoder.embedding_dim, auto_truncate)
        self.metrics = Metrics()
        self.batcher = Batcher(max_batch_tokens, on_cancelled=self.metrics.cancelled.inc)
        self.metrics.track(self.batcher)
        if workers is None:
            self.workers = [Worker(encoder, self.batcher, self.metrics, warmup=warmup)]
            self.metrics.workers_up.set_function(lambda: sum(w.up for w in self.workers))
        else:
            self.workers = [ProcessWorker(index, spec, self.batcher, encoder.text.pack, self.metrics,
                                          alive=self._any_worker_up) for index, spec in enumerate(workers)]
        self.metrics.workers.set(len(self.workers))
        self._tokenizer_thread = None  # a one-thread executor, made at startup
        self._in_flight = 0
        self.text = encoder.text
        self.embedding, self._embed_error = self._embedding_setup(encoder)
        self.classifier = (TextClassificationPipeline(encoder) if "sequence_classification" in encoder.heads
                           else None)
        self.reranker, self._rerank_error = self._rerank_setup()
        self._sparse_error = None if encoder.heads & {"mlm", "bge_m3"} else (
            "/embed_sparse needs a masked-language-model head (a SPLADE checkpoint) or BGE-M3's sparse head, and "
            "this model has neither "
            f"(heads: {', '.join(sorted(encoder.heads)) or 'none'})")
        self._multivector_dim, self._multivector_error = self._multivector_setup(encoder)
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
            return encoder.embedding_task()[0], None
        except FastencError as exc:
            return None, f"this checkpoint serves no embeddings: {exc}"

    @staticmethod
    def _multivector_setup(encoder: Encoder) -> tuple[int | None, str | None]:
        """The width of ``embed_multivector``'s vectors, or why this checkpoint has none."""
        try:
            return encoder.multivector_dim, None
        except FastencError as exc:
            return None, f"/embed_multivector needs a multi-vector model (BGE-M3 or a ColBERT model): {exc}"

    def _plan(self, route: str, make: Callable):
        """``make()``'s ``(task, text plan)`` for a request's options: 422 for a bad option (an unknown
        prompt, say), 400 for what this checkpoint cannot give."""
        try:
            return make()
        except InputError as exc:
            raise unprocessable(str(exc)) from None
        except FastencError as exc:
            raise ServeError(400, f"{route}: {exc}", "model") from None

    def _sparse_task(self, top_k: int | None):
        """``embed_sparse(top_k=...)``'s task: SPLADE vectors, or BGE-M3's lexical weights; 422 for a bad top_k."""
        try:
            return self.encoder.sparse_task(top_k)
        except InputError as exc:
            raise unprocessable(str(exc)) from None

    def _embedding(self, prompt_name: str | None, normalize: bool, dimensions: int | None) -> SentenceEmbedding:
        """``embed(prompt_name=..., normalize=..., dim=...)``'s task with the checkpoint's pooling."""
        if self._embed_error:
            raise ServeError(400, self._embed_error, "model")
        dim = None if dimensions == self.encoder.embedding_dim else dimensions
        return dataclasses.replace(self.embedding, normalize=normalize, dim=dim, skip=self._prompt(prompt_name).skip)

    def _rerank_setup(self) -> tuple[RerankPipeline | None, str | None]:
        """The rerank pipeline whose tokenization, scores and ranking ``/rerank`` uses, or why there is none."""
        causal = RerankPipeline.logit_score(self.encoder) is not None  # a causal LM scored by two tokens
        if self.classifier is None and not causal:
            return None, (f"/rerank needs a sequence-classification head (or a causal LM with a LogitScore) and "
                          f"this model has none (heads: {', '.join(sorted(self.encoder.heads)) or 'none'})")
        labels = 1 if causal else task_heads.num_labels(self.encoder.config)
        if labels != 1:
            return None, (f"/rerank needs a cross-encoder: a sequence-classification head with one label, and "
                          f"this one has {labels}")
        try:
            return RerankPipeline(self.encoder), None
        except FastencError as exc:  # e.g. an activation_fn fastenc does not know, a chat template
            return None, f"/rerank cannot score with this checkpoint: {exc}"

    # ------------------------------------------------------------------------------------- lifecycle
    def _any_worker_up(self) -> bool:
        return any(worker.up for worker in self.workers)

    async def startup(self) -> None:
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="fastenc-tokenize")
        for worker in self.workers:
            worker.start()
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            await loop.run_in_executor(None, worker.ready.wait)
        failed = [f"{worker.name}: {worker.error}" for worker in self.workers if worker.error is not None]
        if failed:
            self.batcher.close()
            raise RuntimeError(f"the model failed to start: {'; '.join(failed)}")

    async def shutdown(self) -> None:
        self.batcher.close()  # the workers drain what is queued, then stop
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.stop()
        for worker in self.workers:
            await loop.run_in_executor(None, worker.join)
        self._tokenizer_thread.shutdown(wait=True)

    # --------------------------------------------------------------------------------------- helpers
    async def _body(self, request: Request) -> dict:
        """The JSON body: 415 unless it says it is JSON, 413 past ``payload_limit`` bytes, 408 (and the
        connection closed) when it does not arrive within ``body_timeout`` seconds."""
        content_type = request.headers.get("content-type")
        if not _json_content_type(content_type):
            raise ServeError(415, f"the request body must be JSON, sent with `Content-Type: application/json` (got "
                                  f"{'no Content-Type' if content_type is None else repr(content_type[:100])})")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.payload_limit:
            raise ServeError(413, f"the request body is {length} bytes, over the limit of {self.payload_limit}")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.payload_limit:
                    raise ServeError(413, f"the request body is over the limit of {self.payload_limit} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            self.metrics.connections_dropped.labels("body_timeout").inc()
            raise ServeError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                             headers={"Connection": "close"}) from None
        return schema.parse_body(b"".join(chunks))

    @contextlib.contextmanager
    def _admitted(self):
        """Count the request in, or 429 at once when ``max_concurrent_requests`` are already in."""
        if self._in_flight >= self.max_concurrent_requests:
            raise ServeError(429, f"the server is at its limit of {self.max_concurrent_requests} concurrent "
                                  "requests; retry later", "overloaded", {"Retry-After": RETRY_AFTER})
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()

    async def _tokenized(self, request: Request, fn: Callable, *args):
        """``fn(*args)`` on the tokenizer thread; an ``InputError`` is the client's 422. A client that leaves
        while its request waits for the thread takes the request with it: it is never tokenized."""
        start = time.perf_counter()
        pending = self._tokenizer_thread.submit(fn, *args)
        waiter = asyncio.wrap_future(pending)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((waiter, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not waiter.done():
            if pending.cancel():  # not started yet: it never will be
                self.metrics.skipped.labels("tokenize").inc()
            waiter.cancel()
            raise ClientGone()
        try:
            return waiter.result()
        except InputError as exc:
            raise unprocessable(str(exc)) from None
        finally:  # every tokenization that ran, answered or refused
            self.metrics.stage.labels("tokenize").observe(time.perf_counter() - start)

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
        if isinstance(outcome, WorkerDied):
            raise ServeError(503, str(outcome), "unhealthy", {"Retry-After": RETRY_AFTER})
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

    def _encode_plan(self, texts: list[str], truncate: bool, plan) -> list:
        """``embed_multivector()``'s tokenization: the plan's prompt and length, a query's expansion."""
        try:
            encodings = self.text.encode(plan.prompt.apply(texts), max_length=plan.max_length, truncate=truncate)
            return encodings if plan.expansion is None else self.text.expand(encodings, plan.expansion)
        except InputError as exc:
            raise InputError(f"`inputs`: {exc}") from None

    def _encode_pairs(self, query: str, texts: list[str], truncate: bool, prompt_name: str | None = None) -> list:
        """The rerank pipeline's tokenization of ``(prompt + query, text)`` pairs; without truncation, a query
        too long to make a pair with any text is named as the fault, not the texts."""
        query = self._prompt(prompt_name).apply([query])[0]
        if not truncate:
            tokens = len(self.text.encode([query], truncate=False, check_length=False, special_tokens=False,
                                          lower_case=False)[0].ids)
            processor = self.text.tokenizer.post_processor
            specials = processor.num_special_tokens_to_add(True) if processor is not None else 0
            limit = self.reranker.pair_length
            if tokens + specials + 1 > limit:
                raise InputError(f"`query` has {tokens} tokens: with any text the pair is over the limit of {limit} "
                                 "tokens (truncation is off)")
        try:
            return self.reranker.pairs(query, texts, truncation=truncate, prompt="")
        except InputError as exc:
            raise InputError(f"`texts`: {exc}") from None

    def _encode_items(self, items: list, truncate: bool) -> list:
        """The text-classification pipeline's tokenization of texts and (text, text_pair) pairs."""
        pipe = self.classifier
        if truncate:
            return pipe.tokenize(items, truncation=True)
        # without truncation, TEI's limit: the tokenizer's (the pipeline's own is the model's positions)
        return self.text.encode(items, max_length=pipe.max_length, truncate=False, lower_case=False, what="input")

    def _check_answer_size(self, size: int, what: str) -> None:
        if size > self.max_response_bytes:
            raise ServeError(413, f"the answer would take up to {size} bytes ({what}), over the limit of "
                                  f"{self.max_response_bytes} (--max-response-bytes): send fewer or shorter inputs")

    def _tokens(self, texts: list[str], add_special_tokens: bool, prompt: Prompt = Prompt()) -> list[list[dict]]:
        texts = prompt.apply(texts)  # as TEI: the tokens (and their offsets) of the prompted text
        sentence = self.encoder.sentence
        if sentence is not None and sentence.do_lower_case:  # as embed() sees the text
            texts = [text.lower() for text in texts]
        encodings = self.text.encode(texts, special_tokens=add_special_tokens, truncate=False, check_length=False,
                                     lower_case=False)
        tokens = sum(len(encoding.ids) for encoding in encodings)
        # each token's text is a slice of its input (or a special token's few characters), at most 6 bytes a
        # character once escaped
        self._check_answer_size(tokens * _TOKEN_BYTES + 6 * sum(map(len, texts)), f"{tokens} tokens")
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
            rows = await self._tokenized(request, self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            vectors = await self._infer(request, rows, task)
        return _json(np.stack([v.numpy() for v in vectors]))

    async def embed_all(self, request: Request) -> Response:
        """TEI's ``/embed_all``: per input its token vectors ``[[float, ...], ...]``, as ``embed_tokens()``."""
        req = schema.parse_embed_all(await self._body(request), self.limits)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            rows = await self._tokenized(request, self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            tokens = sum(len(row.ids) for row in rows)
            hidden = self.encoder.config.hidden_size
            self._check_answer_size(tokens * (hidden * _FLOAT_BYTES + 3) + 2, f"{tokens} tokens x {hidden} floats")
            vectors = await self._infer(request, rows, TokenEmbeddings())
        return _json([v.numpy() for v in vectors])

    async def embed_sparse(self, request: Request) -> Response:
        """TEI's ``/embed_sparse``: per input its active words ``[{"index", "value"}, ...]`` in increasing
        ``index`` order, as ``embed_sparse()`` (``top_k``, else the checkpoint's ``max_active_dims``)."""
        req = schema.parse_embed_sparse(await self._body(request), self.limits)
        if self._sparse_error:
            raise ServeError(400, self._sparse_error, "model")
        prompt = self._prompt(req.prompt_name)
        task = self._sparse_task(req.top_k)
        with self._admitted():
            rows = await self._tokenized(request, self._encode_texts, req.texts, req.truncate, "inputs", prompt)
            vectors = await self._infer(request, rows, task)
        return _json([[{"index": index, "value": value} for index, value in zip(words.tolist(), values.numpy())]
                      for words, values in vectors])

    async def embed_multivector(self, request: Request) -> Response:
        """Per input its multi-vector (ColBERT) vectors ``[[float, ...], ...]``, as ``embed_multivector()``."""
        req = schema.parse_embed_multivector(await self._body(request), self.limits)
        if self._multivector_error:
            raise ServeError(400, self._multivector_error, "model")
        task, plan = self._plan("/embed_multivector", lambda: self.encoder.multivector_task(
            query=req.query, prompt_name=req.prompt_name))
        with self._admitted():
            rows = await self._tokenized(request, self._encode_plan, req.texts, req.truncate, plan)
            self._check_multivector_size(rows)
            vectors = await self._infer(request, rows, task)
        return _json([v.numpy() for v in vectors])

    async def embed_multi(self, request: Request) -> Response:
        """Per input ``{"dense": [...], "sparse": [{"index", "value"}, ...], "multivector": [[...], ...]}`` (the
        outputs asked for) from one forward pass, as ``embed_multi()``: BGE-M3's three outputs."""
        req = schema.parse_embed_multi(await self._body(request), self.limits)
        task, plan = self._plan("/embed_multi", lambda: self.encoder.multi_task(
            dense=req.dense, sparse=req.sparse, multivector=req.multivector, query=req.query, top_k=req.top_k,
            prompt_name=req.prompt_name))
        with self._admitted():
            rows = await self._tokenized(request, self._encode_plan, req.texts, req.truncate, plan)
            if req.multivector:
                self._check_multivector_size(rows)
            results = await self._infer(request, rows, task)
        out = []
        for result in results:
            item = {}
            if "dense" in result:
                item["dense"] = result["dense"].numpy()
            if "sparse" in result:
                words, values = result["sparse"]
                item["sparse"] = [{"index": index, "value": value} for index, value in zip(words.tolist(), values.numpy())]
            if "multivector" in result:
                item["multivector"] = result["multivector"].numpy()
            out.append(item)
        return _json(out)

    def _check_multivector_size(self, rows: list) -> None:
        tokens, dim = sum(len(row.ids) for row in rows), self._multivector_dim
        self._check_answer_size(tokens * (dim * _FLOAT_BYTES + 3) + 2, f"{tokens} tokens x {dim} floats")

    async def openai_embeddings(self, request: Request) -> Response:
        req = schema.parse_openai_embed(await self._body(request), self.limits)
        task = self._embedding(req.prompt_name, True, req.dimensions)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            truncate = self.limits.auto_truncate
            rows = await self._tokenized(request, self._encode_texts, req.texts, truncate, "input", prompt)
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
            rows = await self._tokenized(request, self._encode_items, req.items, req.truncate)
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
            rows = await self._tokenized(request, self._encode_pairs, req.query, req.texts, req.truncate,
                                         req.prompt_name)
            logits = await self._infer(request, rows, pipe.score_task)
        ranks = pipe.rank(pipe.scores(logits, req.raw_scores), req.texts, return_text=req.return_text)
        if req.return_text:
            ranks = [{"index": rank["index"], "text": rank["text"], "score": rank["score"]} for rank in ranks]
        return _json(ranks)

    async def tokenize(self, request: Request) -> Response:
        req = schema.parse_tokenize(await self._body(request), self.limits)
        prompt = self._prompt(req.prompt_name)
        with self._admitted():
            tokens = await self._tokenized(request, self._tokens, req.texts, req.add_special_tokens, prompt)
        return _json(tokens)

    async def info(self, request: Request) -> Response:
        config = self.encoder.config
        sentence = self.encoder.sentence
        if self.classifier is not None:
            id2label = {str(i): label for i, label in self.classifier.id2label.items()}
            kind = "reranker" if task_heads.num_labels(config) == 1 else "classifier"
            model_type = {kind: {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}}
        elif self.reranker is not None:  # a causal LM scored by two tokens' logits: one score, as TEI's rerankers
            model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        elif sentence is not None and sentence.splade is not None:
            model_type = {"embedding": {"pooling": "splade"}}  # as TEI names a SPLADE model's pooling
        else:
            model_type = {"embedding": {"pooling": self.embedding.pooling if self.embedding else "mean"}}
        routes = {"/embed": not self._embed_error, "/v1/embeddings": not self._embed_error, "/embed_all": True,
                  "/embed_sparse": not self._sparse_error, "/embed_multivector": not self._multivector_error,
                  # the combined call, where there is more than one output to combine
                  "/embed_multi": [self._embed_error, self._sparse_error, self._multivector_error].count(None) >= 2,
                  "/predict": self.classifier is not None,
                  "/rerank": self.reranker is not None, "/tokenize": True}
        process = [w for w in self.workers if isinstance(w, ProcessWorker)]
        dtype = (process[0].spec.dtype if process and process[0].spec.dtype
                 else "fp8" if self.encoder.fp8 else str(self.encoder.dtype))
        return _json({
            "model_id": self.model_name,  # the served name: a local path is nobody else's business
            "model_sha": None,
            "model_dtype": dtype.replace("torch.", ""),
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
            "device": str(process[0].spec.device) if process else str(self.encoder.device),
            "devices": [w.spec.device for w in process] if process else [str(self.encoder.device)],
            "backend": (process[0].info.get("backend") if process else None) or self.encoder.backend,
            "hidden_size": config.hidden_size,
            "multivector_dim": self._multivector_dim,
            # fastenc's: what this checkpoint serves, and the prompt names prompt_name takes
            "routes": sorted(route for route, served in routes.items() if served),
            "prompts": list(sentence.prompts) if sentence else [],
            "default_prompt_name": sentence.default_prompt_name if sentence else None,
        })

    async def health(self, request: Request) -> Response:
        """200 ``{"status": "ok"}`` when every worker runs, 200 ``"degraded"`` while some are being restarted,
        503 ``"degraded"`` while none is (the requests of a load balancer's health check then go elsewhere)."""
        total, up = len(self.workers), sum(worker.up for worker in self.workers)
        state = {"status": "ok" if up == total else "degraded", "workers": total, "workers_up": up}
        if up:
            return _json(state)
        return _json({**error_body(503, f"no model worker is running ({total} starting or restarting)",
                                   "unhealthy"), **state}, 503, {"Retry-After": RETRY_AFTER})

    async def openapi(self, request: Request) -> Response:
        return _json(self._openapi)

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
            if response.status_code >= 500 and response.status_code != 503:
                log.error("%s answered %d (request %s)", route, response.status_code,
                          request.scope.get("state", {}).get("request_id"))
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            if response.status_code == 200:
                self.metrics.stage.labels("request").observe(time.perf_counter() - start)
            return response

        return run

    @staticmethod
    def _error(exc: ServeError, openai: bool) -> Response:
        return _json(error_body(exc.status, exc.message, exc.error_type, openai), exc.status, exc.headers)

    def endpoints(self) -> list[Endpoint]:
        """The route table: every route, its handler, error shape, schemas and statuses (see ``Endpoint``)."""
        post = _POST_ERRORS
        return [
            Endpoint("/embed", "POST", self.embed, "sentence vectors, as embed()", "EmbedRequest", "EmbedResponse",
                     (400, *post)),
            Endpoint("/v1/embeddings", "POST", self.openai_embeddings, "OpenAI's embeddings", "OpenAIEmbeddingRequest",
                     "OpenAIEmbeddingResponse", (400, *post), openai=True),
            Endpoint("/embed_all", "POST", self.embed_all, "token vectors, as embed_tokens()", "EmbedAllRequest",
                     "EmbedAllResponse", post),
            Endpoint("/embed_sparse", "POST", self.embed_sparse, "SPLADE vectors, as embed_sparse()",
                     "EmbedSparseRequest", "EmbedSparseResponse", (400, *post)),
            Endpoint("/embed_multivector", "POST", self.embed_multivector,
                     "multi-vector (ColBERT) vectors, as embed_multivector()", "EmbedMultiVectorRequest",
                     "EmbedMultiVectorResponse", (400, *post)),
            Endpoint("/embed_multi", "POST", self.embed_multi,
                     "dense, sparse and multi-vector outputs from one forward pass, as embed_multi()",
                     "EmbedMultiRequest", "EmbedMultiResponse", (400, *post)),
            Endpoint("/predict", "POST", self.predict, "a sequence classifier's labels", "PredictRequest",
                     "PredictResponse", (400, *post)),
            Endpoint("/rerank", "POST", self.rerank, "texts ranked against a query by a cross-encoder",
                     "RerankRequest", "RerankResponse", (400, *post)),
            Endpoint("/tokenize", "POST", self.tokenize, "the tokens of texts", "TokenizeRequest", "TokenizeResponse",
                     post),
            Endpoint("/info", "GET", self.info, "the model, its routes and the server's limits", response="Info"),
            Endpoint("/health", "GET", self.health, "200 while a model worker runs", response="Health", errors=(503,),
                     public=True),
            Endpoint("/metrics", "GET", self.prometheus, "Prometheus metrics", media_type="text/plain"),
            Endpoint("/openapi.json", "GET", self.openapi, "this document", hidden=True),
        ]

    def routes(self) -> list[Route]:
        endpoints = self.endpoints()
        self._openapi = openapi.document(endpoints, title="fastenc serve", version=__version__,
                                         api_key=self.api_key is not None)
        return [Route(e.path, self.endpoint(e.path, e.handler, openai=e.openai), methods=[e.method])
                for e in endpoints]


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's 404 and 405 in the JSON error shape of the route family the path belongs to."""
    path = request.url.path
    if exc.status_code == 404:
        message, kind = f"no route {path!r} (see /openapi.json)", "not_found"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message, kind = f"{request.method} is not allowed on {path} (allowed: {allowed})", "method_not_allowed"
    else:
        message, kind = str(exc.detail), "validation"
    return _json(error_body(exc.status_code, message, kind, family_is_openai(path)), exc.status_code, exc.headers)


def create_app(encoder: Encoder, *, on_ready: Callable[[], None] | None = None,
               on_stopped: Callable[[], None] | None = None, cors_allow_origins: list[str] | tuple[str, ...] = (),
               access_log: bool = True, **options) -> Starlette:
    """A Starlette app serving ``encoder``; ``options`` are ``Service``'s (limits, ``workers``, ``api_key``,
    ``auto_truncate`` …). ``on_ready`` is called once the model is warm, ``on_stopped`` once the last
    request is answered. ``cors_allow_origins``: the origins (or ``"*"``) whose pages may call the
    server from a browser; none by default. ``access_log``: a line per request on the
    ``fastenc.serve.access`` logger (at INFO)."""
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

    middleware = [Middleware(RequestContext, log=access_log)]
    if cors_allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_allow_origins),
                                     allow_methods=["GET", "POST"], expose_headers=["X-Request-Id"], max_age=600,
                                     allow_headers=["Authorization", "Content-Type", "X-Request-Id"]))
    if service.api_key is not None:
        middleware.append(Middleware(ApiKey, key=service.api_key))
    app = Starlette(routes=service.routes(), lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: _http_error})
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


def _raise_fd_limit() -> int | None:
    """Raise this process's open-file limit to its hard limit; the soft limit then in force (None: unknown)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def worker_specs(model, *, device=None, devices=None, workers: int | None = None, dtype=None, backend=None,
                 threads: int | None = None, warmup: bool = True) -> list[WorkerSpec]:
    """One ``WorkerSpec`` per model worker: one per entry of ``devices``, else ``workers`` on ``device``
    (default: CUDA when there is one, else the CPU). CPU workers share the cores: each gets ``threads``
    torch threads, by default its share of this process's cores (at least one); a lone worker keeps
    torch's default."""
    from .. import fp8
    from ..encoder import default_model_path
    from ..model import resolve_device, resolve_dtype

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be a positive int, got {workers!r}")
    if devices:
        if device is not None:
            raise InputError("give --device or --devices, not both")
        if workers is not None and workers != len(devices):
            raise InputError(f"--workers {workers} does not match the {len(devices)} devices of --devices")
        names = list(devices)
    else:
        names = [device] * (workers or 1)
    resolved = [resolve_device(name) for name in names]
    cpu_workers = sum(d.type == "cpu" for d in resolved)
    if threads is None and cpu_workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // cpu_workers)
    path = str(default_model_path() if model is None else os.path.abspath(model))
    def dtype_name(device) -> str | None:
        # no dtype: each worker resolves the checkpoint's default (bfloat16 for the decoder backbones on
        # CUDA); fp8 stays "fp8"
        if dtype is None:
            return None
        return "fp8" if fp8.requested(dtype) else str(resolve_dtype(dtype, device)).replace("torch.", "")

    return [WorkerSpec(path, str(d), dtype_name(d), backend, threads if d.type == "cpu" else None, warmup)
            for d in resolved]


def run(model=None, *, host: str = "127.0.0.1", port: int = 8080, device=None, devices: list[str] | None = None,
        workers: int | None = None, in_process: bool = False, dtype=None, backend=None, threads: int | None = None,
        log_level: str = "warning", access_log: bool = True, cors_allow_origins: list[str] | tuple[str, ...] = (),
        connection_limits: ConnectionLimits | None = None, **options) -> None:
    """Load the model, listen on ``host:port`` and serve until SIGINT/SIGTERM (then finish what is in flight;
    uvicorn then re-raises the signal, so the exit status is the signal's, as for any terminated process).

    The model runs in worker processes, one per entry of ``devices`` (``["cuda:0", "cuda:1"]``), else
    ``workers`` of them on ``device`` (see ``worker_specs``); ``in_process`` runs the one model on a thread
    of this process instead (no process to restart: a crash of the model is the server's).
    ``threads``: torch's intra-op threads per CPU worker. ``connection_limits``: see ``connections``.
    ``options``: ``Service``'s (``api_key``, limits …).
    """
    import torch
    import uvicorn

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive int, got {threads!r}")
    limits = connection_limits or ConnectionLimits()
    if in_process:
        if devices and len(devices) > 1 or (workers or 1) > 1:
            raise InputError("--in-process runs one model worker: drop --workers/--devices or --in-process")
        if threads is not None:
            torch.set_num_threads(threads)
        specs = None
        device = devices[0] if devices else device
    else:
        specs = worker_specs(model, device=device, devices=devices, workers=workers, dtype=dtype, backend=backend,
                             threads=threads, warmup=options.get("warmup", True))
        torch.set_num_threads(1)  # this process packs batches and never runs the model: leave the cores to it
    fd_limit = _raise_fd_limit()
    if fd_limit is not None and limits.max_connections > fd_limit - 64:  # fds for the model, pipes and logs
        limits = dataclasses.replace(limits, max_connections=max(1, fd_limit - 64))

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise FastencError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    if not _is_loopback(bound_host) and not options.get("api_key"):
        print(f"fastenc serve: warning: listening on {url} without an API key: anyone who can reach this address "
              "can use the model (set --api-key or FASTENC_API_KEY)", file=sys.stderr, flush=True)
    if specs is None:
        encoder = Encoder.from_pretrained(model, device=device, dtype=dtype, backend=backend)
    else:  # the tokenizer, configuration and heads; the workers load their own model
        encoder = Encoder.from_pretrained(model, device="cpu", backend="torch")
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access = logging.getLogger("fastenc.serve.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    where = ", ".join(spec.device for spec in specs) if specs else f"{encoder.device} (in-process)"

    def ready():
        backend_name = app.state.service.workers[0].info.get("backend") if specs else encoder.backend
        print(f"fastenc serve: {encoder.path} on {where} ({backend_name}), listening on {url}",
              file=sys.stderr, flush=True)

    def stopped():
        print("fastenc serve: stopped (every request in flight was answered)", file=sys.stderr, flush=True)

    app = create_app(encoder, on_ready=ready, on_stopped=stopped, workers=specs, access_log=access_log,
                     cors_allow_origins=cors_allow_origins, body_timeout=limits.body_timeout, **options)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=60,
                            http=protocol_class(limits, app.state.service.metrics), server_header=False,
                            timeout_keep_alive=limits.keep_alive_timeout, backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])
