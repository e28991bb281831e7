"""BGE-M3: its dense, sparse (lexical weights) and ColBERT outputs against FlagEmbedding's
``BGEM3FlagModel.encode`` on a tiny perturbed XLM-R checkpoint with ``colbert_linear.pt`` and
``sparse_linear.pt`` saved as BAAI/bge-m3 ships them; each output alone against the combined call; the
restricted ``.pt`` reader; late-interaction reranking; a text's outputs alone and in a batch on the Triton
backend (under the interpreter on the CPU).
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import warnings

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402

import fastenc  # noqa: E402
from fastenc import Encoder, InputError, LoadError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["What is BGE-M3?", "", "a", "The quick brown fox jumps over the lazy dog, " * 6 + "again.",
         "Ünïcödé, 中文 and emoji 😍", "the the the dog dog"]
MAX_LENGTH = 64  # the tiny model's positions


@pytest.fixture(scope="module")
def m3(tmp_path_factory, one_thread):
    return C.make_bge_m3(tmp_path_factory.mktemp("bge-m3") / "m3")


@pytest.fixture(scope="module")
def flag(m3):
    flag_embedding = pytest.importorskip("FlagEmbedding")
    with warnings.catch_warnings(), C.quiet_transformers():
        warnings.simplefilter("ignore")
        model = flag_embedding.BGEM3FlagModel(str(m3), use_fp16=False, devices="cpu")
        return model.encode(TEXTS, max_length=MAX_LENGTH, return_dense=True, return_sparse=True,
                            return_colbert_vecs=True), model


def _as_dict(sparse_row: torch.Tensor) -> dict[int, float]:
    row = sparse_row.coalesce()
    return {int(i): float(v) for i, v in zip(row.indices()[0], row.values())}


def test_matches_flagembedding(m3, flag):
    """dense_vecs, lexical_weights and colbert_vecs of one encode() call, from one forward here."""
    expected, _ = flag
    out = Encoder.from_pretrained(m3).embed_multi(TEXTS)
    assert set(out) == {"dense", "sparse", "multivector"}
    dense = torch.from_numpy(expected["dense_vecs"])
    assert torch.isfinite(out["dense"]).all()
    torch.testing.assert_close(out["dense"], dense, rtol=0, atol=1e-5)
    active = 0
    for row, text in enumerate(TEXTS):
        ours = _as_dict(out["sparse"][row])
        theirs = {int(k): float(v) for k, v in expected["lexical_weights"][row].items()}
        assert sorted(ours) == sorted(theirs), text
        for key in ours:
            assert abs(ours[key] - theirs[key]) <= 1e-5
        active += len(ours)
        colbert = torch.from_numpy(expected["colbert_vecs"][row])
        assert out["multivector"][row].shape == colbert.shape  # every token but CLS
        torch.testing.assert_close(out["multivector"][row], colbert, rtol=0, atol=1e-5)
    assert active > 20  # the lexical weights are not all cut by the ReLU


def test_each_output_alone_is_the_combined_calls(m3):
    encoder = Encoder.from_pretrained(m3)
    both = encoder.embed_multi(TEXTS)
    assert torch.equal(encoder.embed(TEXTS), both["dense"])
    assert torch.equal(encoder.embed_sparse(TEXTS).to_dense(), both["sparse"].to_dense())
    for ours, theirs in zip(encoder.embed_multivector(TEXTS), both["multivector"]):
        assert torch.equal(ours, theirs)
    one = encoder.embed_multi(TEXTS[0], dense=False)
    assert set(one) == {"sparse", "multivector"} and one["sparse"].shape == (encoder.config.vocab_size,)
    torch.testing.assert_close(one["multivector"], both["multivector"][0], rtol=0, atol=1e-6)  # torch: not bitwise
    assert encoder.embed_multi([])["dense"].shape == (0, encoder.config.hidden_size)
    with pytest.raises(InputError, match="at least one"):
        encoder.embed_multi(TEXTS, dense=False, sparse=False, multivector=False)


def test_top_k_keeps_the_largest_weights(m3):
    encoder = Encoder.from_pretrained(m3)
    full, top = encoder.embed_sparse(TEXTS[3]), encoder.embed_sparse(TEXTS[3], top_k=3)
    values = full.coalesce().values()
    assert top.coalesce().values().sort().values.tolist() == values.sort().values[-3:].tolist()


def test_dense_is_cls_without_sentence_transformers_files(tmp_path, one_thread):
    """BGE-M3's dense vector is its normalised CLS token with or without modules.json."""
    plain = C.make_bge_m3(tmp_path / "plain", modules=False, colbert_dim=24)
    encoder = Encoder.from_pretrained(plain)
    hidden = encoder.embed_tokens(TEXTS[:2])
    for row, tokens in enumerate(hidden):
        torch.testing.assert_close(encoder.embed(TEXTS[row]), tokens[0] / tokens[0].norm(), rtol=0, atol=1e-6)
    assert encoder.multivector_dim == 24 and encoder.embed_multivector("a b").shape[1] == 24


