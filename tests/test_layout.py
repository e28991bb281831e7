"""No file of the project may shadow a module that the project or its dependencies import.

``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``; ``python -m ...`` puts the
working directory (the tree's root) there; pytest puts each test folder there (the test modules are
not in packages). A module ``kernels.py`` in any of them is found before Hugging Face's ``kernels``
package, which ``transformers`` imports when a model loads, and the script dies with an ImportError
that names the wrong file. The names checked: every installed distribution's top-level modules, the
standard library's, and a list of the field's packages that may be missing here but present where the
scripts run (the GPU machine has no ``kernels``, CI has no ``flash_attn``).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders a script, ``python -m`` or pytest runs from: each lands first on sys.path (the GPU check's package
# folder too, should one of its modules be run as a file).
SCRIPT_FOLDERS = [ROOT, ROOT / "benchmarks", ROOT / "benchmarks" / "gpu_check",
                  *sorted({p.parent for p in (ROOT / "tests").rglob("test_*.py")})]
FIELD_PACKAGES = {
    "kernels", "tokenizers", "transformers", "torch", "triton", "ray", "safetensors", "numpy", "huggingface_hub",
    "sentence_transformers", "accelerate", "flash_attn", "vllm", "infinity_emb", "FlagEmbedding", "xformers",
    "onnxruntime", "optimum", "peft", "datasets", "pyarrow", "pandas", "starlette", "uvicorn", "fastapi",
    "httpx", "orjson", "prometheus_client", "tqdm", "pytest", "hypothesis", "matplotlib", "scipy", "sklearn",
    "regex", "sentencepiece", "tiktoken", "jinja2", "yaml", "requests", "packaging", "filelock", "fsspec",
}


def importable_names(folder: Path) -> dict[str, Path]:
    """What ``import NAME`` would find in ``folder``: modules and regular packages (a folder without an
    ``__init__.py`` is a namespace portion, which any regular package elsewhere on the path beats)."""
    names = {}
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix in (".py", ".pyc", ".so", ".pyd"):
            names[entry.name.split(".")[0]] = entry
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
    return names


def taken_names() -> set[str]:
    installed = {name for name in metadata.packages_distributions() if name.isidentifier()}
    return installed | set(sys.stdlib_module_names) | FIELD_PACKAGES


def test_no_file_is_named_like_a_module_a_dependency_imports():
    taken = taken_names() - {"fastenc"}  # the project's own package, found at the root on purpose
    clashes = [f"{path.relative_to(ROOT)} shadows the module {name!r}"
               for folder in SCRIPT_FOLDERS for name, path in sorted(importable_names(folder).items())
               if name in taken]
    assert not clashes, "; ".join(clashes)


def test_the_check_sees_a_clash(tmp_path):
    """The test above can fail: a ``kernels.py`` beside a script is reported."""
    (tmp_path / "kernels.py").write_text("")
    (tmp_path / "fastenc_layout_probe.py").write_text("")
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "__init__.py").write_text("")
    (tmp_path / "results").mkdir()  # a plain folder shadows nothing
    found = {name for name in importable_names(tmp_path) if name in taken_names()}
    assert found == {"kernels", "tokenizers"}
