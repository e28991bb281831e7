"""ColBERT models saved by sentence-transformers as ``MultiVectorEncoder``s, against its ``encode_query`` /
``encode_document`` (prompts, query and document lengths, query expansion with mask tokens, the skiplist,
the Dense projection, normalisation); late-interaction reranking; ``fastenc embed --multivector``; and
sentence-transformers ``Dense`` modules after the pooling of an ordinary ``SentenceTransformer``, for every
family, against ``SentenceTransformer.encode``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402

import fastenc  # noqa: E402
from fastenc import Encoder, FastencError  # noqa: E402
from fastenc.cli import main  # noqa: E402
from fastenc.corpus import read_ranges  # noqa: E402
from fastenc.quantize import int8_ranges, quantize_int8  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["hello, world!", "a b c", "", "the quick brown fox jumps over the lazy dog again and again, and again.",
         "what? where; when: who."]
# (family, query_expansion, Dense activation, skiplist tasks): a classic fixed 12-token expansion, a
# RoBERTa-style model (positions after padding) with a "min" floor and the skiplist on queries too
MODELS = {
    "bert-fixed": ("bert", {"strategy": "fixed", "attend": True, "length": 12}, "Tanh", ("document",)),
    "roberta-min": ("roberta", {"strategy": "min", "attend": True, "length": 10}, "Identity", ("query", "document")),
    "bert-plain": ("bert", None, "GELU", ("document",)),
}


def _load_st(cls, path):
    with warnings.catch_warnings(), C.quiet_transformers():
        warnings.simplefilter("ignore")
        return cls(str(path), device="cpu")


@pytest.fixture(scope="module")
def colbert(tmp_path_factory, one_thread):
    from sentence_transformers import MultiVectorEncoder

    root = tmp_path_factory.mktemp("colbert")
    built = {}
    for name, (family, expansion, activation, tasks) in MODELS.items():
        path = C.make_colbert(root / name, family, expansion=expansion, dense_activation=activation,
                              skiplist_tasks=tasks)
        built[name] = (path, _load_st(MultiVectorEncoder, path))
    return built


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("query", [True, False])
def test_matches_sentence_transformers(colbert, name, query):
    path, model = colbert[name]
    expected = (model.encode_query if query else model.encode_document)(TEXTS)
    ours = Encoder.from_pretrained(path).embed_multivector(TEXTS, query=query)
    for mine, theirs in zip(ours, expected):
        assert mine.shape == theirs.shape  # the same tokens: prompt, length, expansion, skiplist
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-6)
    if query and MODELS[name][1] is not None and "query" not in MODELS[name][3]:  # expanded, nothing skipped
        assert min(len(v) for v in ours) >= MODELS[name][1]["length"]


def test_pylate_layout(colbert, tmp_path):
    """PyLate's older layout (Transformer and a pylate Dense only; prefixes, lengths, expansion and skiplist
    as top-level keys of config_sentence_transformers.json), as MultiVectorEncoder reads it."""
    import shutil
    import string

    from sentence_transformers import MultiVectorEncoder

    source, _ = colbert["bert-fixed"]
    path = tmp_path / "pylate"
    shutil.copytree(source, path)
    modules = json.loads((path / "modules.json").read_text())[:2]
    modules[1]["type"] = "pylate.models.Dense.Dense"
    (path / "modules.json").write_text(json.dumps(modules))
    sbert = json.loads((path / "sentence_bert_config.json").read_text())
    for key in ("query_length", "document_length", "query_expansion"):
        sbert.pop(key)
    (path / "sentence_bert_config.json").write_text(json.dumps(sbert))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "ColBERT", "query_prefix": "[Q] ", "document_prefix": "[D] ", "query_length": 11,
        "document_length": 18, "attend_to_expansion_tokens": True, "skiplist_words": list(string.punctuation[:8]),
        "prompts": {}, "similarity_fn_name": "MaxSim"}))
    model = _load_st(MultiVectorEncoder, path)
    encoder = Encoder.from_pretrained(path)
    for query in (True, False):
        expected = (model.encode_query if query else model.encode_document)(TEXTS)
        for mine, theirs in zip(encoder.embed_multivector(TEXTS, query=query), expected):
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-6)


def test_expansion_not_attended_is_refused(tmp_path, one_thread):
    """Expansion tokens the encoder must not attend to need a key mask the packed attention lacks: the
    queries are refused, the documents work."""
    path = C.make_colbert(tmp_path / "colbert", "bert", expansion={"strategy": "fixed", "attend": False, "length": 8})
    encoder = Encoder.from_pretrained(path)
    with pytest.raises(FastencError, match="attend=false"):
        encoder.embed_multivector("a query", query=True)
    assert encoder.embed_multivector("a document").shape[1] == 16
    with pytest.raises(FastencError, match="MultiVectorEncoder"):
        encoder.embed("a text")


def test_rerank_scores_by_late_interaction(colbert):
    from sentence_transformers.util import maxsim

    path, model = colbert["bert-fixed"]
    query, texts = "the lazy fox", TEXTS
    ranked = fastenc.pipeline("rerank", model=str(path))(query, texts)
    expected = maxsim(model.encode_query([query]), model.encode_document(texts))[0]
    assert [r["index"] for r in ranked] == expected.argsort(descending=True, stable=True).tolist()
    for result in ranked:
        assert abs(result["score"] - float(expected[result["index"]])) <= 1e-4


@pytest.mark.parametrize("suffix,precision", [(".parquet", "float16"), (".npy", "float32"), (".jsonl", "int8")])
def test_cli_writes_multivector(colbert, tmp_path, suffix, precision):
    path, _ = colbert["roberta-min"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / f"out{suffix}"
    assert main(["embed", "--model", str(path), "--file", str(corpus), "--output", str(out), "--multivector",
                 "--precision", precision, "--window", "2"]) == 0
    expected = Encoder.from_pretrained(path).embed_multivector(TEXTS)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert json.loads(table.schema.metadata[b"fastenc"])["multivector"] is True
        rows = [torch.tensor(np.array(row, dtype=np.float16)) for row in table.column("embedding").to_pylist()]
        for row, vectors in zip(rows, expected):
            assert torch.equal(row, vectors.half())
    elif suffix == ".npy":
        lengths = np.load(tmp_path / "out.lengths.npy")
        assert lengths.tolist() == [len(v) for v in expected]
        assert torch.equal(torch.from_numpy(np.load(out)), torch.cat(expected))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        ranges = read_ranges(tmp_path / "out.jsonl.ranges.json")  # the first window's (two texts)
        torch.testing.assert_close(ranges, int8_ranges(torch.cat(expected[:2])), rtol=0, atol=1e-6)
        assert len(rows) == len(TEXTS)
        for row, vectors in zip(rows, expected):
            assert torch.equal(torch.tensor(row, dtype=torch.int8).reshape(-1, 16), quantize_int8(vectors, ranges))


@pytest.mark.parametrize("family", C.ALL_FAMILIES)
def test_dense_modules_after_pooling(family, tmp_path, one_thread):
    """A SentenceTransformer with two Dense modules after its pooling: embed() is its encode()."""
    from sentence_transformers import SentenceTransformer

    activation, residual = {"bert": ("GELU", True), "roberta": ("Identity", False), "distilbert": ("ReLU", False),
                            "mpnet": ("SiLU", False), "modernbert": ("Sigmoid", False)}.get(family, ("Tanh", False))
    path = C.make_dense_sentence_transformer(tmp_path / family, family, activation=activation, use_residual=residual,
                                             pooling="cls" if family == "electra" else "mean")
    expected = _load_st(SentenceTransformer, path).encode(TEXTS, convert_to_tensor=True)
    encoder = Encoder.from_pretrained(path)
    ours = encoder.embed(TEXTS)
    assert ours.shape == expected.shape and encoder.embedding_dim == expected.shape[1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)
    cut = encoder.embed(TEXTS, dim=8)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(expected[:, :8], dim=-1), rtol=0, atol=2e-6)


def test_triton_backend_batch_invariant(colbert):
    """On the Triton backend (interpreted here) a text's vectors are the same bits alone or in a batch (the
    Dense GEMM on the model's ops), and close to the torch backend's."""
    path, _ = colbert["roberta-min"]
    texts = ["a b", "the lazy dog, again"]
    encoder = Encoder.from_pretrained(path, backend="triton")
    batch = encoder.embed_multivector(texts, query=True)  # expanded, the skiplist on queries too
    assert torch.equal(encoder.embed_multivector(texts[1], query=True), batch[1])
    for ours, theirs in zip(batch, Encoder.from_pretrained(path).embed_multivector(texts, query=True)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_served_multivector_queries_and_documents(colbert):
    """``/embed_multivector`` encodes ``query: true`` inputs as ``encode_query`` (prompt, length, expansion)
    and the others as documents, as ``embed_multivector``; a model without multi-vector output is a 400."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    path, _ = colbert["bert-fixed"]
    encoder = Encoder.from_pretrained(path)
    texts = [t for t in TEXTS if t]
    with TestClient(create_app(encoder, warmup=False)) as client:
        for query in (True, False):
            response = client.post("/embed_multivector", json={"inputs": texts, "query": query, "truncate": True})
            assert response.status_code == 200, response.text
            for got, expected in zip(response.json(), encoder.embed_multivector(texts, query=query)):
                torch.testing.assert_close(torch.tensor(got), expected, rtol=0, atol=1e-6)
    plain = Encoder.from_pretrained(C.make_checkpoint(pathlib.Path(str(path) + "-plain"), "bert"))
    with TestClient(create_app(plain, warmup=False)) as client:
        response = client.post("/embed_multivector", json={"inputs": "a"})
        assert response.status_code == 400 and "multi-vector" in response.json()["error"], response.text
        assert "/embed_multivector" not in client.get("/info").json()["routes"]
