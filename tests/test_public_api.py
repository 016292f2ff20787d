"""Every exported name imports, and every module's docstring examples run."""

import doctest
import importlib
import pkgutil

import pytest

import artemis


def _modules():
    names = ["artemis"]
    for info in pkgutil.walk_packages(artemis.__path__, "artemis."):
        names.append(info.name)
    return sorted(names)


def test_all_exports_exist():
    for name in _modules():
        mod = importlib.import_module(name)
        exported = getattr(mod, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
        for attr in exported:
            assert hasattr(mod, attr), f"{name}.__all__ names missing {attr!r}"


def test_seed_import_path():
    from artemis.pruning import PruningConfig, PruningManager, create_pruning_manager

    assert artemis.create_pruning_manager is create_pruning_manager
    assert artemis.PruningManager is PruningManager and artemis.PruningConfig is PruningConfig


# Modules that run no docstring example, each with the reason. Every other module must run
# at least one (a module without examples would pass test_doctests vacuously).
NO_EXAMPLE: dict[str, str] = {}  # module -> why it has no example (none at present)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
    if name in NO_EXAMPLE:
        assert result.attempted == 0, f"{name} now runs examples: remove it from NO_EXAMPLE"
    else:
        assert result.attempted > 0, f"{name} runs no docstring example; add one (or list it in NO_EXAMPLE, with why)"


def test_no_example_list_names_real_modules():
    assert set(NO_EXAMPLE) <= set(_modules())
