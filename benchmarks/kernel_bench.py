"""Kernel benchmarks: ``fastenc bench --suite kernel`` (each Triton kernel against its torch twin and SDPA).

    python benchmarks/kernel_bench.py [--device cuda|cpu] [--dtype fp16,bf16] [--quick] [--output DIR] ...

A thin wrapper: the machinery is the ``fastenc/bench/`` package; every option of ``fastenc bench`` works here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tree's fastenc, installed or not

from fastenc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "kernel", *sys.argv[1:]]))
