"""The command line, run as users run it: ``python -m fastenc`` in a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

import fastenc


def fastenc_cli(*args, stdin=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fastenc", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def expected():
    return fastenc.Encoder.from_pretrained().embed(["Welcome to NYC", "second text"])


def test_embed_json_lines(expected):
    result = fastenc_cli("embed", "Welcome to NYC", "second text")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 384
    torch.testing.assert_close(torch.tensor(rows), expected, rtol=0, atol=1e-6)
    assert result.stderr == ""  # the main job prints nothing but the vectors


def test_embed_file_and_outputs(tmp_path, expected):
    source = tmp_path / "texts.txt"
    source.write_text("Welcome to NYC\nsecond text\n", encoding="utf-8")
    result = fastenc_cli("embed", "--file", str(source), "--output", str(tmp_path / "out.npy"))
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), expected, rtol=0, atol=1e-6)  # this process and the CLI may run torch on different thread counts
    result = fastenc_cli("embed", "--file", "-", "--output", str(tmp_path / "out.jsonl"),
                         stdin="Welcome to NYC\nsecond text\n")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(rows), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, needle", [
    (("embed",), "no texts"),
    (("embed", "--model", "/definitely/not/here", "x"), "not a directory"),
    (("embed", "--output", "vectors.csv", "x"), "suffix must be one of .npy, .jsonl, .parquet"),
    (("embed", "--file", "/definitely/not/here.txt"), "cannot read --file"),
    (("embed", "--backend", "nope", "x"), "backend 'nope'"),
    (("embed", "--dtype", "int4", "x"), "dtype 'int4'"),
])
def test_user_errors_are_one_line_with_status_2(args, needle):
    result = fastenc_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_info():
    result = fastenc_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"fastenc {fastenc.__version__}" in result.stdout and "torch " in result.stdout
    assert "default: device" in result.stdout and "kernels:" in result.stdout


def test_check_passes_on_a_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path, "electra")
    result = fastenc_cli("check", "--model", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "last_hidden_state" in result.stdout and "-> ok" in result.stdout


def test_check_fails_on_a_broken_checkpoint(tmp_path, monkeypatch):
    """``check`` exits non-zero when fastenc's output breaks the tolerance rule."""
    from fastenc import check

    path = make_checkpoint(tmp_path, "bert")
    real = fastenc.Encoder.__call__
    monkeypatch.setattr(fastenc.Encoder, "__call__", lambda self, *a, **k: real(self, *a, **k) * 1.01)
    results = check.run_check(path)
    assert not all(r.ok for r in results)
    assert any("FAIL" in r.line() for r in results)
