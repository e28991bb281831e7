"""Storage at corpus scale: retrieval with the bundled all-MiniLM-L6-v2 keeps its top-10 neighbours.

500 documents and 50 queries made from templates (subject, verb, object, place); the reference is the
float32 cosine top-10 of each query. Measured on this corpus (2-core x86-64, torch backend): float16
1.00, int8 0.996 (dequantized scores) and 0.86 (raw int8 code dot products), binary 0.78 (Hamming),
dim 256 0.89, dim 128 0.79 (all-MiniLM-L6-v2 was not trained for Matryoshka truncation). The bounds
below leave room for other BLAS roundings, not for a broken code path: a shuffled or wrongly scaled
code drops the overlap to about 0.02.
"""

import random

import numpy as np
import pytest
import torch

import fastenc
from fastenc.quantize import Storage, dequantize_int8

SUBJECTS = ["the old fisherman", "a young doctor", "the city council", "my neighbour's cat", "the football team",
            "a quiet student", "the bakery owner", "an astronaut", "the orchestra", "a tired nurse", "the mayor",
            "two hikers"]
VERBS = ["repaired", "painted", "sold", "photographed", "cleaned", "described", "built", "lost", "found", "studied",
         "celebrated", "ignored"]
OBJECTS = ["the wooden boat", "a broken violin", "the new library", "an ancient map", "the garden fence",
           "a red bicycle", "the hospital roof", "a loaf of bread", "the mountain trail", "a solar panel",
           "the train station", "a stack of letters"]
PLACES = ["near the harbour", "after the storm", "in the early morning", "during the festival", "before winter",
          "at the market", "on the hill", "in the rain", "behind the school", "under the bridge"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}" for _ in range(n)]


@pytest.fixture(scope="module")
def retrieval(minilm_path, one_thread):
    """The encoder, the documents' float32 vectors, the queries and the reference top-10.

    Documents are embedded once; each test stores those vectors as ``embed(..., precision=p)`` does
    (``Storage``, the same code; tests/test_corpus.py checks it bit for bit) and embeds the queries
    with ``embed(..., precision=p)`` itself."""
    encoder = fastenc.Encoder.from_pretrained(minilm_path)
    docs, queries = encoder.embed(sentences(500, seed=0)), sentences(50, seed=1)
    yield encoder, docs, queries, top10(encoder.embed(queries) @ docs.T)


def store(encoder, vectors: torch.Tensor, **options) -> torch.Tensor:
    storage = Storage.make(options.get("dim"), options.get("precision", "float32"), options.get("calibration"),
                           hidden_size=encoder.config.hidden_size, normalize=True)
    return storage.apply(vectors)


def top10(scores: torch.Tensor) -> torch.Tensor:
    return scores.topk(10, dim=1).indices


def overlap(reference: torch.Tensor, found: torch.Tensor) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(reference, found)]))


def unpack(codes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(codes.numpy(), axis=1))


def test_float16_keeps_the_neighbours(retrieval):
    encoder, docs, queries, reference = retrieval
    d, q = store(encoder, docs, precision="float16"), encoder.embed(queries, precision="float16")
    assert d.dtype == torch.float16
    assert overlap(reference, top10(q.float() @ d.float().T)) >= 0.99


def test_int8_keeps_the_neighbours(retrieval):
    encoder, docs, queries, reference = retrieval
    ranges = torch.stack([docs.amin(0), docs.amax(0)])  # = encoder.calibrate(document texts)
    d = store(encoder, docs, precision="int8", calibration=ranges)
    q = encoder.embed(queries, precision="int8", calibration=ranges)
    assert d.dtype == torch.int8
    assert overlap(reference, top10(dequantize_int8(q, ranges) @ dequantize_int8(d, ranges).T)) >= 0.97
    assert overlap(reference, top10((q.int() @ d.int().T).float())) >= 0.75  # raw codes, as an int8 index scores
    shuffled = d[:, torch.randperm(d.shape[1], generator=torch.Generator().manual_seed(0))]
    assert overlap(reference, top10(dequantize_int8(q, ranges) @ dequantize_int8(shuffled, ranges).T)) < 0.2


def test_binary_keeps_most_neighbours(retrieval):
    encoder, docs, queries, reference = retrieval
    d, q = store(encoder, docs, precision="binary"), encoder.embed(queries, precision="binary")
    assert d.dtype == torch.uint8 and d.shape == (500, 48)
    hamming = (unpack(q)[:, None, :] != unpack(d)[None, :, :]).sum(-1)
    assert overlap(reference, top10(-hamming.float())) >= 0.7


@pytest.mark.parametrize("dim, bound", [(256, 0.8), (128, 0.7)])
def test_matryoshka_truncation_keeps_most_neighbours(retrieval, dim, bound):
    encoder, docs, queries, reference = retrieval
    d, q = store(encoder, docs, dim=dim), encoder.embed(queries, dim=dim)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(len(docs)))  # re-normalised after the cut
    assert overlap(reference, top10(q @ d.T)) >= bound
