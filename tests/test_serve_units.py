"""The server's pieces on their own, without a server: request validation, the batcher, the worker, and the
app in process (Starlette's TestClient) for what a real server cannot easily show."""

import dataclasses
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint, make_sparse_encoder, minilm_with_prompts

import fastenc
from fastenc.serve import schema
from fastenc.serve.batcher import Batcher, Closed, Job
from fastenc.serve.schema import ServeError
from fastenc.pipelines import RerankPipeline
from fastenc.serve.worker import Worker
from fastenc.tasks import SentenceEmbedding, SequenceScores, SparseEmbedding, TokenEmbeddings

LIMITS = schema.Limits(max_client_batch_size=4, hidden_size=384)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("body, status, message", [
    (b"{", 422, "malformed JSON"),
    (b"\xff\xfe", 422, "malformed JSON"),
    (b"[1, 2]", 422, "must be a JSON object, got an array"),
])
def test_parse_body_errors(body, status, message):
    with pytest.raises(ServeError) as info:
        schema.parse_body(body)
    assert info.value.status == status and message in info.value.message


@pytest.mark.parametrize("body, status, message", [
    ({}, 422, "missing field `inputs`"),
    ({"inputs": 5}, 422, "`inputs` must be a string or an array of strings, got a number"),
    ({"inputs": {"text": "a"}}, 422, "got an object"),
    ({"inputs": []}, 422, "`inputs` is empty"),
    ({"inputs": ""}, 422, "`inputs` is an empty string"),
    ({"inputs": ["a", ""]}, 422, "`inputs[1]` is an empty string"),
    ({"inputs": ["a", None]}, 422, "`inputs[1]` must be a string, got null"),
    ({"inputs": ["a", ["b"]]}, 422, "`inputs[1]` must be a string, got an array"),
    ({"inputs": ["a"] * 5}, 413, "`inputs` has 5 inputs, over the maximum of 4"),
    ({"inputs": "a", "normalize": "yes"}, 422, "`normalize` must be true or false, got a string"),
    ({"inputs": "a", "truncate": 1}, 422, "`truncate` must be true or false, got a number"),
    ({"inputs": "a", "dimensions": 0}, 422, "`dimensions` is 0; it must be between 1 and the model's 384"),
    ({"inputs": "a", "dimensions": 385}, 422, "between 1 and the model's 384"),
    ({"inputs": "a", "dimensions": 2.5}, 422, "`dimensions` must be an integer, got a number"),
])
def test_parse_embed_errors(body, status, message):
    with pytest.raises(ServeError) as info:
        schema.parse_embed(body, LIMITS)
    assert info.value.status == status
    assert message in info.value.message


def test_parse_embed_defaults_follow_tei():
    request = schema.parse_embed({"inputs": "a b"}, LIMITS)
    assert request == schema.EmbedRequest(["a b"], normalize=True, truncate=False, dimensions=None)
    auto = schema.Limits(4, 384, auto_truncate=True)
    assert schema.parse_embed({"inputs": ["x", "y"], "normalize": False}, auto).truncate is True
    assert schema.parse_embed({"inputs": "x", "truncate": False}, auto).truncate is False


@pytest.mark.parametrize("body, message", [
    ({"input": "a", "encoding_format": "int8"}, "`encoding_format` must be \"float\" or \"base64\""),
    ({"input": "a", "model": 3}, "`model` must be a string, got a number"),
    ({"inputs": "a"}, "missing field `input`"),
])
def test_parse_openai_errors(body, message):
    with pytest.raises(ServeError) as info:
        schema.parse_openai_embed(body, LIMITS)
    assert info.value.status == 422 and message in info.value.message


