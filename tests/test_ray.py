"""Ray Data: ``fastenc.embed_dataset``, the ``EmbedBatch`` callable class and ``fastenc embed --ray``.

A local cluster of 2 CPUs (``ray.init(num_cpus=2)``), two actors, a tiny checkpoint, a few thousand rows.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import torch
from checkpoints import make_checkpoint

import fastenc
from fastenc.integrations.ray import EmbedBatch

TESTS = Path(__file__).resolve().parent
WORDS = "alpha beta gamma delta river stone light paper green house seven bridges under cards".split()


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))} for i in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")  # the actors use both cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "bert")


@pytest.fixture(scope="module")
def cluster():
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def check_every_row_once(result: list[dict], source: list[dict], encoder) -> None:
    """Every input id exactly once, with the vector embed() gives its text.

    Not bitwise: Ray's batches group the texts differently from one embed() call, and an actor runs
    one torch thread; on the torch backend that changes the rounding, not the vector."""
    ids = [row["id"] for row in result]
    assert sorted(ids) == [row["id"] for row in source]  # each id once
    by_id = {row["id"]: row["embedding"] for row in result}
    got = torch.from_numpy(np.stack([np.asarray(by_id[row["id"]], dtype=np.float32) for row in source]))
    expected = encoder.embed([row["text"] for row in source])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_embed_batch_takes_each_batch_format(tiny):
    """The callable class alone (no cluster): pyarrow, pandas and numpy batches, and bad rows."""
    data = rows(40, seed=1)
    texts = [row["text"] for row in data]
    expected = fastenc.Encoder.from_pretrained(tiny).embed(texts)
    embed = EmbedBatch(tiny)
    table = embed(pa.table({"id": [r["id"] for r in data], "text": texts}))
    assert table.column_names == ["id", "text", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 72)
    assert torch.equal(torch.tensor(table.column("embedding").to_pylist()), expected)
    frame = embed(pd.DataFrame({"text": texts}))
    assert torch.equal(torch.tensor(np.stack(frame["embedding"])), expected)
    arrays = embed({"text": np.array(texts, dtype=object)})
    assert torch.equal(torch.from_numpy(arrays["embedding"]), expected)
    bad = pa.table({"id": [0, 1, 2], "text": ["a", None, "c"]})
    with pytest.raises(fastenc.InputError, match="row 1 of a batch of 3 is NoneType"):
        embed(bad)
    kept = EmbedBatch(tiny, on_error="skip", dim=16, precision="binary")(bad)
    assert kept.column("id").to_pylist() == [0, 2]
    assert kept.schema.field("embedding").type == pa.list_(pa.uint8(), 2)


@pytest.mark.parametrize("options", [dict(dim=24, normalize=False, precision="float16"),
                                     dict(dim=16, precision="int8", calibration="sample"), dict(precision="binary")])
def test_embed_batch_on_triton_is_embed_bitwise(tiny, options):
    """An actor's batch on the Triton backend (the interpreter here) is ``embed()`` of the same texts, bit for
    bit, for every storage option: both run the same task and storage objects."""
    texts = [row["text"] for row in rows(6, seed=3)]
    encoder = fastenc.Encoder.from_pretrained(tiny, backend="triton")
    if options.get("calibration") == "sample":
        options = dict(options, calibration=encoder.calibrate(texts[:3], dim=options["dim"]))
    expected = encoder.embed(texts, **options)
    table = EmbedBatch(tiny, backend="triton", **options)(pa.table({"text": texts}))
    got = np.array(table.column("embedding").to_pylist(), dtype=expected.numpy().dtype)
    assert torch.equal(torch.from_numpy(got), expected)


def test_embed_dataset_every_id_once(cluster, tiny):
    source = rows(2000, seed=2)
    ds = ray.data.from_items(source, override_num_blocks=4)
    result = fastenc.embed_dataset(ds, model=tiny, concurrency=2, rows_per_batch=200).take_all()
    check_every_row_once(result, source, fastenc.Encoder.from_pretrained(tiny))


def test_an_actor_killed_mid_run_loses_and_duplicates_no_row(cluster, tiny, tmp_path):
    """One actor dies in the middle of the run; Ray restarts it and retries its batch."""
    from ray_helpers import DyingEmbedBatch

    source = rows(1600, seed=3)
    marker = tmp_path / "died"
    ds = ray.data.from_items(source, override_num_blocks=8).map_batches(
        DyingEmbedBatch, fn_constructor_kwargs={"model": str(tiny), "marker": str(marker)}, batch_format="pyarrow",
        batch_size=200, compute=ray.data.ActorPoolStrategy(size=2))
    result = ds.take_all()
    assert marker.exists()  # an actor did die
    check_every_row_once(result, source, fastenc.Encoder.from_pretrained(tiny))


def test_embed_dataset_int8_needs_shared_ranges(tiny):
    with pytest.raises(fastenc.InputError, match="needs calibration= ranges"):
        fastenc.embed_dataset(object(), model=tiny, precision="int8")


def test_cli_ray_writes_parquet_shards(cluster, tiny, tmp_path):
    source = rows(2000, seed=4)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"doc": r["id"], "text": r["text"]}) + "\n" for r in source))
    output = tmp_path / "vectors"
    env = dict(os.environ, RAY_ADDRESS=cluster, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "fastenc", "embed", "--ray", "--concurrency", "2", "--model", str(tiny),
               "--file", str(corpus), "--id-field", "doc", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(output)
    assert table.column_names == ["id", "embedding"]
    assert table.column("id").to_pylist() == [r["id"] for r in source]  # input order kept
    check_every_row_once(table.to_pylist(), source, fastenc.Encoder.from_pretrained(tiny))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    # a bad row: one line on stderr, status 2, no output directory
    corpus.write_text(corpus.read_text() + json.dumps({"doc": 2000, "text": None}) + "\n")
    result = subprocess.run(command[:-1] + [str(tmp_path / "again")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    # Ray's own C++ logger may add lines; fastenc's report is one line, the last
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("fastenc:")] == lines[-1:], result.stderr[-3000:]
    assert "column 'text': row" in lines[-1] and "not a string" in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "again").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
