"""One encoder shared by threads: a pipeline that truncates and ``embed`` calls that truncate differently
(or not at all), interleaved, each give what they give alone.

``tokenizers.Tokenizer`` keeps its truncation setting as state on the object, and every caller flips it:
without one lock around "set truncation, encode, reset" a pipeline call can encode under another
thread's setting (its long text then comes back cut at the other thread's length, or uncut and refused).
"""

from __future__ import annotations

import sys
import threading

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from task_helpers import task_checkpoint  # noqa: E402

import fastenc  # noqa: E402

LONG = "the cat sat on the mat and looked at the dog " * 12  # over the model's 96 positions
SHORT = ["a cat", "the dog sat", "hello world, how are you"]
ROUNDS = 25


def test_pipeline_and_embed_in_threads_equal_their_serial_results():
    encoder = fastenc.Encoder.from_pretrained(task_checkpoint("bert", "sequence_classification"), device="cpu")
    classify = fastenc.pipeline("text-classification", encoder)
    serial = {
        "pipeline": classify([LONG, SHORT[0]], truncation=True, top_k=None),
        "embed16": encoder.embed([LONG, *SHORT], max_length=16),
        "embed_whole": encoder.embed(SHORT, truncate=False),
    }
    calls = {
        "pipeline": lambda: classify([LONG, SHORT[0]], truncation=True, top_k=None),
        "embed16": lambda: encoder.embed([LONG, *SHORT], max_length=16),
        "embed_whole": lambda: encoder.embed(SHORT, truncate=False),
    }
    start = threading.Barrier(6)
    mismatches, errors = [], []

    def work(name):
        start.wait()
        for _ in range(ROUNDS):
            try:
                got = calls[name]()
            except Exception as exc:  # noqa: BLE001 - collected, the assertion below names it
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                return
            same = torch.equal(got, serial[name]) if isinstance(got, torch.Tensor) else got == serial[name]
            if not same:
                mismatches.append(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in calls for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors[:3]
    assert not mismatches, f"{len(mismatches)} results differ from the serial ones: {sorted(set(mismatches))}"