def test_parse_predict_shapes_as_tei_reads_them():
    assert schema.parse_predict({"inputs": "a"}, LIMITS).items == ["a"]
    pair = schema.parse_predict({"inputs": ["q", "t"]}, LIMITS)
    assert pair.items == [("q", "t")] and pair.single
    batch = schema.parse_predict({"inputs": [["a"], ["q", "t"]], "raw_scores": True}, LIMITS)
    assert batch.items == ["a", ("q", "t")] and not batch.single and batch.raw_scores
    for body, message in (({"inputs": ["a", "b", "c"]}, "an array of 3"), ({"inputs": [["a"], "b"]}, "got a string"),
                          ({"inputs": [[]]}, "an array of 0"), ({"inputs": 1}, "got a number")):
        with pytest.raises(ServeError, match=message):
            schema.parse_predict(body, LIMITS)


def test_parse_rerank_errors():
    good = schema.parse_rerank({"query": "q", "texts": ["a", "b"], "return_text": True}, LIMITS)
    assert good.texts == ["a", "b"] and good.return_text and not good.raw_scores
    for body, status, message in (({"texts": ["a"]}, 422, "missing field `query`"),
                                  ({"query": "q", "texts": "a"}, 422, "`texts` must be an array"),
                                  ({"query": "q", "texts": []}, 422, "`texts` is empty"),
                                  ({"query": "", "texts": ["a"]}, 422, "`query` is an empty string"),
                                  ({"query": "q", "texts": ["a"] * 5}, 413, "`texts` has 5 inputs")):
        with pytest.raises(ServeError) as info:
            schema.parse_rerank(body, LIMITS)
        assert info.value.status == status and message in info.value.message


@pytest.mark.parametrize("parse, body, message", [
    (schema.parse_embed, {"inputs": "a", "prompt_name": 3}, "`prompt_name` must be a string, got a number"),
    (schema.parse_openai_embed, {"input": "a", "prompt_name": ["q"]}, "`prompt_name` must be a string, got an array"),
    (schema.parse_embed_all, {"inputs": "a", "prompt_name": True}, "`prompt_name` must be a string, got a boolean"),
    (schema.parse_embed_all, {"inputs": []}, "`inputs` is empty"),
    (schema.parse_embed_all, {"inputs": "a", "truncate": "no"}, "`truncate` must be true or false"),
    (schema.parse_embed_sparse, {"inputs": "a", "top_k": 0}, "`top_k` must be a positive integer, got 0"),
    (schema.parse_embed_sparse, {"inputs": "a", "top_k": True}, "`top_k` must be a positive integer, got True"),
    (schema.parse_embed_sparse, {"inputs": "a", "top_k": 2.0}, "`top_k` must be a positive integer, got 2.0"),
    (schema.parse_embed_sparse, {"top_k": 2}, "missing field `inputs`"),
    (schema.parse_tokenize, {"inputs": "a", "prompt_name": {}}, "`prompt_name` must be a string, got an object"),
])
def test_parse_retrieval_fields_errors(parse, body, message):
    with pytest.raises(ServeError) as info:
        parse(body, LIMITS)
    assert info.value.status == 422 and message in info.value.message


def test_parse_retrieval_fields():
    assert schema.parse_embed({"inputs": "a", "prompt_name": "query"}, LIMITS).prompt_name == "query"
    assert schema.parse_openai_embed({"input": ["a"], "prompt_name": "q"}, LIMITS).prompt_name == "q"
    assert schema.parse_tokenize({"inputs": "a", "prompt_name": None}, LIMITS).prompt_name is None
    assert schema.parse_embed_sparse({"inputs": ["a", "b"], "top_k": 3, "truncate": True}, LIMITS) == \
        schema.EmbedSparseRequest(["a", "b"], truncate=True, prompt_name=None, top_k=3)
    auto = schema.Limits(4, 384, auto_truncate=True)  # TEI's --auto-truncate is the default of truncate
    assert schema.parse_embed_all({"inputs": "a", "prompt_name": "p"}, auto) == schema.EmbedAllRequest(["a"], True, "p")
    assert schema.parse_embed_sparse({"inputs": "a"}, auto).truncate is True
    with pytest.raises(ServeError) as info:
        schema.parse_embed_sparse({"inputs": ["a"] * 5}, LIMITS)
    assert info.value.status == 413


