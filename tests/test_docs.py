"""The documentation site: every Python and shell snippet in ``docs/`` runs, and the site builds strictly.

Snippets run on the bundled all-MiniLM-L6-v2. ``path/to/model`` and ``path/to/all-MiniLM-L6-v2`` in a
snippet stand for it; the fine-tuned checkpoints the pipelines and retrieval pages name (SPLADE, BGE-M3,
ColBERT, a cross-encoder, ...) stand for tiny perturbed checkpoints of the same kind (``tests/checkpoints.py``),
so those snippets check the calls and their answers' form, not the models' quality. Python snippets share one namespace per page, which starts with ``fastenc`` and
``encoder`` (the bundled model, loaded once for the whole module). Shell snippets run with ``bash -e`` in
a scratch directory holding small ``corpus.txt`` and ``corpus.jsonl`` files. A snippet that cannot run here
is preceded by ``<!-- skip: reason -->`` and is reported as skipped with that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
STAND_INS = ("path/to/all-MiniLM-L6-v2", "path/to/model")
# Checkpoints the pages name, stood in for by tiny perturbed ones: a BERT with the same head, or a maker's.
TINY = {
    "path/to/bert-base-uncased": dict(head="mlm"),
    "path/to/sst2-model": dict(head="sequence_classification"),
    "path/to/ner-model": dict(head="token_classification"),
    "path/to/squad-model": dict(head="question_answering"),
    "path/to/deberta-v3-base-mnli": dict(head="sequence_classification",
                                         id2label={0: "entailment", 1: "neutral", 2: "contradiction"}),
    "path/to/ms-marco-cross-encoder": dict(head="sequence_classification", num_labels=1),
    # the retrieval page's checkpoints, by their own makers
    "path/to/e5-or-bge": lambda C, folder, minilm: C.minilm_with_prompts(minilm, folder / "model"),
    "path/to/splade": lambda C, folder, minilm: C.make_sparse_encoder(folder, "bert", "max", "relu", layout="current"),
    "path/to/bge-m3": lambda C, folder, minilm: C.make_bge_m3(folder),
    "path/to/colbert": lambda C, folder, minilm: C.make_colbert(folder, "bert", expansion=None),
}


@dataclass
class Snippet:
    page: str
    line: int
    language: str
    code: str
    skip: str | None


def snippets() -> list[Snippet]:
    """Every fenced ``python`` / ``bash`` block of every page, in page order."""
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        lines = path.read_text().split("\n")
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if not match:
                i += 1
                continue
            end = i + 1
            while not lines[end].startswith("```"):
                end += 1
            if match.group(1) in ("python", "bash", "sh"):
                before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                skip = SKIP.match(before.strip())
                found.append(Snippet(str(path.relative_to(DOCS)), i + 1, match.group(1),
                                     "\n".join(lines[i + 1:end]), skip.group(1) if skip else None))
            i = end + 1
    return found


SNIPPETS = snippets()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs")
    texts = ["Welcome to NYC", "A second line of the corpus.", "hi"]
    (path / "corpus.txt").write_text("".join(t + "\n" for t in texts))
    (path / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    """Builds the stand-in for one named checkpoint on first use; returns its path."""
    import checkpoints

    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            folder = tmp_path_factory.mktemp(name.rsplit("/", 1)[1])
            how = TINY[name]
            made[name] = str(how(checkpoints, folder, minilm_path) if callable(how)
                             else checkpoints.make_checkpoint(folder, "bert", seed=len(made) + 1, **how))
        return made[name]
    return get


@pytest.fixture(scope="module")
def namespaces(minilm_path):
    import fastenc

    encoder = fastenc.Encoder.from_pretrained(minilm_path)
    pages: dict[str, dict] = {}
    return lambda page: pages.setdefault(page, {"fastenc": fastenc, "encoder": encoder})


def _stand_in(code: str, model: str, tiny) -> str:
    for name in STAND_INS:
        code = code.replace(name, model)
    for name in TINY:
        if name in code:
            code = code.replace(name, tiny(name))
    return code


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"{s.page}:{s.line}" for s in SNIPPETS])
def test_snippet_runs(snippet, namespaces, workdir, minilm_path, tiny, monkeypatch):
    if snippet.skip:
        pytest.skip(snippet.skip)
    code = _stand_in(snippet.code, str(minilm_path), tiny)
    monkeypatch.chdir(workdir)
    if snippet.language == "python":
        exec(compile(code, f"docs/{snippet.page}:{snippet.line}", "exec"), namespaces(snippet.page))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    done = subprocess.run(["bash", "-e", "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"docs/{snippet.page}:{snippet.line} failed:\n{done.stdout}\n{done.stderr}"


def test_snippets_found():
    """The extraction sees the blocks (a broken fence pattern would make every snippet test vanish)."""
    runnable = [s for s in SNIPPETS if not s.skip]
    assert {s.language for s in runnable} == {"python", "bash"}
    assert any(s.page == "embeddings.md" for s in runnable)


def test_api_reference_covers_all():
    """Every name in ``fastenc.__all__`` has an entry in the Python API page."""
    import fastenc

    page = (DOCS / "reference" / "api.md").read_text()
    missing = [name for name in fastenc.__all__
               if f"::: fastenc.{name}\n" not in page + "\n" and f"`fastenc.{name}`" not in page]
    assert not missing, f"not in docs/reference/api.md: {missing}"


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` succeeds, and the pages carry their navigation, tables, code and plot."""
    site = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    home = (site / "index.html").read_text()
    assert 'class="md-nav' in home and "Serving" in home and "<img" in home
    assert (site / "assets" / "cpu-20261124.png").exists()
    serving = (site / "serving" / "index.html").read_text()
    assert "<table>" in serving and "<code>" in serving
    api = (site / "reference" / "api" / "index.html").read_text()
    import fastenc

    for name in fastenc.__all__:
        if name != "__version__":
            assert f'id="fastenc.{name}"' in api, name
    cli = (site / "reference" / "cli" / "index.html").read_text()
    from fastenc.cli import build_parser

    assert "&lt;!-- cli-reference" not in cli and "usage: fastenc embed" in cli
    for command in ("embed", "check", "run", "serve", "info", "bench"):
        assert f"fastenc {command}" in cli
    assert build_parser().prog == "fastenc"
