"""The CUDA-graph runner's contract, driven on the CPU with torch.cuda's stream and graph calls stubbed.

The stub records, at capture, the forward the runner asks for and the static tensors it reads and writes;
``replay()`` runs that forward again on the same static tensors, as a real graph would. What this shows
without a GPU: which tensors the runner creates (and in which autograd mode), which bucket a batch
takes, and that a replay's result is the eager one. The real graphs are tested on CUDA in
``tests/test_packed.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from checkpoints import make_checkpoint

import fastenc
from fastenc.graphs import GraphRunner

TEXTS = ["Paris is the [MASK] of France.", "a b c", "the quick brown fox jumps over the lazy dog"]


class _FakeGraph:
    def __init__(self):
        self.forward = None  # (fn, static batch, output) recorded at capture

    def replay(self):
        fn, static, output = self.forward
        output.copy_(fn(static))


@pytest.fixture
def stubbed_cuda(monkeypatch):
    """torch.cuda's streams and graphs as no-ops; ``capture(encoder)`` makes captures record into _FakeGraph."""
    state = {"graph": None}

    @contextlib.contextmanager
    def graph(g, pool=None, **kwargs):
        state["graph"] = g
        try:
            yield
        finally:
            state["graph"] = None

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def capture(encoder):
        real = encoder.model.forward

        def forward(batch):
            output = real(batch)
            if state["graph"] is not None:
                state["graph"].forward = (real, batch, output)
            return output

        monkeypatch.setattr(encoder.model, "forward", forward)
        encoder.model.graphs = GraphRunner(encoder.model)
        return encoder.model.graphs

    return capture


@pytest.fixture(scope="module")
def mlm_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mlm"), "bert", head="mlm", seed=12)


def test_a_bucket_captured_inside_inference_mode_replays_outside_it(mlm_path, stubbed_cuda):
    """The pipelines run the encoder under inference_mode; embed() and encoder(...) do not."""
    encoder = fastenc.Encoder.from_pretrained(mlm_path, device="cpu", backend="triton")
    eager = fastenc.Encoder.from_pretrained(mlm_path, device="cpu", backend="triton")
    runner = stubbed_cuda(encoder)
    fastenc.pipeline("fill-mask", encoder)(TEXTS[0], top_k=2)  # captures the bucket in inference mode
    assert len(runner.captured) == 1
    for graph in runner._graphs.values():
        for tensor in (graph.input_ids, graph.position_ids, graph.token_type_ids, graph.cu_seqlens, graph.output):
            assert not tensor.is_inference()
    replayed = encoder.embed(TEXTS[0])  # the same bucket, outside inference mode: copies into the buffers
    assert len(runner.captured) == 1
    assert torch.equal(replayed, eager.embed(TEXTS[0]))
    packed = encoder.pack_texts(TEXTS)
    with torch.inference_mode():
        inside = encoder.model(packed)
    assert torch.equal(inside, eager.forward_packed(packed))
    assert torch.equal(encoder.model(packed), inside)


def test_a_sequence_bucket_longer_than_its_token_bucket_runs_eagerly(mlm_path, stubbed_cuda, monkeypatch):
    """max_tokens 80 (not a power of two): a 70-token text is in token bucket 80 but sequence bucket 96."""
    encoder = fastenc.Encoder.from_pretrained(mlm_path, device="cpu", backend="torch")
    stubbed_cuda(encoder)
    runner = encoder.model.graphs = GraphRunner(encoder.model, max_tokens=80)
    assert runner.token_buckets == [64, 80] and runner.seqlen_buckets == [32, 64, 96]
    long_text = encoder.pack_texts([" ".join(["word"] * 200)], max_length=70)
    assert runner.bucket(long_text) == (80, 96)
    assert not runner.fits(long_text)
    with pytest.raises(ValueError, match="sequence bucket exceeds its token bucket"):
        runner.run(long_text)
    with pytest.raises(ValueError, match="does not fit"):
        runner._capture(80, 96)
    assert torch.equal(encoder.model(long_text), encoder.forward_packed(long_text))  # eager, nothing captured
    assert runner.captured == []
    asked = []
    monkeypatch.setattr(runner, "_capture", lambda tokens, seqlen: asked.append((tokens, seqlen)))
    runner.capture_all()
    assert asked == [(64, 32), (64, 64), (80, 32), (80, 64)]  # never (80, 96)


def test_launches_and_graphs_go_to_the_tensors_device():
    """Triton launches on the current CUDA device: the launchers and the runner enter the tensors' device."""
    from fastenc.kernels._checks import on_device

    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_an_encoder_on_the_second_gpu_runs_there_while_the_first_is_current(mlm_path):
    torch.cuda.set_device(0)
    encoder = fastenc.Encoder.from_pretrained(mlm_path, device="cuda:1", backend="triton")
    reference = fastenc.Encoder.from_pretrained(mlm_path, device="cpu", dtype=encoder.dtype, backend="torch")
    vectors = encoder.embed(TEXTS)  # CUDA-graph replays
    packed = encoder.pack_texts(TEXTS)
    hidden = encoder.forward_packed(packed)  # eager launches
    assert hidden.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    assert torch.isfinite(hidden).all() and torch.isfinite(vectors).all()
    torch.testing.assert_close(vectors, reference.embed(TEXTS), rtol=2e-2, atol=2e-2)
