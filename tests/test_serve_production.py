"""``fastenc serve`` for production, as an attacker and an operator meet it: real servers on free loopback
ports, real clients (httpx, the openai client, raw sockets, schemathesis).

* hostile and careless clients: deep JSON, huge integers, lone surrogates, heads too large or too slow,
  idle connections past the cap, clients that never read, non-JSON bodies, blank texts, bad
  ``encoding_format``, a rerank query at fault, clients gone before tokenization, 429's ``Retry-After``;
* the API key, CORS, request ids and access logs, no ``server`` header, the OpenAPI document (fuzzed);
* several model worker processes on one queue, and a worker killed under load."""

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from checkpoints import make_checkpoint
from test_serve import ROOT, serving

import fastenc


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def raw_exchange(url: str, data: bytes, *, read_timeout: float = 10.0, rcvbuf: int | None = None) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``read_timeout``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(read_timeout)
        sock.connect((host, int(port)))
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
        return b"".join(chunks)


def children(pid: int) -> list[int]:
    """The model worker processes of the server ``pid`` (multiprocessing's spawned children), read from
    ``/proc`` (a minimal machine has no ``ps``), in the order they started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended while being read
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (20th)
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append((int(fields[19]), int(entry.name)))
    return [child for _, child in sorted(found)]


def wait_for(predicate, timeout: float = 60.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not true after {timeout} s")


# ------------------------------------------------------------------------- hostile clients, default limits
@pytest.fixture(scope="module")
def plain(minilm_path, tmp_path_factory):
    """MiniLM with the default limits (but 6 requests at once), so each finding shows what a default
    server does; yields (url, process, log path)."""
    log = tmp_path_factory.mktemp("plain") / "server.log"
    with serving("--model", str(minilm_path), "--max-concurrent-requests", "6", log_path=log) as (url, process):
        yield url, process, log


def test_deeply_nested_json_is_a_422_without_a_traceback(plain):
    url, _, log = plain
    body = b'{"inputs": ' + b"[" * 990 + b"]" * 990 + b"}"
    response = httpx.post(url + "/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    deeper = httpx.post(url + "/embed", content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"})
    assert deeper.status_code == 422 and "nest deeper than 256 levels" in deeper.json()["error"]
    assert "Traceback" not in log.read_text()


def test_a_5000_digit_integer_is_a_422(plain):
    url, _, _ = plain
    body = b'{"inputs": "a", "dimensions": ' + b"9" * 5000 + b"}"
    response = httpx.post(url + "/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "malformed JSON" in response.json()["error"], response.text


@pytest.mark.parametrize("route", ["/tokenize", "/embed", "/embed_all", "/v1/embeddings"])
def test_lone_surrogates_are_422_on_every_route(plain, route):
    url, _, _ = plain
    field = b"input" if route == "/v1/embeddings" else b"inputs"
    for text in (b'"a\\ud800b"', b'"a\xed\xa0\x80b"'):  # escaped, and as raw (invalid UTF-8) bytes
        response = httpx.post(url + route, content=b"{\"" + field + b"\": " + text + b"}",
                              headers={"content-type": "application/json"})
        assert response.status_code == 422, (route, text, response.text)


def test_a_60_mb_header_is_431_after_a_few_kb(plain):
    url, _, _ = plain
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    answer = raw_exchange(url, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"error_type":"validation"' in answer


def test_a_non_json_body_is_415_and_cors_is_off(plain):
    url, _, _ = plain
    as_text = httpx.post(url + "/embed", content=b'{"inputs": "a"}', headers={"content-type": "text/plain"})
    assert as_text.status_code == 415, as_text.text
    assert "`Content-Type: application/json`" in as_text.json()["error"]
    form = httpx.post(url + "/v1/embeddings", data={"input": "a"})
    assert form.status_code == 415 and form.json()["error"]["code"] == 415  # OpenAI's shape on its route
    charset = httpx.post(url + "/embed", content=b'{"inputs": "a"}', headers={"content-type": "application/json; charset=utf-8"})
    assert charset.status_code == 200
    preflight = httpx.options(url + "/embed", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_404_and_405_are_json_in_the_route_familys_shape(plain):
    url, _, _ = plain
    missing = httpx.post(url + "/nope", json={})
    assert missing.status_code == 404 and missing.json() == {"error": "no route '/nope' (see /openapi.json)",
                                                           "error_type": "not_found"}
    openai_missing = httpx.post(url + "/v1/nope", json={})
    assert openai_missing.status_code == 404 and openai_missing.json()["error"]["code"] == 404
    wrong = httpx.get(url + "/embed")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {"error": "GET is not allowed on /embed (allowed: POST)", "error_type": "method_not_allowed"}


def test_info_names_the_served_model_not_a_local_path(plain, minilm_path):
    url, _, _ = plain
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == info["served_model_name"] == Path(minilm_path).parent.name  # not the generic "model"
    assert str(Path(minilm_path).parent) not in httpx.get(url + "/info").text


@pytest.mark.parametrize("text", ["   ", "\u0000", "\u200b\n\t", ""])
def test_blank_texts_follow_the_empty_texts_rule(plain, text):
    url, _, _ = plain
    for route, field in (("/embed", "inputs"), ("/v1/embeddings", "input"), ("/tokenize", "inputs"),
                         ("/embed_all", "inputs")):
        response = httpx.post(url + route, json={field: ["fine", text]})
        assert response.status_code == 422, (route, text, response.text)


@pytest.mark.parametrize("value", ["", False, 0, "FLOAT", ["float"]])
def test_encoding_format_is_float_or_base64_only(plain, value):
    url, _, _ = plain
    response = httpx.post(url + "/v1/embeddings", json={"input": "a", "encoding_format": value})
    assert response.status_code == 422 and "`encoding_format`" in response.json()["error"]["message"], response.text


def test_a_client_gone_before_tokenization_is_never_tokenized(plain):
    """Three slow requests hold the one tokenizer thread; a fourth whose client gives up while it waits
    is dropped there: only three are tokenized."""
    url, _, _ = plain
    big = "a," * 400_000  # 800k tokens, tokenized whole by /tokenize (then refused: its answer is too large)
    before = (metric(url, "fastenc_stage_seconds_count", stage="tokenize"),
              metric(url, "fastenc_skipped_requests_total", stage="tokenize"))

    async def run():
        async with httpx.AsyncClient(timeout=120) as patient, httpx.AsyncClient(timeout=0.5) as impatient:
            blockers = [asyncio.ensure_future(patient.post(url + "/tokenize", json={"inputs": big}))
                        for _ in range(3)]
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.TimeoutException):
                await impatient.post(url + "/embed", json={"inputs": "gave up"})
            return await asyncio.gather(*blockers)

    asyncio.run(run())
    wait_for(lambda: metric(url, "fastenc_stage_seconds_count", stage="tokenize") - before[0] >= 3)
    time.sleep(0.5)
    assert metric(url, "fastenc_stage_seconds_count", stage="tokenize") - before[0] == 3
    assert metric(url, "fastenc_skipped_requests_total", stage="tokenize") - before[1] == 1


def test_429_says_when_to_retry(plain):
    url, _, _ = plain
    body = {"inputs": ["a fairly long text to keep the model busy for a while " * 6] * 4}

    async def flood():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=20)) as http:
            return await asyncio.gather(*(http.post(url + "/embed", json=body) for _ in range(20)))

    refused = [r for r in asyncio.run(flood()) if r.status_code == 429]
    assert refused and all(r.headers.get("retry-after") == "1" for r in refused)


def test_a_dead_lone_worker_makes_health_503_degraded_until_it_is_back(plain):
    url, process, log = plain
    (worker,) = children(process.pid)
    os.kill(worker, signal.SIGKILL)
    down = wait_for(lambda: (r := httpx.get(url + "/health")).status_code == 503 and r, timeout=10)
    assert down.json()["status"] == "degraded" and down.json()["workers_up"] == 0
    assert down.json()["error_type"] == "unhealthy"
    wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=120)
    assert httpx.post(url + "/embed", json={"inputs": "back"}).status_code == 200
    assert metric(url, "fastenc_worker_deaths_total", worker="0") == 1
    assert metric(url, "fastenc_worker_restarts_total", worker="0") == 1
    assert "worker 0 (cpu) died (killed by SIGKILL); restarting it" in log.read_text()


# ------------------------------------------------------------------------- the connection limits, the key
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(minilm_path, tmp_path_factory):
    """MiniLM behind an API key, one CORS origin, short timeouts and small caps."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    with serving("--model", str(minilm_path), "--api-key", KEY, "--cors-allow-origin", "https://app.example",
                 "--header-timeout", "1", "--body-timeout", "1", "--write-timeout", "1", "--keep-alive-timeout", "1",
                 "--max-connections", "10", "--max-response-bytes", "12000000", log_path=log) as (url, process):
        yield url, process, log