# ---------------------------------------------------------------------------------------------- batcher
def row(n):
    return SimpleNamespace(ids=[1] * n, type_ids=[0] * n)


def job(lengths, task="t", sink=None):
    return Job([row(n) for n in lengths], task, (sink.append if sink is not None else lambda outcome: None))


def test_batches_respect_the_token_budget_first_in_first_out():
    batcher = Batcher(max_batch_tokens=10)
    a, b, c = job([4, 4]), job([3, 5]), job([20])
    for j in (a, b, c):
        batcher.put(j)
    assert batcher.depth == 5
    first = batcher.next_batch()
    assert [(x is a, i) for x, i in first.entries] == [(True, 0), (True, 1)]  # 4 + 4; b's 3 would make 11
    second = batcher.next_batch()
    assert [(x, i) for x, i in second.entries] == [(b, 0), (b, 1)] and second.num_tokens == 8
    third = batcher.next_batch()  # longer than the budget: alone
    assert [(x, i) for x, i in third.entries] == [(c, 0)] and third.num_tokens == 20
    assert batcher.depth == 0 and batcher.next_batch(timeout=0.01) is None


def test_a_job_splits_across_batches_and_finishes_once():
    outcomes = []
    batcher = Batcher(max_batch_tokens=6)
    j = job([3, 3, 3], sink=outcomes)
    batcher.put(j)
    first, second = batcher.next_batch(), batcher.next_batch()
    assert len(first.entries) == 2 and len(second.entries) == 1 and j.started is not None
    for batch, values in ((second, ["c"]), (first, ["a", "b"])):  # any order of completion
        for (x, index), value in zip(batch.entries, values):
            x.deliver(index, value)
    assert outcomes == [["a", "b", "c"]]
    j.fail(RuntimeError("late"))  # a job finishes once
    assert len(outcomes) == 1


def test_batch_size_limit_and_task_groups():
    batcher = Batcher(max_batch_tokens=100, max_batch_size=3)
    x, y, z = job([1], "embed"), job([1], "score"), job([1, 1], "embed")
    for j in (x, y, z):
        batcher.put(j)
    batch = batcher.next_batch()
    assert len(batch.entries) == 3 and batch.num_jobs == 3
    # grouped by task, each group contiguous, in order of first appearance
    assert [(task, first, end) for task, first, end in batch.groups] == [("embed", 0, 2), ("score", 2, 3)]
    assert [e[0] for e in batch.entries] == [x, z, y]
    assert [(e[0], e[1]) for e in batcher.next_batch().entries] == [(z, 1)]


def test_cancelled_jobs_never_reach_a_batch():
    dropped = []
    batcher = Batcher(max_batch_tokens=100, on_cancelled=dropped.append)
    gone, kept = job([2, 2, 2]), job([2])
    batcher.put(gone)
    batcher.put(kept)
    gone.cancel()
    batch = batcher.next_batch()
    assert [e[0] for e in batch.entries] == [kept]
    assert dropped == [3] and batcher.cancelled_sequences == 3 and batcher.depth == 0


def test_close_drains_then_stops_and_refuses_new_jobs():
    batcher = Batcher(max_batch_tokens=4)
    batcher.put(job([3]))
    batcher.put(job([3]))
    batcher.close()
    with pytest.raises(Closed):
        batcher.put(job([1]))
    assert batcher.next_batch() is not None and batcher.next_batch() is not None
    assert batcher.next_batch() is None


def test_next_batch_wakes_up_when_work_arrives():
    batcher = Batcher(max_batch_tokens=8)
    got = []
    thread = threading.Thread(target=lambda: got.append(batcher.next_batch()))
    thread.start()
    time.sleep(0.05)
    batcher.put(job([2]))
    thread.join(5)
    assert not thread.is_alive() and got[0] is not None and got[0].num_tokens == 2


def test_batcher_rejects_bad_limits():
    with pytest.raises(ValueError):
        Batcher(max_batch_tokens=0)


