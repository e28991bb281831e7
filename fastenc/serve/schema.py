"""Request bodies: JSON in, validated request objects out, or a ``ServeError`` naming the problem.

The shapes are text-embeddings-inference's (``router/src/http/types.rs``) and OpenAI's embeddings API;
the status codes are fastenc's: 422 for a body that cannot be read, a wrong type, an empty input or a
text over the limit; 413 for too many inputs or too many bytes; 429 when the server is full; 400 for a
route the model has no head for. Nothing here touches the model or imports the HTTP stack.

Bodies are parsed by orjson, which never recurses in Python; nesting deeper than ``MAX_DEPTH`` levels is
refused here whatever orjson's own limit (not every version and build of it enforces one), so no later walk over a body
can hit a ``RecursionError``. orjson reads integers past 64 bits as floats or refuses them (so no
5,000-digit integer reaches ``int()``), and refuses invalid UTF-8 and lone surrogates (``"\\ud800"``)
as malformed JSON: every such body is a 422 here. One rule for texts: a text that is empty or holds
only whitespace and control characters (which the tokenizers drop) is a 422, never the empty text's
vector.
"""

from __future__ import annotations

import dataclasses
import re

import orjson

Text = str
Pair = tuple[str, str]


class ServeError(Exception):
    """An answer other than 200: ``status``, TEI's ``error_type`` and a message naming the problem."""

    def __init__(self, status: int, message: str, error_type: str = "validation", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}


def error_body(status: int, message: str, error_type: str, openai: bool = False) -> dict:
    """An error answer's JSON: TEI's ``{"error", "error_type"}``, or OpenAI's ``{"error": {"message", "type",
    "param", "code"}}`` on its routes."""
    if openai:
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return {"error": message, "error_type": error_type}


def unprocessable(message: str) -> ServeError:
    return ServeError(422, message, "validation")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_client_batch_size: int
    hidden_size: int
    auto_truncate: bool = False


@dataclasses.dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    normalize: bool = True
    truncate: bool = False
    dimensions: int | None = None
    prompt_name: str | None = None


@dataclasses.dataclass(frozen=True)
class OpenAIEmbedRequest:
    texts: list[str]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    prompt_name: str | None = None  # not OpenAI's, nor read by TEI there: fastenc's, as on /embed


@dataclasses.dataclass(frozen=True)
class EmbedAllRequest:
    texts: list[str]
    truncate: bool = False
    prompt_name: str | None = None


@dataclasses.dataclass(frozen=True)
class EmbedSparseRequest:
    texts: list[str]
    truncate: bool = False
    prompt_name: str | None = None
    top_k: int | None = None  # not TEI's: None keeps the checkpoint's max_active_dims (else every active word)


@dataclasses.dataclass(frozen=True)
class EmbedMultiVectorRequest:
    texts: list[str]
    truncate: bool = False
    prompt_name: str | None = None
    query: bool = False  # a ColBERT model's queries: its query prompt, length and expansion


@dataclasses.dataclass(frozen=True)
class EmbedMultiRequest:
    texts: list[str]
    truncate: bool = False
    prompt_name: str | None = None
    query: bool = False
    dense: bool = True
    sparse: bool = True
    multivector: bool = True
    top_k: int | None = None


@dataclasses.dataclass(frozen=True)
class PredictRequest:
    items: list[Text | Pair]
    single: bool  # one input: the answer is one list of predictions, not a list of lists
    truncate: bool = False
    raw_scores: bool = False


@dataclasses.dataclass(frozen=True)
class RerankRequest:
    query: str
    texts: list[str]
    truncate: bool = False
    raw_scores: bool = False
    return_text: bool = False
    prompt_name: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
    texts: list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


