"""``fastenc serve`` as users run it: a subprocess on a free loopback port, spoken to with httpx and with the
official ``openai`` client. Answers are checked against the Python API in this process (``embed()`` with and
without ``prompt_name``, ``embed_tokens``, ``embed_sparse``, the text-classification and rerank pipelines);
the bad-input cases each with their status and message; 429s, disconnects and SIGTERM."""

import asyncio
import base64
import contextlib
import json
import math
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
from checkpoints import PROMPTS, make_checkpoint, make_sparse_encoder, minilm_with_prompts

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
    tokens = sum(len(e.ids) for e in minilm.text.encode(TEXTS[:3]))
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
    assert info["routes"] == ["/embed", "/embed_all", "/tokenize", "/v1/embeddings"]
    assert info["prompts"] == [] and info["default_prompt_name"] is None
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
     "`inputs`: text 1 has 302 tokens, over the limit of 256 (truncation is off)"),
    ("/embed", {"inputs": ["a"] * 33}, 413, "`inputs` has 33 inputs, over the maximum of 32 per request"),
    ("/embed", {"inputs": "a", "dimensions": 999}, 422,
     "`dimensions` is 999; it must be between 1 and the model's 384"),
    ("/tokenize", {"inputs": {}}, 422, "`inputs` must be a string or an array of strings, got an object"),
    ("/predict", {"inputs": "a"}, 400, "/predict needs a sequence-classification head and this model has none"),
    ("/rerank", {"query": "q", "texts": ["a"]}, 400, "/rerank needs a sequence-classification head"),
    ("/rerank", {"query": "q", "texts": []}, 422, "`texts` is empty"),
    ("/embed_sparse", {"inputs": "a"}, 400,
     "/embed_sparse needs a masked-language-model head (a SPLADE checkpoint) or BGE-M3's sparse head, and this model has neither (heads: pooler)"),
    ("/embed_all", {"inputs": []}, 422, "`inputs` is empty"),
    ("/embed_all", {"inputs": ["ok", LONG]}, 422,
     "`inputs`: text 1 has 302 tokens, over the limit of 256 (truncation is off)"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, 422,
     "prompt_name 'query' is not one of this checkpoint's prompts (config_sentence_transformers.json): none"),
])
def test_bad_input(server, route, body, status, message):
    content = body if isinstance(body, bytes) else None
    headers = {"content-type": "application/json"} if content else None
    response = httpx.post(server + route, content=content, json=None if content else body, headers=headers)
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
    """A cross-encoder (one label) whose config_sentence_transformers.json names tanh as its activation_fn, as
    CrossEncoder saves one: /rerank scores with it (TEI would take a sigmoid), /predict keeps TEI's sigmoid."""
    path = make_checkpoint(tmp_path_factory.mktemp("rerank"), "bert", head="sequence_classification", seed=7,
                           num_labels=1)
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"activation_fn": "torch.nn.modules.activation.Tanh"}))
    with serving("--model", str(path), log_path=path / "server.log") as (url, _):
        yield url, fastenc.pipeline("text-classification", str(path)), fastenc.pipeline("rerank", str(path))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


QUERY, DOCUMENTS = "what is a cat", ["a cat is an animal", "stocks fell", "cats purr", "the weather", "a cat"]


@pytest.mark.parametrize("raw_scores", [False, True])
def test_rerank_is_the_rerank_pipeline(reranker, raw_scores):
    url, _, rerank = reranker
    response = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": raw_scores,
                                                 "return_text": True})
    assert response.status_code == 200, response.text
    ranks, expected = response.json(), rerank(QUERY, DOCUMENTS, return_text=True, raw_scores=raw_scores)
    assert [r["index"] for r in ranks] == [r["index"] for r in expected]
    for rank, theirs in zip(ranks, expected):
        assert list(rank) == ["index", "text", "score"] and rank["text"] == theirs["text"]  # TEI's key order
        assert abs(rank["score"] - theirs["score"]) < 1e-5
    plain = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCUMENTS}).json()
    logits = {r["index"]: r["score"] for r in rerank(QUERY, DOCUMENTS, raw_scores=True)}
    for rank in plain:  # the checkpoint's tanh, not a sigmoid
        assert list(rank) == ["index", "score"] and abs(rank["score"] - math.tanh(logits[rank["index"]])) < 1e-5


