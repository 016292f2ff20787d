"""Old import paths of modules that moved into the concept folders.

``import artemis.export`` (and every ``from artemis.export import ...``) keeps working:
a meta-path finder answers each old name with the module at its new home, the same
module object (so ``mock.patch("artemis.export.x")`` patches the real one), and warns
once per old name with a :class:`DeprecationWarning` that names the new path.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     import artemis.export as old
    >>> import artemis.sparse.checkpoint as new
    >>> old is new
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Optional, Sequence

__all__ = ["MOVED_MODULES", "install"]

#: old dotted path -> new dotted path
MOVED_MODULES: dict[str, str] = {
    "artemis.config": "artemis.core.config",
    "artemis.manager": "artemis.core.manager",
    "artemis.schedule": "artemis.core.schedule",
    "artemis.masks": "artemis.core.masks",
    "artemis.targets": "artemis.core.targets",
    "artemis.registry": "artemis.core.registry",
    "artemis.errors": "artemis.core.errors",
    "artemis.sizing": "artemis.core.sizing",
    "artemis.distributed": "artemis.core.distributed",
    "artemis.owl": "artemis.methods.owl",
    "artemis.reconstruction": "artemis.methods.sparsegpt",
    "artemis.calibration": "artemis.data.calibration",
    "artemis.export": "artemis.sparse.checkpoint",
    "artemis.kernels": "artemis.sparse.kernels",
    "artemis.sparse_inference": "artemis.sparse.inference",
    "artemis.quantization": "artemis.sparse.quantization",
    "artemis.eval_suite": "artemis.evaluation.quality",
    "artemis.evaluate": "artemis.evaluation.quality",
    "artemis.analysis": "artemis.evaluation.analysis",
    "artemis.report": "artemis.evaluation.report",
    "artemis.run_config": "artemis.train.run_config",
    "artemis.integrations": "artemis.train.integrations",
}


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{self.old} moved to {self.new}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # importlib sets __spec__ to the old name's; put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path is already executed; keep its own spec (find_spec and
        reload then see its real name)."""
        module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(fullname, new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (called by ``import artemis``)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
