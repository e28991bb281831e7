"""Drop-in integrations: ``fastenc.optimize`` and ``attn_implementation="fastenc"`` (optional, lazy imports).

Neither ``transformers`` nor ``sentence_transformers`` is imported by ``import fastenc``: both are
optional, and importing them costs seconds. Instead:

* ``optimize(model)`` looks at the model's class only through ``sys.modules`` — a ``transformers`` or
  ``sentence_transformers`` object can only exist once its library has been imported.
* ``attn_implementation="fastenc"`` must be registered with ``AttentionInterface`` (in
  ``transformers.modeling_utils``) and ``AttentionMaskInterface`` (in ``transformers.masking_utils``)
  before a model asks for it. ``install_import_hooks`` (run by ``import fastenc``) registers with each
  module that is already imported, and for the others puts a small finder at the front of
  ``sys.meta_path``: it finds nothing itself, but wraps the real loader of exactly those two modules so
  that, right after the module has run, the registration runs on it — so ``import transformers``
  stays as fast as it was, and a registration never imports anything. The finder removes itself once
  both modules are registered. A module that is in ``sys.modules`` but still running (another thread is
  importing it, or ``import fastenc`` happens inside its own import) is registered by a daemon thread
  once its import completes: registering a half-run module failed with "partially initialized module".
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("fastenc")


def optimize(model, *, backend: str | None = None, dtype=None):
    """Patch ``model`` in place so that its encoder runs on fastenc; returns the same object.

    ``model``: a ``transformers`` model of a supported family (the base model or any ``*For…`` model),
    or a ``sentence_transformers`` model (``SentenceTransformer``; ``CrossEncoder`` and
    ``SparseEncoder`` too) whose transformer module is one. Anything else raises ``TypeError``.
    ``dtype``: ``None`` runs the encoder in the model's own dtype; ``"fp8"`` quantizes its GEMMs (see
    ``fastenc.fp8``), the hidden states handed back in the model's dtype.
    """
    sentence_transformers = sys.modules.get("sentence_transformers")
    if sentence_transformers is not None:
        from .sentence_transformers import is_sentence_transformers_model, optimize_sentence_transformer

        if is_sentence_transformers_model(model):
            return optimize_sentence_transformer(model, backend=backend, dtype=dtype)
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        from .transformers import optimize_model

        return optimize_model(model, backend=backend, dtype=dtype)
    raise TypeError(f"fastenc.optimize cannot patch a {type(model).__module__}.{type(model).__qualname__}: it takes "
                    "a transformers model of a supported family or a sentence_transformers.SentenceTransformer")


class _CallbackLoader(importlib.abc.Loader):
    """A module's own loader, then a callback on the freshly executed module."""

    def __init__(self, loader, after: Callable[[ModuleType], None]):
        self._loader = loader
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, … of the real loader
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs ``callbacks[name](module)`` once module ``name`` has been imported (see the module docstring)."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]):
        self._callbacks = dict(callbacks)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, lambda module: self._fire(fullname, module))
        return spec

    def _fire(self, name: str, module: ModuleType) -> None:
        callback = self._callbacks.pop(name, None)
        if not self._callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)
        if callback is not None:
            _run_callback(callback, module)


def _run_callback(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # never break the user's import of transformers
        logger.warning("fastenc: could not register attn_implementation='fastenc' with %s: %s", module.__name__, exc)


def _initializing(module: ModuleType) -> bool:
    """Whether ``module`` is still being executed by an import (importlib marks its spec meanwhile)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback`` on module ``name`` once its import, under way in this or another thread, completes.

    ``import_module`` of a module another thread is importing waits for that import to finish; a daemon
    thread does the waiting, so neither ``import fastenc`` nor that import waits for the other.
    """
    def wait_then_register():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the importer sees its own error; ours is only a warning
            logger.warning("fastenc: could not register attn_implementation='fastenc': %s failed to import: %s",
                           name, exc)
            return
        _run_callback(callback, module)

    threading.Thread(target=wait_then_register, name=f"fastenc-register-{name}", daemon=True).start()


def install_import_hooks() -> None:
    """Register ``attn_implementation="fastenc"`` with transformers, now or when it gets imported."""
    if any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        return
    from . import transformers as integration  # torch only; transformers itself is not imported

    pending = {}
    for name, callback in (("transformers.modeling_utils", integration.register_attention),
                           ("transformers.masking_utils", integration.register_mask)):
        module = sys.modules.get(name)
        if module is None:
            pending[name] = callback
        elif _initializing(module):
            _register_when_imported(name, callback)
        else:
            _run_callback(callback, module)
    if pending:
        sys.meta_path.insert(0, _RegisterOnImport(pending))
