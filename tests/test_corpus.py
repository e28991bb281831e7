"""Corpus-scale embedding: ``embed_iter``, ``fastenc embed --file`` over txt / jsonl / parquet, storage options.

Speed matters here, so the model is a tiny perturbed BERT (tests/checkpoints.py), not MiniLM.
"""

import fcntl
import json
import os
import pty
import random
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from checkpoints import make_checkpoint

import fastenc
from fastenc.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog by the river stone while light paper music runs green "
         "house of cards under seven bridges").split()


def corpus(n: int, seed: int = 0, max_words: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "bert")


@pytest.fixture(scope="module")
def encoder(tiny):
    return fastenc.Encoder.from_pretrained(tiny)


def run_cli(*args, stdin=None, env=None, timeout=300):
    """``python -m fastenc`` in a subprocess, as users run it."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    return subprocess.run([sys.executable, "-m", "fastenc", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def leftovers(directory: Path) -> list[str]:
    """Temporary outputs left behind (``.NAME.XXXX.part``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# ----------------------------------------------------------------------------------------- embed_iter
def test_embed_iter_gives_embed_bits_over_many_windows(encoder):
    texts = corpus(2500, seed=1)
    expected = encoder.embed(texts, window=700, batch_size=64)
    for read_ahead in (True, False):
        stream = encoder.embed_iter((t for t in texts), window=700, batch_size=64, read_ahead=read_ahead)
        got = torch.stack(list(stream))
        assert torch.equal(got, expected)  # bitwise: the same windows, the same batches, the same kernels
        assert stream.texts == len(texts) and stream.tokens == sum(len(e.ids) for e in encoder.text.encode(texts))
    # within one window, embed_iter is embed with its default window
    assert torch.equal(torch.stack(list(encoder.embed_iter(iter(texts[:600])))), encoder.embed(texts[:600]))
    # windows() hands out the rest as whole windows, after rows taken one by one
    stream = encoder.embed_iter(iter(texts), window=700, batch_size=64)
    first = [next(stream) for _ in range(3)]
    rest = list(stream.windows())
    assert [len(w) for w in rest] == [697, 700, 700, 400]
    assert torch.equal(torch.cat([torch.stack(first), *rest]), expected)


def test_embed_iter_across_windows_on_the_torch_backend_is_within_rounding(encoder):
    """Different windows put a text in a different batch; torch's BLAS may then round differently."""
    texts = corpus(1500, seed=2)
    whole = encoder.embed(texts, window=len(texts))
    torch.testing.assert_close(torch.stack(list(encoder.embed_iter(iter(texts), window=400))), whole,
                               rtol=1e-5, atol=1e-5)


def test_embed_iter_input_errors(encoder):
    with pytest.raises(TypeError, match="iterable of str, got str"):
        encoder.embed_iter("one text")
    texts = corpus(250) + [b"bytes"] + corpus(10)
    stream = encoder.embed_iter(iter(texts), window=100)
    got = [next(stream) for _ in range(200)]  # the windows before the bad text come out first
    assert len(got) == 200
    with pytest.raises(TypeError, match=r"texts\[250\] is bytes, not str"):
        list(stream)
    with pytest.raises(fastenc.InputError, match="window must be a positive int"):
        encoder.embed_iter(iter(texts), window=0)
    with pytest.raises(fastenc.InputError, match=r"text 7 has (more than )?\d+ tokens"):
        list(encoder.embed_iter(iter(["a"] * 7 + ["b " * 600]), window=5, truncate=False))


# ------------------------------------------------------------------------------------- the command line
def test_cli_streams_20000_rows_in_input_order_with_embed_bits(tiny, encoder, tmp_path):
    """A 20,000-row file, embedded window by window (10 windows), equals embed() of the same texts."""
    texts = corpus(20000, seed=3)
    source = tmp_path / "corpus.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text, "other": i}) + "\n")
    output = tmp_path / "vectors.parquet"
    assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--id-field", "id", "--output",
                     str(output), "--window", "2048", "--batch-size", "256"]) == 0
    table = pq.read_table(output)
    assert table.column_names == ["id", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 72)
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(texts))]
    got = torch.from_numpy(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    expected = encoder.embed(texts, window=2048, batch_size=256)
    assert torch.equal(got, expected)
    assert leftovers(tmp_path) == []
    # the first two windows as text lines into .npy: the same bits
    lines = tmp_path / "corpus.txt"
    lines.write_text("\n".join(texts[:4096]) + "\n", encoding="utf-8")
    assert cli_main(["embed", "--model", str(tiny), "--file", str(lines), "--output", str(tmp_path / "v.npy"),
                     "--window", "2048", "--batch-size", "256"]) == 0
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "v.npy")), expected[:4096])