# ----------------------------------------------------------------------------------------------- worker
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("cls"), "bert", head="sequence_classification", seed=5)
    return fastenc.Encoder.from_pretrained(path)


def run_one_batch(encoder, jobs) -> list:
    """Put ``jobs`` (rows, task) in a batcher, check they make one batch, run it; return each job's outcome."""
    batcher = Batcher(max_batch_tokens=100_000)
    outcomes = [[] for _ in jobs]
    for (rows, task), sink in zip(jobs, outcomes):
        batcher.put(Job(rows, task, sink.append))
    batch = batcher.next_batch()
    assert batch.num_jobs == len(jobs) and batcher.depth == 0
    Worker(encoder, batcher, warmup=False).run(batch)
    return [sink[0] for sink in outcomes]


def run_worker(encoder, jobs, max_batch_tokens=10_000):
    """Put ``jobs`` (rows, task) in a batcher, run them as batches of a worker; return each job's outcome."""
    batcher = Batcher(max_batch_tokens)
    outcomes = [[] for _ in jobs]
    for (rows, task), sink in zip(jobs, outcomes):
        batcher.put(Job(rows, task, sink.append))
    batcher.close()
    worker = Worker(encoder, batcher, warmup=False)
    while (batch := batcher.next_batch()) is not None:
        worker.run(batch)
    return [sink[0] for sink in outcomes]


def test_worker_mixes_tasks_in_one_batch_and_matches_embed(classifier):
    texts = ["the cat sat on the mat", "a", "dogs and cats " * 5, "hello world"]
    encodings = classifier.text.encode(texts)
    pipe = fastenc.pipeline("text-classification", classifier)
    pairs = pipe.tokenize([("query", t) for t in texts[:2]], truncation=True)
    outcomes = run_worker(classifier, [
        (encodings[:2], SentenceEmbedding("mean", True)),
        (pairs, SequenceScores()),
        (encodings[2:], SentenceEmbedding("mean", False)),
        (encodings, SentenceEmbedding("cls", True, dim=16)),
    ])
    normalized, raw = classifier.embed(texts, normalize=True), classifier.embed(texts, normalize=False)
    torch.testing.assert_close(torch.stack(outcomes[0]), normalized[:2], rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.stack(outcomes[2]), raw[2:], rtol=0, atol=2e-6)
    cut = classifier.embed(texts, pooling="cls", normalize=False)[:, :16]
    torch.testing.assert_close(torch.stack(outcomes[3]), cut / cut.norm(dim=1, keepdim=True), rtol=0, atol=2e-6)
    expected = pipe([{"text": "query", "text_pair": t} for t in texts[:2]], top_k=None, function_to_apply="none")
    scores = torch.stack(outcomes[1])  # (2, num_labels) logits
    for row_scores, predictions in zip(scores, expected):
        for p in predictions:
            label = next(i for i, name in pipe.id2label.items() if name == p["label"])
            assert abs(float(row_scores[label]) - p["score"]) < 1e-5


def test_worker_fails_the_batch_not_the_server(classifier):
    bad = [SimpleNamespace(ids=[10 ** 9], type_ids=[0])]  # an id no embedding table has
    good = classifier.text.encode(["fine"])
    batcher = Batcher(10_000)
    bad_outcome, good_outcome = [], []
    batcher.put(Job(bad, SentenceEmbedding("mean", True), bad_outcome.append))
    worker = Worker(classifier, batcher, warmup=False)
    worker.start()
    deadline = time.monotonic() + 30
    while not bad_outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.put(Job(good, SentenceEmbedding("mean", True), good_outcome.append))
    batcher.close()
    worker.join(30)
    assert isinstance(bad_outcome[0], Exception)
    assert isinstance(good_outcome[0], list) and good_outcome[0][0].shape == (classifier.config.hidden_size,)