def _kind(value) -> str:
    """A JSON value's type, as a client would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


MAX_DEPTH = 256
"""The deepest nesting of arrays and objects a request body may have; the deepest real one is 3 (a batch
of token-id lists inside the body's object)."""


def _depth_exceeds(data, limit: int) -> bool:
    """Whether ``data`` nests arrays and objects deeper than ``limit`` levels, walked without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def parse_body(body: bytes) -> dict:
    """The request body as a JSON object, or 422 saying why it is not one."""
    too_deep = f"malformed JSON in the request body: arrays and objects nest deeper than {MAX_DEPTH} levels"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):  # orjson's own limit, where its build has one
            raise unprocessable(too_deep) from None
        raise unprocessable(f"malformed JSON in the request body: {exc}") from None
    if isinstance(data, (list, dict)) and _depth_exceeds(data, MAX_DEPTH):
        raise unprocessable(too_deep)
    if not isinstance(data, dict):
        raise unprocessable(f"the request body must be a JSON object, got {_kind(data)}")
    return data


def _required(body: dict, key: str):
    if key not in body:
        raise unprocessable(f"missing field `{key}`")
    return body[key]


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise unprocessable(f"`{key}` must be true or false, got {_kind(value)}")
    return value


# whitespace, C0/C1 controls, zero-width and bidirectional marks, the BOM: what tokenizers drop or split on
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u205f-\u206f\ufeff]*")


def _string(value, name: str) -> str:
    if not isinstance(value, str):
        raise unprocessable(f"`{name}` must be a string, got {_kind(value)}")
    if not value:
        raise unprocessable(f"`{name}` is an empty string")
    if _BLANK.fullmatch(value):
        raise unprocessable(f"`{name}` holds only whitespace or control characters (an empty text)")
    return value


def _count(n: int, name: str, limits: Limits) -> None:
    if n == 0:
        raise unprocessable(f"`{name}` is empty")
    if n > limits.max_client_batch_size:
        raise ServeError(413, f"`{name}` has {n} inputs, over the maximum of {limits.max_client_batch_size} per "
                              "request (--max-client-batch-size)")


def _texts(value, name: str, limits: Limits) -> list[str]:
    """A string or a non-empty array of non-empty strings."""
    if isinstance(value, str):
        return [_string(value, name)]
    if not isinstance(value, list):
        raise unprocessable(f"`{name}` must be a string or an array of strings, got {_kind(value)}")
    _count(len(value), name, limits)
    return [_string(item, f"{name}[{index}]") for index, item in enumerate(value)]


def _dimensions(body: dict, limits: Limits) -> int | None:
    value = body.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise unprocessable(f"`dimensions` must be an integer, got {_kind(value)}")
    if not 0 < value <= limits.hidden_size:
        raise unprocessable(f"`dimensions` is {value}; it must be between 1 and the model's {limits.hidden_size}")
    return value


def _prompt_name(body: dict) -> str | None:
    """TEI's ``prompt_name``: null or a string (whether the checkpoint has such a prompt is the handler's check)."""
    value = body.get("prompt_name")
    if value is not None and not isinstance(value, str):
        raise unprocessable(f"`prompt_name` must be a string, got {_kind(value)}")
    return value


def _top_k(body: dict) -> int | None:
    value = body.get("top_k")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise unprocessable(f"`top_k` must be a positive integer, got {value!r}")
    return value


def parse_embed(body: dict, limits: Limits) -> EmbedRequest:
    """TEI's ``POST /embed``: ``inputs``, ``normalize`` (default true), ``truncate``, ``dimensions``,
    ``prompt_name``."""
    return EmbedRequest(texts=_texts(_required(body, "inputs"), "inputs", limits),
                        normalize=_flag(body, "normalize", True),
                        truncate=_flag(body, "truncate", limits.auto_truncate),
                        dimensions=_dimensions(body, limits), prompt_name=_prompt_name(body))


def parse_openai_embed(body: dict, limits: Limits) -> OpenAIEmbedRequest:
    """OpenAI's ``POST /v1/embeddings``: ``input``, ``model``, ``encoding_format``, ``dimensions``; and
    ``prompt_name`` (fastenc's: the OpenAI client sends it with ``extra_body``)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise unprocessable(f"`model` must be a string, got {_kind(model)}")
    encoding_format = body.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if not isinstance(encoding_format, str) or encoding_format not in ("float", "base64"):
        raise unprocessable(f"`encoding_format` must be \"float\" or \"base64\", got {encoding_format!r}")
    return OpenAIEmbedRequest(texts=_texts(_required(body, "input"), "input", limits), model=model,
                              encoding_format=encoding_format, dimensions=_dimensions(body, limits),
                              prompt_name=_prompt_name(body))


def parse_embed_all(body: dict, limits: Limits) -> EmbedAllRequest:
    """TEI's ``POST /embed_all``: ``inputs``, ``truncate``, ``prompt_name``."""
    return EmbedAllRequest(texts=_texts(_required(body, "inputs"), "inputs", limits),
                           truncate=_flag(body, "truncate", limits.auto_truncate), prompt_name=_prompt_name(body))


def parse_embed_sparse(body: dict, limits: Limits) -> EmbedSparseRequest:
    """TEI's ``POST /embed_sparse``: ``inputs``, ``truncate``, ``prompt_name``; and ``top_k`` (fastenc's)."""
    return EmbedSparseRequest(texts=_texts(_required(body, "inputs"), "inputs", limits),
                              truncate=_flag(body, "truncate", limits.auto_truncate), prompt_name=_prompt_name(body),
                              top_k=_top_k(body))


def parse_embed_multivector(body: dict, limits: Limits) -> EmbedMultiVectorRequest:
    """fastenc's ``POST /embed_multivector``: ``inputs``, ``truncate``, ``prompt_name``, ``query``."""
    return EmbedMultiVectorRequest(texts=_texts(_required(body, "inputs"), "inputs", limits),
                                   truncate=_flag(body, "truncate", limits.auto_truncate),
                                   prompt_name=_prompt_name(body), query=_flag(body, "query", False))


def parse_embed_multi(body: dict, limits: Limits) -> EmbedMultiRequest:
    """fastenc's ``POST /embed_multi``: ``/embed_multivector``'s fields, which outputs (``dense``, ``sparse``,
    ``multivector``: default true, at least one) and ``top_k`` for the sparse one."""
    request = EmbedMultiRequest(texts=_texts(_required(body, "inputs"), "inputs", limits),
                                truncate=_flag(body, "truncate", limits.auto_truncate), prompt_name=_prompt_name(body),
                                query=_flag(body, "query", False), dense=_flag(body, "dense", True),
                                sparse=_flag(body, "sparse", True), multivector=_flag(body, "multivector", True),
                                top_k=_top_k(body))
    if not (request.dense or request.sparse or request.multivector):
        raise unprocessable("`dense`, `sparse` and `multivector` are all false: ask for at least one output")
    return request


def _sequence(value, name: str) -> Text | Pair:
    """``[text]`` or ``[text, text_pair]``."""
    if not isinstance(value, list) or not 1 <= len(value) <= 2:
        raise unprocessable(f"`{name}` must be a string, [text] or [text, text_pair], got "
                            f"{_kind(value) if not isinstance(value, list) else f'an array of {len(value)}'}")
    strings = [_string(item, f"{name}[{index}]") for index, item in enumerate(value)]
    return strings[0] if len(strings) == 1 else (strings[0], strings[1])


def parse_predict(body: dict, limits: Limits) -> PredictRequest:
    """TEI's ``POST /predict``: ``inputs`` is a text, a pair ``[a, b]``, or a batch of ``[a]`` / ``[a, b]``."""
    inputs = _required(body, "inputs")
    truncate, raw_scores = _flag(body, "truncate", limits.auto_truncate), _flag(body, "raw_scores", False)
    if isinstance(inputs, str):
        return PredictRequest([_string(inputs, "inputs")], True, truncate, raw_scores)
    if not isinstance(inputs, list):
        raise unprocessable(f"`inputs` must be a string, a pair [text, text_pair] or an array of them, "
                            f"got {_kind(inputs)}")
    if inputs and isinstance(inputs[0], str):  # one text or one pair, as TEI reads it
        return PredictRequest([_sequence(inputs, "inputs")], True, truncate, raw_scores)
    _count(len(inputs), "inputs", limits)
    items = [_sequence(item, f"inputs[{index}]") for index, item in enumerate(inputs)]
    return PredictRequest(items, False, truncate, raw_scores)


def parse_rerank(body: dict, limits: Limits) -> RerankRequest:
    """TEI's ``POST /rerank``: ``query``, ``texts``, ``truncate``, ``raw_scores``, ``return_text``; and
    ``prompt_name`` (fastenc's: one of the CrossEncoder's prompts, prepended to the query)."""
    texts = _required(body, "texts")
    if not isinstance(texts, list):
        raise unprocessable(f"`texts` must be an array of strings, got {_kind(texts)}")
    return RerankRequest(query=_string(_required(body, "query"), "query"), texts=_texts(texts, "texts", limits),
                         truncate=_flag(body, "truncate", limits.auto_truncate),
                         raw_scores=_flag(body, "raw_scores", False), return_text=_flag(body, "return_text", False),
                         prompt_name=_prompt_name(body))


def parse_tokenize(body: dict, limits: Limits) -> TokenizeRequest:
    """TEI's ``POST /tokenize``: ``inputs``, ``add_special_tokens`` (default true), ``prompt_name``."""
    return TokenizeRequest(_texts(_required(body, "inputs"), "inputs", limits),
                           _flag(body, "add_special_tokens", True), _prompt_name(body))
