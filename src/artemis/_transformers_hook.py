"""Registers Artemis' quantizer with transformers the moment transformers' quantizer registry
is imported, without importing torch or transformers before then.

``import artemis`` calls :func:`install`. If ``transformers.quantizers.auto`` is already
imported, :func:`artemis.sparse.hf_quantizer.register` runs now; otherwise a finder on
``sys.meta_path`` runs it right after that module is first executed (which
``from_pretrained`` always does before it reads a config). Standard library only, so
``import artemis`` (and ``artemis --help``) stays fast.

Example:
    >>> import artemis, sys
    >>> import transformers.quantizers.auto as auto
    >>> "artemis" in auto.AUTO_QUANTIZER_MAPPING
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from typing import Any

__all__ = ["TARGET", "install", "uninstall"]

logger = logging.getLogger(__name__)

#: the module whose import triggers the registration
TARGET = "transformers.quantizers.auto"
_lock = threading.RLock()


def _register() -> None:
    importlib.import_module("artemis.sparse.hf_quantizer").register()


class _HookLoader(importlib.abc.Loader):
    """Runs the real loader, then registers the plugin."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        try:
            _register()
        except Exception as exc:  # never break `import transformers` because of the plugin
            logger.warning("artemis: registering the transformers quantizer failed: %s", exc)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else as soon as it is
    (cheap and idempotent)."""
    with _lock:
        if TARGET in sys.modules:
            try:
                _register()
            except Exception as exc:  # never break `import artemis` because of the plugin
                logger.warning("artemis: registering the transformers quantizer failed: %s", exc)
            return
        if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())


def uninstall() -> None:
    """Take the finder off ``sys.meta_path`` (after registering, it has nothing left to do)."""
    with _lock:
        for f in [f for f in sys.meta_path if isinstance(f, _PostImportFinder)]:
            sys.meta_path.remove(f)
