"""``import fastenc`` while transformers is half imported (by another thread, or around fastenc's own import):
the ``attn_implementation="fastenc"`` registration waits for the module to finish instead of failing on
a "partially initialized module"."""

from __future__ import annotations

import importlib
import sys
import threading
import types

from fastenc import integrations


def test_a_module_another_thread_is_importing_is_registered_once_complete(tmp_path, monkeypatch):
    name = "fastenc_test_slow_module"
    gate = types.SimpleNamespace(started=threading.Event(), release=threading.Event())
    monkeypatch.setitem(sys.modules, "fastenc_test_gate", gate)
    (tmp_path / f"{name}.py").write_text(
        "import fastenc_test_gate as gate\n"
        "gate.started.set()\n"
        "gate.release.wait(30)\n"
        "Interface = 'complete'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=importlib.import_module, args=(name,))
    importer.start()
    try:
        assert gate.started.wait(30)
        module = sys.modules[name]
        assert integrations._initializing(module) and not hasattr(module, "Interface")
        seen, done = [], threading.Event()
        integrations._register_when_imported(name, lambda m: (seen.append(m.Interface), done.set()))
        assert not done.wait(0.2)  # still importing: nothing registered yet
    finally:
        gate.release.set()
        importer.join(30)
    assert done.wait(30) and seen == ["complete"]
    assert not integrations._initializing(sys.modules[name])
    sys.modules.pop(name, None)


def test_transformers_gets_the_fastenc_attention():
    import transformers.masking_utils
    import transformers.modeling_utils

    assert "fastenc" in transformers.modeling_utils.AttentionInterface._global_mapping
    assert "fastenc" in transformers.masking_utils.AttentionMaskInterface._global_mapping
