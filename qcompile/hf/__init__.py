"""The transformers plug-in: ``quant_method="qcompile"`` for ``from_pretrained`` and ``save_pretrained``.

    import qcompile
    from qcompile.hf import QCompileConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QCompileConfig(recipe="int4-g128"))
    model.save_pretrained(out)                       # packed tensors + the per-site plan in config.json
    model = AutoModelForCausalLM.from_pretrained(out)  # only `import qcompile` needed

``import qcompile`` registers the plug-in without importing transformers: :func:`install` (run when this package
is imported) puts an import hook that registers the config and quantizer classes right after
``transformers.quantizers`` is imported (at once when it already is). Nothing happens when transformers is not
installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

_HOOKED = "transformers.quantizers"
_EXPORTS = {"QCompileConfig": "qcompile.hf.config", "QCompileHfQuantizer": "qcompile.hf.quantizer"}
_registered = False
_registering = False


def register() -> None:
    """Register ``QCompileConfig`` and ``QCompileHfQuantizer`` with transformers under ``"qcompile"`` (imports
    transformers; idempotent)."""
    global _registered, _registering
    if _registered or _registering:
        return  # done, or under way (its imports of transformers ran the import hook)
    _registering = True
    try:
        from qcompile.hf.config import register_config
        from qcompile.hf.quantizer import register_quantizer

        register_config()
        register_quantizer()
        _registered = True
    finally:
        _registering = False


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers`` so that :func:`register` runs once it is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _remove_hook()
            try:
                register()
            except Exception as error:  # a broken plug-in must not break importing transformers
                warnings.warn(f"qcompile: the transformers plug-in could not register: {error!r}", stacklevel=2)

        loader.exec_module = exec_then_register
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def install() -> None:
    """Register now when ``transformers.quantizers`` is imported already, else when it gets imported; nothing
    when transformers is not installed."""
    if _HOOKED in sys.modules:
        register()
        return
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        installed = False
    if installed and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str):
    if name in _EXPORTS:
        register()
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qcompile.hf' has no attribute {name!r}")


__all__ = ["QCompileConfig", "QCompileHfQuantizer", "install", "register"]

install()
