"""``fastenc serve``: an HTTP server with text-embeddings-inference's routes, OpenAI's embeddings route and
Prometheus metrics, batching concurrent requests together (the ``serve`` extra).

Three pieces, each testable alone (TEI's router is the model): ``app`` (handlers: validate, tokenize,
enqueue; they never touch the model), ``batcher`` (one queue cut into token-budget batches) and
``worker`` (the model workers: a process per device, or one thread of the server, each owning its
device and taking the next batch when idle). ``schema`` parses request bodies; ``openapi`` describes
the routes; ``middleware`` adds request ids, access logs and the API key; ``connections`` bounds what a
client can hold (head size and time, open connections, unread answers); ``metrics`` holds the
Prometheus registry. Importing this package imports neither Starlette nor uvicorn: ``create_app`` and
``run`` do.
"""

from __future__ import annotations


def create_app(encoder, **options):
    """A Starlette app serving ``encoder`` (see ``fastenc.serve.app.Service`` for the options)."""
    from .app import create_app as _create_app

    return _create_app(encoder, **options)


def run(model=None, **options) -> None:
    """Load ``model`` and serve it until SIGINT/SIGTERM (see ``fastenc.serve.app.run``)."""
    from .app import run as _run

    _run(model, **options)


__all__ = ["create_app", "run"]
