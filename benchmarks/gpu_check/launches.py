"""What a run of fastenc's kernels will compile: launch keys, and Triton's compile hooks.

Triton compiles a kernel once per *specialisation*: its constexprs and options (``num_warps``,
``num_stages``), the dtypes of its tensor arguments, whether each pointer is 16-byte aligned, and whether
each integer argument is 1 or a multiple of 16 (and needs 64 bits). ``launch_key`` writes that down for
one launch, so that counting distinct keys counts compiles without compiling anything.

``record(path, plan_only)`` patches the ``run`` of Triton's ``JITFunction`` and of the interpreter's
``InterpretedFunction`` to append each new key to ``path`` (JSON lines); ``plan_only`` also skips the
launch itself, so a plan of GPU-sized work costs only the host's glue (the outputs stay as allocated).
``compile_timer`` uses Triton's own hooks (``jit_cache_hook`` before a new specialisation is built or
read from the disk cache, ``jit_post_compile_hook`` after) to time each compile per kernel.

Loaded as a pytest plugin (``-p benchmarks.gpu_check.launches``) it records when ``FASTENC_LAUNCH_LOG``
is set (``FASTENC_LAUNCH_PLAN=1``: without launching, each test then reported skipped: its checks saw
no kernel's output), and writes the selected tests to ``FASTENC_GPU_SUBSET`` when that is set.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from pathlib import Path

import pytest

LOG_ENV, PLAN_ENV, SUBSET_ENV = "FASTENC_LAUNCH_LOG", "FASTENC_LAUNCH_PLAN", "FASTENC_GPU_SUBSET"
OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
SHAPE_ARGS = ("N", "K")  # integer arguments whose values the compile report shows (GEMM tiles)
_lock = threading.Lock()
_installed: dict = {}  # class -> its original run
_state: dict = {}  # where keys go, whether launches are skipped, the keys seen


def _parameters(fn) -> list[tuple[str, bool, object]]:
    """``(name, is_constexpr, default)`` of a jitted function's parameters (either kind of Triton function)."""
    cached = getattr(fn, "_fastenc_parameters", None)
    if cached is None:
        signature = inspect.signature(fn.fn)
        cached = [(p.name, "constexpr" in str(p.annotation), p.default) for p in signature.parameters.values()]
        fn._fastenc_parameters = cached
    return cached


