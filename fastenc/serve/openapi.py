"""The OpenAPI 3.1 description of the server, built from its route table (``GET /openapi.json``).

Each route of ``app.Service.endpoints()`` names its request and answer schemas here (JSON Schema, as
OpenAPI 3.1 takes it) and the error statuses it may answer; ``document`` puts them together. A new
route is one ``Endpoint`` with its schemas: the document follows.
"""

from __future__ import annotations

from .schema import error_body

_TEXT = {"type": "string", "minLength": 1, "description": "a text; empty or only whitespace/control characters is 422"}
_TEXTS = {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}],
          "description": "one text or a list of them (at most max_client_batch_size, see /info)"}
_PROMPT = {"type": ["string", "null"], "description": "one of the checkpoint's prompts (see /info)"}
_TRUNCATE = {"type": ["boolean", "null"], "description": "cut inputs to the model's limit (default: --auto-truncate)"}
_VECTOR = {"type": "array", "items": {"type": "number"}}


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


SCHEMAS: dict[str, dict] = {
    # ---------------------------------------------------------------------------------------- requests
    "EmbedRequest": _object({
        "inputs": _TEXTS, "normalize": {"type": ["boolean", "null"], "default": True}, "truncate": _TRUNCATE,
        "dimensions": {"type": ["integer", "null"], "minimum": 1, "description": "keep the first N coordinates"},
        "prompt_name": _PROMPT}, ("inputs",)),
    "OpenAIEmbeddingRequest": _object({
        "input": _TEXTS, "model": {"type": ["string", "null"]},
        "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1}, "prompt_name": _PROMPT}, ("input",)),
    "EmbedAllRequest": _object({"inputs": _TEXTS, "truncate": _TRUNCATE, "prompt_name": _PROMPT}, ("inputs",)),
    "EmbedSparseRequest": _object({"inputs": _TEXTS, "truncate": _TRUNCATE, "prompt_name": _PROMPT,
                                   "top_k": {"type": ["integer", "null"], "minimum": 1}}, ("inputs",)),
    "EmbedMultiVectorRequest": _object({
        "inputs": _TEXTS, "truncate": _TRUNCATE, "prompt_name": _PROMPT,
        "query": {"type": ["boolean", "null"], "default": False,
                  "description": "encode as queries (a ColBERT model's query prompt, length and expansion)"}},
        ("inputs",)),
    "EmbedMultiRequest": _object({
        "inputs": _TEXTS, "truncate": _TRUNCATE, "prompt_name": _PROMPT,
        "query": {"type": ["boolean", "null"], "default": False},
        "dense": {"type": ["boolean", "null"], "default": True},
        "sparse": {"type": ["boolean", "null"], "default": True},
        "multivector": {"type": ["boolean", "null"], "default": True},
        "top_k": {"type": ["integer", "null"], "minimum": 1}}, ("inputs",)),
    "PredictRequest": _object({
        "inputs": {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 2},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 2}}],
                   "description": "a text, a pair [text, text_pair], or a list of [text] / [text, text_pair]"},
        "truncate": _TRUNCATE, "raw_scores": {"type": ["boolean", "null"], "default": False}}, ("inputs",)),
    "RerankRequest": _object({
        "query": _TEXT, "texts": {"type": "array", "items": _TEXT, "minItems": 1}, "truncate": _TRUNCATE,
        "raw_scores": {"type": ["boolean", "null"], "default": False},
        "return_text": {"type": ["boolean", "null"], "default": False}}, ("query", "texts")),
    "TokenizeRequest": _object({"inputs": _TEXTS, "add_special_tokens": {"type": ["boolean", "null"], "default": True},
                                "prompt_name": _PROMPT}, ("inputs",)),
    # ----------------------------------------------------------------------------------------- answers
    "EmbedResponse": {"type": "array", "items": _VECTOR, "description": "one vector per input"},
    "OpenAIEmbeddingResponse": _object({
        "object": {"const": "list"},
        "data": {"type": "array", "items": _object({
            "object": {"const": "embedding"}, "index": {"type": "integer"},
            "embedding": {"oneOf": [_VECTOR, {"type": "string", "description": "base64 of little-endian float32"}]}},
            ("object", "index", "embedding"))},
        "model": {"type": "string"},
        "usage": _object({"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
                         ("prompt_tokens", "total_tokens"))}, ("object", "data", "model", "usage")),
    "EmbedAllResponse": {"type": "array", "items": {"type": "array", "items": _VECTOR},
                         "description": "per input, one vector per token"},
    "EmbedSparseResponse": {"type": "array", "items": {"type": "array", "items": _object(
        {"index": {"type": "integer"}, "value": {"type": "number"}}, ("index", "value"))}},
    "EmbedMultiVectorResponse": {"type": "array", "items": {"type": "array", "items": _VECTOR},
                                 "description": "per input, its normalised multi-vector (ColBERT) vectors"},
    "EmbedMultiResponse": {"type": "array", "items": {
        "type": "object", "description": "per input, the outputs asked for",
        "properties": {"dense": _VECTOR, "multivector": {"type": "array", "items": _VECTOR},
                       "sparse": {"type": "array", "items": _object(
                           {"index": {"type": "integer"}, "value": {"type": "number"}}, ("index", "value"))}}}},
    "PredictResponse": {"oneOf": [
        {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}},
        {"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}]},
    "Prediction": _object({"score": {"type": "number"}, "label": {"type": "string"}}, ("score", "label")),
    "RerankResponse": {"type": "array", "items": _object(
        {"index": {"type": "integer"}, "text": {"type": "string"}, "score": {"type": "number"}}, ("index", "score"))},
    "TokenizeResponse": {"type": "array", "items": {"type": "array", "items": _object({
        "id": {"type": "integer"}, "text": {"type": "string"}, "special": {"type": "boolean"},
        "start": {"type": ["integer", "null"]}, "stop": {"type": ["integer", "null"]}},
        ("id", "text", "special", "start", "stop"))}},
    "Info": {"type": "object", "description": "the model and the server's limits (TEI's fields, and fastenc's "
                                              "routes, prompts, default_prompt_name, devices)",
             "properties": {"model_id": {"type": "string"}, "routes": {"type": "array", "items": {"type": "string"}},
                            "max_input_length": {"type": "integer"},
                            "max_client_batch_size": {"type": "integer"}},
             "required": ["model_id", "routes"]},
    "Health": _object({"status": {"enum": ["ok", "degraded"]}, "workers": {"type": "integer"},
                       "workers_up": {"type": "integer"}}, ("status", "workers", "workers_up")),
    "Error": _object({"error": {"type": "string"}, "error_type": {"type": "string"}}, ("error", "error_type")),
    "OpenAIError": _object({"error": _object({
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "null"},
        "code": {"type": "integer"}}, ("message", "type", "code"))}, ("error",)),
}

_REASONS = {400: "the model has no head for this route", 401: "a missing or wrong API key", 404: "no such route",
            405: "the wrong method", 408: "the request body did not arrive in time",
            413: "too many inputs, too large a body or too large an answer",
            415: "the body is not JSON (Content-Type: application/json)", 422: "bad input, named in the message",
            429: "the server is full; retry after Retry-After seconds",
            503: "no model worker is running, or one died with this request; retry"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def document(endpoints, *, title: str, version: str, api_key: bool) -> dict:
    """The OpenAPI document of ``endpoints`` (``app.Endpoint``s); ``api_key``: the routes but the public
    ones need ``Authorization: Bearer``."""
    paths: dict[str, dict] = {}
    for endpoint in endpoints:
        if endpoint.hidden:
            continue
        error = _ref("OpenAIError" if endpoint.openai else "Error")
        responses = {"200": {"description": "the answer", "content": {endpoint.media_type: {
            "schema": _ref(endpoint.response) if endpoint.response else {"type": "string"}}}}}
        statuses = set(endpoint.errors) | ({401} if api_key and not endpoint.public else set())
        for status in sorted(statuses):
            responses[str(status)] = {"description": _REASONS[status], "content": {"application/json": {"schema": error}}}
        operation = {"summary": endpoint.summary, "operationId": endpoint.path.strip("/").replace("/", "_") or "root",
                     "responses": responses}
        if endpoint.request:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": _ref(endpoint.request)}}}
        if api_key and not endpoint.public:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    doc = {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
           "components": {"schemas": SCHEMAS}}
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


__all__ = ["SCHEMAS", "document", "error_body"]
