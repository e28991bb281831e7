"""``fastenc serve`` as users run it: a subprocess on a free loopback port, spoken to with httpx and with the
official ``openai`` client. Answers are checked against ``embed()`` and the text-classification pipeline in
this process; the bad-input cases each with their status and message; 429s, disconnects and SIGTERM."""

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

import fastenc

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 180  # seconds: importing torch and loading on a busy 2-core machine


@contextlib.contextmanager
def serving(*args, log_path: Path):
    """``fastenc serve --port 0 ARGS`` until the block ends (SIGTERM); yields (base URL, process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "fastenc", "serve", "--port", "0", *args],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while url is None:
            found = re.search(r"listening on (http://\S+)", log_path.read_text())
            if found:
                url = found.group(1)
            elif process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fastenc serve did not start:\n{log_path.read_text()}")
            else:
                time.sleep(0.1)
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def metric(url: str, name: str, **labels) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


TEXTS = ["Welcome to NYC", "a", "the quick brown fox jumps over the lazy dog " * 3, "Hello, world!",
         "serving embeddings over HTTP, batched " * 6, "x y z", "Ünïcödé and emoji 🙂 survive", "one more"]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return fastenc.Encoder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def server(minilm_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving("--model", str(minilm_path), log_path=log) as (url, _):
        yield url


# ------------------------------------------------------------------------------------------- the routes
def test_embed_matches_embed(server, minilm):
    response = httpx.post(server + "/embed", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(torch.tensor(response.json()), minilm.embed(TEXTS), rtol=0, atol=2e-6)
    single = httpx.post(server + "/embed", json={"inputs": "Welcome to NYC", "normalize": False}).json()
    assert len(single) == 1  # TEI answers a list of vectors, also for one text
    torch.testing.assert_close(torch.tensor(single[0]), minilm.embed("Welcome to NYC", normalize=False),
                               rtol=0, atol=2e-6)


def test_embed_truncates_when_asked_and_cuts_dimensions(server, minilm):
    long = "word " * 400
    response = httpx.post(server + "/embed", json={"inputs": [long], "truncate": True})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(torch.tensor(response.json()[0]), minilm.embed(long), rtol=0, atol=2e-6)
    cut = httpx.post(server + "/embed", json={"inputs": ["Welcome to NYC"], "dimensions": 64}).json()[0]
    full = minilm.embed("Welcome to NYC", normalize=False)[:64]
    torch.testing.assert_close(torch.tensor(cut), full / full.norm(), rtol=0, atol=2e-6)


def test_openai_client(server, minilm):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0)
    result = client.embeddings.create(input=TEXTS[:3], model="all-MiniLM-L6-v2")  # the client asks for base64
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == "all-MiniLM-L6-v2"
    expected = minilm.embed(TEXTS[:3])
    torch.testing.assert_close(torch.tensor([d.embedding for d in result.data]), expected, rtol=0, atol=2e-6)
    tokens = sum(len(e.ids) for e in minilm._encode(TEXTS[:3], None, True))
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    floats = client.embeddings.create(input="Welcome to NYC", model="m", encoding_format="float", dimensions=32)
    cut = minilm.embed("Welcome to NYC", normalize=False)[:32]
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), cut / cut.norm(), rtol=0, atol=2e-6)
    with pytest.raises(openai.UnprocessableEntityError, match="`input` is an empty string"):
        client.embeddings.create(input="", model="m")


def test_openai_base64_is_little_endian_float32(server, minilm):
    body = httpx.post(server + "/v1/embeddings", json={"input": ["Welcome to NYC"], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vector.copy()), minilm.embed("Welcome to NYC"), rtol=0, atol=2e-6)


def test_tokenize_info_health_metrics(server, minilm):
    tokens = httpx.post(server + "/tokenize", json={"inputs": ["Hello, world!"]}).json()
    assert tokens[0][0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[0][1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert [t["id"] for t in tokens[0]] == minilm.tokenize("Hello, world!")["input_ids"][0].tolist()
    plain = httpx.post(server + "/tokenize", json={"inputs": "Hello", "add_special_tokens": False}).json()
    assert [t["text"] for t in plain[0]] == ["Hello"]
    info = httpx.get(server + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 32 and info["model_dtype"] == "float32"
    assert httpx.get(server + "/health").status_code == 200
    metrics = httpx.get(server + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric(server, "fastenc_requests_total", route="/embed", status="200") >= 1
    for name in ("fastenc_queue_depth", "fastenc_batch_tokens_bucket", "fastenc_stage_seconds_bucket"):
        assert name in metrics.text


# ------------------------------------------------------------------------------------------- bad input
LONG = "word " * 300  # over MiniLM's 256 tokens


@pytest.mark.parametrize("route, body, status, message", [
    ("/embed", b'{"inputs": ', 422, "malformed JSON in the request body"),
    ("/embed", b'"text"', 422, "the request body must be a JSON object, got a string"),
    ("/embed", {"input": "a"}, 422, "missing field `inputs`"),
    ("/embed", {"inputs": 3}, 422, "`inputs` must be a string or an array of strings, got a number"),
    ("/embed", {"inputs": ["a", 3]}, 422, "`inputs[1]` must be a string, got a number"),
    ("/embed", {"inputs": []}, 422, "`inputs` is empty"),
    ("/embed", {"inputs": ""}, 422, "`inputs` is an empty string"),
    ("/embed", {"inputs": "a", "normalize": "no"}, 422, "`normalize` must be true or false, got a string"),
    ("/embed", {"inputs": ["ok", LONG]}, 422,
     "`inputs`: text 1 has 302 tokens, over the limit of 256 (truncate=False)"),
    ("/embed", {"inputs": ["a"] * 33}, 413, "`inputs` has 33 inputs, over the maximum of 32 per request"),
    ("/embed", {"inputs": "a", "dimensions": 999}, 422,
     "`dimensions` is 999; it must be between 1 and the model's 384"),
    ("/tokenize", {"inputs": {}}, 422, "`inputs` must be a string or an array of strings, got an object"),
    ("/predict", {"inputs": "a"}, 400, "/predict needs a sequence-classification head and this model has none"),
    ("/rerank", {"query": "q", "texts": ["a"]}, 400, "/rerank needs a sequence-classification head"),
    ("/rerank", {"query": "q", "texts": []}, 422, "`texts` is empty"),
])
def test_bad_input(server, route, body, status, message):
    content = body if isinstance(body, bytes) else None
    response = httpx.post(server + route, content=content, json=None if content else body)
    assert response.status_code == status, response.text
    error = response.json()
    assert message in error["error"], error
    assert error["error_type"] == {413: "validation", 422: "validation", 400: "model"}[status]


def test_openai_errors_have_openai_shape(server):
    response = httpx.post(server + "/v1/embeddings", json={"input": [LONG]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert "text 0 has 302 tokens, over the limit of 256" in error["message"] and error["code"] == 422
    response = httpx.post(server + "/v1/embeddings", json={"input": "a", "encoding_format": "int8"})
    assert response.status_code == 422 and "`encoding_format`" in response.json()["error"]["message"]


def test_wrong_method_and_route(server):
    assert httpx.get(server + "/embed").status_code == 405
    assert httpx.post(server + "/nope", json={}).status_code == 404


# ------------------------------------------------------------------------------------------ the load
def test_32_concurrent_clients_are_batched_and_exact(server, minilm):
    """32 clients for a few seconds, texts of mixed lengths, 1 to 3 per request: no error, every answer
    equal to embed() of the same texts, and requests sharing batches."""
    rng = random.Random(0)
    words = "the of a cat sat on mat dog runs far away into woods river city light music data".split()
    pool = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 20, 60, 120]))) for _ in range(48)]
    expected = minilm.embed(pool)
    before = metric(server, "fastenc_batch_requests_count"), metric(server, "fastenc_batch_requests_sum")
    failures, answers = [], [0]

    async def client(seed: int, http: httpx.AsyncClient, end: float) -> None:
        local = random.Random(seed)
        while time.monotonic() < end:
            rows = local.sample(range(len(pool)), local.randint(1, 3))
            response = await http.post(server + "/embed", json={"inputs": [pool[i] for i in rows]})
            if response.status_code != 200:
                failures.append(response.text)
                continue
            got = torch.tensor(response.json())
            if not torch.allclose(got, expected[rows], rtol=0, atol=2e-6):
                failures.append(f"rows {rows}: max error {(got - expected[rows]).abs().max().item()}")
            answers[0] += 1

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            end = time.monotonic() + 3
            await asyncio.gather(*(client(seed, http, end) for seed in range(32)))

    asyncio.run(main())
    assert not failures, failures[:3]
    assert answers[0] >= 32
    batches = metric(server, "fastenc_batch_requests_count") - before[0]
    requests = metric(server, "fastenc_batch_requests_sum") - before[1]
    assert requests / batches > 1.5, (requests, batches)  # requests rode together


def test_a_client_that_disconnects_leaves_no_work(server, minilm):
    """A request queued behind a long batch whose client gives up never reaches the model."""
    blocker = ["a long passage about nothing in particular " * 30] * 32  # 32 x 256 tokens
    before = (metric(server, "fastenc_sequences_total", task="embed"),
              metric(server, "fastenc_cancelled_sequences_total"))
    with httpx.Client(timeout=120) as patient:
        with httpx.Client(timeout=0.2) as impatient:

            async def both():
                first = asyncio.to_thread(patient.post, server + "/embed", json={"inputs": blocker, "truncate": True})
                task = asyncio.ensure_future(first)
                await asyncio.sleep(0.05)
                with pytest.raises(httpx.TimeoutException):
                    await asyncio.to_thread(impatient.post, server + "/embed",
                                            json={"inputs": [f"gave up {i}" for i in range(32)]})
                return await task

            response = asyncio.run(both())
    assert response.status_code == 200
    deadline = time.monotonic() + 30
    while metric(server, "fastenc_cancelled_sequences_total") - before[1] < 32 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "fastenc_cancelled_sequences_total") - before[1] == 32
    assert metric(server, "fastenc_sequences_total", task="embed") - before[0] == 32  # the blocker's only
    assert httpx.post(server + "/embed", json={"inputs": "still fine"}).status_code == 200


# ------------------------------------------------------------------------------------ limits, shutdown
def test_full_server_answers_429_and_recovers(minilm_path, tmp_path):
    with serving("--model", str(minilm_path), "--max-concurrent-requests", "2", "--max-client-batch-size", "4",
                 "--payload-limit", "20000", log_path=tmp_path / "log") as (url, _):
        body = {"inputs": ["a fairly long text to keep the model busy for a while " * 8] * 4}

        async def flood():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=24)) as http:
                return await asyncio.gather(*(http.post(url + "/embed", json=body) for _ in range(24)))

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        overloaded = next(r for r in responses if r.status_code == 429).json()
        assert overloaded == {"error": "the server is at its limit of 2 concurrent requests; retry later",
                              "error_type": "overloaded"}
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/embed", json={"inputs": "after the storm"}).status_code == 200
        too_big = httpx.post(url + "/embed", json={"inputs": ["x" * 30000]})
        assert too_big.status_code == 413 and "over the limit of 20000" in too_big.json()["error"]
        assert metric(url, "fastenc_requests_total", route="/embed", status="429") == codes.count(429)


def test_sigterm_finishes_the_requests_in_flight(minilm_path, minilm, tmp_path):
    texts = [f"request {i}: " + "some words to embed here " * 10 for i in range(8)]
    with serving("--model", str(minilm_path), log_path=tmp_path / "log") as (url, process):

        async def run():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as http:
                tasks = [asyncio.ensure_future(http.post(url + "/embed", json={"inputs": [text] * 8}))
                         for text in texts]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # until the server holds all 8 (answered or in flight)
                    text = (await http.get(url + "/metrics")).text
                    held = sum(float(m.group(1)) for m in re.finditer(
                        r'^fastenc_requests_(?:in_flight|total\{route="/embed",status="200"\}) (\S+)$', text, re.M))
                    if held >= 8:
                        break
                    await asyncio.sleep(0.005)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(run())
        assert process.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises the signal once it is done
        assert "fastenc serve: stopped (every request in flight was answered)" in (tmp_path / "log").read_text()
        assert [r.status_code for r in responses] == [200] * 8
        expected = minilm.embed(texts)
        for response, vector in zip(responses, expected):
            torch.testing.assert_close(torch.tensor(response.json()), vector.expand(8, -1), rtol=0, atol=2e-6)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")


# --------------------------------------------------------------------------------- cross-encoder routes
@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("rerank"), "bert", head="sequence_classification", seed=7,
                           num_labels=1)
    with serving("--model", str(path), log_path=path / "server.log") as (url, _):
        yield url, fastenc.pipeline("text-classification", str(path))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_rerank_scores_pairs_like_the_pipeline(reranker):
    url, pipe = reranker
    query, texts = "what is a cat", ["a cat is an animal", "stocks fell", "cats purr", "the weather"]
    response = httpx.post(url + "/rerank", json={"query": query, "texts": texts, "raw_scores": True,
                                                 "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    logits = [p["score"] for p in pipe([{"text": query, "text_pair": t} for t in texts], function_to_apply="none")]
    assert [r["index"] for r in ranks] == sorted(range(4), key=lambda i: logits[i], reverse=True)
    for rank in ranks:
        assert list(rank) == ["index", "text", "score"] and rank["text"] == texts[rank["index"]]
        assert abs(rank["score"] - logits[rank["index"]]) < 1e-5
    squashed = httpx.post(url + "/rerank", json={"query": query, "texts": texts}).json()
    for rank in squashed:
        assert "text" not in rank and abs(rank["score"] - sigmoid(logits[rank["index"]])) < 1e-5


def test_predict_texts_and_pairs(reranker):
    url, pipe = reranker
    one = httpx.post(url + "/predict", json={"inputs": "a cat"}).json()
    expected = pipe("a cat", function_to_apply="none")[0]
    assert one == [{"score": pytest.approx(sigmoid(expected["score"]), abs=1e-5), "label": expected["label"]}]
    pair = httpx.post(url + "/predict", json={"inputs": ["a cat", "an animal"], "raw_scores": True}).json()
    logit = pipe({"text": "a cat", "text_pair": "an animal"}, function_to_apply="none")["score"]
    assert len(pair) == 1 and abs(pair[0]["score"] - logit) < 1e-5
    batch = httpx.post(url + "/predict", json={"inputs": [["a cat"], ["a cat", "an animal"]], "raw_scores": True})
    assert [len(row) for row in batch.json()] == [1, 1]
    assert abs(batch.json()[1][0]["score"] - logit) < 1e-5
    too_long = httpx.post(url + "/predict", json={"inputs": [["word " * 50, "word " * 50]]})
    assert too_long.status_code == 422
    assert re.fullmatch(rf"input 0 has \d+ tokens, over the limit of {pipe.max_length} \(truncate=false\)",
                        too_long.json()["error"])
    cut = httpx.post(url + "/predict", json={"inputs": [["word " * 50, "word " * 50]], "truncate": True})
    assert cut.status_code == 200
    assert httpx.get(url + "/info").json()["model_type"] == {"reranker": {"id2label": {"0": "negative"},
                                                                           "label2id": {"negative": 0}}}


# ------------------------------------------------------------------------------------ Triton, bitwise
def test_triton_backend_answers_are_bitwise_embed(tmp_path):
    """On the Triton backend (the interpreter here) a text's vector is embed()'s bit for bit, whatever
    else shares its batch."""
    path = make_checkpoint(tmp_path / "bert", "bert", seed=4)
    texts = ["the cat sat", "a", "dogs and cats and birds " * 4, "hello world", "x y z", "one two three four"]
    with serving("--model", str(path), "--backend", "triton", log_path=tmp_path / "log") as (url, _):

        async def run():
            async with httpx.AsyncClient(timeout=300) as http:
                return await asyncio.gather(*(http.post(url + "/v1/embeddings", json={
                    "input": [text], "encoding_format": "base64"}) for text in texts))

        responses = asyncio.run(run())
        shared = metric(url, "fastenc_batch_requests_sum") > metric(url, "fastenc_batch_requests_count")
    encoder = fastenc.Encoder.from_pretrained(path, backend="triton")
    for text, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        got = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
        assert torch.equal(torch.from_numpy(got.copy()), encoder.embed(text, normalize=True)), text
    assert shared  # at least one batch held more than one request