def _spec(value) -> str:
    """Triton's specialisation of one runtime argument."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        kind = "one" if value == 1 else "d16" if value % 16 == 0 else "int"
        return kind + ("64" if not -2**31 <= value < 2**31 else "")
    if isinstance(value, float):
        return "fp32"
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "data_ptr"):
        return f"{str(dtype).removeprefix('torch.')}{'/a16' if value.data_ptr() % 16 == 0 else ''}"
    return type(value).__name__


def launch_key(fn, args: tuple, kwargs: dict) -> tuple[str, str, dict]:
    """``(kernel name, key, shape)`` of a launch: the key is Triton's specialisation (module docstring);
    ``shape`` holds the values of the ``SHAPE_ARGS`` and the constexprs (for reports)."""
    name = fn.fn.__name__
    parts, shape = [], {}
    positional = list(args)
    for pname, constexpr, default in _parameters(fn):
        value = positional.pop(0) if positional else kwargs.get(pname, default)
        if value is inspect.Parameter.empty:
            value = None
        if constexpr:
            parts.append(f"{pname}={value!r}")
            shape[pname] = value
        else:
            parts.append(_spec(value))
            if pname in SHAPE_ARGS and isinstance(value, int):
                shape[pname] = value
            elif "dtype" not in shape and hasattr(value, "data_ptr"):
                shape["dtype"] = str(value.dtype).removeprefix("torch.")
    if "dtype" in shape and "float8" not in shape["dtype"] and any(
            "float8" in str(getattr(v, "dtype", "")) for v in [*args, *kwargs.values()]):
        shape["dtype"] += "+e4m3"  # a 16-bit input quantized in the kernel for e4m3 weights
    options = [f"{option}={kwargs[option]!r}" for option in OPTIONS if option in kwargs]
    return name, f"{name}({', '.join(parts)})[{', '.join(options)}]", shape


def record(path: Path, plan_only: bool = False) -> None:
    """Append each new launch key to ``path`` from now on (see the module docstring). Called again, it
    writes to the new ``path`` and counts keys afresh."""
    from triton.runtime import interpreter, jit

    _state.update(path=Path(path), plan_only=plan_only, seen=set())
    if _installed:
        return

    def patched(original):
        def run(self, *args, grid, warmup, **kwargs):
            name, key, shape = launch_key(self, args, kwargs)
            seen = key + json.dumps(shape, sort_keys=True, default=str)  # one binary may serve several N, K
            with _lock:
                if seen not in _state["seen"]:
                    _state["seen"].add(seen)
                    with open(_state["path"], "a") as handle:
                        handle.write(json.dumps({"kernel": name, "key": key, "shape": shape}, default=str) + "\n")
            if _state["plan_only"]:
                return None
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        _installed[cls] = cls.run
        cls.run = patched(cls.run)


def stop() -> None:
    """Launch as before ``record``."""
    for cls, run in _installed.items():
        cls.run = run
    _installed.clear()
    _state.clear()


def read_keys(path: Path, *, every_shape: bool = False) -> list[dict]:
    """The distinct launch keys ``record`` wrote, in order (``every_shape``: each key once per ``shape``)."""
    if not path.exists():
        return []
    out, seen = [], set()
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        mark = item["key"] + (json.dumps(item["shape"], sort_keys=True) if every_shape else "")
        if mark not in seen:
            seen.add(mark)
            out.append(item)
    return out


def plan_keys(work: Path, stage: str) -> list[str]:
    """The keys a plan recorded for ``stage`` (``plan-<stage>.jsonl`` in the work folder; none without a plan)."""
    return [item["key"] for item in read_keys(Path(work) / f"plan-{stage}.jsonl")]


class compile_timer:
    """Per kernel, the specialisations this process built or loaded and the seconds it took (Triton's hooks).

    A specialisation already in the process's memory calls no hook; one found in the Triton cache on disk
    calls both and adds no entry to it (counted in ``loads``); a new one adds its entry (``compiles``). Meant
    for a process with a Triton cache of its own (``TRITON_CACHE_DIR``)."""

    def __init__(self):
        self.kernels: dict[str, dict] = {}
        self._started: dict = {}

    def __enter__(self):
        from triton import knobs

        self._knobs = knobs.runtime
        self._cache = Path(knobs.cache.dir)
        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after
        return self

    def __exit__(self, *exc):
        self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._saved

    def _entries(self) -> int:
        return sum(1 for _ in self._cache.iterdir()) if self._cache.is_dir() else 0

    def _before(self, **kwargs):
        self._started[str(kwargs.get("key"))] = (time.perf_counter(), self._entries())
        return False  # compile as usual

    def _after(self, **kwargs):
        started = self._started.pop(str(kwargs.get("key")), None)
        if started is None:
            return False
        seconds, new = time.perf_counter() - started[0], self._entries() > started[1]
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(fn)
        entry = self.kernels.setdefault(name.split(".")[-1], {"compiles": 0, "loads": 0, "compile_s": 0.0})
        entry["compiles" if new else "loads"] += 1
        entry["compile_s"] = round(entry["compile_s"] + seconds, 3)
        return False


# ------------------------------------------------------------------------------------------- pytest plugin
def pytest_configure(config):
    path = os.environ.get(LOG_ENV)
    if path:
        record(Path(path), plan_only=os.environ.get(PLAN_ENV) == "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In a plan (``FASTENC_LAUNCH_PLAN=1``) no kernel ran, so a test's verdict means nothing: it is reported
    skipped, with the reason, whatever its checks found."""
    report = yield
    if os.environ.get(PLAN_ENV) == "1" and call.when == "call" and report.outcome != "skipped":
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], "plan: its launches were recorded, no kernel ran")
    return report


def pytest_collection_finish(session):
    """The selected tests, for the report: ``{test function: [test ids]}`` per module."""
    path = os.environ.get(SUBSET_ENV)
    if not path or not session.items:  # a pytest-xdist controller collects nothing: its workers write it
        return
    subset: dict[str, list[str]] = {}
    for item in session.items:
        module = item.nodeid.split("::")[0]
        function = getattr(item, "originalname", None) or item.name.split("[")[0]
        marks = sorted({m.name for m in item.iter_markers() if m.name in ("cuda", "gpu")})
        subset.setdefault(f"{module}::{function}", []).append(item.nodeid.split("::", 1)[1] + f" {'/'.join(marks)}")
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # each xdist worker collects, and writes the same file: whole
    tmp.write_text(json.dumps(subset, indent=1) + "\n")
    os.replace(tmp, path)
