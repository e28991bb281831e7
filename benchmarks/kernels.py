"""Kernel benchmarks: ``fastenc bench --suite kernel`` (each Triton kernel against its torch twin and SDPA).

    python benchmarks/kernels.py [--device cuda|cpu] [--dtype fp16,bf16] [--quick] [--output DIR] ...

A thin wrapper: the machinery is the ``fastenc/bench/`` package; every option of ``fastenc bench`` works here.
"""

import sys

from fastenc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "kernel", *sys.argv[1:]]))