PEAK_RSS = """
import resource, sys
from fastenc.cli import main
code = main(["embed", "--model", sys.argv[1], "--file", sys.argv[2], "--output", sys.argv[3], "--window", "256",
             "--batch-size", "256"])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_stays_flat_when_the_file_grows_tenfold(tmp_path):
    """Peak RSS of the whole command, in a fresh process, for a file and the same file 10x longer."""
    tiny = make_checkpoint(tmp_path / "tiny1", "bert", num_hidden_layers=1)
    rows = corpus(2000, seed=4, max_words=20)
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("\n".join(rows) + "\n", encoding="utf-8")
    big.write_text("\n".join(rows * 10) + "\n", encoding="utf-8")
    peaks = {}
    for source in (small, big):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tiny), str(source), str(tmp_path / "out.npy")],
                                capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        assert result.returncode == 0, result.stderr
        code, peak = result.stdout.split()
        assert code == "0"
        peaks[source.name] = int(peak) / 1024  # MiB
        assert np.load(tmp_path / "out.npy", mmap_mode="r").shape == (len(rows) * (10 if source is big else 1), 72)
    # Holding the big file's 18,000 extra rows would add their texts and token encodings (about 80 tokens
    # a row: over 100 MiB); streaming holds two windows of 256 rows whatever the length of the file.
    grown = peaks["big.txt"] - peaks["small.txt"]
    assert grown < 40, peaks
    print(f"peak RSS: {peaks}")


def write_bad_jsonl(path: Path) -> None:
    rows = [json.dumps({"id": i, "text": text}) for i, text in enumerate(corpus(3000, seed=5))]
    rows[1500] = json.dumps({"id": 1500, "body": "no text"})  # line 1501
    rows[2000] = json.dumps({"id": 2000, "text": 42})  # line 2001
    rows[2500] = '{"id": 2500, "text": "unterminated'  # line 2501
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name, make, needle", [
    ("corpus.jsonl", write_bad_jsonl, "corpus.jsonl:1501: no field 'text'"),
    ("corpus.txt", lambda p: p.write_bytes(b"fine\n" * 9 + b"caf\xe9\n" + b"fine\n"), "corpus.txt:10: not UTF-8"),
    ("corpus.parquet", lambda p: pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), p),
     "corpus.parquet: row 2: 'text' is null"),
    ("corpus.jsonl", lambda p: p.write_text('{"text": "a"}\n[1, 2]\n'), "corpus.jsonl:2: a JSON list, not an object"),
    ("corpus.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), "column 'text' is int64, not strings"),
])
def test_a_bad_row_stops_the_run_naming_file_and_line(tiny, tmp_path, name, make, needle):
    source = tmp_path / name
    make(source)
    output = tmp_path / "out.npy"
    result = run_cli("embed", "--model", tiny, "--file", source, "--output", output, "--window", "1000")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not output.exists() and leftovers(tmp_path) == []


def test_on_error_skip_skips_and_reports_bad_rows(tiny, encoder, tmp_path):
    source = tmp_path / "corpus.jsonl"
    write_bad_jsonl(source)
    output = tmp_path / "out.jsonl"
    result = run_cli("embed", "--model", tiny, "--file", source, "--id-field", "id", "--output", output,
                     "--on-error", "skip", "--window", "1000")
    assert result.returncode == 0, result.stderr
    assert "skipped corpus" not in result.stderr  # names are printed as given
    for needle in (":1501: no field 'text'", ":2001: field 'text' is a number, not a string",
                   ":2501: not valid JSON", "skipped 3 bad row(s)", "wrote 2997"):
        assert needle in result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == [i for i in range(3000) if i not in (1500, 2000, 2500)]
    texts = [json.loads(line)["text"] for i, line in enumerate(source.read_text().splitlines())
             if i not in (1500, 2000, 2500)]
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in records]),
                               encoder.embed(texts, window=1000), rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["/proc/nope/x.npy", "{tmp}", "{tmp}/missing/x.jsonl", "{tmp}/x.parquet/"])
def test_output_errors_are_one_line_and_status_2(tmp_path, target):
    """issue 11: `fastenc embed --output /proc/nope/x.npy hello` printed a traceback and exited 1."""
    target = target.format(tmp=tmp_path)
    if target.endswith("x.parquet/"):
        Path(target).mkdir()
        target = target.rstrip("/")
    elif target == str(tmp_path):
        target = str(tmp_path / "dir.npy")
        Path(target).mkdir()
    result = run_cli("embed", "--output", target, "hello")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastenc: error: ") and "Traceback" not in result.stderr
    assert "--output" in lines[0]


def test_a_failed_run_leaves_the_previous_output_untouched(tiny, tmp_path):
    """Written to a temporary file beside the target and renamed at the end: a run that fails after
    writing windows leaves the previous file as it was, and no temporary file."""
    source = tmp_path / "corpus.jsonl"
    write_bad_jsonl(source)
    for name in ("out.npy", "out.jsonl", "out.parquet"):
        output = tmp_path / name
        output.write_bytes(b"previous run")
        assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--output", str(output),
                         "--window", "500"]) == 2  # windows 1-3 are written before line 1501 stops the run
        assert output.read_bytes() == b"previous run"
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_leaves_no_output(tiny, tmp_path, signum, status):
    """Interrupted mid-run (windows already written to the temporary file, the reader waiting on a pipe
    that stays open): no output file, no temporary file, and no hang."""
    output = tmp_path / "out.npy"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "fastenc", "embed", "--model", str(tiny), "--file", "-",
                                "--output", str(output), "--window", "100"], stdin=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    try:
        process.stdin.write(("\n".join(corpus(450)) + "\n").encode())
        process.stdin.flush()  # and keep it open: the reader blocks after 450 rows
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the 4 full windows in the temporary file
            parts = list(tmp_path.glob(".out.npy.*.part"))
            if parts and parts[0].stat().st_size >= 128 + 400 * 72 * 4:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run never wrote its first windows")
        process.send_signal(signum)
        assert process.wait(timeout=60) == status, process.stderr.read().decode()
    finally:
        process.kill()
        process.stdin.close()
        process.stderr.close()
    assert not output.exists() and leftovers(tmp_path) == []


def test_progress_bar_on_a_terminal_shows_texts_and_tokens_per_second(tiny, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus(1200)) + "\n", encoding="utf-8")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "fastenc", "embed", "--model", str(tiny), "--file", str(source),
                                "--output", str(tmp_path / "out.npy"), "--window", "400"], stderr=terminal,
                               stdout=subprocess.DEVNULL, env=env)
    os.close(terminal)
    chunks = []

    def drain():
        while True:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    data = os.read(controller, 4096)
                except OSError:  # EIO: the other side closed
                    return
                if not data:
                    return
                chunks.append(data)
            elif process.poll() is not None:
                return

    reader = threading.Thread(target=drain)
    reader.start()
    assert process.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(controller)
    shown = b"".join(chunks).decode(errors="replace")
    assert "1200texts" in shown.replace(" ", "") and "texts/s" in shown and "tokens/s" in shown, shown


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus(600)) + "\n", encoding="utf-8")
    result = run_cli("embed", "--model", tiny, "--file", source, "--output", tmp_path / "out.npy")
    assert result.returncode == 0 and result.stderr == ""


# ------------------------------------------------------------------------------------------ storage
def test_dim_truncates_then_renormalises(encoder):
    texts = corpus(300, seed=6)
    full = encoder.embed(texts, normalize=True)
    cut = encoder.embed(texts, normalize=True, dim=40)
    assert cut.shape == (300, 40)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(full[:, :40], dim=1), rtol=0, atol=1e-7)
    torch.testing.assert_close(cut.norm(dim=1), torch.ones(300))
    raw = encoder.embed(texts, normalize=False, dim=40)  # not normalised before: only cut
    assert torch.equal(raw, encoder.embed(texts, normalize=False)[:, :40])
    with pytest.raises(fastenc.InputError, match=r"dim must be an int in \[1, 72\]"):
        encoder.embed(texts, dim=73)


def test_precisions(encoder):
    texts = corpus(900, seed=7)
    full = encoder.embed(texts, window=400)
    half = encoder.embed(texts, window=400, precision="float16")
    assert half.dtype == torch.float16 and torch.equal(half, full.half())
    bits = encoder.embed(texts, window=400, precision="binary")
    assert bits.dtype == torch.uint8 and bits.shape == (900, 9)
    assert torch.equal(bits, torch.from_numpy(np.packbits(full.numpy() > 0, axis=1)))
    # int8: ranges from the first window (as embed_iter must take them), codes within half a step
    codes = encoder.embed(texts, window=400, precision="int8")
    ranges = torch.stack([full[:400].amin(0), full[:400].amax(0)])
    step = (ranges[1] - ranges[0]) / 255
    assert codes.dtype == torch.int8
    inside = (full >= ranges[0]) & (full <= ranges[1])
    back = ranges[0] + (codes.float() + 128) * step
    assert ((back - full).abs() <= step / 2 + 1e-6)[inside].all()
    assert ((full < ranges[0]) <= (codes == -128)).all() and ((full > ranges[1]) <= (codes == 127)).all()
    stream = encoder.embed_iter(iter(texts), window=400, precision="int8")
    assert torch.equal(torch.stack(list(stream)), codes)
    assert torch.equal(stream.calibration, ranges)
    given = encoder.calibrate(texts, window=400)
    assert torch.equal(given, torch.stack([full.amin(0), full.amax(0)]))
    whole = encoder.embed(texts, window=400, precision="int8", calibration=given.numpy())  # one set of ranges:
    parts = [encoder.embed(texts[i:i + 400], precision="int8", calibration=given) for i in (0, 400, 800)]
    assert torch.equal(whole, torch.cat(parts))  # codes depend on nothing else
    with pytest.raises(fastenc.InputError, match=r"shape \(2, 72\)"):
        encoder.embed(texts, precision="int8", calibration=np.zeros((2, 10)))
    with pytest.raises(fastenc.InputError, match="precision 'int4' is not supported"):
        encoder.embed(texts, precision="int4")
    with pytest.raises(fastenc.InputError, match="calibration ranges apply to precision='int8'"):
        encoder.embed(texts, calibration=given)


def test_cli_storage_options(tiny, encoder, tmp_path):
    texts = corpus(700, seed=8)
    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"key": list(range(700)), "body": texts}), source, row_group_size=128)
    out = tmp_path / "v.parquet"
    assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--text-field", "body", "--id-field", "key",
                     "--output", str(out), "--precision", "int8", "--dim", "48", "--window", "300"]) == 0
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.int8(), 48)
    assert table.column("id").to_pylist() == list(range(700))
    expected = encoder.embed(texts, precision="int8", dim=48, window=300)
    assert torch.equal(torch.from_numpy(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))), expected)
    sidecar = json.loads((tmp_path / "v.parquet.ranges.json").read_text())
    ranges = torch.tensor([sidecar["min"], sidecar["max"]])
    assert torch.equal(ranges, fastenc.Encoder.calibrate(encoder, texts[:300], dim=48))
    assert json.loads(table.schema.metadata[b"fastenc"])["precision"] == "int8"
    # the ranges reused for another file code it alike
    npy = tmp_path / "v.npy"
    assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--text-field", "body", "--output",
                     str(npy), "--precision", "int8", "--dim", "48", "--calibration",
                     str(tmp_path / "v.parquet.ranges.json"), "--window", "128"]) == 0
    assert torch.equal(torch.from_numpy(np.load(npy)), expected)
    assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--text-field", "body", "--output",
                     str(npy), "--precision", "binary"]) == 0
    assert np.load(npy).dtype == np.uint8 and np.load(npy).shape == (700, 9)
    assert cli_main(["embed", "--model", str(tiny), "--file", str(source), "--text-field", "body", "--output",
                     str(tmp_path / "h.jsonl"), "--precision", "float16"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert torch.equal(torch.tensor(rows, dtype=torch.float16), encoder.embed(texts, precision="float16"))


def test_import_fastenc_imports_neither_ray_nor_pyarrow():
    code = ("import sys, fastenc; fastenc.embed_dataset; "
            "print(sorted(m for m in ('ray', 'pyarrow', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
