"""Helpers shared by test_heads.py, test_pipelines.py and test_integrations.py.

``task_checkpoint(family, head)`` builds each tiny checkpoint once per test session (in a temporary
directory removed at exit), so the three modules do not build the same 35 checkpoints three times.
``compare_outputs`` checks that two pipeline outputs have the same structure, keys (in order), strings
and integers, and returns the largest difference between their floats.
"""

from __future__ import annotations

import atexit
import pathlib
import shutil
import tempfile

import numpy as np

import checkpoints as C

TASK_HEADS = ("mlm", "sequence_classification", "token_classification", "question_answering")
_ROOT: pathlib.Path | None = None
_BUILT: dict[tuple, pathlib.Path] = {}


def task_checkpoint(family: str, head: str | None, **overrides) -> pathlib.Path:
    """A tiny perturbed ``family`` checkpoint with ``head`` (None: the base model), built once per session."""
    global _ROOT
    key = (family, head, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        if _ROOT is None:
            _ROOT = pathlib.Path(tempfile.mkdtemp(prefix="fastenc-tasks-"))
            atexit.register(shutil.rmtree, _ROOT, True)
        name = "-".join([family, head or "base"] + [f"{k}={v}" for k, v in sorted(overrides.items())])
        _BUILT[key] = C.make_checkpoint(_ROOT / name, family, head=head, seed=len(_BUILT), **overrides)
    return _BUILT[key]


def mask_token(family: str) -> str:
    return C.mask_token(family)


def compare_outputs(ours, theirs, path: str = "$") -> float:
    """The largest float difference between two outputs; AssertionError on any other difference."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__} where transformers has a dict"
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != transformers' {list(theirs)}"
        return max((compare_outputs(ours[k], theirs[k], f"{path}.{k}") for k in theirs), default=0.0)
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, list), f"{path}: {type(ours).__name__} where transformers has a list"
        assert len(ours) == len(theirs), f"{path}: {len(ours)} items, transformers has {len(theirs)}"
        return max((compare_outputs(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs))),
                   default=0.0)
    if isinstance(theirs, (float, np.floating)):
        assert isinstance(ours, float), f"{path}: {ours!r} is not a float (transformers: {theirs!r})"
        assert np.isfinite(ours), f"{path}: {ours!r}"
        return abs(ours - float(theirs))
    if isinstance(theirs, (int, np.integer)) and not isinstance(theirs, bool):
        assert isinstance(ours, int) and not isinstance(ours, bool), f"{path}: {ours!r} is not an int"
        assert ours == int(theirs), f"{path}: {ours!r} != transformers' {theirs!r}"
        return 0.0
    assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} != transformers' {theirs!r}"
    return 0.0