def test_rerank_scores_by_late_interaction(m3, flag):
    """The MaxSim sum: FlagEmbedding's colbert_score times the query's vector count."""
    _, model = flag
    query, texts = "the lazy dog", TEXTS[2:]
    ranked = fastenc.pipeline("rerank", model=str(m3))(query, texts, return_text=True)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    q = model.encode(query, max_length=MAX_LENGTH, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    docs = model.encode(texts, max_length=MAX_LENGTH, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    for result in ranked:
        assert result["text"] == texts[result["index"]]
        expected = float(model.colbert_score(q, docs[result["index"]])) * q.shape[0]
        assert abs(result["score"] - expected) <= 1e-4
    assert len(fastenc.pipeline("rerank", model=str(m3))(query, texts, top_k=2)) == 2


def test_pt_files_are_read_with_the_restricted_loader(m3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(m3, bad)
    state = torch.load(bad / "sparse_linear.pt", weights_only=True)
    torch.save({**state, "extra": pathlib.PurePosixPath("x")}, bad / "sparse_linear.pt")  # an object, not a tensor
    with pytest.raises(LoadError, match="sparse_linear.pt: refused by the restricted loader .*PurePosixPath"):
        Encoder.from_pretrained(bad)
    torch.save({"weight": state["weight"]}, bad / "sparse_linear.pt")
    with pytest.raises(LoadError, match="exactly the tensors 'weight' and 'bias'"):
        Encoder.from_pretrained(bad)
    torch.save({"weight": state["weight"].t(), "bias": state["bias"]}, bad / "sparse_linear.pt")
    with pytest.raises(LoadError, match=r"'weight' has shape \[64, 1\], expected \[1, 64\]"):
        Encoder.from_pretrained(bad)
    (bad / "sparse_linear.pt").write_bytes(b"not a torch file")
    with pytest.raises(LoadError, match="sparse_linear.pt: refused by the restricted loader"):
        Encoder.from_pretrained(bad)
    (bad / "sparse_linear.pt").unlink()
    with pytest.raises(LoadError, match="has colbert_linear.pt but not sparse_linear.pt"):
        Encoder.from_pretrained(bad)


def test_without_the_projections(m3, tmp_path):
    """A plain XLM-R checkpoint: no multi-vector output, and the multi-vector calls say so."""
    plain = tmp_path / "plain"
    shutil.copytree(m3, plain)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (plain / name).unlink()
    encoder = Encoder.from_pretrained(plain)
    assert "bge_m3" not in encoder.heads
    with pytest.raises(LoadError, match="no multi-vector output"):
        encoder.embed_multivector("a")
    with pytest.raises(LoadError, match="masked-LM|mlm|lm_head"):
        encoder.embed_sparse("a")


def test_triton_backend_batch_invariant(m3):
    """On the Triton backend (interpreted here) a text's three outputs are the same bits alone or in a
    batch, and close to the torch backend's."""
    texts = ["a b", "the lazy dog", "dog"]
    encoder = Encoder.from_pretrained(m3, backend="triton")
    batch = encoder.embed_multi(texts)
    alone = encoder.embed_multi(texts[1])
    assert torch.equal(alone["dense"], batch["dense"][1])
    assert torch.equal(alone["sparse"].to_dense(), batch["sparse"][1].to_dense())
    assert torch.equal(alone["multivector"], batch["multivector"][1])
    torch_backend = Encoder.from_pretrained(m3).embed_multi(texts)
    for ours, theirs in zip(batch["multivector"], torch_backend["multivector"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_served_outputs_are_embed_multis(m3):
    """``/embed_multi`` and ``/embed_multivector`` answer ``embed_multi``'s outputs; ``/embed_sparse`` BGE-M3's
    lexical weights; ``/info`` lists the routes and the multi-vector width."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fastenc.serve import create_app

    encoder = Encoder.from_pretrained(m3)
    texts = [t for t in TEXTS if t]
    expected = encoder.embed_multi(texts, top_k=5)
    with TestClient(create_app(encoder, warmup=False)) as client:
        info = client.get("/info").json()
        assert {"/embed_multi", "/embed_multivector", "/embed_sparse"} <= set(info["routes"])
        assert info["multivector_dim"] == expected["multivector"][0].shape[1]
        response = client.post("/embed_multi", json={"inputs": texts, "top_k": 5, "truncate": True})
        assert response.status_code == 200, response.text
        got = response.json()
        for row, item in enumerate(got):
            assert set(item) == {"dense", "sparse", "multivector"}
            torch.testing.assert_close(torch.tensor(item["dense"]), expected["dense"][row], rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.tensor(item["multivector"]), expected["multivector"][row], rtol=0,
                                       atol=1e-6)
            assert {w["index"]: pytest.approx(w["value"], abs=1e-6) for w in item["sparse"]} == \
                _as_dict(expected["sparse"][row])
        only = client.post("/embed_multi", json={"inputs": texts[0], "dense": False, "sparse": False, "truncate": True}).json()
        assert set(only[0]) == {"multivector"}
        vectors = client.post("/embed_multivector", json={"inputs": texts, "truncate": True}).json()
        for row, item in enumerate(vectors):
            torch.testing.assert_close(torch.tensor(item), expected["multivector"][row], rtol=0, atol=1e-6)
        sparse = client.post("/embed_sparse", json={"inputs": texts, "top_k": 5, "truncate": True}).json()
        assert [{w["index"]: pytest.approx(w["value"], abs=1e-6) for w in row} for row in sparse] == \
            [_as_dict(row) for row in expected["sparse"]]
        none = client.post("/embed_multi", json={"inputs": "a", "dense": False, "sparse": False, "multivector": False})
        assert none.status_code == 422 and "at least one output" in none.json()["error"]