def test_rerank_truncates_as_the_pipeline(reranker):
    url, _, rerank = reranker
    texts = ["a cat", "the cat sat on the mat " * 20]  # the second pair is over the model's 96 positions
    refused = httpx.post(url + "/rerank", json={"query": QUERY, "texts": texts})
    assert refused.status_code == 422
    assert re.fullmatch(r"`texts`: input 1 has \d+ tokens, over the limit of 96 \(truncation is off\)",
                        refused.json()["error"]), refused.json()
    cut = httpx.post(url + "/rerank", json={"query": QUERY, "texts": texts, "truncate": True})
    assert cut.status_code == 200, cut.text
    expected = rerank(QUERY, texts)  # truncation=True: cut to the cross-encoder's length
    assert [r["index"] for r in cut.json()] == [r["index"] for r in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(cut.json(), expected))


def test_predict_texts_and_pairs(reranker):
    url, pipe, _ = reranker
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
    assert re.fullmatch(rf"input 0 has \d+ tokens, over the limit of {pipe.max_length} \(truncation is off\)",
                        too_long.json()["error"])
    cut = httpx.post(url + "/predict", json={"inputs": [["word " * 50, "word " * 50]], "truncate": True})
    assert cut.status_code == 200
    info = httpx.get(url + "/info").json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "negative"}, "label2id": {"negative": 0}}}
    assert info["routes"] == ["/embed", "/embed_all", "/predict", "/rerank", "/tokenize", "/v1/embeddings"]


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
        cut = {(dim, normalize): httpx.post(url + "/embed", timeout=300, json={
            "inputs": texts, "dimensions": dim, "normalize": normalize}) for dim in (None, 16) for normalize in (True, False)}
    encoder = fastenc.Encoder.from_pretrained(path, backend="triton")
    for text, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        got = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
        assert torch.equal(torch.from_numpy(got.copy()), encoder.embed(text, normalize=True)), text
    assert shared  # at least one batch held more than one request
    for (dim, normalize), response in cut.items():  # TEI's dimensions and normalize: embed(dim=, normalize=)
        assert response.status_code == 200, response.text
        expected = encoder.embed(texts, dim=dim, normalize=normalize)
        assert torch.equal(torch.tensor(response.json(), dtype=torch.float32), expected), (dim, normalize)


# ------------------------------------------------------------------------------- prompts and token vectors
@pytest.fixture(scope="module")
def prompted(minilm_path, tmp_path_factory):
    """MiniLM with prompts: "query" by default, and every prompt's tokens left out of the pooling
    (include_prompt: false), so each prompt changes both the tokens and the pooled slice."""
    path = minilm_with_prompts(minilm_path, tmp_path_factory.mktemp("prompted") / "minilm", default="query",
                               include_prompt=False)
    with serving("--model", str(path), log_path=path.parent / "server.log") as (url, _):
        yield url, fastenc.Encoder.from_pretrained(path)


@pytest.mark.parametrize("prompt_name", [None, "query", "passage", "empty"])
def test_prompt_name_is_embeds(prompted, prompt_name):
    url, encoder = prompted
    response = httpx.post(url + "/embed", json={"inputs": TEXTS, "prompt_name": prompt_name})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(torch.tensor(response.json()), encoder.embed(TEXTS, prompt_name=prompt_name),
                               rtol=0, atol=2e-6)


def test_requests_with_different_prompts_and_routes_share_batches(prompted):
    """24 requests at once, each with its own prompt (or none: the default) on /embed or /embed_all: each
    answer is the Python API's for its prompt, and requests rode together."""
    url, encoder = prompted
    names = [None, "query", "passage", "empty"]
    rng = random.Random(3)
    plan = [(names[i % 4], "/embed_all" if i % 3 == 0 else "/embed", rng.sample(TEXTS, 2)) for i in range(24)]
    vectors = {name: dict(zip(TEXTS, encoder.embed(TEXTS, prompt_name=name))) for name in names}
    tokens = {name: dict(zip(TEXTS, encoder.embed_tokens(TEXTS, prompt_name=name))) for name in names}
    before = metric(url, "fastenc_batch_requests_count"), metric(url, "fastenc_batch_requests_sum")

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=24)) as http:
            return await asyncio.gather(*(http.post(url + route, json={"inputs": texts, "prompt_name": name})
                                          for name, route, texts in plan))

    for (name, route, texts), response in zip(plan, asyncio.run(run())):
        assert response.status_code == 200, response.text
        if route == "/embed":
            expected = torch.stack([vectors[name][text] for text in texts])
            torch.testing.assert_close(torch.tensor(response.json()), expected, rtol=0, atol=2e-6)
        else:
            for got, text in zip(response.json(), texts):
                torch.testing.assert_close(torch.tensor(got), tokens[name][text], rtol=1e-5, atol=1e-5)
    batches = metric(url, "fastenc_batch_requests_count") - before[0]
    requests = metric(url, "fastenc_batch_requests_sum") - before[1]
    assert requests == 24 and batches < requests  # some batch held several requests (prompts, routes)


