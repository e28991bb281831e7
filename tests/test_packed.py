"""Padding-free execution: packed vs padded, bitwise batch invariance on the Triton backend, token-budget
batching, and the CUDA-graph bucket contract (captured graphs themselves are tested on CUDA only)."""

import pytest
import torch
from checkpoints import FAMILIES, hf_last_hidden_state, make_checkpoint

import fastenc
from fastenc.check import compare
from fastenc.packing import PackedBatch, token_budget_batches

TEXTS = [
    "the cat sat on the mat",
    "a",
    "",
    "dogs and cats and birds " * 12,
    "hello world",
    "the quick brown fox jumps over the lazy dog and runs far away into the woods",
    "x y z",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request, tmp_path_factory):
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


@pytest.fixture(scope="module")
def triton_bert(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("bert"), "bert", seed=4)
    return fastenc.Encoder.from_pretrained(path, backend="triton", device="cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_agrees_with_padded(family_path, backend):
    """Texts packed straight from the tokenizer vs the padded batch transformers runs."""
    family, path = family_path
    encoder = fastenc.Encoder.from_pretrained(path, backend=backend, device="cpu")
    packed = encoder.pack_texts(TEXTS, max_length=48)
    hidden = encoder.forward_packed(packed)  # (tokens, hidden)
    assert hidden.shape == (packed.num_tokens, encoder.config.hidden_size)
    assert packed.num_tokens == sum(packed.lengths) and packed.cu_seqlens[-1] == packed.num_tokens
    batch = encoder.tokenize(TEXTS, max_length=48)
    if not encoder.config.type_vocab_size:
        batch.pop("token_type_ids")
    reference = hf_last_hidden_state(path, **batch)
    mask = batch["attention_mask"].bool()
    assert torch.isfinite(hidden).all()
    result = compare("packed vs padded", hidden, reference[mask])
    assert result.ok, result.line()


def test_pack_and_pad_round_trip(family_path):
    _, path = family_path
    encoder = fastenc.Encoder.from_pretrained(path, device="cpu")
    batch = encoder.tokenize(TEXTS, max_length=32)
    packed = encoder.pack(**batch)
    assert packed.shape == tuple(batch["input_ids"].shape) and packed.lengths == tuple(
        batch["attention_mask"].sum(1).tolist())
    torch.testing.assert_close(packed.pad(encoder.forward_packed(packed)), encoder(**batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not made from padded tensors"):
        encoder.pack_texts(["a"]).pad(torch.zeros(3, encoder.config.hidden_size))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_triton_hidden_states_are_bitwise_batch_invariant(triton_bert, where):
    encoder = triton_bert
    target = "the quick brown fox jumps over the lazy dog"
    others = ["a", "dogs and cats and birds " * 14, "hello world", "", "x"]
    texts = {"start": [target] + others, "middle": others[:3] + [target] + others[3:], "end": others + [target]}[where]
    alone = encoder.forward_packed(encoder.pack_texts([target]))
    packed = encoder.pack_texts(texts)
    row = texts.index(target)
    start = int(packed.cu_seqlens[row])
    together = encoder.forward_packed(packed)[start:start + alone.shape[0]]
    assert torch.equal(alone, together)
    # the padded entry point too: the target row of a padded batch equals the target alone
    batch = encoder.tokenize(texts)
    padded = encoder(**batch)[row, : alone.shape[0]]
    assert torch.equal(padded, alone)


def test_triton_embed_is_bitwise_batch_invariant(triton_bert):
    texts = TEXTS + ["sentence " + "word " * 9]
    alone = torch.stack([triton_bert.embed(t) for t in texts])
    for batch_size in (1, 7, 64):
        assert torch.equal(triton_bert.embed(texts, batch_size=batch_size), alone), batch_size
    assert torch.equal(triton_bert.embed(texts, max_tokens=40), alone)
    assert torch.equal(triton_bert.embed(list(reversed(texts))), alone.flip(0))


# Rows that belong to no sequence get no attention output: they carry uninitialised memory through the
# layers, by design (they are discarded), and numpy may warn when such bits overflow in the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_rows_past_the_last_sequence_never_reach_real_rows(triton_bert):
    """The CUDA-graph bucket contract: extra rows that belong to no sequence, empty trailing sequences and
    a larger max_seqlen leave the real rows' bits unchanged (checked here on the eager Triton path)."""
    encoder = triton_bert
    packed = encoder.pack_texts(["the cat sat on the mat", "hello world", "a b c d e f g h"])
    eager = encoder.forward_packed(packed)
    tokens, extra = packed.num_tokens, 29
    generator = torch.Generator().manual_seed(0)
    garbage = torch.randint(0, encoder.config.vocab_size, (extra,), generator=generator)
    cu = torch.cat([packed.cu_seqlens, torch.full((9,), tokens, dtype=torch.int32)])  # 9 empty sequences
    bucketed = PackedBatch(
        input_ids=torch.cat([packed.input_ids, garbage]),
        position_ids=torch.cat([packed.position_ids, torch.arange(extra)]),
        token_type_ids=torch.cat([packed.token_type_ids, torch.zeros(extra, dtype=torch.long)]),
        cu_seqlens=cu, lengths=packed.lengths + (0,) * 9, max_seqlen=64,
    )
    assert torch.equal(encoder.forward_packed(bucketed)[:tokens], eager)


def test_token_budget_batches():
    lengths = [5, 50, 3, 20, 20, 7, 100, 1]
    batches = token_budget_batches(lengths, batch_size=3, max_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 60
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first, so batches hold texts of similar length
    assert token_budget_batches([], 4, 10) == []


def test_embed_respects_the_token_budget(triton_bert, monkeypatch):
    seen = []
    real = triton_bert.model.forward
    monkeypatch.setattr(triton_bert.model, "forward", lambda batch: seen.append(batch.lengths) or real(batch))
    triton_bert.embed(TEXTS, max_tokens=30)
    lengths = triton_bert.tokenize(TEXTS)["attention_mask"].sum(1).tolist()
    assert sorted(n for batch in seen for n in batch) == sorted(lengths)  # every text once
    assert all(sum(batch) <= 30 or len(batch) == 1 for batch in seen)  # over budget only alone
    assert len(seen) == 3  # [96], [51], then the five short texts together


def test_cuda_graphs_option_errors(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    with pytest.raises(fastenc.BackendError, match="cuda_graphs=True"):
        fastenc.Encoder.from_pretrained(path, cuda_graphs=True, device="cpu")
    assert fastenc.Encoder.from_pretrained(path, device="cpu").model.graphs is None


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.fixture(scope="module")
def cuda_encoder(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("cuda"), "bert", seed=5)
    return fastenc.Encoder.from_pretrained(path, device="cuda", backend="triton")


@pytest.mark.cuda
def test_graph_replay_equals_eager(cuda_encoder):
    encoder = cuda_encoder
    assert encoder.model.graphs is not None
    packed = encoder.pack_texts(TEXTS)
    eager = encoder.forward_packed(packed)
    replayed = encoder.model(packed)
    assert torch.equal(replayed, eager)
    assert torch.equal(encoder.model(packed), eager)  # a second replay of the same bucket
    assert torch.equal(encoder.embed(TEXTS), torch.stack([encoder.embed(t) for t in TEXTS]))


@pytest.mark.cuda
def test_graph_buckets_are_reused_and_bounded(cuda_encoder):
    runner = cuda_encoder.model.graphs
    runner.run(cuda_encoder.pack_texts(["hello world"]))
    before = runner.captured
    runner.run(cuda_encoder.pack_texts(["the cat sat"]))  # same bucket
    assert runner.captured == before
    runner.capture_all()
    assert len(runner.captured) <= runner.max_graphs
    reserved = torch.cuda.memory_reserved()
    runner.capture_all()  # nothing new to capture: memory does not grow
    assert torch.cuda.memory_reserved() == reserved


@pytest.mark.cuda
def test_forward_never_syncs_with_the_host(cuda_encoder):
    packed = cuda_encoder.pack_texts(TEXTS)
    cuda_encoder.forward_packed(packed)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_encoder.forward_packed(packed)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_a_graph_captured_by_a_pipeline_replays_in_embed(tmp_path):
    """The pipelines run under inference_mode: a bucket they capture must replay outside it too."""
    path = make_checkpoint(tmp_path, "bert", head="mlm", seed=13)
    encoder = fastenc.Encoder.from_pretrained(path, device="cuda", backend="triton")
    eager = fastenc.Encoder.from_pretrained(path, device="cuda", backend="triton", cuda_graphs=False)
    text = "Paris is the [MASK] of France."
    fastenc.pipeline("fill-mask", encoder)(text)
    assert len(encoder.model.graphs.captured) == 1
    assert torch.equal(encoder.embed(text), eager.embed(text))
    assert len(encoder.model.graphs.captured) == 1  # the same bucket, replayed