def test_idle_and_slow_head_connections_are_closed(guarded):
    url, _, _ = guarded
    start = time.monotonic()
    assert raw_exchange(url, b"", read_timeout=10) == b""  # sends nothing: closed by the server
    assert time.monotonic() - start < 5
    partial = raw_exchange(url, b"POST /embed HTTP/1.1\r\nHost: x\r\n", read_timeout=10)
    assert partial.startswith(b"HTTP/1.1 408 "), partial[:100]
    assert metric(url, "fastenc_connections_dropped_total", AUTH, reason="header_timeout") >= 1


def test_connections_past_the_cap_are_refused_at_once(guarded):
    url, _, _ = guarded
    host, port = url.removeprefix("http://").rsplit(":", 1)
    held = [socket.create_connection((host, int(port))) for _ in range(10)]
    try:
        time.sleep(0.2)
        refused = raw_exchange(url, b"", read_timeout=5)
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
        assert b"limit of 10 connections" in refused
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=10)


def test_a_client_that_never_reads_is_dropped(guarded):
    """An answer of ~8 MB to a client that reads nothing: the server gives up after the write timeout and
    frees the connection (the client gets a cut answer), instead of holding it until the client leaves."""
    url, _, _ = guarded
    body = b'{"inputs": ' + str(["word " * 300] * 8).replace("'", '"').encode() + b', "truncate": true}'
    request = (b"POST /embed_all HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(request)
        wait_for(lambda: metric(url, "fastenc_connections_dropped_total", AUTH, reason="write_timeout") >= 1, timeout=60)
        sock.settimeout(10)
        received = b""
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    length = int(re.search(rb"content-length: (\d+)", received).group(1))
    assert len(received) < length  # cut: the server dropped the connection


def test_per_token_answers_are_bounded(guarded):
    url, _, _ = guarded
    # tokenizing 900,000 tokens takes seconds on a busy two-core machine: more than httpx's default 5 s
    too_big = httpx.post(url + "/embed_all", headers=AUTH, json={"inputs": ["word " * 300] * 16, "truncate": True},
                         timeout=120)
    assert too_big.status_code == 413 and "--max-response-bytes" in too_big.json()["error"], too_big.text
    tokens = httpx.post(url + "/tokenize", headers=AUTH, json={"inputs": "a b c " * 300_000}, timeout=120)
    assert tokens.status_code == 413 and "tokens" in tokens.json()["error"]


def test_a_body_that_does_not_arrive_is_408(guarded):
    url, _, _ = guarded
    head = (b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
    answer = raw_exchange(url, head, read_timeout=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]


def test_the_api_key_guards_every_route_but_health(guarded):
    import openai

    url, _, _ = guarded
    for method, route in (("POST", "/embed"), ("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("GET", "/info"),
                          ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/rerank"), ("GET", "/nope")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, url + route, json={"inputs": "a"}, headers=headers)
            assert response.status_code == 401, (route, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/embed", json={"inputs": "a"}, headers=AUTH).status_code == 200
    assert httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(input="a", model="m")
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).embeddings.create(input="a", model="m")
    assert len(ok.data[0].embedding) == 384


def test_cors_answers_the_configured_origin_only(guarded):
    url, _, _ = guarded
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(url + "/embed", headers={"Origin": "https://app.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(url + "/embed", headers={"Origin": "https://evil.example", **preflight})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    call = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Origin": "https://app.example", **AUTH})
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == "https://app.example"


def test_request_ids_access_log_and_no_server_header(guarded):
    url, _, log = guarded
    given = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"X-Request-Id": "trace-42", **AUTH})
    assert given.headers["x-request-id"] == "trace-42" and "server" not in given.headers
    made = httpx.get(url + "/health")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"]) and "server" not in made.headers
    unsafe = httpx.get(url + "/health", headers={"X-Request-Id": "a b\tc"})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    wait_for(lambda: 'POST /embed HTTP/1.1" 200' in log.read_text() and "request_id=trace-42" in log.read_text(),
             timeout=10)


def test_openapi_describes_every_route(guarded):
    url, _, _ = guarded
    document = httpx.get(url + "/openapi.json", headers=AUTH).json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for route in ("/embed", "/v1/embeddings", "/embed_all", "/embed_sparse", "/predict", "/rerank", "/tokenize"):
        operation = paths[route]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components/")
        assert {"200", "401", "415", "422", "429"} <= set(operation["responses"]), route
    assert set(paths) >= {"/info", "/health", "/metrics"} and "security" not in paths["/health"]["get"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_a_public_address_without_a_key_warns(minilm_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTENC_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "fastenc", "serve", "--host", "0.0.0.0", "--port", "0",
                                "--model", str(minilm_path)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               env=env, text=True)
    try:
        line = process.stderr.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert line.startswith("fastenc serve: warning: listening on http://0.0.0.0:") and "without an API key" in line


# ---------------------------------------------------------------------------- two workers on one queue
PAIR_TEXTS = ["the cat sat", "a", "dogs and cats and birds " * 4, "hello world", "x y z", "one two three four",
              "a longer sentence about the weather in the mountains " * 2, "fin"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny cross-encoder served by two CPU worker processes of one thread, batches of at most 48 tokens
    (so requests spread over batches and workers)."""
    path = make_checkpoint(tmp_path_factory.mktemp("ce"), "bert", head="sequence_classification", num_labels=1, seed=9)
    with serving("--model", str(path), "--workers", "2", "--max-batch-tokens", "48",
                 log_path=path / "server.log") as (url, process):
        yield url, process, path


def test_two_workers_serve_one_queue_in_order(pair):
    url, process, path = pair
    assert len(children(process.pid)) == 2
    info = httpx.get(url + "/info").json()
    assert info["devices"] == ["cpu", "cpu"]
    encoder = fastenc.Encoder.from_pretrained(path)
    expected = dict(zip(PAIR_TEXTS, encoder.embed(PAIR_TEXTS, normalize=True)))  # TEI normalizes by default
    rng = random.Random(1)
    plan = [rng.sample(PAIR_TEXTS, 3) for _ in range(24)]

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=24)) as http:
            return await asyncio.gather(*(http.post(url + "/embed", json={"inputs": texts}) for texts in plan))

    for texts, response in zip(plan, asyncio.run(run())):
        assert response.status_code == 200, response.text
        torch.testing.assert_close(torch.tensor(response.json()), torch.stack([expected[t] for t in texts]),
                                   rtol=0, atol=1e-5)
    assert metric(url, "fastenc_worker_batches_total", worker="0") > 0
    assert metric(url, "fastenc_worker_batches_total", worker="1") > 0


def test_the_rerank_query_is_named_when_it_is_at_fault(pair):
    url, _, _ = pair
    response = httpx.post(url + "/rerank", json={"query": "what " * 200, "texts": ["a", "b"]})
    assert response.status_code == 422
    assert re.fullmatch(r"`query` has \d+ tokens: with any text the pair is over the limit of \d+ tokens "
                        r"\(truncation is off\)", response.json()["error"]), response.text
    bad = httpx.post(url + "/predict", content=b'{"inputs": [["a", "b\\ud800"]]}',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "TextEncodeInput" not in bad.text


def test_schemathesis_finds_no_server_error(pair, tmp_path):
    """The OpenAPI document fuzzed, bounded: a fixed seed and a few examples per operation."""
    url, _, _ = pair
    command = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks",
               "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
               "--max-examples", "6", "--seed", "7", "--phases", "examples,fuzzing", "--workers", "1",
               "--request-timeout", "30", "--max-time", "10", "--report-dir", str(tmp_path), "--no-color"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache too
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_a_worker_killed_under_load_fails_its_requests_and_restarts(pair):
    """Worker 0 is frozen (SIGSTOP) while 8 clients keep sending, so it holds a batch, then killed: that
    batch's requests are answered 503 with a message, the others by worker 1; /health says degraded
    until worker 0 is back; /metrics counts the death and the restart; no request hangs."""
    url, process, _ = pair
    first = children(process.pid)
    victim = first[0]
    stop = [False]
    codes, messages = [], []

    async def client(http):
        while not stop[0]:
            response = await http.post(url + "/embed", json={"inputs": random.sample(PAIR_TEXTS, 2)})
            codes.append(response.status_code)
            if response.status_code != 200:
                messages.append(response.json()["error"])

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=8)) as http:
            clients = [asyncio.ensure_future(client(http)) for _ in range(8)]
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGSTOP)
            await asyncio.sleep(1.0)  # worker 0's thread sends it a batch and waits
            os.kill(victim, signal.SIGKILL)
            health = []
            for _ in range(40):
                health.append((await http.get(url + "/health")).json())
                if health[-1]["status"] == "degraded":
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            stop[0] = True
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            return health

    health = asyncio.run(run())
    assert set(codes) <= {200, 503} and codes.count(200) > 10, codes
    assert messages and all(re.fullmatch(r"the model worker 0 \(cpu\) died while running this request \(killed by "
                                         r"SIGKILL\); it is being restarted: retry the request", m) for m in messages)
    assert health[-1] == {"status": "degraded", "workers": 2, "workers_up": 1}
    wait_for(lambda: httpx.get(url + "/health").json()["status"] == "ok", timeout=120)
    assert metric(url, "fastenc_worker_deaths_total", worker="0") == 1
    assert metric(url, "fastenc_worker_restarts_total", worker="0") == 1
    assert metric(url, "fastenc_workers_up") == 2
    now = children(process.pid)
    assert len(now) == 2 and victim not in now
    assert httpx.post(url + "/embed", json={"inputs": PAIR_TEXTS}).status_code == 200