def test_openai_prompt_name(prompted):
    """OpenAI's route takes ``prompt_name`` too (the client sends it with ``extra_body``); usage counts the
    prompt's tokens, as they are computed."""
    import openai

    url, encoder = prompted
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0)
    texts = TEXTS[:3]
    passage = client.embeddings.create(input=texts, model="m", extra_body={"prompt_name": "passage"})
    torch.testing.assert_close(torch.tensor([d.embedding for d in passage.data]),
                               encoder.embed(texts, prompt_name="passage"), rtol=0, atol=2e-6)
    prompted_texts = [PROMPTS["passage"] + text for text in texts]
    assert passage.usage.prompt_tokens == sum(len(e.ids) for e in encoder.text.encode(prompted_texts))
    default = client.embeddings.create(input=texts, model="m")  # the checkpoint's default prompt, "query"
    torch.testing.assert_close(torch.tensor([d.embedding for d in default.data]), encoder.embed(texts),
                               rtol=0, atol=2e-6)
    with pytest.raises(openai.UnprocessableEntityError, match="prompt_name 'doc' is not one of"):
        client.embeddings.create(input=texts, model="m", extra_body={"prompt_name": "doc"})


def test_embed_all_is_embed_tokens(prompted):
    url, encoder = prompted
    for prompt_name in (None, "passage"):
        response = httpx.post(url + "/embed_all", json={"inputs": TEXTS, "prompt_name": prompt_name})
        assert response.status_code == 200, response.text
        expected = encoder.embed_tokens(TEXTS, prompt_name=prompt_name)
        assert [len(tokens) for tokens in response.json()] == [len(tokens) for tokens in expected]
        for got, tokens in zip(response.json(), expected):
            torch.testing.assert_close(torch.tensor(got), tokens, rtol=1e-5, atol=1e-5)
    one = httpx.post(url + "/embed_all", json={"inputs": "Welcome to NYC", "prompt_name": "empty"}).json()
    torch.testing.assert_close(torch.tensor(one[0]), encoder.embed_tokens("Welcome to NYC", prompt_name="empty"),
                               rtol=1e-5, atol=1e-5)
    cut = httpx.post(url + "/embed_all", json={"inputs": [LONG], "truncate": True}).json()
    assert torch.tensor(cut[0]).shape == (256, 384)


def test_tokenize_and_info_with_prompts(prompted):
    url, encoder = prompted
    tokens = httpx.post(url + "/tokenize", json={"inputs": "Hello", "prompt_name": "query"}).json()[0]
    assert [t["id"] for t in tokens] == encoder.tokenize("query: Hello")["input_ids"][0].tolist()
    assert tokens[1] == {"id": tokens[1]["id"], "text": "query", "special": False, "start": 0, "stop": 5}
    info = httpx.get(url + "/info").json()
    assert info["prompts"] == ["query", "passage", "empty"] and info["default_prompt_name"] == "query"
    assert info["routes"] == ["/embed", "/embed_all", "/tokenize", "/v1/embeddings"]


@pytest.mark.parametrize("route", ["/embed", "/embed_all", "/tokenize", "/v1/embeddings"])
def test_bad_prompt_name(prompted, route):
    url, _ = prompted
    field = "input" if route == "/v1/embeddings" else "inputs"

    def error(body):
        response = httpx.post(url + route, json={field: "x", **body})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        return error["message"] if route == "/v1/embeddings" else error

    assert error({"prompt_name": "doc"}) == ("prompt_name 'doc' is not one of this checkpoint's prompts "
                                             "(config_sentence_transformers.json): 'query', 'passage', 'empty'")
    assert error({"prompt_name": 3}) == "`prompt_name` must be a string, got a number"