@pytest.fixture(scope="module")
def prompted_minilm(minilm_path, tmp_path_factory):
    path = minilm_with_prompts(minilm_path, tmp_path_factory.mktemp("prompted") / "minilm", include_prompt=False)
    return fastenc.Encoder.from_pretrained(path)


def test_one_batch_mixes_prompts_and_token_vectors(prompted_minilm):
    """Sequences with different prompts (so different pooled slices) and token-vector requests share one
    forward pass; each result is the Python API's for its own prompt."""
    encoder = prompted_minilm
    texts = ["how to bake bread", "a", "knead the dough and let it rise for an hour " * 3]
    jobs, skips = [], {}
    for name in ("query", "passage", "empty"):
        prompt = encoder.text.prompt(name)
        skips[name] = prompt.skip
        jobs.append((encoder.text.encode(prompt.apply(texts)), SentenceEmbedding("mean", True, skip=prompt.skip)))
    jobs.append((encoder.text.encode(encoder.text.prompt("passage").apply(texts)), TokenEmbeddings()))
    assert skips["query"] > 1 and skips["passage"] > skips["query"] and skips["empty"] == 0  # [CLS] + the prompt
    outcomes = run_one_batch(encoder, jobs)
    for outcome, name in zip(outcomes, ("query", "passage", "empty")):
        torch.testing.assert_close(torch.stack(outcome), encoder.embed(texts, prompt_name=name), rtol=0, atol=2e-6)
    for got, expected in zip(outcomes[3], encoder.embed_tokens(texts, prompt_name="passage")):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    path = make_sparse_encoder(tmp_path_factory.mktemp("splade") / "bert", "bert", "sum", "relu", layout="legacy",
                               max_active_dims=9, seed=2)
    return fastenc.Encoder.from_pretrained(path)


def test_sparse_task_is_embed_sparse_in_a_mixed_batch(splade):
    encoder = splade
    texts = ["the cat sat on the mat", "a", "paris is the capital of france " * 2]
    rows = encoder.text.encode(texts)
    default = SparseEmbedding.for_checkpoint(encoder.sentence)
    assert default.top_k == 9  # the checkpoint's max_active_dims
    outcomes = run_one_batch(encoder, [(rows, default), (rows[:2], TokenEmbeddings()),
                                       (rows, dataclasses.replace(default, top_k=4)), (rows, dataclasses.replace(default, top_k=None)),
                                       (rows, SentenceEmbedding("mean", False))])
    for outcome, top_k in zip((outcomes[0], outcomes[2], outcomes[3]), (None, 4, 10_000)):
        expected = encoder.embed_sparse(texts, top_k=top_k).to_dense()
        got = torch.zeros_like(expected)
        for row, (words, values) in enumerate(outcome):
            assert words.dtype == torch.int64 and values.dtype == torch.float32
            assert (words.diff() > 0).all() and (values > 0).all()  # increasing, zeros left out
            got[row, words] = values
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [len(words) for words, _ in outcomes[2]] == [4, 4, 4]
    assert all(len(words) > 9 for words, _ in outcomes[3])  # SparseEmbedding(None): every active word
    for got, expected in zip(outcomes[1], encoder.embed_tokens(texts[:2])):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(outcomes[4]), encoder.embed(texts, pooling="mean", normalize=False),
                               rtol=0, atol=2e-6)


def test_rank_orders_as_cross_encoder_rank():
    """Highest score first, ties in input order (CrossEncoder.rank's stable sort), then the first top_k."""
    scores, texts = [0.5, 0.9, 0.5, 0.9, 0.1], ["a", "b", "c", "d", "e"]
    assert [r["index"] for r in RerankPipeline.rank(scores, texts)] == [1, 3, 0, 2, 4]
    assert RerankPipeline.rank(scores, texts, top_k=3, return_text=True) == [
        {"index": 1, "score": 0.9, "text": "b"}, {"index": 3, "score": 0.9, "text": "d"},
        {"index": 0, "score": 0.5, "text": "a"}]
    assert RerankPipeline.rank([], []) == []


