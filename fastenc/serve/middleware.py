"""ASGI middleware around the routes: a request id and an access log line per request, and the API key.

Both are plain ASGI (no per-request objects beyond a closure), since every request passes through them.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

import orjson

from .schema import error_body

access_log = logging.getLogger("fastenc.serve.access")

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII without spaces: safe in a log line


def family_is_openai(path: str) -> bool:
    """Whether ``path`` answers errors in OpenAI's shape (its routes live under ``/v1/``)."""
    return path.startswith("/v1/")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send, path: str, status: int, message: str, error_type: str,
                     headers: dict[str, str] | None = None) -> None:
    """An error answer in the shape of ``path``'s route family, sent on a raw ASGI ``send``."""
    body = orjson.dumps(error_body(status, message, error_type, family_is_openai(path)))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Gives each request an id (the client's ``X-Request-Id`` when it is printable ASCII of at most 200
    characters, else a new one), echoes it in the answer's ``X-Request-Id`` and, with ``log``, writes one
    access line per request to the ``fastenc.serve.access`` logger: client, method, path, status,
    milliseconds and the id."""

    def __init__(self, app, log: bool = True):
        self.app = app
        self.log = log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        encoded = request_id.encode("ascii")
        status = [0]
        start = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", ()), (b"x-request-id", encoded)])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info('%s "%s %s HTTP/%s" %d %.1fms request_id=%s',
                                f"{client[0]}:{client[1]}" if client else "-", scope["method"], scope["path"],
                                scope.get("http_version", "1.1"), status[0] or 499,
                                1000 * (time.perf_counter() - start), request_id)


class ApiKey:
    """``Authorization: Bearer KEY`` required on every route but those in ``public``; else 401 in the route
    family's error shape, with ``WWW-Authenticate: Bearer`` (as TEI and OpenAI clients expect)."""

    def __init__(self, app, key: str, public: frozenset[str] = frozenset({"/health"})):
        if not key:
            raise ValueError("the API key is empty")
        self.app = app
        self.expected = b"bearer " + key.encode("utf-8")
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        if hmac.compare_digest(scheme.lower() + b" " + token.strip(), self.expected):
            return await self.app(scope, receive, send)
        message = ("this server needs an API key: send `Authorization: Bearer <key>`" if not given
                   else "the API key is wrong (send `Authorization: Bearer <key>`)")
        await send_error(send, scope["path"], 401, message, "authentication", {"WWW-Authenticate": "Bearer"})