# ----------------------------------------------------------------------------------------- SPLADE vectors
SPARSE_TEXTS = ["the cat sat on the mat", "a", "paris is the capital of france " * 3, "hello world"]


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    """A tiny SparseEncoder checkpoint (max pooling, log1p_relu, max_active_dims 12) with a query prompt."""
    path = make_sparse_encoder(tmp_path_factory.mktemp("splade") / "bert", "bert", "max", "log1p_relu",
                               layout="current", max_active_dims=12, seed=3)
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": "where is the ", "document": ""}
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    with serving("--model", str(path), log_path=path.parent / "server.log") as (url, _):
        yield url, fastenc.Encoder.from_pretrained(path)


def sparse_rows(answer: list, vocab_size: int) -> torch.Tensor:
    """TEI's sparse answer (per input ``[{"index", "value"}]``) as a dense ``(n, vocab)`` tensor."""
    dense = torch.zeros(len(answer), vocab_size)
    for row, words in enumerate(answer):
        assert all(list(word) == ["index", "value"] and word["value"] > 0 for word in words)
        indices = [word["index"] for word in words]
        assert indices == sorted(set(indices))  # each active word once, in increasing order
        dense[row, indices] = torch.tensor([word["value"] for word in words])
    return dense


@pytest.mark.parametrize("top_k, prompt_name, active", [(None, None, 12), (5, "query", 5), (10_000, None, None)])
def test_embed_sparse_is_embed_sparse(splade, top_k, prompt_name, active):
    """The checkpoint's max_active_dims by default, ``top_k`` when given (past the vocabulary: every active
    word), the prompt prepended: as embed_sparse()."""
    url, encoder = splade
    response = httpx.post(url + "/embed_sparse", json={"inputs": SPARSE_TEXTS, "top_k": top_k,
                                                       "prompt_name": prompt_name})
    assert response.status_code == 200, response.text
    got = sparse_rows(response.json(), encoder.config.vocab_size)
    expected = encoder.embed_sparse(SPARSE_TEXTS, top_k=top_k, prompt_name=prompt_name).to_dense()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    counts = (got > 0).sum(1)
    assert (counts == (expected > 0).sum(1)).all()
    assert (counts == active).all() if active else (counts > 12).all()
    one = httpx.post(url + "/embed_sparse", json={"inputs": "hello world"}).json()
    torch.testing.assert_close(sparse_rows(one, encoder.config.vocab_size)[0],
                               encoder.embed_sparse("hello world").to_dense(), rtol=1e-5, atol=1e-6)


def test_splade_checkpoint_routes_and_errors(splade):
    url, encoder = splade
    refused = httpx.post(url + "/embed", json={"inputs": "x"})
    assert refused.status_code == 400 and refused.json() == {
        "error": "this checkpoint is a sentence-transformers SparseEncoder (SPLADE): its vectors come from "
                 "/embed_sparse", "error_type": "model"}
    assert httpx.post(url + "/v1/embeddings", json={"input": "x"}).json()["error"]["code"] == 400
    tokens = httpx.post(url + "/embed_all", json={"inputs": ["the cat sat"]})
    assert tokens.status_code == 200, tokens.text
    torch.testing.assert_close(torch.tensor(tokens.json()[0]), encoder.embed_tokens("the cat sat"), rtol=1e-5,
                               atol=1e-5)
    info = httpx.get(url + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "splade"}}
    assert info["routes"] == ["/embed_all", "/embed_sparse", "/tokenize"]
    for body, message in (({"inputs": "x", "top_k": 0}, "`top_k` must be a positive integer, got 0"),
                          ({"inputs": "x", "top_k": "5"}, "`top_k` must be a positive integer, got '5'"),
                          ({"inputs": "x", "prompt_name": "doc"}, "'query', 'document'"),
                          ({"inputs": ["x"] * 33}, "`inputs` has 33 inputs, over the maximum of 32")):
        response = httpx.post(url + "/embed_sparse", json=body)
        assert response.status_code in (413, 422) and message in response.json()["error"], response.text