# -------------------------------------------------------------------------------- the app, in process
@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    path = make_checkpoint(tmp_path_factory.mktemp("cls3"), "bert", head="sequence_classification", seed=6)
    encoder = fastenc.Encoder.from_pretrained(path)
    with TestClient(create_app(encoder)) as client:
        yield encoder, client


def test_predict_softmax_over_labels_in_process(three_labels):
    encoder, client = three_labels
    pipe = fastenc.pipeline("text-classification", encoder)
    response = client.post("/predict", json={"inputs": [["good movie"], ["a", "b"]]})
    assert response.status_code == 200, response.text
    expected = pipe(["good movie", {"text": "a", "text_pair": "b"}], top_k=None, function_to_apply="softmax")
    got = response.json()
    assert [[p["label"] for p in row] for row in got] == [[p["label"] for p in row] for row in expected]
    np.testing.assert_allclose([[p["score"] for p in row] for row in got],
                               [[p["score"] for p in row] for row in expected], rtol=0, atol=1e-5)
    raw = client.post("/predict", json={"inputs": "good movie", "raw_scores": True}).json()
    logits = pipe("good movie", top_k=None, function_to_apply="none")
    assert [p["label"] for p in raw] == [p["label"] for p in logits]
    np.testing.assert_allclose([p["score"] for p in raw], [p["score"] for p in logits], rtol=0, atol=1e-5)
    info = client.get("/info").json()
    assert set(info["model_type"]) == {"classifier"} and len(info["model_type"]["classifier"]["id2label"]) == 3


def test_rerank_needs_a_single_label_head_in_process(three_labels):
    _, client = three_labels
    response = client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert response.status_code == 400
    assert response.json()["error"] == ("/rerank needs a cross-encoder: a sequence-classification head with one "
                                        "label, and this one has 3")
    assert "/rerank" not in client.get("/info").json()["routes"]


def test_rerank_refuses_an_activation_it_cannot_reproduce_in_process(tmp_path):
    """A cross-encoder whose activation_fn fastenc does not know: /rerank says so (pipeline("rerank") raises
    the same LoadError), /predict still serves."""
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    path = make_checkpoint(tmp_path / "ce", "bert", head="sequence_classification", num_labels=1, seed=8)
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"activation_fn": "torch.nn.modules.activation.Softmax"}))
    with TestClient(create_app(fastenc.Encoder.from_pretrained(path), warmup=False)) as client:
        response = client.post("/rerank", json={"query": "q", "texts": ["a"]})
        assert response.status_code == 400 and response.json()["error_type"] == "model"
        assert response.json()["error"].startswith("/rerank cannot score with this checkpoint: ")
        assert "activation_fn 'torch.nn.modules.activation.Softmax' is not supported" in response.json()["error"]
        assert client.post("/predict", json={"inputs": "a"}).status_code == 200
        assert client.get("/info").json()["routes"] == ["/embed", "/embed_all", "/predict", "/tokenize",
                                                        "/v1/embeddings"]


def test_import_fastenc_stays_light():
    code = ("import sys, fastenc, fastenc.serve; print(sorted(m for m in ('starlette', 'uvicorn', "
            "'prometheus_client', 'orjson') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_cli_errors_are_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "fastenc", "serve", "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert busy.returncode == 2
    assert busy.stderr.startswith(f"fastenc: error: cannot listen on 127.0.0.1:{port}: ")
    assert busy.stderr.count("\n") == 1
    code = "import sys; sys.modules['starlette'] = None; from fastenc.cli import main; sys.exit(main(['serve']))"
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "fastenc serve needs the serve extra: pip install 'fastenc[serve]'" in missing.stderr


def test_a_receiver_that_fails_does_not_stop_delivery():
    def broken(outcome):
        raise RuntimeError("event loop is closed")

    j = Job([row(1)], "t", broken)
    j.deliver(0, "value")  # logged, not raised
    j.fail(RuntimeError("again"))  # finished once already: ignored
